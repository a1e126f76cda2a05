"""What a conversion returns and the error it raises for operators it cannot convert."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from agent.errors import UsageError

__all__ = ["ConversionResult", "UnsupportedOperators"]


@dataclass(frozen=True, kw_only=True)
class ConversionResult:
    """A written ``.tflite`` file and what went into it.

    ``op_counts``: TFLite builtin operators written, by name (``{"CONV_2D": 4, ...}``).
    ``folded``: ONNX nodes that have no operator of their own in the output, by
    reason: ``"constant_nodes"`` (evaluated at conversion time), an op type
    folded into its producer (``"BatchNormalization"`` into a Conv, ``"Relu"``
    or ``"Clip"`` fused as an activation), ``"Identity"``/``"Dropout"`` removed.
    ``notes``: decisions a user may want to know about (batch handling, fp16).
    """

    path: Path
    op_counts: Mapping[str, int] = field(default_factory=dict)
    folded: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what in ("op_counts", "folded"):
            counts = dict(getattr(self, what))
            if any(not isinstance(k, str) or not isinstance(v, int) or v < 0 for k, v in counts.items()):
                raise ValueError(f"{what} must map names to non-negative counts, got {counts!r}")
            object.__setattr__(self, what, MappingProxyType(counts))
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "notes", tuple(self.notes))


class UnsupportedOperators(UsageError):
    """The model uses operators (or attribute combinations) the converter cannot express in TFLite.

    ``problems`` maps each label (an op type such as ``"NonMaxSuppression"`` or
    an op with the offending attributes such as ``"Conv(auto_pad=FOO)"``) to the
    number of nodes affected.
    """

    def __init__(self, problems: Mapping[str, int]) -> None:
        self.problems: Mapping[str, int] = MappingProxyType(dict(problems))
        super().__init__(format_unsupported(self.problems))

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> UnsupportedOperators:
        return cls(Counter(labels))


def format_unsupported(problems: Mapping[str, int]) -> str:
    """``cannot convert to TFLite: unsupported ONNX operator(s) Foo (2), Bar (1); use --target onnx ...``.

    Most frequent first, then by name.
    """
    listed = ", ".join(f"{name} ({count})" for name, count in sorted(problems.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"cannot convert to TFLite: unsupported ONNX operator(s) {listed}; "
            "use --target onnx to ship this model to the ONNX runtime")
