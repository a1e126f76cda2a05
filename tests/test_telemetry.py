"""Device-side reporting: the v1 documents, the process sampler, the disk outbox (real files, a real
kill -9) and draining it into a real Mosquitto (broker down first, broker killed mid-drain)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.errors import LinkError, UsageError
from agent.mqtt import make_client, parse_broker_url
from agent.outbox import Outbox, Record, decode_records, encode_record
from agent.protocol import events_topic, telemetry_topic
from agent.telemetry import (
    ModelReport,
    ModelStats,
    ProcessSample,
    ProcessSampler,
    Reporter,
    TelemetryConfig,
    drain,
    encode,
    event_doc,
    presence_doc,
    publish_loop,
    rfc3339,
    state_doc,
    telemetry_doc,
)
from tests.mosquitto import Broker, broker, start_broker  # noqa: F401  (broker: a fixture)

ROOT = Path(__file__).resolve().parent.parent
TOPIC = telemetry_topic("dev1")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


# --- documents ------------------------------------------------------------------


def test_state_document_has_exactly_the_v1_shape() -> None:
    doc = state_doc(
        device="dev1", agent_version="0.1.0", groups=["canary"], runtimes={"onnx": "1.32.0", "tflite": "2.20.0"},
        models={"digits": ModelReport(version="1.1.0", sha256="ab" * 32, runtime="onnx", status="active",
                                      previous="1.0.0", updated="2026-11-27T21:00:00Z")},
        ts="2026-11-27T21:00:00Z")
    assert doc == {
        "v": 1, "device": "dev1", "agent_version": "0.1.0", "groups": ["canary"],
        "runtimes": {"onnx": "1.32.0", "tflite": "2.20.0"}, "ts": "2026-11-27T21:00:00Z",
        "models": {"digits": {"version": "1.1.0", "sha256": "ab" * 32, "runtime": "onnx", "status": "active",
                              "previous": "1.0.0", "staged": None, "last_error": None,
                              "updated": "2026-11-27T21:00:00Z"}}}
    assert json.loads(encode(doc)) == doc
    assert b" " not in encode(doc)  # compact on the wire


def test_state_document_leaves_out_missing_runtimes_and_rejects_unknown_status() -> None:
    doc = state_doc(device="dev1", agent_version="0.1.0", groups=[], runtimes={"onnx": "1.32.0", "tflite": None},
                    models={"digits": ModelReport()})
    assert doc["runtimes"] == {"onnx": "1.32.0"}
    assert doc["models"]["digits"]["status"] == "none" and doc["models"]["digits"]["version"] is None
    assert RFC3339.fullmatch(doc["ts"])
    with pytest.raises(ValueError, match="status"):
        ModelReport(status="installed")  # type: ignore[arg-type]


def test_presence_telemetry_and_event_documents() -> None:
    assert presence_doc(True, device="dev1", ts="2026-11-27T21:00:00Z") == {
        "v": 1, "device": "dev1", "online": True, "ts": "2026-11-27T21:00:00Z"}
    assert presence_doc(False, device="dev1")["online"] is False
    sample = ProcessSample(uptime_s=123.44, cpu_percent=3.21, rss_bytes=41_000_000, disk_free_bytes=123456789)
    tel = telemetry_doc(device="dev1", seq=17, sample=sample, dropped=0, ts="2026-11-27T21:00:00Z",
                        models={"digits": ModelStats(version="1.1.0", inferences=1200, errors=0, p50_ms=0.21,
                                                     p95_ms=0.4, p99_ms=0.9)})
    assert tel == {
        "v": 1, "device": "dev1", "seq": 17, "ts": "2026-11-27T21:00:00Z", "uptime_s": 123.4, "cpu_percent": 3.2,
        "rss_bytes": 41_000_000, "disk_free_bytes": 123456789, "dropped": 0,
        "models": {"digits": {"version": "1.1.0", "inferences": 1200, "errors": 0, "p50_ms": 0.21, "p95_ms": 0.4,
                              "p99_ms": 0.9}}}
    ev = event_doc(device="dev1", seq=18, model="digits", version="1.1.0", step="installed", detail="x" * 900,
                   ts="2026-11-27T21:00:00Z")
    assert set(ev) == {"v", "device", "seq", "ts", "model", "version", "step", "detail"}
    assert ev["step"] == "installed" and len(ev["detail"]) == 500
    with pytest.raises(ValueError, match="step"):
        event_doc(device="dev1", seq=1, model="digits", version=None, step="exploded")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="device id"):
        presence_doc(True, device="dev/1")


def test_rfc3339_is_utc_whole_seconds() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1_795_809_600.9) == "2026-11-27T20:00:00Z"


def test_config_validates_its_limits() -> None:
    assert TelemetryConfig() == TelemetryConfig(interval=30.0, buffer_bytes=1 << 20)
    for bad in ({"interval": 0}, {"buffer_bytes": 100}, {"batch": 0}):
        with pytest.raises(UsageError):
            TelemetryConfig(**bad)  # type: ignore[arg-type]


def test_process_sampler_reads_real_figures(tmp_path: Path) -> None:
    sampler = ProcessSampler(tmp_path)
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    s = sampler.sample()
    assert 20 < s.cpu_percent < 250  # ~100 for one busy core, over the time since creation
    with open("/proc/self/status") as fh:
        vmrss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    assert abs(s.rss_bytes - vmrss) < 16 << 20
    st = os.statvfs(tmp_path)
    assert abs(s.disk_free_bytes - st.f_bavail * st.f_frsize) < 64 << 20
    assert 0.2 <= s.uptime_s < 30
    time.sleep(0.05)
    assert sampler.cpu_percent() < 50  # since the previous sample: idle


# --- the outbox -----------------------------------------------------------------


def payloads(box: Outbox) -> list[bytes]:
    return [r.payload for r in box.peek(1 << 20)]


def test_outbox_keeps_order_and_acks(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob", 1 << 20) as box:
        ids = [box.append(TOPIC, f"m{i}".encode()) for i in range(10)]
        assert ids == list(range(1, 11)) and box.next_id == 11
        assert payloads(box) == [f"m{i}".encode() for i in range(10)]
        assert [r.id for r in box.peek(3)] == [1, 2, 3]
        box.ack([1, 2, 3])
        assert [r.id for r in box.peek(2)] == [4, 5] and box.pending == 7
        box.ack([6, 99])  # out of order, and an unknown id: both fine
        assert [r.id for r in box.peek(10)] == [4, 5, 7, 8, 9, 10]
        assert box.size_bytes == sum(r.size for r in box.peek(10))


def test_outbox_drops_the_oldest_past_its_bound_and_counts_them(tmp_path: Path) -> None:
    record = Record(id=1, topic=TOPIC, payload=b"x" * 100).size
    with Outbox(tmp_path / "ob", 40 * record) as box:
        for i in range(100):
            box.append(TOPIC, b"%03d" % i + b"x" * 97)
        assert box.pending == 40 and box.dropped == 60 and box.size_bytes == 40 * record
        assert [p[:3] for p in payloads(box)] == [b"%03d" % i for i in range(60, 100)]
        # a record bigger than the whole bound is dropped itself
        rid = box.append(TOPIC, b"y" * (50 * record))
        assert box.dropped == 61 and box.pending == 40 and rid == 101
    segments = list((tmp_path / "ob").glob("*.seg"))
    assert sum(p.stat().st_size for p in segments) <= 40 * record + box.segment_bytes + record


def test_outbox_persists_across_reopen(tmp_path: Path) -> None:
    record = Record(id=1, topic=TOPIC, payload=b"x" * 1000).size
    with Outbox(tmp_path / "ob", 10 * record) as box:
        for i in range(15):
            box.append(TOPIC, b"%03d" % i + b"x" * 997)
        box.ack([6, 7])
    with Outbox(tmp_path / "ob", 10 * record) as box:
        assert box.dropped == 5 and box.pending == 8 and box.next_id == 16
        assert [r.id for r in box.peek(100)] == [8, 9, 10, 11, 12, 13, 14, 15]
        box.ack([r.id for r in box.peek(100)])
    with Outbox(tmp_path / "ob", 10 * record) as box:
        assert box.pending == 0 and box.dropped == 5 and box.next_id == 16  # ids keep growing
        assert list((tmp_path / "ob").glob("*.seg")) == []  # fully acked segments are gone
    with Outbox(tmp_path / "ob", 10 * record) as box:  # reopened with records, then a lower bound
        for _ in range(10):
            box.append(TOPIC, b"x" * 1000)
    with Outbox(tmp_path / "ob", 4 * record + 10) as box:
        assert box.pending == 4 and box.dropped == 11 and [r.id for r in box.peek(9)] == [22, 23, 24, 25]


def test_outbox_is_locked_to_one_process(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob", 1 << 20):
        with pytest.raises(UsageError, match="in use"):
            Outbox(tmp_path / "ob", 1 << 20)
    Outbox(tmp_path / "ob", 1 << 20).close()


@pytest.mark.parametrize("damage", ["cut-in-payload", "cut-in-header", "garbage-tail", "bit-flip-in-last"])
def test_outbox_tolerates_a_torn_last_record(tmp_path: Path, damage: str) -> None:
    with Outbox(tmp_path / "ob", 1 << 20) as box:
        for i in range(20):
            box.append(TOPIC, b"record %d" % i)
    [seg] = list((tmp_path / "ob").glob("*.seg"))
    data = seg.read_bytes()
    last = len(encode_record(Record(id=20, topic=TOPIC, payload=b"record 19")))
    if damage == "cut-in-payload":
        data = data[:-3]
    elif damage == "cut-in-header":
        data = data[:-last + 5]
    elif damage == "garbage-tail":
        data += b"\x00" * 7 + os.urandom(50)
    else:
        data = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
    seg.write_bytes(data)
    keep = 20 if damage == "garbage-tail" else 19
    with Outbox(tmp_path / "ob", 1 << 20) as box:
        assert [r.payload for r in box.peek(100)] == [b"record %d" % i for i in range(keep)]
        assert box.append(TOPIC, b"after the tear") == keep + 1
    with Outbox(tmp_path / "ob", 1 << 20) as box:  # the tear was cut away, the new record follows
        assert payloads(box)[-2:] == [b"record %d" % (keep - 1), b"after the tear"]


def test_decode_records_refuses_ids_that_do_not_grow() -> None:
    data = b"".join(encode_record(Record(id=i, topic=TOPIC, payload=b"p")) for i in (1, 2, 2, 3))
    records, valid = decode_records(data)
    assert [r.id for r in records] == [1, 2] and valid < len(data)


WRITER = r"""
import sys
from pathlib import Path
from agent.outbox import Outbox
box = Outbox(Path(sys.argv[1]), 1 << 30, sync_interval=3600)
i = 0
while True:
    rid = box.append("edgeship/v1/telemetry/dev1", b"%08d" % i + b"z" * (i % 3000))
    sys.stdout.write(f"{rid}\n")
    sys.stdout.flush()
    i += 1
"""


def test_outbox_survives_kill_9_of_a_writer_mid_append(tmp_path: Path) -> None:
    directory = tmp_path / "ob"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    confirmed = 0
    while confirmed < 3000:
        confirmed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)  # while it keeps appending
    proc.wait(timeout=10)
    confirmed = max([confirmed, *(int(line) for line in proc.stdout.read().split())])
    proc.stdout.close()
    with Outbox(directory, 1 << 30) as box:
        ids = [r.id for r in box.peek(1 << 30)]
        # every append that returned is there, in order, with no gap; at most one more
        assert ids == list(range(1, len(ids) + 1)) and confirmed <= len(ids) <= confirmed + 1
        assert all(r.payload.startswith(b"%08d" % (r.id - 1)) for r in box.peek(1 << 30))
        assert box.append(TOPIC, b"next") == len(ids) + 1


ACKER = r"""
import sys, time
from pathlib import Path
from agent.outbox import Outbox
box = Outbox(Path(sys.argv[1]), 1 << 20, sync_interval=3600, meta_interval=3600)
for i in range(100):
    box.append("edgeship/v1/events/dev1", b"%d" % i)
box.ack([r.id for r in box.peek(60)])
box.flush()  # what drain() does when it stops
box.ack([61, 62])  # acked, but not flushed yet
print("done", flush=True)
time.sleep(60)
"""


def test_acks_flushed_before_a_kill_9_stay_acked(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", ACKER, str(tmp_path / "ob")], stdout=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"done"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    with Outbox(tmp_path / "ob", 1 << 20) as box:
        # 61 and 62 come back (at least once); nothing before them does
        assert [r.id for r in box.peek(100)] == list(range(61, 101)) and box.next_id == 101


# --- the reporter ---------------------------------------------------------------


def test_reporter_numbers_events_and_telemetry_with_one_sequence(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob", 1 << 20) as box:
        rep = Reporter(device="dev1", outbox=box, sampler=ProcessSampler(tmp_path))
        assert rep.event(model="digits", version="1.1.0", step="downloading") == 1
        assert rep.telemetry({"digits": ModelStats(version="1.1.0", inferences=3)}) == 2
        assert rep.wake.is_set()
        recs = box.peek(10)
        assert [r.topic for r in recs] == [events_topic("dev1"), telemetry_topic("dev1")]
        assert [json.loads(r.payload)["seq"] for r in recs] == [1, 2]
        assert json.loads(recs[1].payload)["models"]["digits"]["inferences"] == 3
    with Outbox(tmp_path / "ob", 1 << 20) as box:
        rep = Reporter(device="dev1", outbox=box, sampler=ProcessSampler(tmp_path))
        assert rep.event(model="digits", version="1.1.0", step="staged") == 3  # after a restart too


# --- draining into a real Mosquitto ---------------------------------------------


class Subscriber:
    """Collects (topic, payload) from a real broker in arrival order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(self.got) >= n, f"got {len(self.got)} of {n}"


@asynccontextmanager
async def subscribed(broker: Broker, topic_filter: str) -> AsyncIterator[Subscriber]:
    sub = Subscriber()
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"sub-{os.getpid()}",
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.subscribe(topic_filter, qos=1)

        async def read() -> None:
            async for m in client.messages:
                sub.got.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]

        task = asyncio.ensure_future(read())
        try:
            yield sub
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def device_client(broker: Broker) -> AsyncIterator[Any]:
    client = make_client(parse_broker_url(broker.url), identifier="dev1", protocol="3.1.1")
    async with client:
        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1, timeout=2)

        yield publish


def seqs(got: list[tuple[str, bytes]]) -> list[int]:
    return [json.loads(p)["seq"] for _, p in got]


def test_drain_delivers_in_order_once_the_broker_is_up(tmp_path: Path) -> None:
    """Offline first: the broker does not even exist while the device produces."""
    box = Outbox(tmp_path / "ob", 1 << 20)
    rep = Reporter(device="dev1", outbox=box, sampler=ProcessSampler(tmp_path))
    n = 500
    for i in range(n):
        if i % 5 == 0:
            rep.telemetry({"digits": ModelStats(version="1.0.0", inferences=i)})
        else:
            rep.event(model="digits", version="1.0.0", step="downloading", detail=f"offline {i}")
    box.close()

    broker = start_broker(tmp_path / "mosquitto")
    try:
        async def main() -> None:
            box2 = Outbox(tmp_path / "ob", 1 << 20)  # the agent restarted meanwhile
            async with subscribed(broker, "edgeship/v1/+/dev1") as sub, device_client(broker) as publish:
                t = time.monotonic()
                result = await drain(box2, publish, batch=32, link_errors=(aiomqtt.MqttError,))
                elapsed = time.monotonic() - t
                await sub.wait_for(n)
            print(f"\ndrained {n} records into Mosquitto in {elapsed:.3f} s ({n / elapsed:.0f}/s)")
            assert result.sent == n and result.pending == 0 and result.error is None
            assert seqs(sub.got) == list(range(1, n + 1))
            assert [t for t, _ in sub.got[:2]] == [telemetry_topic("dev1"), events_topic("dev1")]
            assert box2.pending == 0
            box2.close()

        asyncio.run(main())
    finally:
        broker.stop()


def test_drain_over_the_bound_delivers_the_newest_and_reports_the_drops(tmp_path: Path, broker: Broker) -> None:
    box = Outbox(tmp_path / "ob", 16 * 1024)
    rep = Reporter(device="dev1", outbox=box, sampler=ProcessSampler(tmp_path))
    for i in range(300):
        rep.event(model="digits", version="1.0.0", step="error", detail=f"while offline {i}")
    dropped = box.dropped
    assert dropped > 0 and box.pending + dropped == 300
    last = rep.telemetry({})  # telemetry reports what was lost

    async def main() -> None:
        async with subscribed(broker, "edgeship/v1/+/dev1") as sub, device_client(broker) as publish:
            result = await drain(box, publish, link_errors=(aiomqtt.MqttError,))
            await sub.wait_for(result.sent)
        got = seqs(sub.got)
        assert got == list(range(last - len(got) + 1, last + 1))  # the newest, in order, no gap
        assert got[0] > dropped  # the oldest were dropped
        tel = json.loads(sub.got[-1][1])
        # counted when the document was built: its own append may drop one more
        assert tel["seq"] == last and dropped <= tel["dropped"] <= box.dropped <= tel["dropped"] + 1

    asyncio.run(main())
    box.close()


def test_drain_stops_when_the_broker_dies_and_resumes_after_restart(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "mosquitto")
    box = Outbox(tmp_path / "ob", 1 << 20)
    n = 2000
    for i in range(n):
        box.append(events_topic("dev1"), json.dumps({"seq": i + 1}).encode())
    try:
        async def first() -> tuple[list[int], int]:
            async with subscribed(broker, "edgeship/v1/+/dev1") as sub:
                client = make_client(parse_broker_url(broker.url), identifier="dev1", protocol="3.1.1")
                count = 0

                async def publish(topic: str, payload: bytes) -> None:
                    nonlocal count
                    count += 1
                    if count == 700:
                        broker.kill()  # the link dies with ~32 publishes in flight
                    await client.publish(topic, payload, qos=1, timeout=2)

                try:
                    async with client:
                        result = await drain(box, publish, link_errors=(aiomqtt.MqttError,))
                except aiomqtt.MqttError:
                    pass  # leaving the context of a dead connection
                return seqs(sub.got), result.sent

        seen, sent = asyncio.run(first())
        assert 600 <= sent < 700 and box.pending == n - sent
        # the killed broker had not forwarded everything it acknowledged: what came is an in-order prefix
        assert seen == list(range(1, len(seen) + 1)) and seen

        broker.restart()

        async def second() -> list[int]:
            async with subscribed(broker, "edgeship/v1/+/dev1") as sub, device_client(broker) as publish:
                result = await drain(box, publish, link_errors=(aiomqtt.MqttError,))
                assert result.error is None and result.sent == n - sent
                await sub.wait_for(result.sent)
                return seqs(sub.got)

        rest = asyncio.run(second())
        assert rest == list(range(sent + 1, n + 1))  # the first unacknowledged onwards, in order
    finally:
        box.close()
        broker.stop()


def test_publish_loop_drains_on_wake_and_raises_a_link_error(tmp_path: Path, broker: Broker) -> None:
    box = Outbox(tmp_path / "ob", 1 << 20)
    rep = Reporter(device="dev1", outbox=box, sampler=ProcessSampler(tmp_path))

    async def main() -> None:
        async with subscribed(broker, "edgeship/v1/+/dev1") as sub, device_client(broker) as publish:
            loop_task = asyncio.ensure_future(publish_loop(box, publish, rep.wake,
                                                           link_errors=(aiomqtt.MqttError,)))
            for i in range(5):
                rep.event(model="digits", version="1.0.0", step="refreshed")
                await sub.wait_for(i + 1)
            assert box.pending == 0 and seqs(sub.got) == [1, 2, 3, 4, 5]

            async def failing(topic: str, payload: bytes) -> None:
                raise LinkError("link lost")

            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            rep.event(model="digits", version="1.0.0", step="refreshed")
            with pytest.raises(LinkError, match="link lost"):
                await publish_loop(box, failing, rep.wake)
            assert box.pending == 1

    asyncio.run(main())
    box.close()

