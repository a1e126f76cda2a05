"""The accuracy gate: pure decisions over measured figures.

Two checks stand between a converted or quantized model and a signature:

1. **Fidelity** (always): on the check inputs (calibration, else self-test samples) the
   candidate's outputs must match the float model's. A float conversion must match
   element-wise within ``float_rtol``/``float_atol``; an fp16 model needs a mean cosine
   similarity of at least ``fp16_min_cosine``; an int8 model at least ``int8_min_cosine``.
2. **The gate** (with ``--eval``): with labels, accuracy may drop at most
   ``max_accuracy_drop`` percentage points below the float model's on the same runtime;
   without labels, the mean cosine similarity to the float model's outputs must be at
   least ``min_cosine``.

``choose`` picks among the candidates that passed: the smallest size class (within
``size_tie`` of the smallest file), then the fastest p50 latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from agent.errors import BadData

QuantMode = Literal["none", "fp16", "int8-dynamic", "weight-only", "int8"]
QUANTIZE_CHOICES = ("none", "fp16", "int8-dynamic", "int8", "auto")


class GateFailed(BadData):
    """No candidate passed the fidelity check and the accuracy gate; nothing was signed."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    max_accuracy_drop: float = 1.0
    """Percentage points of accuracy a result may lose against the float model (labelled --eval)."""
    min_cosine: float = 0.99
    """Minimum mean cosine similarity to the float model's outputs (unlabelled --eval)."""
    float_rtol: float = 1e-3
    float_atol: float = 1e-4
    """Element-wise tolerance for a float conversion (different kernels, summation order)."""
    fp16_min_cosine: float = 0.999
    int8_min_cosine: float = 0.98
    """Fidelity floors on the check inputs, independent of --eval."""
    size_tie: float = 0.25
    """Sizes within this fraction of the smallest count as equally small; then the fastest wins."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop <= 100:
            raise ValueError("max_accuracy_drop must be within 0..100 percentage points")
        for name in ("min_cosine", "fp16_min_cosine", "int8_min_cosine"):
            if not -1 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within -1..1")


@dataclass(frozen=True, kw_only=True)
class CandidateReport:
    """One candidate's figures and the decision about it (goes into the signed manifest)."""

    name: str
    target: str
    mode: QuantMode
    options: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    size_ratio: float = 1.0
    accuracy: float | None = None
    accuracy_drop_pp: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    check_cosine: float | None = None
    check_max_abs_diff: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    speedup: float | None = None
    seconds: float = 0.0
    min_runtime_version: str | None = None
    kept: bool = False
    chosen: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def fidelity(mode: QuantMode, *, check_cosine: float, float_within_tolerance: bool, cfg: GateConfig) -> tuple[bool, str]:
    """Does the candidate reproduce the float model on the check inputs?"""
    if mode == "none":
        if float_within_tolerance:
            return True, "matches the source model"
        return False, f"outputs differ from the source model beyond rtol={cfg.float_rtol:g} atol={cfg.float_atol:g}"
    floor = cfg.fp16_min_cosine if mode == "fp16" else cfg.int8_min_cosine
    if check_cosine != check_cosine or check_cosine < floor:  # NaN-safe
        return False, f"cosine {check_cosine:.4f} to the float model on the check inputs is below {floor:g}"
    return True, f"cosine {check_cosine:.4f} on the check inputs"


def accuracy_gate(
    *, reference_accuracy: float | None, accuracy: float | None, cosine: float | None, cfg: GateConfig
) -> tuple[bool, str]:
    """The --eval gate: accuracy drop (labelled) or cosine (unlabelled)."""
    if reference_accuracy is not None and accuracy is not None:
        drop = (reference_accuracy - accuracy) * 100.0
        if drop > cfg.max_accuracy_drop + 1e-9:
            return False, f"accuracy drops {drop:.2f} pp (> {cfg.max_accuracy_drop:g} pp allowed)"
        return True, f"accuracy drop {drop:.2f} pp"
    if cosine is not None:
        if cosine != cosine or cosine < cfg.min_cosine:
            return False, f"cosine {cosine:.4f} below --min-cosine {cfg.min_cosine:g}"
        return True, f"cosine {cosine:.4f}"
    return True, "no --eval data"


def choose(candidates: Sequence[CandidateReport], cfg: GateConfig) -> CandidateReport | None:
    """Smallest size class among the kept candidates, then the fastest."""
    kept = [c for c in candidates if c.kept]
    if not kept:
        return None
    smallest = min(c.size for c in kept)
    small = [c for c in kept if c.size <= smallest * (1.0 + cfg.size_tie)]
    return min(small, key=lambda c: (c.p50_ms if c.p50_ms is not None else float("inf"), c.size))
