"""The operator table: for each ONNX op type, how to infer its output shapes and how to lower it.

A :class:`Rule` pairs two functions. ``infer`` runs during analysis, before
anything is written: it returns the output shapes (ONNX order, ``-1`` for the
dynamic batch in dimension 0) or raises :class:`Unsupported` with a label
naming the op and the attributes that cannot be converted. ``lower`` runs
afterwards and writes TFLite operators through an
:class:`packager.convert.emit.Emitter`.
Rules are registered by the ``ops_*`` modules with :func:`rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from packager.convert.graph import Node

if TYPE_CHECKING:
    from packager.convert.emit import Emitter

__all__ = ["RULES", "BatchMixed", "Ctx", "Rule", "Shape", "SimpleCtx", "Unsupported", "broadcast", "rule"]

Shape = tuple[int, ...]


class Unsupported(Exception):
    """This node cannot be converted; ``label`` is how the user will see it (``"Conv(dilations=[2, 2])"``)."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


class BatchMixed(Exception):
    """The model computes with its dynamic batch size in a way TFLite shapes cannot express.

    Not a user error: the converter retries with the batch size fixed to 1.
    """


class Ctx(Protocol):
    """What ``infer`` may look at."""

    opset: int

    def shape(self, name: str) -> Shape: ...
    def const(self, name: str) -> np.ndarray | None: ...


class SimpleCtx:
    """A :class:`Ctx` over a shape table and a constant table."""

    def __init__(self, opset: int, shapes: dict[str, Shape], consts: dict[str, np.ndarray]) -> None:
        self.opset = opset
        self._shapes = shapes
        self._consts = consts

    def shape(self, name: str) -> Shape:
        value = self._consts.get(name)
        return tuple(value.shape) if value is not None else self._shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        return self._consts.get(name) if name else None


InferFn = Callable[[Node, Ctx], Sequence[Shape]]
LowerFn = Callable[[Node, "Emitter"], None]


@dataclass(frozen=True)
class Rule:
    infer: InferFn
    lower: LowerFn


RULES: dict[str, Rule] = {}


def rule(*op_types: str, infer: InferFn) -> Callable[[LowerFn], LowerFn]:
    """Register the decorated lowering function and ``infer`` for ``op_types``."""
    def register(lower: LowerFn) -> LowerFn:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"two rules for {op}")
            RULES[op] = Rule(infer=infer, lower=lower)
        return lower
    return register


def broadcast(*shapes: Shape) -> Shape:
    """Numpy broadcasting, with ``-1`` (the dynamic batch) allowed to meet only ``1`` or ``-1``."""
    rank = max(len(s) for s in shapes)
    out: list[int] = []
    for i in range(rank):
        dims = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0}
        dims.discard(1)
        if not dims:
            out.append(1)
        elif len(dims) == 1:
            out.append(dims.pop())
        elif -1 in dims:
            raise BatchMixed(f"the dynamic batch is broadcast against a fixed size {sorted(dims)}")
        else:
            raise Unsupported("broadcast of incompatible shapes")
    return tuple(out)


def const_or_unsupported(node: Node, ctx: Ctx, index: int, what: str) -> np.ndarray:
    value = ctx.const(node.input(index))
    if value is None:
        raise Unsupported(f"{node.op_type}(non-constant {what})")
    return value


def fmt(value: Any) -> str:
    """Attribute values the way labels show them."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ",".join(str(int(v)) if float(v).is_integer() else f"{float(v):g}" for v in value) + "]"
    return str(value)
