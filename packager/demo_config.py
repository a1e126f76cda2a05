"""What ``edgeship demo`` is asked to do (:class:`DemoConfig`, :class:`DemoTimeouts`) and what it
reports (:class:`DemoResult`: per step ok/failed/skipped, timings, details; ``--json`` prints
:meth:`DemoResult.to_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.mqtt import parse_broker_url
from packager.demo_devices import AgentTuning
from packager.gate import QUANTIZE_CHOICES



# --- configuration and results ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DemoTimeouts:
    """Seconds each wait may take before its step fails, naming what did not happen."""

    broker: float = 15.0
    server: float = 20.0
    agents: float = 30.0
    install: float = 60.0
    rollout: float = 60.0
    request: float = 10.0
    fleet: float = 10.0
    stop: float = 10.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise UsageError(f"demo timeout {name} must be positive, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    examples: Path
    """Directory with digits.onnx, calibration.npz, eval.npz, samples.npz, labels.txt."""
    broker_url: str | None = None
    """None: start the embedded amqtt broker."""
    devices: int = 3
    quantize: str = "auto"
    quantize_v2: str = "int8"
    v1: str = "1.0.0"
    v2: str = "1.1.0"
    samples: int = 20
    """Predictions per device and version."""
    min_accuracy: float = 0.8
    keep: bool = False
    timeouts: DemoTimeouts = DemoTimeouts()
    tuning: AgentTuning = AgentTuning()

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 16:
            raise UsageError("--devices must be between 1 and 16")
        if not 1 <= self.samples <= 200:
            raise UsageError("--samples must be between 1 and 200")
        for q in (self.quantize, self.quantize_v2):
            if q not in QUANTIZE_CHOICES:
                raise UsageError(f"unknown quantization {q!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
        if self.v1 == self.v2:
            raise UsageError("the demo's two releases need two versions")
        if self.broker_url is not None:
            parse_broker_url(self.broker_url)  # UsageError now rather than in a child later
        missing = [n for n in ("digits.onnx", "calibration.npz", "eval.npz", "samples.npz", "labels.txt")
                   if not (self.examples / n).is_file()]
        if missing:
            raise UsageError(f"{self.examples} lacks {', '.join(missing)}: the demo needs the examples/digits "
                             "directory of a source checkout (pass --examples DIR)")


@dataclass
class StepResult:
    name: str
    title: str
    ok: bool | None = None
    """None: not run (an earlier step failed)."""
    seconds: float = 0.0
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "ok": self.ok, "skipped": self.ok is None,
                "seconds": round(self.seconds, 3), "error": self.error, "detail": self.detail}


@dataclass
class DemoResult:
    steps: list[StepResult]
    broker: dict[str, Any] = field(default_factory=dict)
    workdir: str = ""
    kept: bool = False
    seconds: float = 0.0
    children: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    """{"v1": ..., "v2": ...}: the releases the devices went through."""

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def failed(self) -> StepResult | None:
        return next((s for s in self.steps if s.ok is False), None)

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed
        return {"ok": self.ok, "failed_step": failed.name if failed else None,
                "error": failed.error if failed else None, "seconds": round(self.seconds, 3),
                "versions": self.versions, "broker": self.broker, "workdir": self.workdir, "kept": self.kept,
                "steps": [s.to_dict() for s in self.steps], "children": self.children}


def default_examples() -> Path:
    """examples/digits of the source checkout this package runs from."""
    return Path(__file__).resolve().parent.parent / "examples" / "digits"


def with_timeouts(config: DemoConfig, scale: float) -> DemoConfig:
    """``config`` with every timeout multiplied by ``scale`` (slow machines)."""
    t = config.timeouts
    return replace(config, timeouts=DemoTimeouts(**{k: v * scale for k, v in t.__dict__.items()}))
