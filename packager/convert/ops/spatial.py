"""Geometry shared by convolutions and pools: kernel, strides, dilations, padding.

TFLite knows two paddings, SAME and VALID; ONNX has explicit per-side pads.
:func:`padding_plan` maps one onto the other exactly: zero pads are VALID,
pads equal to what TFLite computes for SAME are SAME, anything else becomes an
explicit PAD operator followed by a VALID op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.graph import Node
from packager.convert.rules import Unsupported, fmt

__all__ = ["Geometry", "apply_padding", "geometry", "padding_plan"]


@dataclass(frozen=True)
class Geometry:
    """2-D window geometry; ``pads`` is ``(top, left, bottom, right)`` as in ONNX ``pads``."""

    in_hw: tuple[int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    def effective_kernel(self, i: int) -> int:
        return (self.kernel[i] - 1) * self.dilations[i] + 1

    def out_hw(self, *, ceil_mode: bool = False) -> tuple[int, int]:
        rnd = math.ceil if ceil_mode else math.floor
        return tuple(  # type: ignore[return-value]
            int(rnd((self.in_hw[i] + self.pads[i] + self.pads[i + 2] - self.effective_kernel(i)) / self.strides[i])) + 1
            for i in (0, 1))

    def same_pads(self) -> tuple[int, int, int, int]:
        """The pads TFLite's SAME padding uses (extra pixel at the end)."""
        before, after = [], []
        for i in (0, 1):
            out = -(-self.in_hw[i] // self.strides[i])
            total = max((out - 1) * self.strides[i] + self.effective_kernel(i) - self.in_hw[i], 0)
            before.append(total // 2)
            after.append(total - total // 2)
        return before[0], before[1], after[0], after[1]


def _pair(node: Node, name: str, default: int) -> tuple[int, int]:
    value = node.attrs.get(name)
    if value is None:
        return default, default
    if len(value) != 2:
        raise Unsupported(f"{node.op_type}({name}={fmt(value)})")
    return int(value[0]), int(value[1])


def geometry(node: Node, in_shape: Sequence[int], kernel: tuple[int, int]) -> Geometry:
    """The node's window geometry on a 4-D NCHW input; ``auto_pad`` resolved into explicit pads."""
    in_hw = (int(in_shape[2]), int(in_shape[3]))
    if "kernel_shape" in node.attrs and tuple(int(k) for k in node.attrs["kernel_shape"]) != kernel:
        raise Unsupported(f"{node.op_type}(kernel_shape={fmt(node.attrs['kernel_shape'])} != weights)")
    strides = _pair(node, "strides", 1)
    dilations = _pair(node, "dilations", 1)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = tuple(int(p) for p in node.attr("pads", [0, 0, 0, 0]))
        if len(pads) != 4 or min(pads) < 0:
            raise Unsupported(f"{node.op_type}(pads={fmt(pads)})")
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        t, left, b, r = Geometry(in_hw, kernel, strides, dilations, (0, 0, 0, 0)).same_pads()
        pads = (t, left, b, r) if auto_pad == "SAME_UPPER" else (b, r, t, left)
    else:
        raise Unsupported(f"{node.op_type}(auto_pad={auto_pad})")
    if min(strides) < 1 or min(dilations) < 1:
        raise Unsupported(f"{node.op_type}(strides={fmt(strides)}, dilations={fmt(dilations)})")
    return _trim(Geometry(in_hw, kernel, strides, dilations, pads))


def _trim(geo: Geometry) -> Geometry:
    """Drop end padding no window reaches (``k=2, s=2`` on 8 pixels with an end pad of 1): same output."""
    out = geo.out_hw()
    pads = list(geo.pads)
    for i in (0, 1):
        reached = (out[i] - 1) * geo.strides[i] + geo.effective_kernel(i) - geo.in_hw[i] - pads[i]
        pads[i + 2] = min(pads[i + 2], max(reached, 0))
    return Geometry(geo.in_hw, geo.kernel, geo.strides, geo.dilations, tuple(pads))  # type: ignore[arg-type]


Plan = Literal["VALID", "SAME", "PAD"]


def padding_plan(geo: Geometry, *, same_allowed: bool = True) -> Plan:
    if not any(geo.pads):
        return "VALID"
    if same_allowed and geo.pads == geo.same_pads():
        return "SAME"
    return "PAD"


def apply_padding(em: Emitter, x: str, geo: Geometry, plan: Plan, *, value: float = 0.0) -> tuple[str, int]:
    """Pad the NHWC tensor ``x`` when the plan says so; returns (input for the op, TFLite Padding)."""
    if plan == "SAME":
        return x, schema.Padding.SAME
    if plan == "VALID":
        return x, schema.Padding.VALID
    t, left, b, r = geo.pads
    n, h, w, c = em.tshape(x)
    padded = em.tensor(x + "/padded", (n, h + t + b, w + left + r, c))
    paddings = em.ints([[0, 0], [t, b], [left, r], [0, 0]], "paddings")
    if value == 0.0:
        em.op("PAD", [x, paddings], [padded])
    else:
        em.op("PADV2", [x, paddings, em.const(np.array(value, dtype=np.float32), "pad_value")], [padded])
    return padded, schema.Padding.VALID
