"""Quantization bench: every mode on both targets for (a) the digits CNN and (b) a MobileNetV2-shaped net.

    python bench/quantize.py [--only digits|mobilenet] [--json]

For each model and target it runs ``--quantize auto`` through edgeship's own pipeline (the same
code ``edgeship build`` runs), which measures every candidate on the target runtime at 1 thread
against the float model of the same run, and prints: size, accuracy (digits, labelled) or
cosine (MobileNet, random inputs), top-1 agreement with fp32, p50 latency, quantization time,
the speed ratio against fp32, and what ``auto`` chose. Needs torch for (b) (``pip install torch==2.13.0``).
Absolute times are noisy on shared machines; the ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from packager.optimize import OptimizeRequest, optimize  # noqa: E402
from packager.progress import default_reporter  # noqa: E402

DIGITS = ROOT / "examples" / "digits"


def mobilenet_files(work: Path) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT / "bench"))
    from mobilenet import export_mobilenet_v2

    model = export_mobilenet_v2(work / "mobilenet_v2.onnx")
    rng = np.random.default_rng(0)
    calib = work / "mnv2-calibration.npz"
    np.savez(calib, input=rng.standard_normal((32, 3, 224, 224)).astype(np.float32))
    evalf = work / "mnv2-eval.npz"
    np.savez(evalf, input=rng.standard_normal((32, 3, 224, 224)).astype(np.float32))
    return model, calib, evalf


def run(model: Path, calib: Path, evalf: Path, target: str, budget: float, quiet: bool) -> dict:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as work:
        req = OptimizeRequest(source=model, target=target, quantize="auto", calibration=calib, eval=evalf,  # type: ignore[arg-type]
                              latency_budget_s=budget)
        t0 = time.perf_counter()
        opt = optimize(req, Path(work), reporter=default_reporter(quiet=quiet))
        assert opt.report is not None
        opt.report["total_seconds"] = time.perf_counter() - t0
        return opt.report


def print_table(model_name: str, report: dict) -> None:  # type: ignore[type-arg]
    ref = report["reference"]
    labelled = report["gate"]["labelled"]
    print(f"\n{model_name} -> {report['target']}   (fp32 reference: {ref['size'] / 1024:.1f} KiB, "
          f"p50 {ref['p50_ms']:.3f} ms on {ref['backend']}"
          + (f", accuracy {ref['accuracy']:.4f}" if ref["accuracy"] is not None else "") + ")")
    metric = "accuracy" if labelled else "cosine"
    print(f"  {'mode':<30} {'size KiB':>9} {'size':>6} {metric:>8} {'top1 agr':>8} {'p50 ms':>8} {'vs fp32':>8} "
          f"{'quant s':>8}  decision")
    for c in report["candidates"]:
        val = c["accuracy"] if labelled else c["cosine"]
        dec = "CHOSEN" if c["chosen"] else ("kept" if c["kept"] else "dropped")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"  {c['name']:<30} {fmt(c['size'] / 1024 if c['size'] else None, '9.1f')} "
              f"{fmt(c['size_ratio'], '5.2f')}x {fmt(val, '8.4f')} {fmt(c['agreement'], '8.4f')} "
              f"{fmt(c['p50_ms'], '8.3f')} {fmt(c['speedup'], '7.2f')}x {c['seconds']:8.2f}  {dec}: {c['reason']}")
    print(f"  auto chose: {report['chosen']}  (whole run {report['total_seconds']:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["digits", "mobilenet"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--latency-budget", type=float, default=2.0, help="seconds of timing per candidate")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        if args.only in (None, "digits"):
            models.append(("digits CNN", DIGITS / "digits.onnx", DIGITS / "calibration.npz", DIGITS / "eval.npz"))
        if args.only in (None, "mobilenet"):
            models.append(("MobileNetV2-shaped", *mobilenet_files(Path(tmp))))
        for name, model, calib, evalf in models:
            for target in ("onnx", "tflite"):
                rep = run(model, calib, evalf, target, args.latency_budget, quiet=args.json)
                results[f"{name} -> {target}"] = rep
                if not args.json:
                    print_table(name, rep)
    if args.json:
        print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
