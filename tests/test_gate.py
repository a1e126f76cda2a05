"""The gate's pure decisions, against in-memory figures."""

from __future__ import annotations

import pytest

from agent.errors import UsageError
from packager.gate import CandidateReport, GateConfig, accuracy_gate, choose, fidelity
from packager.optimize import plan_candidates

CFG = GateConfig()


def cand(name: str, size: int, p50: float, kept: bool = True) -> CandidateReport:
    return CandidateReport(name=name, target="onnx", mode="int8", size=size, p50_ms=p50, kept=kept)


def test_accuracy_drop_within_and_beyond_limit() -> None:
    assert accuracy_gate(reference_accuracy=0.975, accuracy=0.970, cosine=None, cfg=CFG)[0]
    ok, why = accuracy_gate(reference_accuracy=0.975, accuracy=0.960, cosine=None, cfg=CFG)
    assert not ok and "1.50 pp" in why
    strict = GateConfig(max_accuracy_drop=0.0)
    assert accuracy_gate(reference_accuracy=0.9, accuracy=0.9, cosine=None, cfg=strict)[0]
    assert not accuracy_gate(reference_accuracy=0.9, accuracy=0.8999, cosine=None, cfg=strict)[0]


def test_unlabelled_gate_uses_cosine() -> None:
    assert accuracy_gate(reference_accuracy=None, accuracy=None, cosine=0.995, cfg=CFG)[0]
    ok, why = accuracy_gate(reference_accuracy=None, accuracy=None, cosine=0.95, cfg=CFG)
    assert not ok and "--min-cosine" in why
    assert not accuracy_gate(reference_accuracy=None, accuracy=None, cosine=float("nan"), cfg=CFG)[0]


def test_fidelity_by_mode() -> None:
    assert fidelity("none", check_cosine=1.0, float_within_tolerance=True, cfg=CFG)[0]
    assert not fidelity("none", check_cosine=1.0, float_within_tolerance=False, cfg=CFG)[0]
    assert fidelity("fp16", check_cosine=0.9995, float_within_tolerance=False, cfg=CFG)[0]
    assert not fidelity("fp16", check_cosine=0.998, float_within_tolerance=False, cfg=CFG)[0]
    assert fidelity("int8", check_cosine=0.985, float_within_tolerance=False, cfg=CFG)[0]
    assert not fidelity("int8", check_cosine=0.5, float_within_tolerance=False, cfg=CFG)[0]
    assert not fidelity("int8", check_cosine=float("nan"), float_within_tolerance=False, cfg=CFG)[0]


def test_choose_smallest_class_then_fastest() -> None:
    # the MobileNetV2 situation: three int8 variants of nearly equal size; only the fastest should win
    cs = [cand("fp32", 14_000_000, 6.2), cand("int8 uint8", 3_600_000, 3.6), cand("int8 int8", 3_600_000, 5.9),
          cand("int8-dynamic", 3_500_000, 20.0), cand("fp16", 7_000_000, 9.3)]
    assert choose(cs, CFG).name == "int8 uint8"  # type: ignore[union-attr]
    # a much smaller model wins even when slower
    cs.append(cand("tiny", 1_000_000, 50.0))
    assert choose(cs, CFG).name == "tiny"  # type: ignore[union-attr]
    # dropped candidates are never chosen
    assert choose([cand("a", 10, 1.0, kept=False)], CFG) is None


def test_plan_candidates() -> None:
    auto_onnx = [c.name for c in plan_candidates("onnx", "auto")]
    assert auto_onnx == ["fp32", "fp16", "int8-dynamic", "int8 (uint8 act, per-channel)", "int8 (int8 act, per-channel)"]
    assert [c.mode for c in plan_candidates("tflite", "auto")] == ["none", "fp16", "int8-dynamic", "weight-only", "int8"]
    assert plan_candidates("onnx", "int8", activation_type="int8")[0].options["activation_type"] == "int8"
    with pytest.raises(UsageError, match="unknown --quantize"):
        plan_candidates("onnx", "int4")


def test_gate_config_validates() -> None:
    with pytest.raises(ValueError):
        GateConfig(max_accuracy_drop=-1)
