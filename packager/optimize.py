"""Conversion and quantization behind the gate: source model -> the model to sign, plus its report.

Plan, then apply: :func:`plan_candidates` lists what will be tried for a target and a
``--quantize`` choice; :func:`optimize` makes each candidate, measures it on the target
runtime against the float model, applies :mod:`packager.gate`, and returns the chosen
model with a report that goes into the signed manifest.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from agent.errors import EdgeshipError, ModelError, UsageError
from agent.manifest import Runtime, version_tuple
from agent.runtime import open_session
from agent.selftest import generate_inputs
from packager import evaluate as ev
from packager.data import SampleSet, load_samples
from packager.gate import CandidateReport, GateConfig, GateFailed, QuantMode, accuracy_gate, choose, fidelity
from packager.introspect import ModelInfo, read_signature
from packager.progress import Reporter, Silent

log = logging.getLogger(__name__)

MAX_CHECK_SAMPLES = 64
ActivationType = Literal["uint8", "int8"]


@dataclass(frozen=True, kw_only=True)
class Candidate:
    name: str
    mode: QuantMode
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class OptimizeRequest:
    source: Path
    target: Runtime | None = None
    """Runtime the device will use; default: the source model's own."""
    quantize: str = "none"
    calibration: Path | None = None
    eval: Path | None = None
    activation_type: ActivationType = "uint8"
    per_channel: bool = True
    gate: GateConfig = GateConfig()
    latency_budget_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Optimized:
    path: Path
    info: ModelInfo
    quantized: bool
    min_runtime_version: str
    report: dict[str, Any] | None


def plan_candidates(target: Runtime, quantize: str, *, activation_type: ActivationType = "uint8",
                    per_channel: bool = True) -> list[Candidate]:
    """What ``--quantize`` tries on ``target``. ``auto`` includes the float model, so it always has an answer."""
    fp32 = Candidate(name="fp32", mode="none")
    if target == "onnx":
        fp16 = Candidate(name="fp16", mode="fp16")
        dyn = Candidate(name="int8-dynamic", mode="int8-dynamic", options={"per_channel": per_channel})
        def static(act: ActivationType) -> Candidate:
            pc = "per-channel" if per_channel else "per-tensor"
            return Candidate(name=f"int8 ({act} act, {pc})", mode="int8",
                             options={"activation_type": act, "per_channel": per_channel})
        table: dict[str, list[Candidate]] = {
            "none": [fp32], "fp16": [fp16], "int8-dynamic": [dyn], "int8": [static(activation_type)],
            "auto": [fp32, fp16, dyn, static("uint8"), static("int8")],
        }
    else:
        fp16 = Candidate(name="fp16 weights", mode="fp16")
        dyn = Candidate(name="int8-dynamic", mode="int8-dynamic")
        wo = Candidate(name="int8 weight-only", mode="weight-only")
        st = Candidate(name="int8 (int8 act)", mode="int8")
        table = {"none": [fp32], "fp16": [fp16], "int8-dynamic": [dyn], "int8": [st],
                 "auto": [fp32, fp16, dyn, wo, st]}
    if quantize not in table:
        raise UsageError(f"unknown --quantize {quantize!r}; choose one of {', '.join(table)}")
    return table[quantize]


def _max_version(*versions: str | None) -> str:
    present = [v for v in versions if v]
    return max(present, key=version_tuple)


def _produce(cand: Candidate, target: Runtime, float_model: Path, onnx_source: Path | None, out_dir: Path,
             calibration: Sequence[dict[str, np.ndarray]] | None, reporter: Reporter) -> tuple[Path, str | None, dict[str, Any]]:
    """Make the candidate's model file; returns (path, min runtime it needs or None, quantizer details)."""
    if cand.mode == "none":
        return float_model, None, {}
    suffix = ".onnx" if target == "onnx" else ".tflite"
    dst = out_dir / (cand.name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "") + suffix)
    if target == "onnx":
        from packager.quantize.onnx_quant import quantize_onnx

        assert onnx_source is not None
        if cand.mode == "int8":
            with reporter.bar(f"calibrating {cand.name}") as advance:
                q = quantize_onnx(onnx_source, dst, mode="int8", calibration=calibration, progress=advance,
                                  activation_type=cand.options["activation_type"],
                                  per_channel=cand.options["per_channel"])
        else:
            q = quantize_onnx(onnx_source, dst, mode=cand.mode,  # type: ignore[arg-type]
                              per_channel=cand.options.get("per_channel", True))
        return q.path, q.min_runtime_version, dict(q.details)
    if cand.mode == "fp16":
        if onnx_source is None:
            raise UsageError("fp16 for --target tflite is made by the ONNX converter; it needs an ONNX source model")
        from packager.convert import convert_onnx_to_tflite

        res = convert_onnx_to_tflite(onnx_source, dst, fp16_weights=True)
        return res.path, None, {"op_counts": dict(res.op_counts)}
    from packager.quantize.tflite_quant import quantize_tflite

    if cand.mode == "int8":
        with reporter.bar(f"calibrating {cand.name}") as advance:
            q = quantize_tflite(float_model, dst, mode="int8", calibration=calibration, progress=advance)
    else:
        q = quantize_tflite(float_model, dst, mode=cand.mode)  # type: ignore[arg-type]
    return q.path, q.min_runtime_version, dict(q.details)


def optimize(req: OptimizeRequest, workdir: Path, *, reporter: Reporter | None = None) -> Optimized:
    """Convert/quantize ``req.source`` for ``req.target`` and gate the result. Files go to ``workdir``."""
    rep = reporter or Silent()
    src = read_signature(req.source)
    target: Runtime = req.target or src.runtime
    if src.runtime == "tflite" and target == "onnx":
        raise UsageError("converting a TFLite model to ONNX is not supported; use --target tflite")
    candidates = plan_candidates(target, req.quantize, activation_type=req.activation_type, per_channel=req.per_channel)
    needs_calibration = any(c.mode == "int8" for c in candidates)
    if req.quantize == "int8" and req.calibration is None:
        raise UsageError("--quantize int8 (static) needs --calibration FILE.npz")
    if req.quantize == "none" and target == src.runtime and req.eval is None:
        return Optimized(path=req.source, info=src, quantized=False, min_runtime_version=src.min_runtime_version,
                         report=None)

    calib: SampleSet | None = load_samples(req.calibration, src.inputs, what="--calibration") if req.calibration else None
    evalset: SampleSet | None = load_samples(req.eval, src.inputs, what="--eval") if req.eval else None
    if needs_calibration and calib is None:
        rep.note("no --calibration file: static int8 candidates are skipped")
        candidates = [c for c in candidates if c.mode != "int8"]
    check_feeds = (calib.all_feeds(MAX_CHECK_SAMPLES) if calib else
                   evalset.all_feeds(MAX_CHECK_SAMPLES) if evalset else
                   generate_inputs(src.inputs, cases=16, seed=0))
    eval_feeds = evalset.all_feeds() if evalset else None
    calib_feeds = calib.all_feeds() if calib else None
    labels = evalset.labels if evalset else None

    # 1. the float model on the target runtime: the reference every candidate is judged against
    onnx_source = req.source if src.runtime == "onnx" else None
    source_check: tuple[list[dict[str, np.ndarray]], list[str]] | None = None
    if target == src.runtime:
        float_model = req.source
    else:
        from packager.convert import convert_onnx_to_tflite

        with rep.step(f"Converting {req.source.name} to TFLite"):
            float_model = convert_onnx_to_tflite(req.source, workdir / "fp32.tflite").path
            with open_session("onnx", req.source, threads=1) as session:  # its outputs only, untimed
                source_check = ev.run_all(session, check_feeds), [s.name for s in session.outputs]
    with rep.step(f"Measuring the float model on {target}"):
        ref = ev.measure(float_model, target, check_feeds=check_feeds, eval_feeds=eval_feeds,
                         latency_budget_s=req.latency_budget_s)
    if source_check is not None:  # the converted model must reproduce the source it came from
        source_outputs, source_names = source_check
        if not ev.within_tolerance(ref.check_outputs, source_outputs, source_names,
                                   rtol=req.gate.float_rtol, atol=req.gate.float_atol):
            diff = ev.max_abs_diff(ref.check_outputs, source_outputs, source_names)
            raise ModelError(f"the TFLite conversion does not reproduce the ONNX model (max abs diff {diff:.3g}); "
                             "use --target onnx")
    names = list(ref.output_names)
    main_out = names[0]
    ref_acc = ev.accuracy(ref.eval_outputs, main_out, labels) if (labels is not None and ref.eval_outputs) else None

    reports: list[CandidateReport] = []
    paths: dict[str, tuple[Path, str | None]] = {}
    for cand in candidates:
        t0 = time.perf_counter()
        with rep.step(f"Candidate {cand.name}"):
            try:
                path, min_rt, details = _produce(cand, target, float_model, onnx_source, workdir, calib_feeds, rep)
                made = time.perf_counter() - t0
                m = ref if path == float_model else ev.measure(
                    path, target, check_feeds=check_feeds, eval_feeds=eval_feeds, latency_budget_s=req.latency_budget_s)
            except EdgeshipError as e:
                if req.quantize != "auto":
                    raise
                reports.append(CandidateReport(name=cand.name, target=target, mode=cand.mode, options=cand.options,
                                               seconds=time.perf_counter() - t0, reason=f"failed: {e}"))
                rep.note(f"dropped: {e}")
                continue
            check_cos = ev.mean_cosine(m.check_outputs, ref.check_outputs, names)
            exact = ev.within_tolerance(m.check_outputs, ref.check_outputs, names,
                                        rtol=req.gate.float_rtol, atol=req.gate.float_atol)
            ok, why = fidelity(cand.mode, check_cosine=check_cos, float_within_tolerance=exact, cfg=req.gate)
            acc = cos = agree = None
            if m.eval_outputs is not None and ref.eval_outputs is not None:
                cos = ev.mean_cosine(m.eval_outputs, ref.eval_outputs, names)
                agree = ev.agreement(m.eval_outputs, ref.eval_outputs, main_out)
                if labels is not None:
                    acc = ev.accuracy(m.eval_outputs, main_out, labels)
            if ok:
                ok, why2 = accuracy_gate(reference_accuracy=ref_acc, accuracy=acc,
                                         cosine=None if labels is not None else cos, cfg=req.gate)
                why = f"{why}; {why2}" if m is not ref else why2
            reports.append(CandidateReport(
                name=cand.name, target=target, mode=cand.mode, options={**cand.options, **details},
                size=m.size, size_ratio=m.size / ref.size, accuracy=acc,
                accuracy_drop_pp=None if acc is None or ref_acc is None else (ref_acc - acc) * 100.0,
                agreement=agree, cosine=cos, check_cosine=check_cos,
                check_max_abs_diff=ev.max_abs_diff(m.check_outputs, ref.check_outputs, names),
                p50_ms=m.latency.p50_ms, p99_ms=m.latency.p99_ms, speedup=ref.latency.p50_ms / m.latency.p50_ms,
                seconds=made, min_runtime_version=min_rt, kept=ok, reason=why,
            ))
            paths[cand.name] = (path, min_rt)
            rep.note(("kept: " if ok else "dropped: ") + why)

    best = choose(reports, req.gate)
    reports = [replace(r, chosen=best is not None and r.name == best.name) for r in reports]
    report = {
        "target": target,
        "requested": req.quantize,
        "chosen": best.name if best else None,
        "mode": best.mode if best else None,
        "source": {"file": req.source.name, "runtime": src.runtime, "size": req.source.stat().st_size},
        "reference": {"size": ref.size, "accuracy": ref_acc, "p50_ms": ref.latency.p50_ms,
                      "p99_ms": ref.latency.p99_ms, "backend": ref.backend},
        "gate": {"max_accuracy_drop_pp": req.gate.max_accuracy_drop, "min_cosine": req.gate.min_cosine,
                 "fp16_min_cosine": req.gate.fp16_min_cosine, "int8_min_cosine": req.gate.int8_min_cosine,
                 "eval_samples": evalset.count if evalset else 0, "labelled": labels is not None,
                 "check_samples": len(check_feeds), "check_data": "calibration" if calib else "eval" if evalset else "generated"},
        "measured_on": {"machine": platform.machine(), "threads": 1},
        "candidates": [r.to_dict() for r in reports],
    }
    if best is None:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in reports)
        raise GateFailed(f"no candidate passed the gate, nothing signed ({reasons})", report)
    path, min_rt = paths[best.name]
    info = read_signature(path)
    return Optimized(path=path, info=info, quantized=best.mode != "none",
                     min_runtime_version=_max_version(info.min_runtime_version, min_rt), report=report)
