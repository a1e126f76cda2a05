"""Slice and Gather on activations, with constant starts/ends/indices: STRIDED_SLICE and GATHER.

Both work in ONNX order, except a Slice of a 4-D tensor already in NHWC,
which is sliced there with its axes remapped (slicing commutes with the
permutation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.graph import Node
from packager.convert.layout import TO_NHWC, Layout
from packager.convert.rules import BatchMixed, Ctx, Shape, Unsupported, const_or_unsupported, rule

__all__: list[str] = []

_INT_MAX = 2**31 - 1


def _slice_spec(node: Node, ctx: Ctx) -> list[tuple[int, int, int]]:
    """Per axis (ONNX order): (start, stop, step), normalised like Python's ``slice.indices``."""
    x = ctx.shape(node.inputs[0])
    rank = len(x)
    if ctx.opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        def ints(i: int, what: str) -> list[int] | None:
            return [int(v) for v in const_or_unsupported(node, ctx, i, what).ravel()] if node.input(i) else None
        starts, ends = ints(1, "starts") or [], ints(2, "ends") or []
        axes = ints(3, "axes") or list(range(len(starts)))
        steps = ints(4, "steps") or [1] * len(starts)
    spec = [(0, d, 1) for d in x]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + rank if axis < 0 else axis
        if step == 0 or not 0 <= axis < rank:
            raise Unsupported("Slice(invalid parameters)")
        dim = x[axis]
        if dim == -1:
            if (start, step) == (0, 1) and end >= _INT_MAX:
                continue  # the whole dynamic batch
            raise BatchMixed("Slice of the dynamic batch dimension")
        spec[axis] = slice(int(np.clip(start, -2**62, 2**62)), int(np.clip(end, -2**62, 2**62)), step).indices(dim)
    return spec


def _slice_len(start: int, stop: int, step: int) -> int:
    return len(range(start, stop, step))


def _slice_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    spec = _slice_spec(node, ctx)
    out = tuple(d if d == -1 else _slice_len(*s) for d, s in zip(x, spec))
    if 0 in out:
        raise Unsupported("Slice(empty result)")
    return [out]


@rule("Slice", infer=_slice_infer)
def _slice(node: Node, em: Emitter) -> None:
    name = node.inputs[0]
    shape = em.shape(name)
    spec = _slice_spec(node, em.ctx)
    layout: Layout = "nhwc" if len(shape) == 4 and em.layout_of(name) == "nhwc" else "onnx"
    if layout == "nhwc":
        spec, shape = [spec[p] for p in TO_NHWC], tuple(shape[p] for p in TO_NHWC)
    begin, end, strides = [], [], []
    end_mask = 0
    for i, (start, stop, step) in enumerate(spec):
        if shape[i] == -1:  # the dynamic batch, taken whole
            start, stop, step = 0, 0, 1
            end_mask |= 1 << i
        elif stop < 0:  # a negative step running past index 0: "to the beginning"
            end_mask |= 1 << i
            stop = 0
        begin.append(start)
        end.append(stop)
        strides.append(step)
    opts = schema.StridedSliceOptionsT()
    opts.endMask = end_mask
    em.op("STRIDED_SLICE", [em.get(name, layout), em.ints(begin, "begin"), em.ints(end, "end"),
                            em.ints(strides, "strides")], [em.define(node.outputs[0], layout)], opts,
          version=4 if len(shape) > 4 else 1)


def _gather_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    indices = const_or_unsupported(node, ctx, 1, "indices")
    axis = int(node.attr("axis", 0))
    axis = axis + len(x) if axis < 0 else axis
    if not 0 <= axis < len(x):
        raise Unsupported(f"Gather(axis={axis})")
    if x[axis] == -1:
        raise BatchMixed("Gather along the dynamic batch")
    if indices.size and (indices.min() < -x[axis] or indices.max() >= x[axis]):
        raise Unsupported("Gather(indices out of range)")
    out = tuple(x[:axis]) + tuple(indices.shape) + tuple(x[axis + 1:])
    if -1 in out[1:]:
        raise BatchMixed("Gather moves the dynamic batch")
    return [out]


@rule("Gather", infer=_gather_infer)
def _gather(node: Node, em: Emitter) -> None:
    name = node.inputs[0]
    shape = em.shape(name)
    axis = int(node.attr("axis", 0))
    axis = axis + len(shape) if axis < 0 else axis
    indices = em.const_value(node.inputs[1])
    assert indices is not None
    indices = np.where(indices < 0, indices + shape[axis], indices).astype(np.int32)
    opts = schema.GatherOptionsT()
    opts.axis = axis
    em.op("GATHER", [em.get(name, "onnx"), em.const(indices, f"{node.name}/indices")],
          [em.define(node.outputs[0], "onnx")], opts)
