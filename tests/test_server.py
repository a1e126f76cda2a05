"""The update server (`edgeship serve`): the request handler against a repository directory laid
out by hand, and the MQTT loop against real brokers (Mosquitto, TLS + the shipped ACL, amqtt)
with raw aiomqtt clients playing the devices."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest
from tuf.api.metadata import Metadata, MetaFile, Timestamp  # type: ignore[attr-defined]
from tuf.api.serialization.json import JSONSerializer

from agent.errors import BadData, LinkError, UsageError
from agent.mqtt import BrokerSettings, make_client
from agent.protocol import (
    DEFAULT_BLOCK,
    HINT_TOPIC,
    MAX_BLOCK,
    BlockRequest,
    MetaRequest,
    Reply,
    decode_hint,
    decode_reply,
    encode_request,
    req_topic,
    resp_topic,
)
from packager.repo import timestamp_version
from packager.server import Server, ServerLimits
from packager.server_handler import RequestHandler
from tests.conftest import KeyPair
from tests.mosquitto import Broker, amqtt_broker, broker, free_port, make_pki, start_broker  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "examples" / "mosquitto" / "acl.conf"
FAST = ServerLimits(hint_interval=0.05, resign_interval=0.2, reconnect_min=0.05, reconnect_max=0.3,
                    shutdown_grace=0.5)
WAIT = 5.0
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# A repository directory, by hand (the handler only reads files)


TARGET = "digits/digits-1.0.0.edge"
TARGET_SIZE = 2 * DEFAULT_BLOCK + 12345  # two full blocks and a short last one


def _write_json(path: Path, obj: Any) -> bytes:
    data = json.dumps(obj, sort_keys=True).encode()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # like the repository writer: readers see the old or the new file
    return data


def set_timestamp_version(repo: Path, version: int) -> None:
    """A well-formed (unsigned) TUF timestamp: whoever reads its version for the hint parses it."""
    md = Metadata(Timestamp(version=version, expires=dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc),
                            snapshot_meta=MetaFile(version=3)))
    path = repo / "metadata" / "timestamp.json"
    tmp = path.with_name("timestamp.json.tmp")
    tmp.write_bytes(md.to_bytes(JSONSerializer(compact=True)))
    os.replace(tmp, path)


def make_repo(base: Path) -> tuple[Path, str, bytes]:
    repo = base / "repo"
    meta = repo / "metadata"
    meta.mkdir(parents=True)
    for v in (1, 2):
        _write_json(meta / f"{v}.root.json", {"signed": {"_type": "root", "version": v}, "signatures": []})
    (meta / "root.json").write_bytes((meta / "2.root.json").read_bytes())
    _write_json(meta / "3.snapshot.json", {"signed": {"_type": "snapshot", "version": 3}, "signatures": []})
    _write_json(meta / "5.targets.json", {"signed": {"_type": "targets", "version": 5}, "signatures": []})
    set_timestamp_version(repo, 7)
    content = random.Random(4).randbytes(TARGET_SIZE)
    sha = hashlib.sha256(content).hexdigest()
    (repo / "targets" / "digits").mkdir(parents=True)
    (repo / "targets" / "digits" / f"{sha}.digits-1.0.0.edge").write_bytes(content)
    return repo, f"digits/{sha}.digits-1.0.0.edge", content


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str, bytes]:
    return make_repo(tmp_path)


_ids = iter(range(1, 1 << 30))


def next_id() -> str:
    return f"{next(_ids):08x}{random.getrandbits(32):08x}"


def meta(name: str) -> MetaRequest:
    return MetaRequest(id=next_id(), name=name)


def block(path: str, offset: int, length: int = DEFAULT_BLOCK) -> BlockRequest:
    return BlockRequest(id=next_id(), path=path, offset=offset, length=length)


def ask(handler: RequestHandler, req: MetaRequest | BlockRequest | bytes, device: str = "device-1") -> Reply:
    payload = req if isinstance(req, bytes) else encode_request(req)
    out = handler.handle(device, payload)
    assert out is not None
    reply = decode_reply(out, max_body=8 * 1024 * 1024)
    if not isinstance(req, bytes):
        assert reply.id == req.id
    return reply


def raw(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --------------------------------------------------------------------------------------------
# The handler


def test_meta_ok_and_not_found(repo: tuple[Path, str, bytes]) -> None:
    path, _, _ = repo
    h = RequestHandler(path, ServerLimits())
    for name in ("1.root.json", "2.root.json", "root.json", "timestamp.json", "3.snapshot.json", "5.targets.json"):
        r = ask(h, meta(name))
        assert (r.status, r.body) == ("ok", (path / "metadata" / name).read_bytes())
    r = ask(h, meta("3.root.json"))  # root N+1 does not exist: an explicit answer, not silence
    assert (r.status, r.body, r.message) == ("not_found", b"", "no such metadata: 3.root.json")
    assert h.stats.total(op="meta", status="ok") == 6
    assert h.stats.total(op="meta", status="not_found") == 1
    assert h.stats.bytes_served == sum(len((path / "metadata" / n).read_bytes()) for n in
                                       ("1.root.json", "2.root.json", "root.json", "timestamp.json",
                                        "3.snapshot.json", "5.targets.json"))


def test_blocks_cover_the_file_and_the_last_is_short(repo: tuple[Path, str, bytes]) -> None:
    path, target, content = repo
    h = RequestHandler(path, ServerLimits())
    got = b""
    for offset in range(0, TARGET_SIZE, DEFAULT_BLOCK):
        r = ask(h, block(target, offset))
        assert (r.status, r.offset, r.total) == ("ok", offset, TARGET_SIZE)
        got += r.body
    assert got == content
    assert len(r.body) == 12345  # the last block is clipped to the end of the file
    r = ask(h, block(target, 100, 1))
    assert r.body == content[100:101]
    r = ask(h, block(target, TARGET_SIZE - 1, MAX_BLOCK))
    assert (r.body, r.total) == (content[-1:], TARGET_SIZE)
    assert h.stats.total(op="block", status="ok") == 5
    assert h.stats.bytes_served == TARGET_SIZE + 2


def test_block_offset_past_end_and_oversized_length(repo: tuple[Path, str, bytes]) -> None:
    path, target, _ = repo
    h = RequestHandler(path, ServerLimits(max_block=64 * 1024))
    for offset in (TARGET_SIZE, TARGET_SIZE + 1, 1 << 40):
        r = ask(h, block(target, offset, 1024))
        assert r.status == "bad_request" and "past the end" in r.message and r.body == b""
    r = ask(h, block(target, 0, 64 * 1024 + 1))  # over this server's --block-limit
    assert r.status == "bad_request" and "limit" in r.message
    assert ask(h, block(target, 0, 64 * 1024)).status == "ok"
    # over the protocol's 1 MiB: refused by the decoder, still answered (the id is usable)
    rid = next_id()
    r = ask(h, raw(v=1, id=rid, op="block", path=target, offset=0, length=MAX_BLOCK + 1))
    assert (r.id, r.status) == (rid, "bad_request")
    r = ask(h, raw(v=1, id=rid, op="block", path=target, offset=-1, length=10))
    assert r.status == "bad_request"
    assert ask(h, block("digits/nope.edge", 0, 16)).status == "not_found"
    assert h.stats.total(status="bad_request") == 6


@pytest.mark.parametrize("bad_path", [
    "../metadata/root.json", "digits/../../etc/passwd", "/etc/passwd", "digits//x.edge", "./digits/x",
    "a/b/c/d/e", "digits/x\x00.edge", "", "digits/", "..", "C:\\x",
])
def test_target_paths_that_escape_are_bad_requests(repo: tuple[Path, str, bytes], bad_path: str) -> None:
    path, _, _ = repo
    h = RequestHandler(path, ServerLimits())
    r = ask(h, raw(v=1, id=next_id(), op="block", path=bad_path, offset=0, length=16))
    assert r.status == "bad_request" and r.body == b"" and "\n" not in r.message


@pytest.mark.parametrize("bad_name", ["../repo.json", "/etc/passwd", "0.root.json", "root.json.bak",
                                      "keys/online/timestamp.key", "mirrors.json", "1.timestamp.json/.."])
def test_meta_names_are_checked(repo: tuple[Path, str, bytes], bad_name: str) -> None:
    path, _, _ = repo
    r = ask(RequestHandler(path, ServerLimits()), raw(v=1, id=next_id(), op="meta", name=bad_name))
    assert r.status == "bad_request"


def test_symlinks_and_special_files_are_never_served(repo: tuple[Path, str, bytes], tmp_path: Path) -> None:
    path, target, content = repo
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    targets, metadata = path / "targets", path / "metadata"
    (targets / "digits" / "link.edge").symlink_to(secret)  # a file link
    (targets / "digits" / "inside.edge").symlink_to(targets / target)  # even one pointing inside
    (targets / "outside").symlink_to(tmp_path)  # a directory link
    (metadata / "9.root.json").symlink_to(secret)
    os.mkfifo(targets / "digits" / "fifo.edge")  # opening it must not block
    (targets / "digits" / "dir.edge").mkdir()
    h = RequestHandler(path, ServerLimits())
    for p in ("digits/link.edge", "digits/inside.edge", "outside/secret.json", "digits/fifo.edge",
              "digits/dir.edge", f"{target}/x"):
        r = ask(h, block(p, 0, 16))
        assert (r.status, r.body) == ("not_found", b""), p
    assert ask(h, meta("9.root.json")).status == "not_found"
    assert ask(h, block(target, 0, 16)).body == content[:16]  # the real file is still served


def test_oversized_metadata_is_an_error_not_a_partial_file(repo: tuple[Path, str, bytes]) -> None:
    path, _, _ = repo
    (path / "metadata" / "6.targets.json").write_bytes(b"{" + b" " * 5000 + b"}")
    r = ask(RequestHandler(path, ServerLimits(max_meta_bytes=4096)), meta("6.targets.json"))
    assert (r.status, r.body) == ("error", b"")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_internal_error(repo: tuple[Path, str, bytes]) -> None:
    path, target, _ = repo
    (path / "targets" / target).chmod(0)
    r = ask(RequestHandler(path, ServerLimits()), block(target, 0, 16))
    assert r.status == "error" and "could not read" in r.message


def test_missing_directories_are_not_found(tmp_path: Path) -> None:
    h = RequestHandler(tmp_path, ServerLimits())
    assert ask(h, meta("root.json")).status == "not_found"
    assert ask(h, block("digits/x.edge", 0, 1)).status == "not_found"


def test_malformed_requests(repo: tuple[Path, str, bytes]) -> None:
    path, target, _ = repo
    h = RequestHandler(path, ServerLimits())
    rid = next_id()
    # no usable id: no reply at all
    for payload in (b"", b"\xff\xfe", b"[]", b"null", b'{"v":1}', raw(v=1, id="XYZ", op="meta", name="root.json"),
                    raw(v=1, id=7, op="meta", name="root.json"), b"{" * 5000,
                    raw(v=1, id=rid, op="meta", name="root.json", pad="x" * 2000),  # over the size cap
                    b'{"v":1,"v":1,"id":"%s","op":"meta","name":"root.json"}' % rid.encode()):  # ambiguous
        assert h.handle("device-1", payload) is None, payload[:40]
    assert h.stats.dropped == 10
    # a usable id: an explicit bad_request with a one-line message
    counts = {"meta": 0, "block": 0, "invalid": 0}
    for payload, op in (
        (raw(v=2, id=rid, op="meta", name="root.json"), "meta"),  # a future protocol version
        (raw(v=1, id=rid, op="list"), "invalid"),
        (raw(v=1, id=rid), "invalid"),
        (raw(v=1, id=rid, op="meta", name="root.json", device="device-2"), "meta"),  # no identity in payloads
        (raw(v=1, id=rid, op="block", path=target, offset="0", length=16), "block"),
        (raw(v=1, id=rid, op="block", path=target, offset=0.0, length=16), "block"),
        (raw(v=1, id=rid, op="block", path=target, offset=True, length=16), "block"),
    ):
        r = ask(h, payload)
        assert (r.id, r.status, r.body) == (rid, "bad_request", b"")
        assert r.message and "\n" not in r.message
        counts[op] += 1
    assert {op: h.stats.total(op=op, status="bad_request") for op in counts} == counts
    # an invalid or reserved device id (from the topic) cannot be answered
    good = encode_request(meta("root.json"))
    for device in ("edgeship-server", "edgeship-fleet", "a/b", "+", "", "x" * 65):
        assert h.handle(device, good) is None
    assert h.stats.dropped == 16


def test_limits_validate_themselves() -> None:
    for bad in ({"max_block": 0}, {"max_block": MAX_BLOCK + 1}, {"max_concurrent": 0},
                {"hint_interval": 0}, {"reconnect_min": 2, "reconnect_max": 1}):
        with pytest.raises(ValueError):
            ServerLimits(**bad)


def test_read_timestamp_version(repo: tuple[Path, str, bytes]) -> None:
    """The hint's version comes from the repository's own reader: bounded, strict, never trusted."""
    path, _, _ = repo
    assert timestamp_version(path) == 7
    set_timestamp_version(path, 8)
    assert timestamp_version(path) == 8
    for broken in (b"{not json", b'{"signed": {"version": "8"}}', b'{"signed": {"version": 0}}', b"[]",
                   b'{"signed": {"version": 9}, "pad": "' + b"x" * (1 << 20) + b'"}'):
        (path / "metadata" / "timestamp.json").write_bytes(broken)
        with pytest.raises(BadData):
            timestamp_version(path)
    (path / "metadata" / "timestamp.json").unlink()
    with pytest.raises(UsageError, match="not found"):
        timestamp_version(path)


# --------------------------------------------------------------------------------------------
# Devices and servers on a real broker


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def settings_for(b: Broker, name: str | None = None) -> BrokerSettings:
    if b.tls is None:
        return BrokerSettings(host=b.host, port=b.port)
    assert name is not None
    c = b.tls.client(name)
    return BrokerSettings(host=b.host, port=b.port, tls=True, ca=b.tls.ca_cert, cert=c.cert, key=c.key)


class Device:
    """A device as raw MQTT: requests on its own req topic, replies matched by id."""

    def __init__(self, client: aiomqtt.Client, name: str) -> None:
        self.client, self.name = client, name
        self.pending: dict[str, asyncio.Future[Reply]] = {}
        self.topics: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.subscribe(resp_topic(self.name), qos=1)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for m in self.client.messages:
            self.topics.add(str(m.topic))
            assert isinstance(m.payload, bytes)
            reply = decode_reply(m.payload)
            fut = self.pending.pop(reply.id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def request(self, req: MetaRequest | BlockRequest, *, timeout: float = WAIT, retries: int = 0) -> Reply:
        for attempt in range(retries + 1):
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self.pending[req.id] = fut
            await self.client.publish(req_topic(self.name), encode_request(req), qos=1)
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                self.pending.pop(req.id, None)
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")

    async def fetch(self, path: str, size: int, *, block_size: int = DEFAULT_BLOCK) -> bytes:
        """All blocks in flight at once, as a device with a window would."""
        replies = await asyncio.gather(*(self.request(block(path, o, block_size)) for o in range(0, size, block_size)))
        assert all(r.status == "ok" and r.total == size for r in replies), [r.message for r in replies]
        return b"".join(r.body for r in replies)


@contextlib.asynccontextmanager
async def device(settings: BrokerSettings, name: str, *, protocol: str = "5") -> AsyncIterator[Device]:
    client = make_client(settings, identifier=f"{name}-test", protocol=protocol)  # type: ignore[arg-type]
    async with client:
        d = Device(client, name)
        await d.start()
        try:
            yield d
        finally:
            assert d.task is not None
            d.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await d.task


@contextlib.asynccontextmanager
async def server(repo_dir: Path, settings: BrokerSettings, *, protocol: str = "auto",
                 limits: ServerLimits = FAST) -> AsyncIterator[tuple[Server, asyncio.Event]]:
    srv = Server(repo_dir, settings, protocol=protocol, limits=limits)  # type: ignore[arg-type]
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(srv.run(stop=stop, ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raises what stopped it
    assert ready.is_set(), "server not ready in time"
    try:
        yield srv, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def next_hint(client: aiomqtt.Client, timeout: float = WAIT) -> tuple[int, bool]:
    async def first() -> tuple[int, bool]:
        async for m in client.messages:
            if str(m.topic) == HINT_TOPIC:
                assert isinstance(m.payload, bytes)
                return decode_hint(m.payload).timestamp_version, bool(m.retain)
        raise AssertionError("disconnected")
    return await asyncio.wait_for(first(), timeout)


def test_end_to_end_meta_and_blocks_reach_only_the_asking_device(
        broker: Broker, repo: tuple[Path, str, bytes]) -> None:  # noqa: F811
    path, target, content = repo

    (path / "metadata" / "6.targets.json").write_bytes(b"{" + b" " * (3 * 1024 * 1024) + b"}")

    async def main() -> None:
        # a retained request left on the broker: its device is long gone, the server ignores it
        async with make_client(settings_for(broker), identifier="old") as old:
            await old.publish(req_topic("device-3"), encode_request(meta("root.json")), qos=1, retain=True)
        async with server(path, settings_for(broker)) as (srv, _), \
                device(settings_for(broker), "device-1") as d1, \
                device(settings_for(broker), "device-2") as d2:
            assert srv.protocol_in_use == "5"
            spy = make_client(settings_for(broker), identifier="spy")
            async with spy:
                await spy.subscribe("edgeship/v1/resp/#")
                r = await d1.request(meta("timestamp.json"))
                assert (r.status, r.body) == ("ok", (path / "metadata" / "timestamp.json").read_bytes())
                r = await d1.request(meta("3.root.json"))
                assert r.status == "not_found"
                assert await d1.fetch(target, TARGET_SIZE) == content
                assert await d2.fetch(target, TARGET_SIZE, block_size=MAX_BLOCK) == content
                # over the broker's max_packet_size as one reply: refused, not sent (which would
                # get the server disconnected)
                assert (await d1.request(meta("6.targets.json"))).status == "error"
                # the payload cannot name another device: the reply goes to the topic's device
                assert (await d1.request(meta("root.json"))).status == "ok"
                await d1.client.publish(req_topic("device-1"),
                                        raw(v=1, id=next_id(), op="meta", name="root.json", device="device-2"), qos=1)
                await asyncio.sleep(0.2)
                seen = set()
                while len(spy.messages):
                    seen.add(str((await spy.messages.__anext__()).topic))
            assert seen == {resp_topic("device-1"), resp_topic("device-2")}
            assert d1.topics == {resp_topic("device-1")} and d2.topics == {resp_topic("device-2")}
            assert srv.stats.total(op="block", status="ok") == 3 + 1
            assert srv.stats.total(op="meta", status="bad_request") == 1
            assert srv.stats.reply_failures == 0 and srv.stats.reconnects == 0
            assert srv.stats.dropped == 1  # the retained request

    run(main())


def test_hint_is_retained_and_follows_the_timestamp(broker: Broker, repo: tuple[Path, str, bytes]) -> None:  # noqa: F811
    path, _, _ = repo

    async def main() -> None:
        async with server(path, settings_for(broker)) as (srv, _):
            async with make_client(settings_for(broker), identifier="hint-1") as c:
                await c.subscribe(HINT_TOPIC, qos=1)
                assert await next_hint(c) == (7, True)  # retained, published at start
                set_timestamp_version(path, 8)
                assert await next_hint(c) == (8, False)  # live update within a poll interval
                (path / "metadata" / "timestamp.json").write_text("{not json")  # a broken write: no hint
                await asyncio.sleep(0.2)
                set_timestamp_version(path, 9)
                assert await next_hint(c) == (9, False)
            async with make_client(settings_for(broker), identifier="hint-2", protocol="3.1.1") as c:
                await c.subscribe(HINT_TOPIC, qos=1)
                assert await next_hint(c) == (9, True)  # a late subscriber gets the newest
            assert srv.hint_version == 9 and srv.stats.hints_published == 3

    run(main())


def test_two_servers_share_the_load_and_survive_one_stopping(broker: Broker, repo: tuple[Path, str, bytes]) -> None:  # noqa: F811
    path, target, content = repo
    settings = settings_for(broker)

    async def main() -> None:
        async with server(path, settings) as (a, stop_a), server(path, settings) as (b, _), \
                device(settings_for(broker), "device-1") as d:
            assert a.client_id != b.client_id
            replies = await asyncio.gather(*(d.request(block(target, i * 1000, 1000)) for i in range(40)))
            assert [r.body for r in replies] == [content[i * 1000:(i + 1) * 1000] for i in range(40)]
            assert a.stats.replies_sent > 0 and b.stats.replies_sent > 0
            assert a.stats.replies_sent + b.stats.replies_sent == 40
            # a stream, 8 blocks in flight; server A stops in the middle of a window; the device
            # re-asks for anything lost (A leaves the share group first, so usually nothing is)
            got: list[bytes] = []
            a_after_stop = None
            for w in range(10):
                window = [d.request(block(target, i * 997, 997), timeout=0.5, retries=4)
                          for i in range(w * 8, w * 8 + 8)]
                if w == 3:
                    stop_a.set()
                got += [r.body for r in await asyncio.gather(*window)]
                if w == 5:
                    a_after_stop = a.stats.replies_sent
            assert got == [content[i * 997:(i + 1) * 997] for i in range(80)]
            assert a.stats.replies_sent == a_after_stop  # A answered nothing after it stopped...
            assert b.stats.replies_sent + a.stats.replies_sent >= 120  # ...B answered the rest
            before = b.stats.replies_sent
            assert (await d.request(meta("root.json"))).status == "ok"
            assert b.stats.replies_sent == before + 1

    run(main())


def test_reconnects_after_broker_restart(broker: Broker, repo: tuple[Path, str, bytes]) -> None:  # noqa: F811
    path, _, _ = repo

    async def main() -> None:
        async with server(path, settings_for(broker)) as (srv, _):
            async with device(settings_for(broker), "device-1") as d:
                assert (await d.request(meta("root.json"))).status == "ok"
            await asyncio.to_thread(broker.restart)  # retained hint gone (no persistence)
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    async with make_client(settings_for(broker), identifier="late") as c:
                        await c.subscribe(HINT_TOPIC, qos=1)
                        assert (await next_hint(c, timeout=1.0))[0] == 7  # republished on reconnect
                        break
                except (aiomqtt.MqttError, asyncio.TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            async with make_client(settings_for(broker), identifier="later") as c:
                await c.subscribe(HINT_TOPIC, qos=1)
                assert await next_hint(c) == (7, True)
            async with device(settings_for(broker), "device-1") as d:
                assert (await d.request(meta("root.json"))).status == "ok"
            assert srv.stats.hints_published == 2 and srv.stats.reconnects == 1

    run(main())


def test_resign_failure_is_logged_and_serving_goes_on(broker: Broker, repo: tuple[Path, str, bytes],  # noqa: F811
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path, _, _ = repo
    (path / "keys" / "online").mkdir(parents=True)  # online keys "present", but no repo.json, no keys

    async def main() -> None:
        async with server(path, settings_for(broker)), device(settings_for(broker), "device-1") as d:
            await asyncio.sleep(0.5)  # a few re-sign periods
            assert (await d.request(meta("root.json"))).status == "ok"

    with caplog.at_level("WARNING", logger="packager.server"):
        run(main())
    assert any("re-sign" in r.getMessage() for r in caplog.records), caplog.text


def test_real_repository_is_re_signed_and_its_bundle_served(broker: Broker, tmp_path: Path,  # noqa: F811
                                                            release_key: KeyPair, mlp_bundle: Path) -> None:
    """With packager.repo: a repository whose timestamp expires in 30 minutes is re-signed by the
    server at start (online keys), the hint follows, and a published bundle arrives block by block
    matching the block_sha256 list that the targets metadata signs."""
    from packager.repo import init_repo, publish

    then = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=23, minutes=30)
    path = tmp_path / "real"
    init_repo(path, release_keys=[release_key.public], now=then)
    pub = publish(path, mlp_bundle, now=then)
    v0 = timestamp_version(path)
    assert v0 == pub.timestamp_version

    async def main() -> None:
        async with server(path, settings_for(broker)) as (srv, _), \
                device(settings_for(broker), "device-1") as d:
            async with make_client(settings_for(broker), identifier="hint") as c:
                await c.subscribe(HINT_TOPIC, qos=1)
                while (await next_hint(c))[0] != v0 + 1:
                    pass
            assert srv.stats.resigns == 1
            ts = json.loads(bytes((await d.request(meta("timestamp.json"))).body))
            assert ts["signed"]["version"] == v0 + 1
            expires = dt.datetime.fromisoformat(ts["signed"]["expires"].replace("Z", "+00:00"))
            assert expires > dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=23)
            targets = json.loads(bytes((await d.request(meta(f"{pub.targets_version}.targets.json"))).body))
            custom = targets["signed"]["targets"][pub.target_path]["custom"]["edgeship"]
            stored = f"{pub.target_path.rpartition('/')[0]}/{pub.sha256}.{pub.target_path.rpartition('/')[2]}"
            bs = custom["block_size"]
            for i, digest in enumerate(custom["block_sha256"]):
                r = await d.request(block(stored, i * bs, bs))
                assert (r.status, r.total) == ("ok", pub.length)
                assert hashlib.sha256(r.body).hexdigest() == digest
            assert i * bs + len(r.body) == pub.length

    run(main())


def test_unreachable_broker_at_start_is_a_link_error(repo: tuple[Path, str, bytes]) -> None:
    path, _, _ = repo
    with pytest.raises(LinkError, match="cannot connect to broker mqtt://127.0.0.1"):
        run(Server(path, BrokerSettings(host="127.0.0.1", port=free_port()), limits=FAST).run())
    with pytest.raises(UsageError, match="not found"):
        run(Server(path / "nope", BrokerSettings(host="127.0.0.1", port=1883)).run())


def test_tls_and_the_shipped_acl(tmp_path: Path, repo: tuple[Path, str, bytes]) -> None:
    path, target, content = repo
    pki = make_pki(tmp_path / "pki", devices=["device-1", "device-2"])
    b = start_broker(tmp_path / "mosquitto", tls=pki, acl=ACL)
    try:
        async def main() -> None:
            async with server(path, settings_for(b, "edgeship-server")) as (srv, _), \
                    device(settings_for(b, "device-1"), "device-1") as d1:
                r = await d1.request(meta("root.json"))
                assert r.status == "ok"
                assert await d1.fetch(target, TARGET_SIZE) == content
                async with make_client(settings_for(b, "device-2"), identifier="d2-hint") as c:
                    await c.subscribe(HINT_TOPIC, qos=1)
                    assert await next_hint(c) == (7, True)
                set_timestamp_version(path, 8)
                await asyncio.sleep(0.3)
                assert srv.hint_version == 8
                assert (await d1.request(meta("timestamp.json"))).status == "ok"
                # every publish was allowed: a denied one would have closed the connection
                assert srv.stats.reply_failures == 0
            assert "Bad socket read/write on client edgeship-server" not in b.log_text()
            assert b.log_text().count("as edgeship-server-") == 1  # connected once, never dropped

        run(main())
    finally:
        b.stop()


# --------------------------------------------------------------------------------------------
# amqtt: MQTT 3.1.1 only, so "auto" falls back


@pytest.fixture
def amqtt_port() -> Iterator[int]:
    with amqtt_broker() as url:
        yield int(url.rsplit(":", 1)[1])


def test_amqtt_broker_with_protocol_auto(amqtt_port: int, repo: tuple[Path, str, bytes]) -> None:
    path, target, content = repo
    settings = BrokerSettings(host="127.0.0.1", port=amqtt_port)

    async def main() -> None:
        async with server(path, settings, protocol="auto") as (srv, _), \
                device(settings, "device-1", protocol="3.1.1") as d:
            assert srv.protocol_in_use == "3.1.1"
            assert (await d.request(meta("root.json"))).status == "ok"
            assert (await d.request(meta("4.root.json"))).status == "not_found"
            assert await d.fetch(target, TARGET_SIZE) == content
            async with make_client(settings, identifier="hint", protocol="3.1.1") as c:
                await c.subscribe(HINT_TOPIC, qos=1)
                assert (await next_hint(c))[0] == 7

    run(main())

    with pytest.raises(LinkError, match="Unsupported protocol version"):  # no fallback when 5 is asked for
        run(Server(path, settings, protocol="5", limits=FAST).run())


# --------------------------------------------------------------------------------------------
# The CLI (run as `python -c` with a group holding just `serve`: the lead wires it into cli.py)


CLI = ("import click; from agent.cliutil import run_cli; from packager.serve_cli import serve; "
       "g = click.Group(); g.add_command(serve); run_cli(g, 'edgeship')")


def cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLI, "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def test_cli_errors(tmp_path: Path, repo: tuple[Path, str, bytes]) -> None:
    path, _, _ = repo
    p = cli("--repo", str(tmp_path / "missing"), "--broker", "mqtt://127.0.0.1:1")
    _, err = p.communicate(timeout=20)
    assert p.returncode == 2 and err.strip().splitlines()[-1].startswith("error: repository directory")
    p = cli("--repo", str(path), "--broker", f"mqtt://127.0.0.1:{free_port()}")
    _, err = p.communicate(timeout=20)
    assert p.returncode == 3, err
    assert err.strip().splitlines()[-1].startswith("error: cannot connect to broker mqtt://127.0.0.1:")
    p = cli("--repo", str(path), "--broker", "mqtt://127.0.0.1:1", "--password-env", "EDGESHIP_NO_SUCH_VAR")
    _, err = p.communicate(timeout=20)
    assert p.returncode == 2 and "EDGESHIP_NO_SUCH_VAR" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_exits_0_on_signal(broker: Broker, repo: tuple[Path, str, bytes], sig: int) -> None:  # noqa: F811
    path, _, _ = repo
    p = cli("--repo", str(path), "--broker", broker.url, "--block-limit", "65536")
    try:
        assert p.stderr is not None
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            lines.append(line)
            if "hint: timestamp version 7" in line or not line:
                break
        assert "hint: timestamp version 7" in lines[-1], lines

        async def main() -> None:
            async with device(settings_for(broker), "device-1") as d:
                r = await d.request(block(repo[1], 0, 65536 + 1))
                assert r.status == "bad_request"  # --block-limit applies
        run(main())
        p.send_signal(sig)
        _, err = p.communicate(timeout=10)
        assert p.returncode == 0, err
        assert "server stopped" in err
        assert any("serving" in line for line in lines)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
