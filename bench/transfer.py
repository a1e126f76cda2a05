"""Transfer bench: a signed bundle delivered and verified through Mosquitto on loopback, beside a raw paho stream.

    python bench/transfer.py [--size-mib 64] [--repeat 3] [--blocks-in-flight 8[,16]] [--request-kib 512[,256]]
                             [--raw-kib 256,512] [--warmup 1] [--server process|thread] [--workdir DIR] [--json] [-v]

In one run, against one Mosquitto (127.0.0.1, free port, the production-relevant settings of
tests/mosquitto.py: set_tcp_nodelay, max_queued_messages 0 with a memory_limit, max_packet_size 2 MiB):

* **raw**: plain paho (its own loop thread per client, QoS 1, TCP_NODELAY) publishes the bundle's
  bytes to a paho subscriber; MiB/s from the first publish to the last chunk received: the
  transport with nothing on top (no request/response, hashing or disk). Both clients share this
  process, as edgeship's agent and an in-process server would. One raw row per ``--raw-kib`` chunk
  size: by default 256 KiB (the repository's block size; the first row is the one the ratios and
  the target use) and 512 KiB (the agent's request size, on which the raw stream itself is faster
  here), each target line giving the ratio to both.
* **floor** (``--floor``, on by default): bare paho request/response with the same settings and
  the same per-byte work as edgeship's download and verification (bench/rrfloor.py: a part file
  written in place, read back by a second thread that hashes each block and inflates the stream,
  and with ``--no-transfer-signature`` hashes the output too), and no edgeship code: what request/response and verification cost on this machine
  whoever implements them. edgeship's *download* against this row is what edgeship itself costs.
* **edgeship**: ``edgeship serve`` (a subprocess by default, as on a real deployment; ``--server
  thread`` runs it in this process) serves a fresh TUF repository holding the bundle, and a fresh
  ``Agent.run_once()`` (new state directory each time) connects, refreshes TUF, downloads every
  block (each hashed against TUF, which vouches for the whole file), verifies the bundle while it
  arrives (unpack + signature; the member digests too with ``--no-transfer-signature``, which
  publishes the bundle without the transfer signature ``edgeship build`` wrote) and stages it. *End-to-end* is from the start of ``run_once`` to "staged"; *download* is the
  download step alone (between the agent's ``downloading`` and ``downloaded`` events).

One unmeasured warm-up (``--warmup``) goes first; then the repetitions are interleaved (raw, then
each edgeship setting), so that drift on a shared machine hits every row alike. The table shows the
median of the repetitions, their range, and the ratio against the raw median of the same run, and
where the end-to-end time of the median run went. Absolute numbers depend on the machine; compare
the ratios. ``--blocks-in-flight`` and ``--request-kib`` take comma-separated lists: every
combination is a row. The bundle (an ONNX MatMul whose weights are random float32, so gzip cannot
shrink it) and its signing key are built once and cached in ``--workdir`` (default: a directory
under the system temp dir); the TUF repository, the broker and the device state are fresh each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import KiB, MiB, UpdateLimits  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.mqtt import parse_broker_url  # noqa: E402
from agent.protocol import HINT_TOPIC  # noqa: E402
from agent.settings import AgentConfig  # noqa: E402
from packager.repo import BLOCK_SIZE  # noqa: E402
from bench.rrfloor import download as floor_download  # noqa: E402
from bench.rrfloor import floor_server, inflated_size, paho_client  # noqa: E402
from tests.mosquitto import Broker, start_broker, stop_process  # noqa: E402
from tests.updatechannel import make_repo  # noqa: E402

MODEL = "bench"
VERSION = "1.0.0"
DEVICE = "bench-device"
TARGET_RATIO = 0.6
CACHE_TAG = "r3"
"""Bump when write_model changes, so a cached bundle of the old kind is not reused."""
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "edgeship-bench-transfer"


# --- the bundle and the repository ---------------------------------------------------------


def write_model(path: Path, size_mib: int, seed: int = 0) -> Path:
    """y = x @ W with W [4096, 64 * size_mib] float32: ``size_mib`` MiB of incompressible weights.

    W is random bits with the top exponent bit cleared (finite, |w| < 2): gzip keeps it at 100.0%
    of its size, where normally distributed float32 would shrink by 7% (predictable exponents)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = 4096, 64 * size_mib
    bits = np.random.default_rng(seed).integers(0, 1 << 32, (rows, cols), dtype=np.uint32)
    w = (bits & np.uint32(0xBFFFFFFF)).view(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "transfer-bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeship-bench")
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.save_model(model, str(path))
    return path


def cached_bundle(workdir: Path, size_mib: int) -> tuple[Path, Path]:
    """(bundle, release public key), built on first use and kept in ``workdir``."""
    from packager.build import BuildRequest, build_bundle
    from packager.keys import generate_keypair, load_private_key

    cache = workdir / f"bundle-{size_mib}MiB-{CACHE_TAG}"
    bundle, pub = cache / f"{MODEL}-{VERSION}.edge", cache / "release.pub"
    if bundle.is_file() and pub.is_file() and bundle.with_name(bundle.name + ".sig").is_file():
        return bundle, pub
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    key = generate_keypair(cache, name="release")
    model = write_model(cache / "model.onnx", size_mib)
    req = BuildRequest(model=model, name=MODEL, version=VERSION, out=bundle)
    build_bundle(req, load_private_key(key.private_path, passphrase=None))
    model.unlink()
    return bundle, pub


# --- raw paho stream -------------------------------------------------------------------------


def _connect(client: Any, broker: Broker) -> None:
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect(broker.host, broker.port, keepalive=30)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("paho client did not connect")


def raw_stream(broker: Broker, data: bytes, chunk: int) -> float:
    """Seconds from the first publish to the last chunk received (QoS 1 both ways)."""
    topic = "bench/raw"
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    done = threading.Event()
    got = {"n": 0, "bytes": 0, "end": 0.0}

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got["n"] += 1
        got["bytes"] += len(msg.payload)
        if got["n"] == len(chunks):
            got["end"] = time.perf_counter()
            done.set()

    sub, pub = paho_client("bench-raw-sub"), paho_client("bench-raw-pub")
    subscribed = threading.Event()
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    try:
        _connect(sub, broker)
        sub.subscribe(topic, qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("raw subscriber: no SUBACK")
        _connect(pub, broker)
        start = time.perf_counter()
        for c in chunks:
            pub.publish(topic, c, qos=1)
        if not done.wait(120):
            raise RuntimeError(f"raw stream: {got['n']} of {len(chunks)} chunks arrived")
        if got["bytes"] != len(data):
            raise RuntimeError(f"raw stream: {got['bytes']} bytes arrived, sent {len(data)}")
        return got["end"] - start
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


# --- the edgeship server ---------------------------------------------------------------------


def _wait_for_hint(broker: Broker, timeout: float = 20.0) -> None:
    """The server publishes the retained hint once it has subscribed: it is ready."""
    got = threading.Event()
    c = paho_client("bench-ready-probe")
    c.on_message = lambda *_a: got.set()
    try:
        _connect(c, broker)
        c.subscribe(HINT_TOPIC, qos=1)
        if not got.wait(timeout):
            raise RuntimeError(f"the edgeship server published no hint within {timeout:g} s")
    finally:
        c.disconnect()
        c.loop_stop()


@contextlib.contextmanager
def server_process(repo: Path, broker: Broker, log_path: Path) -> Iterator[None]:
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "packager.cli", "serve", "--repo", str(repo), "--broker", broker.url,
             "--log-level", "warning"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        try:
            _wait_for_hint(broker)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; server log {log_path}:\n{log_path.read_text(errors='replace')[-2000:]}") from None
        yield
    finally:
        stop_process(proc)


@contextlib.contextmanager
def server_thread(repo: Path, broker: Broker) -> Iterator[None]:
    from packager.server import Server

    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await Server(repo, parse_broker_url(broker.url)).run(stop=stop)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    t = threading.Thread(target=run, name="edgeship-server", daemon=True)
    t.start()
    try:
        _wait_for_hint(broker)
        yield
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        t.join(10)
        loop.close()
        if failure:
            raise RuntimeError(f"server thread failed: {failure[0]!r}")


# --- one edgeship delivery -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Setting:
    blocks_in_flight: int
    request_kib: int

    @property
    def label(self) -> str:
        return f"{self.blocks_in_flight} x {self.request_kib} KiB"


@dataclass
class Delivery:
    end_to_end: float
    download: float
    phases: dict[str, float]
    requests: int
    retries: int


def deliver(broker: Broker, repo: Path, state: Path, setting: Setting, expect_sha256: str) -> Delivery:
    limits = UpdateLimits(blocks_in_flight=setting.blocks_in_flight, request_bytes=setting.request_kib * KiB)
    config = AgentConfig(device_id=DEVICE, broker=parse_broker_url(broker.url), root=repo / "metadata" / "1.root.json",
                         state_dir=state, models=(MODEL,), limits=limits)
    marks: dict[str, float] = {}

    def mark(event: dict[str, Any]) -> None:  # the agent's events come from its event loop thread
        marks.setdefault(event["step"], time.perf_counter())

    agent = Agent(config, on_event=mark)

    async def once() -> None:
        marks["start"] = time.perf_counter()
        await agent.run_once()
        marks["end"] = time.perf_counter()

    asyncio.run(once())
    if agent.model_state(MODEL).seen.get(VERSION) != expect_sha256 or "staged" not in marks:
        raise RuntimeError(f"the agent did not stage the bundle (state: {agent.model_state(MODEL)})")
    stats = agent.status.downloads[-1]
    order = ["start", "refreshed", "downloading", "downloaded", "staged", "end"]
    phases = {f"{a}->{b}": marks[b] - marks[a] for a, b in itertools.pairwise(order)}
    return Delivery(end_to_end=marks["staged"] - marks["start"], download=marks["downloaded"] - marks["downloading"],
                    phases=phases, requests=stats.requests, retries=stats.retries)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    size: int
    raw: dict[int, list[float]] = field(default_factory=dict)
    """Seconds per raw run, by chunk size in KiB (the first is the reference)."""
    floor: dict[Setting, list[float]] = field(default_factory=dict)
    edgeship: dict[Setting, list[Delivery]] = field(default_factory=dict)


def run(args: argparse.Namespace, settings: list[Setting], log: logging.Logger) -> Results:
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("bundle: building or reusing %d MiB in %s", args.size_mib, workdir)
    bundle, pub = cached_bundle(workdir, args.size_mib)
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    floor_expect = inflated_size(bundle) if args.floor else 0
    res = Results(size=len(data), edgeship={s: [] for s in settings}, raw={k: [] for k in args.raw_kib},
                  floor={s: [] for s in settings} if args.floor else {})
    with tempfile.TemporaryDirectory(prefix="run-", dir=workdir) as tmp_name:
        tmp = Path(tmp_name)
        published = bundle
        if not args.transfer_signature:  # the bundle alone, without the .sig that build wrote beside it
            published = tmp / "alone" / bundle.name
            published.parent.mkdir()
            shutil.copy(bundle, published)
        repo = make_repo(tmp / "repo", pub, published)
        broker = start_broker(tmp / "mosquitto")
        try:
            serving = (server_process(repo, broker, tmp / "server.log") if args.server == "process"
                       else server_thread(repo, broker))
            flooring = floor_server(broker.host, broker.port, bundle) if args.floor else contextlib.nullcontext()
            with serving, flooring:
                for _ in range(args.warmup):  # first connections, imports, page cache: not measured
                    for kib in res.raw:
                        raw_stream(broker, data, kib * KiB)
                    deliver(broker, repo, tmp / "warmup", settings[0], sha)
                    shutil.rmtree(tmp / "warmup", ignore_errors=True)
                for rep in range(args.repeat):
                    for kib, seconds in res.raw.items():
                        seconds.append(raw_stream(broker, data, kib * KiB))
                        log.info("rep %d raw %d KiB: %.1f MiB/s", rep + 1, kib, len(data) / MiB / seconds[-1])
                    for s in res.floor:
                        res.floor[s].append(floor_download(broker.host, broker.port, len(data), tmp / "floor.part",
                                                           in_flight=s.blocks_in_flight, request=s.request_kib * KiB,
                                                           expect=floor_expect,
                                                           hash_output=not args.transfer_signature))
                        log.info("rep %d floor %s: %.1f MiB/s", rep + 1, s.label, len(data) / MiB / res.floor[s][-1])
                    for s in settings:
                        state = tmp / f"state-{rep}"
                        try:
                            d = deliver(broker, repo, state, s, sha)
                        finally:
                            shutil.rmtree(state, ignore_errors=True)
                        res.edgeship[s].append(d)
                        log.info("rep %d edgeship %s: %.1f MiB/s end to end, %.1f MiB/s download",
                                 rep + 1, s.label, len(data) / MiB / d.end_to_end, len(data) / MiB / d.download)
        finally:
            broker.stop()
    return res


def summarize(res: Results, args: argparse.Namespace) -> dict[str, Any]:
    mib = res.size / MiB

    def rates(seconds: list[float]) -> dict[str, Any]:
        r = [mib / s for s in seconds]
        return {"mib_s": statistics.median(r), "min": min(r), "max": max(r), "runs": r}

    raws = {kib: rates(seconds) for kib, seconds in res.raw.items()}
    raw = next(iter(raws.values()))
    floors = []
    for s, seconds in res.floor.items():
        f = rates(seconds)
        floors.append({"blocks_in_flight": s.blocks_in_flight, "request_kib": s.request_kib, **f,
                       "ratio": f["mib_s"] / raw["mib_s"]})
    rows: list[dict[str, Any]] = []
    for s, ds in res.edgeship.items():
        e2e, dl = rates([d.end_to_end for d in ds]), rates([d.download for d in ds])
        mid = sorted(ds, key=lambda d: d.end_to_end)[len(ds) // 2]  # the median run's own breakdown
        share = {k: v / mid.end_to_end for k, v in mid.phases.items()}
        rows.append({
            "blocks_in_flight": s.blocks_in_flight, "request_kib": s.request_kib,
            "end_to_end": {**e2e, "ratio": e2e["mib_s"] / raw["mib_s"],
                           "ratio_by_raw_chunk_kib": {str(kib): e2e["mib_s"] / r["mib_s"] for kib, r in raws.items()}},
            "download": {**dl, "ratio": dl["mib_s"] / raw["mib_s"]},
            "phase_share_of_end_to_end": share,
            "requests": ds[0].requests, "retries": sum(d.retries for d in ds),
            "target_met": e2e["mib_s"] / raw["mib_s"] >= TARGET_RATIO,
        })
    return {"bundle_bytes": res.size, "repeat": args.repeat, "warmup": args.warmup, "server": args.server,
            "transfer_signature": args.transfer_signature,
            "raw_chunk": args.raw_kib[0] * KiB, "target_ratio": TARGET_RATIO, "raw": {**raw, "ratio": 1.0},
            "raw_rows": [{"chunk_kib": kib, **r, "ratio": r["mib_s"] / raw["mib_s"]} for kib, r in raws.items()],
            "floor": floors, "edgeship": rows}


def print_table(summary: dict[str, Any]) -> None:
    mib = summary["bundle_bytes"] / MiB
    where = "a subprocess" if summary["server"] == "process" else "a thread of the agent's process"
    print(f"\ntransfer bench: {mib:.2f} MiB bundle through Mosquitto on 127.0.0.1, server in {where}, "
          f"{summary['repeat']} repetitions (median, range, ratio to the raw median), published "
          + ("with its transfer signature" if summary["transfer_signature"] else "WITHOUT its transfer signature"))
    print(f"  {'path':<58} {'MiB/s':>8} {'range':>15} {'vs raw':>7}")

    def line(label: str, r: dict[str, Any]) -> None:
        print(f"  {label:<58} {r['mib_s']:8.1f} {r['min']:7.1f}-{r['max']:<7.1f} {r['ratio']:6.2f}x")

    for r in summary["raw_rows"]:
        line(f"raw paho stream (QoS 1, {r['chunk_kib']} KiB chunks)", r)
    for f in summary["floor"]:
        line(f"floor: bare paho req/resp + same work ({f['blocks_in_flight']} x {f['request_kib']} KiB)", f)
    for row in summary["edgeship"]:
        tag = f"{row['blocks_in_flight']} x {row['request_kib']} KiB"
        line(f"edgeship end-to-end ({tag})", row["end_to_end"])
        line(f"edgeship download only ({tag})", row["download"])
    print("\n  where the end-to-end time goes (shares of the median run):")
    names = {"start->refreshed": "connect + TUF refresh", "refreshed->downloading": "select",
             "downloading->downloaded": "download (blocks, each hashed)",
             "downloaded->staged": "verify bundle + stage"}
    for row in summary["edgeship"]:
        share = row["phase_share_of_end_to_end"]
        parts = ", ".join(f"{names[k]} {share[k]:.0%}" for k in names)
        print(f"  {row['blocks_in_flight']} x {row['request_kib']} KiB: {parts}  "
              f"({row['requests']} block requests, {row['retries']} retries)")
    print()
    for row in summary["edgeship"]:
        ratio = row["end_to_end"]["ratio"]
        verdict = "MET" if row["target_met"] else "NOT MET"
        others = "".join(f"; {r:.2f}x of the {kib} KiB-chunk stream"
                         for kib, r in list(row["end_to_end"]["ratio_by_raw_chunk_kib"].items())[1:])
        print(f"target: edgeship end-to-end >= {summary['target_ratio']:.1f}x raw with "
              f"{row['blocks_in_flight']} x {row['request_kib']} KiB: {verdict} ({ratio:.2f}x of the "
              f"{summary['raw_chunk'] // KiB} KiB-chunk stream{others})")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=64, help="bundle payload size (random float32 weights)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every row (interleaved)")
    defaults = UpdateLimits()
    ap.add_argument("--blocks-in-flight", type=int_list, default=[defaults.blocks_in_flight],
                    help=f"comma-separated list (default {defaults.blocks_in_flight}, the agent's default)")
    ap.add_argument("--request-kib", type=int_list, default=[defaults.request_bytes // KiB],
                    help=f"comma-separated list (default {defaults.request_bytes // KiB}, the agent's; max 1024)")
    ap.add_argument("--raw-kib", type=int_list, default=[BLOCK_SIZE // KiB, defaults.request_bytes // KiB],
                    help=f"comma-separated chunk sizes of the raw stream, the first the reference for the ratios "
                         f"(default {BLOCK_SIZE // KiB},{defaults.request_bytes // KiB}: the repository's block size, "
                         "the agent's request size)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured raw + edgeship runs first (default 1)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the bare request/response floor (bench/rrfloor.py; default on)")
    ap.add_argument("--transfer-signature", action=argparse.BooleanOptionalAction, default=True,
                    help="publish the bundle with its transfer signature (default), so that devices hash "
                         "each byte once; --no-transfer-signature publishes it alone (they hash it twice)")
    ap.add_argument("--server", choices=["process", "thread"], default="process",
                    help="edgeship serve as a subprocess (default) or a thread of this process")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache for the bundle and scratch space")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress lines on stderr")
    args = ap.parse_args()
    args.raw_kib = list(dict.fromkeys(args.raw_kib))
    if args.repeat < 1 or args.size_mib < 1 or args.warmup < 0 or max(args.raw_kib) > 1024:
        ap.error("--repeat and --size-mib must be at least 1, --warmup at least 0, --raw-kib 1-1024")
    block_kib = BLOCK_SIZE // KiB
    if any(k > 1024 or k % block_kib for k in args.request_kib):
        ap.error(f"--request-kib must be a multiple of the repository's {block_kib} KiB block size, at most 1024 "
                 "(the protocol's largest request)")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # aiomqtt warns "There are N pending publish calls" past 10 outstanding QoS 1 publishes, which
    # every run with more than 10 blocks in flight reaches: expected here, not a finding.
    import aiomqtt  # noqa: F401 - it sets the "mqtt" logger's level when imported: import it first

    logging.getLogger("mqtt").setLevel(logging.ERROR)
    log = logging.getLogger("bench.transfer")
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    settings = [Setting(blocks_in_flight=b, request_kib=k) for b in args.blocks_in_flight for k in args.request_kib]
    summary = summarize(run(args, settings, log), args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
