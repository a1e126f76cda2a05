"""The update channel under failure, against real Mosquitto (or amqtt) and real processes.

* the broker restarts mid-download: the agent reconnects and resumes, re-fetching no recorded block;
* the agent is SIGKILLed mid-download: the restarted agent resumes from ``downloads/<sha>.record.json``;
* one of two ``edgeship serve`` processes (MQTT 5 shared subscription) dies mid-download: the other
  answers the retries;
* amqtt (MQTT 3.1.1 only): the server falls back from MQTT 5 and a device follows two releases;
* root rotation: a device bootstrapped with ``1.root.json`` walks to root v3, and refuses a root v4 that
  only a new key signed (``MetadataSignatureError``), its trusted state untouched.

Two tests guard bugs found here and fixed in agent/download.py: a broker loss mid-download left a task
whose exception nobody retrieved, and the record written in a thread could forget blocks fetched while
it was being written, so they were fetched again after the next interruption.

Downloads are made slow on purpose where a test must act in the middle of one: :class:`EvilServer`
(the real request handler) waits ``delay`` seconds before each block reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from agent.daemon import Agent
from agent.download import DownloadStats
from agent.errors import MetadataSignatureError
from agent.mqtt import make_client, parse_broker_url
from agent.protocol import BlockRequest, ProtocolError, decode_request, req_topic
from packager.repo import BLOCK_SIZE, publish, rotate
from tests.conftest import KeyPair, build
from tests.modelfactory import onnx_mlp
from tests.mosquitto import Broker, amqtt_broker, broker, free_port, stop_process  # noqa: F401 - fixture
from tests.slowlink import slow_link
from tests.updatechannel import (FAST_SERVER, EvilServer, agent_config, make_repo, now, running_agent,
                                 running_server, trusted_snapshot, wait_for)

BIN = Path(sys.executable).parent
AGENT = Path(__file__).resolve().parent.parent / "agent"
SLOW_LINK: dict[str, float] = {"request_timeout": 2, "request_retries": 5, "blocks_in_flight": 4,
                               "request_bytes": BLOCK_SIZE, "record_flush_interval": 0.05}
"""Agent limits for the tests that act mid-download: with EvilServer's ``delay`` the bundle's 29 blocks
arrive 4 at a time over ~2 s, one block per request (so requests count blocks), and the record is
flushed as they come."""


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory, release_key: KeyPair) -> Path:
    """A bundle of ~7 MiB (random float weights barely compress): 28 blocks of the repository's 256 KiB."""
    out = tmp_path_factory.mktemp("big-bundle")
    model = onnx_mlp(out / "big.onnx", in_features=768, hidden=2560, classes=4, seed=7)
    path = build(model, release_key, out / "big-1.0.0.edge", name="big", version="1.0.0").path
    assert path.stat().st_size > 20 * BLOCK_SIZE
    return path


@pytest.fixture(scope="module")
def small_bundles(tmp_path_factory: pytest.TempPathFactory, mlp_onnx: Path, release_key: KeyPair) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("small-bundles")
    return {v: build(mlp_onnx, release_key, out / f"mlp-{v}.edge", version=v).path for v in ("1.0.0", "1.1.0", "1.2.0")}


def anchor(repo: Path) -> Path:
    return repo / "metadata" / "1.root.json"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_blocks(state: Path, sha: str) -> set[int]:
    """The block indexes ``downloads/<sha>.record.json`` vouches for (empty if absent)."""
    try:
        obj = json.loads((state / "downloads" / f"{sha}.record.json").read_bytes())
    except (FileNotFoundError, ValueError):  # absent, or (never, the write is atomic) torn
        return set()
    return set(obj["done"])


def held(state: Path, model: str) -> tuple[str, str] | None:
    """(version, sha256) of the release the device holds for ``model``: staged, else active.

    ``models/<model>.json`` is read directly: agent.store.Store() would sweep a running agent's temp files."""
    try:
        obj = json.loads((state / "models" / f"{model}.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    h = obj.get("staged") or obj.get("active")
    return None if h is None else (str(h["version"]), str(h["sha256"]))


def held_version(state: Path, model: str) -> str | None:
    h = held(state, model)
    return None if h is None else h[0]


class StagedBundles(list):  # type: ignore[type-arg]
    """An event list for running_agent() that also keeps the bytes of each bundle at the moment it is staged
    (``bundles/<sha256>.edge``; installing it may remove that file soon after)."""

    def __init__(self, state: Path) -> None:
        super().__init__()
        self.state = state
        self.files: dict[str, bytes] = {}

    def append(self, event: dict[str, Any]) -> None:
        super().append(event)
        if event.get("step") == "staged":
            self.files[event["version"]] = (self.state / "bundles" / f"{event['sha256']}.edge").read_bytes()


def offsets(blocks: set[int]) -> set[int]:
    return {i * BLOCK_SIZE for i in blocks}


def cli(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -c`` on its main()."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"from {module} import main; main()"]


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def bundle_block_offsets(ev: EvilServer, device: str, bundle: Path, start: int = 0) -> list[int]:
    """Offsets of the block requests ``device`` made for this bundle (EvilServer.block_offsets() counts every
    path: the release keys are fetched at offset 0 too)."""
    suffix = "." + bundle.name
    return [r.offset for d, r in ev.requests[start:]
            if d == device and isinstance(r, BlockRequest) and r.path.endswith(suffix)]


class TaskWatch:
    """Keeps every task the event loop creates, to find those that ended with an exception nobody retrieved.

    asyncio reports such a task ("Task exception was never retrieved") only when the garbage collector
    finalizes it, at an unpredictable later moment; on CPython 3.11 the report formats a traceback with
    ast.parse, and inside another ast.parse (pytest rewriting or reporting a later test) that one fails with
    "SystemError: AST constructor recursion depth mismatch". Holding the tasks makes the check deterministic;
    :meth:`settle` then marks them all retrieved so nothing is reported later.
    """

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def install(self) -> None:
        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kw)
            self.tasks.append(task)
            return task

        asyncio.get_running_loop().set_task_factory(factory)  # type: ignore[arg-type]

    def unretrieved(self, package: Path) -> list[str]:
        """Tasks of code under ``package`` that failed and whose exception nobody retrieved."""
        out = []
        for t in self.tasks:
            code = getattr(t.get_coro(), "cr_code", None)
            if (t.done() and not t.cancelled() and getattr(t, "_log_traceback", False) and code is not None
                    and Path(code.co_filename).is_relative_to(package)):
                out.append(f"{code.co_name}: {t.exception()!r}")
        return out

    def settle(self) -> None:
        for t in self.tasks:
            if t.done() and not t.cancelled():
                t.exception()
        self.tasks.clear()


# --- 1. broker restart mid-download ---------------------------------------------------------


def test_broker_restart_mid_download_resumes_without_refetching(broker: Broker, tmp_path: Path,  # noqa: F811
                                                                release_key: KeyPair, big_bundle: Path) -> None:
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    state = tmp_path / "state"
    sha = sha256_of(big_bundle)
    total = -(-big_bundle.stat().st_size // BLOCK_SIZE)
    cfg = agent_config(broker.url, state, anchor(repo), device="dev-restart", models=("big",),
                       limits=SLOW_LINK)
    ev = EvilServer(repo, parse_broker_url(broker.url), delay=0.25)
    watch = TaskWatch()

    staged = StagedBundles(state)

    async def scenario() -> tuple[Agent, set[int], int]:
        watch.install()
        async with running_agent(cfg, staged) as agent:
            old = ev.running()
            await old.__aenter__()
            try:
                await wait_for(lambda: len(recorded_blocks(state, sha)) >= 6, 20, "6 blocks recorded")
                before = recorded_blocks(state, sha)
                assert len(before) < total and held_version(state, "big") is None
                mark = len(ev.requests)
                await asyncio.to_thread(broker.restart)
            finally:
                with contextlib.suppress(Exception):  # its connection died with the broker
                    await old.__aexit__(None, None, None)
            async with ev.running():  # the same server, reconnected (the requests list carries on)
                await wait_for(lambda: held_version(state, "big") == "1.0.0", 30, "bundle staged after restart")
            return agent, before, mark

    try:
        agent, before, mark = asyncio.run(scenario())
    finally:
        watch.settle()
    downloads = agent.status.downloads
    assert len(downloads) >= 2, "the restart did not interrupt the download"
    first, last = downloads[0], downloads[-1]
    after_restart = bundle_block_offsets(ev, "dev-restart", big_bundle, mark)
    refetched_by_agent = {o for s in downloads[1:] for o in s.fetched_offsets}
    print(f"\nbroker restart: {total} blocks; recorded before restart {len(before)}; "
          f"fetched first attempt {first.blocks_fetched}; last attempt resumed {last.blocks_resumed}, "
          f"fetched {last.blocks_fetched}; block requests after restart {len(after_restart)}")
    assert last.blocks_resumed >= len(before) > 0
    assert last.blocks_resumed + last.blocks_fetched == last.blocks_total == total
    assert not offsets(before) & set(after_restart), "a block recorded before the restart was requested again"
    assert not offsets(before) & refetched_by_agent
    assert staged.files["1.0.0"] == big_bundle.read_bytes()
    assert not (state / "downloads" / f"{sha}.record.json").exists()
    assert not (state / "downloads" / f"{sha}.part").exists()


def test_a_server_with_a_lower_block_limit_still_serves_a_default_device(broker: Broker, tmp_path: Path,  # noqa: F811
                                                                         release_key: KeyPair, big_bundle: Path) -> None:
    """A server started with --block-limit of one block (256 KiB; an older or stricter deployment)
    refuses the device's default 512 KiB requests with bad_request: the device asks for one block
    at a time from then on, and the bundle is staged with every block fetched once."""
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    state = tmp_path / "state"
    staged = StagedBundles(state)
    cfg = agent_config(broker.url, state, anchor(repo), device="dev-narrow", models=("big",))
    assert cfg.limits.request_bytes > BLOCK_SIZE

    async def scenario() -> Agent:
        limits = dataclasses.replace(FAST_SERVER, max_block=BLOCK_SIZE)
        async with running_server(repo, broker.url, limits=limits), running_agent(cfg, staged) as agent:
            await wait_for(lambda: held_version(state, "big") == "1.0.0", 60, "bundle staged from the narrow server")
            return agent

    agent = asyncio.run(scenario())
    stats = agent.status.downloads[-1]
    assert staged.files["1.0.0"] == big_bundle.read_bytes()
    assert len(agent.status.downloads) == 1 and stats.narrowed >= 1
    assert stats.blocks_fetched == -(-big_bundle.stat().st_size // BLOCK_SIZE)


def test_a_link_slower_than_the_window_downloads_without_asking_twice(broker: Broker, tmp_path: Path,  # noqa: F811
                                                                     release_key: KeyPair, big_bundle: Path) -> None:
    """A device whose downlink carries 2 MiB/s, with the default 8 requests of 512 KiB in flight: the
    last reply of a window arrives 2 s after its request, past the 1 s request timeout. Replies keep
    arriving meanwhile, so no request is asked again (each would only add 512 KiB to the queue on the
    slow link): every block is requested once and the bundle is staged."""
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    state = tmp_path / "state"
    total = -(-big_bundle.stat().st_size // BLOCK_SIZE)
    ev = EvilServer(repo, parse_broker_url(broker.url))
    staged = StagedBundles(state)

    async def scenario() -> Agent:
        async with slow_link(broker.host, broker.port, rate=2 * 1024 * 1024) as port:
            cfg = agent_config(f"mqtt://127.0.0.1:{port}", state, anchor(repo), device="dev-slow", models=("big",),
                               limits={"request_timeout": 1, "request_retries": 3})
            async with ev.running(), running_agent(cfg, staged) as agent:
                await wait_for(lambda: held_version(state, "big") == "1.0.0", 60, "bundle staged over the slow link")
                return agent

    agent = asyncio.run(scenario())
    assert agent.config.limits.blocks_in_flight * agent.config.limits.request_bytes >= 4 * 1024 * 1024
    stats = agent.status.downloads[-1]
    assert len(agent.status.downloads) == 1 and stats.retries == 0
    step = agent.config.limits.request_bytes // BLOCK_SIZE * BLOCK_SIZE
    assert sorted(bundle_block_offsets(ev, "dev-slow", big_bundle)) == list(range(0, total * BLOCK_SIZE, step))
    assert staged.files["1.0.0"] == big_bundle.read_bytes()


def test_broker_loss_mid_download_leaves_no_unretrieved_task_exception(broker: Broker, tmp_path: Path,  # noqa: F811
                                                                      release_key: KeyPair,
                                                                      big_bundle: Path) -> None:
    """A broker loss mid-download ends the download's tasks cleanly: none is left holding an exception that
    asyncio would report later, from the garbage collector, as 'Task exception was never retrieved'."""
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    cfg = agent_config(broker.url, tmp_path / "state", anchor(repo), device="dev-loss", models=("big",),
                       limits=SLOW_LINK)
    ev = EvilServer(repo, parse_broker_url(broker.url), delay=0.3)
    watch = TaskWatch()

    async def scenario() -> None:
        watch.install()
        async with running_agent(cfg) as agent:
            old = ev.running()
            await old.__aenter__()
            try:
                await wait_for(lambda: len(bundle_block_offsets(ev, "dev-loss", big_bundle)) >= 2, 20,
                               "the download started")
                await asyncio.to_thread(broker.restart)
            finally:
                with contextlib.suppress(Exception):
                    await old.__aexit__(None, None, None)
            await wait_for(lambda: agent.status.connected, 10, "the agent reconnected")

    try:
        asyncio.run(scenario())
        leaked = watch.unretrieved(AGENT)
    finally:
        watch.settle()
    assert leaked == []


def lost_blocks(downloads: list[DownloadStats]) -> dict[int, int]:
    """Attempt number -> blocks the attempt before it fetched that it did not find recorded."""
    return {i + 1: downloads[i].blocks_resumed + downloads[i].blocks_fetched - downloads[i + 1].blocks_resumed
            for i in range(len(downloads) - 1)
            if downloads[i + 1].blocks_resumed != downloads[i].blocks_resumed + downloads[i].blocks_fetched}


def test_broker_restarts_lose_no_fetched_block(broker: Broker, tmp_path: Path,  # noqa: F811
                                               release_key: KeyPair, big_bundle: Path) -> None:
    """Every block an interrupted attempt fetched (checked, written) is resumed by the next one, not asked again.

    Up to 14 broker restarts, each once the current attempt has fetched a burst of 2 blocks (EvilServer answers
    both after the same delay). The lost update it looks for is a race: before the fix about 45% of the restarts
    lost a block on an idle 2-core machine (so 14 restarts all but always catch one), far fewer under heavy
    parallel load. With the fix, none in every run."""
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    state = tmp_path / "state"
    burst, interruptions = 2, 14  # 14 bursts of 2 of the 29 blocks
    cfg = agent_config(broker.url, state, anchor(repo), device="dev-restarts", models=("big",),
                       limits={**SLOW_LINK, "blocks_in_flight": burst})
    ev = EvilServer(repo, parse_broker_url(broker.url), delay=0.25)
    watch = TaskWatch()
    staged = StagedBundles(state)

    async def scenario() -> list[DownloadStats]:
        watch.install()
        async with running_agent(cfg, staged) as agent:
            downloads = agent.status.downloads
            for k in range(interruptions + 1):
                old = ev.running()
                await old.__aenter__()
                try:
                    await wait_for(lambda: len(downloads) > k and (downloads[k].blocks_fetched >= burst
                                                                   or held_version(state, "big") is not None),
                                   20, f"attempt {k + 1} fetched a burst")
                    if k == interruptions or lost_blocks(downloads):  # enough, or caught one: finish quickly
                        ev.delay = 0.01
                        await wait_for(lambda: held_version(state, "big") == "1.0.0", 30, "bundle staged")
                        return list(downloads)
                    await asyncio.to_thread(broker.restart)
                finally:
                    with contextlib.suppress(Exception):  # after a restart its connection is gone
                        await old.__aexit__(None, None, None)
            raise AssertionError("unreachable")

    try:
        downloads = asyncio.run(scenario())
    finally:
        watch.settle()
    rows = [(d.blocks_resumed, d.blocks_fetched) for d in downloads]
    print("\nrestarts, (resumed, fetched) per attempt:", rows)
    assert staged.files["1.0.0"] == big_bundle.read_bytes()
    assert lost_blocks(downloads) == {}, f"blocks lost from the record, by attempt; (resumed, fetched): {rows}"
    assert len(rows) == interruptions + 1


# --- 2. agent SIGKILL mid-download ------------------------------------------------------------


def serve_section() -> str:
    """Turns the agent's inference API off where the agent has one (agent.config.ServeConfig): the agents these
    tests start must not compete for its default port."""
    import agent.config

    serve = getattr(agent.config, "ServeConfig", None)
    if serve is None or "enabled" not in {f.name for f in dataclasses.fields(serve)}:
        return ""
    return "\n[serve]\nenabled = false\n"


def write_agent_toml(directory: Path, repo: Path, broker_url: str, *, device: str, model: str,
                     limits: dict[str, float]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(anchor(repo), directory / "root.json")
    lim = "\n".join(f"{k} = {v}" for k, v in limits.items())
    cfg = directory / "agent.toml"
    cfg.write_text(textwrap.dedent(f"""\
        device_id = "{device}"
        state_dir = "state"
        root = "root.json"
        models = ["{model}"]
        refresh_interval = 30
        reconnect_min = 0.1
        reconnect_max = 0.5

        [broker]
        url = "{broker_url}"

        [limits]
        """) + lim + "\n" + serve_section())
    return cfg


def start_agent(cfg: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([*cli("edgeship-agent", "agent.cli"), "run", "--config", cfg.name, *args],
                                cwd=cfg.parent, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def test_agent_sigkill_mid_download_resumes_after_restart(broker: Broker, tmp_path: Path,  # noqa: F811
                                                          release_key: KeyPair, big_bundle: Path) -> None:
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    device = "dev-kill"
    cfg = write_agent_toml(tmp_path / "device", repo, broker.url, device=device, model="big",
                           limits=SLOW_LINK)
    state = cfg.parent / "state"
    sha = sha256_of(big_bundle)
    total = -(-big_bundle.stat().st_size // BLOCK_SIZE)
    logs = [tmp_path / "agent-1.log", tmp_path / "agent-2.log"]
    ev = EvilServer(repo, parse_broker_url(broker.url), delay=0.3)
    procs: list[subprocess.Popen[bytes]] = []

    async def scenario() -> set[int]:
        async with ev.running():
            procs.append(start_agent(cfg, logs[0]))
            await wait_for(lambda: len(recorded_blocks(state, sha)) >= 6 or procs[0].poll() is not None, 30,
                           "6 blocks recorded")
            assert procs[0].poll() is None, log_text(logs[0])
            procs[0].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[0].wait, 10)
            before = recorded_blocks(state, sha)  # what the killed agent left behind
            assert 0 < len(before) < total and held_version(state, "big") is None
            ev.delay = 0.02
            procs.append(start_agent(cfg, logs[1]))
            await wait_for(lambda: held_version(state, "big") == "1.0.0" or procs[1].poll() is not None, 30,
                           "bundle staged by the restarted agent")
            return before

    try:
        before = asyncio.run(scenario())
        assert stop_process(procs[1]) == 0, log_text(logs[1])
    finally:
        for p in procs:
            stop_process(p, signal.SIGKILL)
    assert procs[0].returncode == -signal.SIGKILL
    second = log_text(logs[1])
    m = re.search(r"downloaded model=big version=1\.0\.0 blocks=(\d+) resumed=(\d+)", second)
    assert m, second
    fetched, resumed = int(m[1]), int(m[2])
    counts = Counter(bundle_block_offsets(ev, device, big_bundle))
    print(f"\nagent SIGKILL: {total} blocks; recorded at kill {len(before)}; restarted agent resumed {resumed}, "
          f"fetched {fetched}; block requests over both runs {sum(counts.values())} "
          f"(offsets asked twice: {sorted(o // BLOCK_SIZE for o, n in counts.items() if n > 1)})")
    assert resumed >= len(before) and resumed + fetched == total
    assert all(counts[o] == 1 for o in offsets(before)), {o // BLOCK_SIZE: counts[o] for o in offsets(before)}
    assert set(counts) == {i * BLOCK_SIZE for i in range(total)}
    # the agent checked the whole file against TUF's SHA-256; it must be the published bundle's
    assert held(state, "big") == ("1.0.0", sha)
    assert f"staged model=big version=1.0.0 sha256={sha}" in second
    staged_file = state / "bundles" / f"{sha}.edge"
    if staged_file.exists():  # not yet installed (an install extracts it and removes it)
        assert staged_file.read_bytes() == big_bundle.read_bytes()
    assert not re.search(r"^(ERROR|WARNING|INFO agent\.daemon: error )", second, re.M), second


@pytest.mark.parametrize("once", [False, True], ids=["run", "run-once"])
def test_sigterm_while_a_refresh_waits_for_a_reply_stops_the_agent_at_once(broker: Broker, tmp_path: Path,  # noqa: F811
                                                                          release_key: KeyPair, big_bundle: Path,
                                                                          once: bool) -> None:
    """No server answers, so the agent's first refresh waits on its root probe (request_timeout 30 s,
    3 attempts). SIGTERM must stop it at once: ``run`` ends its session and exits 0; ``run --once``
    abandons its cycle and exits 130 with one line (it used to finish the cycle first, here after
    3 x 30 s)."""
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    device = "dev-term"
    cfg = write_agent_toml(tmp_path / "device", repo, broker.url, device=device, model="big",
                           limits={"request_timeout": 30, "request_retries": 3})
    log = tmp_path / "agent.log"
    procs: list[subprocess.Popen[bytes]] = []

    async def first_request() -> bytes:
        async with make_client(parse_broker_url(broker.url), identifier="spy") as spy:
            await spy.subscribe(req_topic(device), qos=1)
            procs.append(start_agent(cfg, log, *(["--once"] if once else [])))
            msg = await asyncio.wait_for(anext(aiter(spy.messages)), 30)
            return bytes(msg.payload)  # type: ignore[arg-type]

    try:
        assert decode_request(asyncio.run(first_request())).op == "meta"
        procs[0].send_signal(signal.SIGTERM)
        try:
            rc = procs[0].wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not stop within 10 s of SIGTERM:\n{log_text(log)}") from None
    finally:
        for p in procs:
            stop_process(p, signal.SIGKILL)
    assert "most recent call first" not in log_text(log)  # no thread stacks: it did not hang
    if once:
        assert rc == 130, log_text(log)
        assert log_text(log).strip().splitlines()[-1].startswith("error: interrupted: the update cycle stopped")
    else:
        assert rc == 0, log_text(log)


# --- 3. two servers, one dies mid-download ------------------------------------------------------


def start_server(repo: Path, broker_url: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([*cli("edgeship", "packager.cli"), "serve", "--repo", str(repo),
                                 "--broker", broker_url],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def test_two_servers_one_killed_mid_download(broker: Broker, tmp_path: Path, release_key: KeyPair,  # noqa: F811
                                             big_bundle: Path) -> None:
    repo = make_repo(tmp_path / "repo", release_key.public, big_bundle)
    device = "dev-two"
    state = tmp_path / "state"
    cfg = agent_config(broker.url, state, anchor(repo), device=device, models=("big",),
                       limits={"request_timeout": 1, "request_retries": 6, "blocks_in_flight": 2,
                               "record_flush_interval": 0.05})
    logs = [tmp_path / "server-a.log", tmp_path / "server-b.log"]
    servers = [start_server(repo, broker.url, log) for log in logs]
    settings = parse_broker_url(broker.url)
    seen: list[BlockRequest] = []  # block requests for this bundle, as a plain subscriber sees them
    suffix = "." + big_bundle.name
    facts: dict[str, Any] = {}

    async def observe(client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            with contextlib.suppress(ProtocolError):
                req = decode_request(bytes(msg.payload))  # type: ignore[arg-type]
                if isinstance(req, BlockRequest) and req.path.endswith(suffix):
                    seen.append(req)

    staged = StagedBundles(state)

    async def scenario() -> Agent:
        for s, log in zip(servers, logs):
            await wait_for(lambda: "hint: timestamp version" in log_text(log) or s.poll() is not None, 20,
                           f"{log.name} ready")
            assert s.poll() is None, log_text(log)
        assert all("MQTT 5" in log_text(log) for log in logs)  # shared subscription
        async with make_client(settings, identifier="observer", protocol="3.1.1") as obs:
            await obs.subscribe(req_topic(device), qos=1)  # a plain subscriber sees every request too
            watcher = asyncio.ensure_future(observe(obs))
            # Freeze A before the device asks for anything, so that it holds requests when it dies however
            # fast the download runs; kill it once a block request it holds has timed out and been asked
            # again (the broker deals the shared subscription's messages round robin, so A gets some).
            servers[0].send_signal(signal.SIGSTOP)
            try:
                async with running_agent(cfg, staged) as agent:
                    await wait_for(lambda: len(seen) >= 2, 30, "the download started")
                    await wait_for(lambda: bool(agent.status.downloads) and agent.status.downloads[-1].retries >= 1,
                                   15, "a request lost at A")
                    facts["recorded_at_kill"] = len(recorded_blocks(state, sha256_of(big_bundle)))
                    facts["fetched_at_kill"] = agent.status.downloads[-1].blocks_fetched
                    facts["staged_at_kill"] = held_version(state, "big")
                    servers[0].send_signal(signal.SIGKILL)
                    await wait_for(lambda: held_version(state, "big") == "1.0.0", 30, "bundle staged")
                    return agent
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    try:
        agent = asyncio.run(scenario())
        assert servers[0].wait(timeout=5) == -signal.SIGKILL
        assert stop_process(servers[1]) == 0, log_text(logs[1])
    finally:
        for s in servers:
            with contextlib.suppress(ProcessLookupError):
                s.send_signal(signal.SIGCONT)
            stop_process(s, signal.SIGKILL)
    stats = agent.status.downloads
    total = -(-big_bundle.stat().st_size // BLOCK_SIZE)
    print(f"\ntwo servers: {total} blocks; at the kill {facts['fetched_at_kill']} fetched, "
          f"{facts['recorded_at_kill']} recorded; "
          f"downloads {len(stats)}, retries {sum(s.retries for s in stats)}, "
          f"requests {sum(s.requests for s in stats)}, block requests seen {len(seen)}")
    assert facts["staged_at_kill"] is None and facts["fetched_at_kill"] < total  # it was mid-download
    assert len(stats) == 1  # the survivor answered every retry: no failed attempt, no resume needed
    assert staged.files["1.0.0"] == big_bundle.read_bytes()


# --- 4. amqtt (MQTT 3.1.1 only) ------------------------------------------------------------------


@pytest.fixture
def amqtt_url() -> Iterator[str]:
    with amqtt_broker() as url:
        yield url


def test_amqtt_broker_fresh_device_follows_two_releases(amqtt_url: str, tmp_path: Path, release_key: KeyPair,
                                                       small_bundles: dict[str, Path]) -> None:
    repo = make_repo(tmp_path / "repo", release_key.public, small_bundles["1.0.0"])
    state = tmp_path / "state"
    cfg = agent_config(amqtt_url, state, anchor(repo), device="dev-amqtt")
    assert cfg.protocol == "3.1.1"
    events = StagedBundles(state)

    async def scenario() -> tuple[str | None, Agent]:
        async with running_server(repo, amqtt_url) as server:
            async with running_agent(cfg, events) as agent:
                await wait_for(lambda: held_version(state, "mlp") == "1.0.0", 20, "v1 staged")
                publish(repo, small_bundles["1.1.0"], now=now())
                await wait_for(lambda: held_version(state, "mlp") == "1.1.0", 20, "v1.1 staged after the hint")
                return server.protocol_in_use, agent

    proto, agent = asyncio.run(scenario())  # refresh_interval is 30 s: within 20 s only the hint wakes it
    assert proto == "3.1.1"  # auto fell back: amqtt refuses MQTT 5
    assert [e["version"] for e in events if e["step"] == "staged"] == ["1.0.0", "1.1.0"]
    assert not [e for e in events if e["step"] == "error"], events
    assert agent.status.hints >= 1
    assert events.files == {v: small_bundles[v].read_bytes() for v in ("1.0.0", "1.1.0")}


# --- 5. root rotation through the agent ----------------------------------------------------------


def forge_root(repo: Path) -> Path:
    """Root N+1 that keeps everything of root N but hands the root role to a new key, and is signed
    by that new key alone: not by a threshold of root N's root keys, so a device must refuse it."""
    meta = repo / "metadata"
    current: Metadata[Root] = Metadata.from_bytes((meta / "root.json").read_bytes())
    signer = CryptoSigner.generate_ed25519()
    root = current.signed
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(signer.public_key, "root")
    root.version += 1
    current.signatures.clear()
    current.sign(signer)
    out = meta / f"{root.version}.root.json"
    out.write_bytes(current.to_bytes())
    return out


def trusted_root_version(state: Path) -> int:
    return int(json.loads((state / "tuf" / "trusted-root.json").read_bytes())["signed"]["version"])


def test_root_rotation_followed_then_insufficiently_signed_root_refused(broker: Broker, tmp_path: Path,  # noqa: F811
                                                                       release_key: KeyPair,
                                                                       small_bundles: dict[str, Path]) -> None:
    repo = make_repo(tmp_path / "repo", release_key.public, small_bundles["1.0.0"])
    state = tmp_path / "state"
    cfg = agent_config(broker.url, state, anchor(repo), device="dev-root")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with running_server(repo, broker.url):
            await Agent(cfg).run_once()
            out["v1"] = (trusted_root_version(state), held_version(state, "mlp"))
            assert rotate(repo, "root", now=now()).root_version == 2
            assert rotate(repo, "root", now=now()).root_version == 3
            publish(repo, small_bundles["1.1.0"], now=now())
            await Agent(cfg).run_once()
            out["v3"] = (trusted_root_version(state), held_version(state, "mlp"))

            events: list[dict[str, Any]] = []
            async with running_agent(cfg, events) as agent:  # a running device, woken by the hint
                await wait_for(lambda: any(e["step"] == "refreshed" for e in events), 10, "first refresh")
                assert agent.status.last_error is None
                trusted = trusted_snapshot(state)
                out["forged"] = forge_root(repo).name
                publish(repo, small_bundles["1.2.0"], now=now())  # a reason to refresh (and a hint)
                await wait_for(lambda: agent.status.last_error_type is not None, 15, "the refresh to fail")
                out["running"] = (agent.status.last_error_type, agent.status.last_exception)
                out["running_unchanged"] = trusted_snapshot(state) == trusted
            with pytest.raises(MetadataSignatureError) as info:
                await Agent(cfg).run_once()
            out["once"] = str(info.value)
            out["once_unchanged"] = trusted_snapshot(state) == trusted
        return out

    out = asyncio.run(scenario())
    assert out["v1"] == (1, "1.0.0")
    assert out["v3"] == (3, "1.1.0")
    assert (state / "tuf" / "cache" / "root_history" / "3.root.json").exists()
    assert out["forged"] == "4.root.json"
    assert out["running"][0] == "MetadataSignatureError", out["running"]
    assert isinstance(out["running"][1], MetadataSignatureError)
    print("\nforged root refused:", out["once"])
    assert "root" in out["once"].lower()
    assert out["running_unchanged"] and out["once_unchanged"]
    assert trusted_root_version(state) == 3
    assert held_version(state, "mlp") == "1.1.0"  # 1.2.0 came with the forged root: not fetched
    assert not (state / "tuf" / "cache" / "root_history" / "4.root.json").exists()
