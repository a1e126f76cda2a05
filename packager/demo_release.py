"""The demo's releases: the digits model quantized behind the accuracy gate, built into a
signed bundle, and published into the TUF repository, each checked on the way.

The same library calls as ``edgeship build --target onnx --quantize ... --calibration
--eval --labels --sample-inputs`` and ``edgeship publish``, on the committed
examples/digits data (no torch, no network).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packager.demo_devices import MODEL
from packager.demo_narrator import Narrator, StepLine, StepReporter
from packager.demo_procs import DemoFailed


@dataclass(frozen=True, kw_only=True)
class Outcome:
    title: str
    """The line shown with the step's ✓."""
    detail: dict[str, Any]


def build_release(*, examples: Path, workdir: Path, key: Path, version: str, quantize: str, line: StepLine,
                  say: Narrator, step: str) -> tuple[Path, Outcome]:
    """Quantize (``quantize``: none, fp16, int8-dynamic, int8 or auto) behind the gate, show the gate's
    report, build and sign the bundle ``workdir/digits-VERSION.edge``. Fails unless the gate chose a
    model whose accuracy drop is within its limit."""
    from packager.build import BuildRequest, build_bundle
    from packager.gate import GateConfig, GateFailed
    from packager.keys import load_private_key
    from packager.optimize import OptimizeRequest, optimize

    reporter = StepReporter(line, f"{MODEL} {version}")
    oreq = OptimizeRequest(source=examples / "digits.onnx", target="onnx", quantize=quantize,
                           calibration=examples / "calibration.npz", eval=examples / "eval.npz", gate=GateConfig())
    work = workdir / f"optimize-{version}"
    work.mkdir()
    try:
        try:
            opt = optimize(oreq, work, reporter=reporter)
        except GateFailed as e:
            if e.report is not None:
                say.quantization_report(e.report)
            raise DemoFailed(step, str(e)) from None
        report = opt.report
        if report is None or not report.get("chosen"):
            raise DemoFailed(step, "the gate chose no model")
        say.quantization_report(report)
        chosen = next(c for c in report["candidates"] if c["chosen"])
        gate, ref = report["gate"], report["reference"]
        drop = chosen["accuracy_drop_pp"]
        if drop is None or drop > gate["max_accuracy_drop_pp"]:
            raise DemoFailed(step, f"the chosen model {chosen['name']} loses {drop} pp of accuracy "
                                   f"(the gate allows {gate['max_accuracy_drop_pp']})")
        req = BuildRequest(model=opt.path, name=MODEL, version=version, out=workdir / f"{MODEL}-{version}.edge",
                           labels=examples / "labels.txt", sample_inputs=examples / "samples.npz",
                           quantization_report=report, quantized=opt.quantized, min_runtime=opt.min_runtime_version)
        result = build_bundle(req, load_private_key(key, passphrase=None), reporter=reporter, model_info=opt.info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say.note(f"gate: accuracy {chosen['accuracy']:.4f} vs float {ref['accuracy']:.4f} "
             f"(drop {drop:+.2f} pp, limit {gate['max_accuracy_drop_pp']:g} pp) "
             f"on {gate['eval_samples']} labelled digits")
    say.note(f"bundle {result.path.name}: {result.bundle_size:,} bytes, sha256 {result.bundle_sha256[:16]}…, signed, "
             f"self-test of {result.selftest['cases']} golden cases inside")
    detail = {"version": version, "quantize": quantize, "chosen": chosen["name"], "mode": report["mode"],
              "float_accuracy": ref["accuracy"], "accuracy": chosen["accuracy"], "accuracy_drop_pp": drop,
              "max_accuracy_drop_pp": gate["max_accuracy_drop_pp"], "eval_samples": gate["eval_samples"],
              "model_size": chosen["size"], "size_ratio": chosen["size_ratio"], "bundle_size": result.bundle_size,
              "sha256": result.bundle_sha256, "signer": result.signer}
    title = (f"Built {MODEL} {version}: {chosen['name']} chosen, {chosen['size'] / 1024:.1f} KiB "
             f"({chosen['size_ratio']:.2f}x the float model)")
    return result.path, Outcome(title=title, detail=detail)


def publish_release(repo: Path, bundle: Path, *, version: str, step: str) -> tuple[int, Outcome]:
    """Publish ``bundle`` for every device (no groups); returns the new timestamp version."""
    from packager.repo import publish

    res = publish(repo, bundle, now=datetime.now(timezone.utc))
    if not res.changed or res.version != version:
        raise DemoFailed(step, f"publishing {version} changed nothing ({res.message})")
    detail = {"target": res.target_path, "length": res.length, "sha256": res.sha256,
              "targets_version": res.targets_version, "timestamp_version": res.timestamp_version,
              "transfer_signer": res.transfer_signer}
    title = (f"Published {res.target_path} ({res.length:,} bytes): targets v{res.targets_version}, "
             f"timestamp v{res.timestamp_version}")
    return res.timestamp_version, Outcome(title=title, detail=detail)
