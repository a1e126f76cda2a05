"""Serving bench: one small model, bare runtime vs the agent's model host vs its HTTP API; idle memory.

    python bench/agent.py [--model digits|mlp|PATH.onnx|PATH.tflite] [--runtimes tflite,onnx] [--calls 4000]
                          [--http-calls 2000] [--rounds 5] [--workdir DIR] [--json]

For each runtime, in the same run and on the same input (batch 1, 1 thread):

* **bare**: the runtime with nothing on top: LiteRT's ``Interpreter`` (``set_tensor``, ``invoke``,
  ``get_tensor``) or an onnxruntime ``InferenceSession.run``, each made the way agent.runtime makes it;
* **binding**: the C++ binding under that API (LiteRT's interpreter wrapper without the Python
  method's buffer-safety check, onnxruntime's ``_sess.run`` without its Python feed-name check): what
  the host's direct lane calls, shown so that the host's own cost can be read off;
* **Session.run**: agent.runtime's session (feed validation, then the backend);
* **host.infer**: :meth:`agent.host.ModelHost.infer` for a committed release, the Python call the
  agent serves with: a request that is exactly what the model declares takes the direct lane (one
  type/dtype/shape check, the binding; swap-safe hold, statistics, NaN/Inf check on 1 call in 16);
* **host, watching**: the same during a watch window (NaN/Inf check and latency budget on every call);
* **HTTP binary / HTTP JSON**: ``POST /v2/models/m/infer`` to :class:`agent.serve.InferenceServer` on
  127.0.0.1 from a separate client process holding one keep-alive ``http.client`` connection: the
  binary tensor extension (what tritonclient sends) and plain JSON tensors; client-measured round trip.

Rounds interleave the rows so that drift on a shared machine hits every row alike; each row's p50 and
p99 are over all its calls. Ratios are against the bare p50 of the same runtime.

Idle memory: fresh processes that load the model, run it once and then report ``VmRSS`` and ``VmHWM``
(peak) from /proc/self/status: the bare runtime; the bare runtime with aiomqtt imported (asyncio,
ssl and paho-mqtt: the MQTT stack the device side is built on, with no agent code, which is the
floor under any agent built on it); the agent's host with the model; the host plus
the HTTP server after serving one request; and that with everything ``edgeship-agent run`` imports
(agent.cli, agent.daemon: MQTT, TUF, crypto), i.e. the agent process minus its broker connection.

Targets: host.infer p50 within 1.1x of bare; HTTP p50 under 0.5 ms; the agent's RSS with the model at most
50 MB (judged on the last memory row; the running agent, connected and after its first update, holds
several MB more: docs/agent.md).
Models: ``digits`` (examples/digits: the project's small CNN, 8x8 input, 10 classes; converted to
TFLite with packager.convert and cached in --workdir), ``mlp`` (tests.modelfactory's 8-16-4 MLP,
the smallest possible: it shows the fixed per-call overhead), or a model file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.host import ModelHost  # noqa: E402
from agent.manifest import DeviceClass, Manifest, Runtime, RuntimeReq, SelfTestSpec  # noqa: E402
from agent.runtime import Session, open_session  # noqa: E402
from agent.oip import DATATYPES  # noqa: E402
from agent.serve import InferenceServer  # noqa: E402

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "edgeship-bench-agent"
TARGET_RATIO = 1.1
TARGET_HTTP_P50_MS = 0.5
TARGET_RSS_MB = 50.0
MODEL = "m"
MEMORY_ROWS = {"bare": "bare runtime", "mqtt": "bare + aiomqtt", "host": "host + model",
               "serve": "+ HTTP server", "agent": "+ the daemon's imports"}


# --- models -------------------------------------------------------------------------------------


def model_files(which: str, runtimes: list[str], workdir: Path) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    if which == "digits":
        onnx = ROOT / "examples" / "digits" / "digits.onnx"
        out: dict[str, Path] = {"onnx": onnx}
        if "tflite" in runtimes:
            tfl = workdir / "digits.tflite"
            if not tfl.exists():
                from packager.convert.onnx2tflite import convert_onnx_to_tflite

                convert_onnx_to_tflite(onnx, tfl)
            out["tflite"] = tfl
        return out
    if which == "mlp":
        from tests.modelfactory import onnx_mlp, tflite_mlp

        return {"onnx": onnx_mlp(workdir / "mlp.onnx"), "tflite": tflite_mlp(workdir / "mlp.tflite")}
    path = Path(which)
    return {"onnx" if path.suffix == ".onnx" else "tflite": path}


def manifest_for(session: Session, runtime: Runtime) -> Manifest:
    return Manifest(format=1, name=MODEL, version="1.0.0", created="2026-11-27T00:00:00Z",
                    runtime=RuntimeReq(name=runtime, min_version="1.0"), device_class=DeviceClass(),
                    model_files=("model.onnx" if runtime == "onnx" else "model.tflite",), inputs=session.inputs,
                    outputs=session.outputs, selftest=SelfTestSpec(file="selftest.npz", cases=1, rtol=0, atol=0))


def sample_inputs(session: Session) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def bare_runner(runtime: str, path: Path, session: Session, feeds: dict[str, np.ndarray], *,
                binding: bool = False) -> Callable[[], Any]:
    """The runtime's public Python API; with ``binding``, the C++ binding under it (LiteRT's
    wrapper, onnxruntime's ``_sess``), as agent.runtime's direct lane calls it."""
    if runtime == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path), num_threads=1)
        details = it.get_input_details()
        for d in details:  # dynamic batch: size the inputs once, as a caller of the bare API would
            it.resize_tensor_input(d["index"], list(next(iter(feeds.values())).shape) if len(details) == 1
                                   else list(d["shape"]), strict=False)
        it.allocate_tensors()
        values = list(feeds.values()) if len(details) == 1 else [feeds[d["name"]] for d in details]
        pairs = [(d["index"], v) for d, v in zip(details, values)]
        outs = [d["index"] for d in it.get_output_details()]
        set_tensor, invoke, get_tensor = it.set_tensor, it.invoke, it.get_tensor
        if binding:
            raw = it._interpreter  # noqa: SLF001 - what the direct lane calls
            set_tensor, invoke, get_tensor = raw.SetTensor, raw.Invoke, lambda i: raw.GetTensor(i, 0)

        def bare_tflite() -> Any:
            for index, value in pairs:
                set_tensor(index, value)
            invoke()
            return [get_tensor(i) for i in outs]

        return bare_tflite
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if binding:
        raw_run = sess._sess.run  # noqa: SLF001 - what the direct lane calls
        return lambda: raw_run(names, feeds, None)
    run = sess.run
    return lambda: run(names, feeds)


# --- timing -------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], calls: int) -> list[float]:
    clock = time.perf_counter
    out = []
    for _ in range(calls):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


CLIENT = textwrap.dedent(r"""
    import http.client, json, sys, time
    port, calls, modes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    bodies = json.loads(sys.stdin.read())
    conn = http.client.HTTPConnection("127.0.0.1", port)
    result = {}
    for mode in modes:
        body = bytes.fromhex(bodies[mode]["body"])
        headers = bodies[mode]["headers"]
        for _ in range(max(50, calls // 10)):  # warm-up
            conn.request("POST", "/v2/models/m/infer", body=body, headers=headers)
            conn.getresponse().read()
        lat = []
        clock = time.perf_counter
        for _ in range(calls):
            t = clock()
            conn.request("POST", "/v2/models/m/infer", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            lat.append(clock() - t)
            if r.status != 200:
                raise SystemExit(f"HTTP {r.status}")
        result[mode] = lat
    print(json.dumps(result))
""")


def http_bodies(feeds: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    tensors = [{"name": n, "datatype": DATATYPES[a.dtype.name], "shape": list(a.shape)} for n, a in feeds.items()]
    head = json.dumps({"inputs": [{**t, "parameters": {"binary_data_size": a.nbytes}}
                                  for t, a in zip(tensors, feeds.values())],
                       "parameters": {"binary_data_output": True}}).encode()
    binary = head + b"".join(a.tobytes() for a in feeds.values())
    plain = json.dumps({"inputs": [{**t, "data": a.ravel().tolist()} for t, a in zip(tensors, feeds.values())]})
    return {"binary": {"body": binary.hex(), "headers": {"Inference-Header-Content-Length": str(len(head)),
                                                          "Content-Type": "application/octet-stream"}},
            "json": {"body": plain.encode().hex(), "headers": {"Content-Type": "application/json"}}}


def http_round(port: int, calls: int, feeds: dict[str, np.ndarray]) -> dict[str, list[float]]:
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(calls), "binary,json"],
                          input=json.dumps(http_bodies(feeds)), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"HTTP client failed: {proc.stderr.strip()}")
    return dict(json.loads(proc.stdout))


# --- memory -------------------------------------------------------------------------------------


RSS_PROBE = textwrap.dedent(r"""
    import json, sys, time
    from pathlib import Path
    kind, runtime, path, manifest = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    import numpy as np
    def feeds_for(specs):
        return {s["name"]: np.zeros([1 if d == -1 else d for d in s["shape"]], s["dtype"]) for s in specs}
    if kind in ("bare", "mqtt") and runtime == "tflite":
        from ai_edge_litert.interpreter import Interpreter
        it = Interpreter(model_path=str(path), num_threads=1)
        d = it.get_input_details()[0]
        it.resize_tensor_input(d["index"], [1 if x == -1 else x for x in d["shape_signature"]], strict=False)
        it.allocate_tensors()
        it.set_tensor(d["index"], np.zeros(it.get_input_details()[0]["shape"], d["dtype"]))
        it.invoke()
    elif kind in ("bare", "mqtt"):
        import onnxruntime as ort
        o = ort.SessionOptions(); o.intra_op_num_threads = o.inter_op_num_threads = 1
        s = ort.InferenceSession(str(path), sess_options=o, providers=["CPUExecutionProvider"])
        s.run(None, feeds_for(manifest["inputs"]))
    if kind == "mqtt":  # the device's chosen MQTT stack alone (asyncio, ssl, paho-mqtt): the floor under any agent
        import aiomqtt  # noqa: F401
    if kind not in ("bare", "mqtt"):
        sys.path.insert(0, sys.argv[5])
        if kind == "agent":  # everything `edgeship-agent run` imports besides the runtime
            import agent.cli, agent.daemon  # noqa: F401
        from agent.host import ModelHost
        from agent.manifest import Manifest
        m = Manifest.from_dict(manifest)
        host = ModelHost()
        host.activate("m", version=m.version, sha256="0" * 64, model_path=path, runtime=runtime, manifest=m)
        host.infer("m", feeds_for(manifest["inputs"]))
        if kind in ("serve", "agent"):
            from agent.serve import InferenceServer
            from agent.serve_client import Client
            server = InferenceServer(host).start()
            client = Client(server.url)
            client.infer("m", feeds_for(manifest["inputs"]))
            client.close()
    time.sleep(0.3)  # idle
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    kb = lambda k: int(status[k].split()[0])
    print(json.dumps({"rss_mb": kb("VmRSS") / 1024, "peak_mb": kb("VmHWM") / 1024}))
""")


def rss(kind: str, runtime: str, path: Path, manifest: Manifest) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, kind, runtime, str(path), json.dumps(manifest.to_dict()),
                           str(ROOT)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {kind}/{runtime} failed: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# --- the run ------------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.sort(np.asarray(samples)) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "calls": int(a.size)}


def bench_runtime(runtime: Runtime, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    session = open_session(runtime, path)
    feeds = sample_inputs(session)
    manifest = manifest_for(session, runtime)
    host = ModelHost()  # a committed release: the steady state
    host.activate(MODEL, version="1.0.0", sha256="0" * 64, model_path=path, runtime=runtime, manifest=manifest,
                  watching=False)
    watched = ModelHost()  # the same model in its watch window: every output checked, the budget too
    watched.activate(MODEL, version="1.0.0", sha256="0" * 64, model_path=path, runtime=runtime, manifest=manifest,
                     latency_budget_ms=1000.0)
    rows: dict[str, Callable[[], Any]] = {
        "bare": bare_runner(runtime, path, session, feeds),
        "binding": bare_runner(runtime, path, session, feeds, binding=True),
        "Session.run": lambda: session.run(feeds),
        "host.infer": lambda: host.infer(MODEL, feeds),
        "host, watching": lambda: watched.infer(MODEL, feeds),
    }
    reference = host.infer(MODEL, feeds)
    for name, fn in rows.items():  # same answers, and warm
        got = fn()
        got = got if isinstance(got, dict) else dict(zip(reference, got))
        for key, value in reference.items():
            np.testing.assert_allclose(np.asarray(got[key]).reshape(value.shape), value, rtol=1e-4, atol=1e-5)
        timed(fn, max(100, args.calls // 10))
    samples: dict[str, list[float]] = {name: [] for name in [*rows, "HTTP binary", "HTTP JSON"]}
    with InferenceServer(host) as server:
        port = server.address[1]  # type: ignore[index]
        for _ in range(args.rounds):
            for name, fn in rows.items():
                samples[name] += timed(fn, args.calls)
            got = http_round(port, args.http_calls, feeds)
            samples["HTTP binary"] += got["binary"]
            samples["HTTP JSON"] += got["json"]
    stats = host.stats(MODEL)
    host.close()
    watched.close()
    session.close()
    table = {name: percentiles(s) for name, s in samples.items()}
    bare = table["bare"]["p50_ms"]
    for row in table.values():
        row["ratio"] = row["p50_ms"] / bare
        row["overhead_us"] = (row["p50_ms"] - bare) * 1e3
    memory = {kind: rss(kind, runtime, path, manifest) for kind in MEMORY_ROWS}
    return {"runtime": runtime, "model": str(path), "backend": host_backend(runtime, path),
            "input": {n: list(a.shape) for n, a in feeds.items()}, "rows": table, "memory_mb": memory,
            "host_stats": {"inferences": stats.inferences, "errors": stats.errors, "p50_ms": stats.p50_ms}}


def host_backend(runtime: Runtime, path: Path) -> str:
    with open_session(runtime, path) as s:
        return s.backend


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    rows, memory = result["rows"], result["memory_mb"]
    return {"host.infer within 1.1x of bare": rows["host.infer"]["ratio"] <= TARGET_RATIO,
            "HTTP binary p50 < 0.5 ms": rows["HTTP binary"]["p50_ms"] < TARGET_HTTP_P50_MS,
            "HTTP JSON p50 < 0.5 ms": rows["HTTP JSON"]["p50_ms"] < TARGET_HTTP_P50_MS,
            "agent (host, HTTP server, the daemon's imports) + model RSS <= 50 MB":
                memory["agent"]["rss_mb"] <= TARGET_RSS_MB}


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        print(f"\n{r['runtime']}: {Path(r['model']).name} on {r['backend']}, input {r['input']}")
        print(f"  {'row':<16} {'p50 ms':>9} {'p99 ms':>9} {'x bare':>7} {'+us':>8} {'calls':>7}")
        for name, row in r["rows"].items():
            print(f"  {name:<16} {row['p50_ms']:>9.4f} {row['p99_ms']:>9.4f} {row['ratio']:>7.2f} "
                  f"{row['overhead_us']:>8.1f} {row['calls']:>7}")
        rows = r["rows"]
        print(f"  host.infer / Session.run p50: {rows['host.infer']['p50_ms'] / rows['Session.run']['p50_ms']:.2f}")
        print("  idle RSS MB (peak):  " + ",  ".join(
            f"{MEMORY_ROWS[k]} {v['rss_mb']:.1f} ({v['peak_mb']:.1f})" for k, v in r["memory_mb"].items()))
        floor = r["memory_mb"]["mqtt"]["rss_mb"]
        print(f"  the runtime and aiomqtt alone hold {floor:.1f} MB: {TARGET_RSS_MB - floor:.1f} MB of the "
              f"{TARGET_RSS_MB:.0f} MB target is left for everything the agent does")
        for what, ok in verdicts(r).items():
            print(f"  {'PASS' if ok else 'MISS'}  {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model", default="digits", help="digits (default), mlp, or a .onnx/.tflite file")
    ap.add_argument("--runtimes", default="tflite,onnx", help="comma-separated: tflite,onnx")
    ap.add_argument("--calls", type=int, default=4000, help="in-process calls per row per round")
    ap.add_argument("--http-calls", type=int, default=2000, help="HTTP calls per mode per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache for converted models")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    if not runtimes or any(r not in ("tflite", "onnx") for r in runtimes) or min(args.calls, args.http_calls,
                                                                                  args.rounds) < 1:
        ap.error("--runtimes takes tflite and/or onnx; --calls, --http-calls and --rounds must be positive")
    files = model_files(args.model, runtimes, args.workdir)
    results = [bench_runtime(rt, files[rt], args) for rt in runtimes if rt in files]  # type: ignore[arg-type]
    if args.json:
        print(json.dumps([{**r, "targets": verdicts(r)} for r in results], indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
