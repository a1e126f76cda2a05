"""Pools and reductions: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Reduce{Mean,Max,Min,Sum,Prod}.

Padding, exactly:

* MaxPool: pads equal to SAME use SAME (TFLite ignores the padded cells);
  other pads become PADV2 with the lowest float32, then VALID.
* AveragePool with ``count_include_pad=1``: PAD with zeros, then VALID (the
  zeros count in the mean, as in ONNX).
* AveragePool with ``count_include_pad=0``: TFLite's SAME excludes the padded
  cells, so pads equal to SAME are exact; other pads cannot be expressed.
* ``ceil_mode=1`` is accepted when it gives the same output size as floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.graph import Node
from packager.convert.layout import TO_NHWC, Layout
from packager.convert.ops.spatial import Geometry, apply_padding, geometry, padding_plan
from packager.convert.rules import BatchMixed, Ctx, Shape, Unsupported, fmt, rule

__all__: list[str] = []

_LOWEST = float(np.finfo(np.float32).min)


def _pool_geometry(node: Node, x: Shape) -> Geometry:
    kernel = node.attrs.get("kernel_shape")
    if kernel is None or len(kernel) != 2:
        raise Unsupported(f"{node.op_type}(kernel_shape={fmt(kernel or [])})")
    return geometry(node, x, (int(kernel[0]), int(kernel[1])))


def _pool_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    op = node.op_type
    if len(x) != 4:
        raise Unsupported(f"{op}({len(x) - 2}-D)")
    if len(node.outputs) > 1 and node.outputs[1]:
        raise Unsupported(f"{op}(indices output)")
    geo = _pool_geometry(node, x)
    if geo.dilations != (1, 1):
        raise Unsupported(f"{op}(dilations={fmt(geo.dilations)})")
    out = geo.out_hw()
    if node.attr("ceil_mode", 0) and geo.out_hw(ceil_mode=True) != out:
        raise Unsupported(f"{op}(ceil_mode=1)")
    if any(p >= k for p, k in zip(geo.pads, geo.kernel * 2)):
        raise Unsupported(f"{op}(pads={fmt(geo.pads)} not smaller than the kernel)")
    if (op == "AveragePool" and not node.attr("count_include_pad", 0)
            and padding_plan(geo) == "PAD"):
        raise Unsupported(f"AveragePool(pads={fmt(geo.pads)}, count_include_pad=0)")
    if min(out) < 1:
        raise Unsupported(f"{op}(empty output)")
    return [(x[0], x[1], out[0], out[1])]


@rule("MaxPool", "AveragePool", infer=_pool_infer)
def _pool(node: Node, em: Emitter) -> None:
    name = node.inputs[0]
    geo = _pool_geometry(node, em.shape(name))
    x = em.get(name, "nhwc")
    if node.op_type == "MaxPool":
        x, padding = apply_padding(em, x, geo, padding_plan(geo), value=_LOWEST)
        op = "MAX_POOL_2D"
    else:
        include = bool(node.attr("count_include_pad", 0))
        x, padding = apply_padding(em, x, geo, padding_plan(geo, same_allowed=not include))
        op = "AVERAGE_POOL_2D"
    opts = schema.Pool2DOptionsT()
    opts.padding = padding
    opts.strideH, opts.strideW = geo.strides
    opts.filterHeight, opts.filterWidth = geo.kernel
    opts.fusedActivationFunction = em.activation(node)
    em.op(op, [x], [em.define(node.outputs[0], "nhwc")], opts)


def _global_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    if len(x) < 3:
        raise Unsupported(f"{node.op_type}(rank {len(x)})")
    return [tuple(x[:2]) + (1,) * (len(x) - 2)]


@rule("GlobalAveragePool", "GlobalMaxPool", infer=_global_infer)
def _global_pool(node: Node, em: Emitter) -> None:
    """MEAN / REDUCE_MAX over the spatial axes, keeping them (NHWC axes 1, 2 for 4-D)."""
    name = node.inputs[0]
    rank = len(em.shape(name))
    layout: Layout = "nhwc" if rank == 4 else "onnx"
    axes = [1, 2] if layout == "nhwc" else list(range(2, rank))
    opts = schema.ReducerOptionsT()
    opts.keepDims = True
    op = "MEAN" if node.op_type == "GlobalAveragePool" else "REDUCE_MAX"
    em.op(op, [em.get(name, layout), em.ints(axes, "axes")], [em.define(node.outputs[0], layout)], opts)


_REDUCERS = {"ReduceMean": "MEAN", "ReduceMax": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN", "ReduceSum": "SUM",
             "ReduceProd": "REDUCE_PROD"}


def _reduce_axes(node: Node, ctx: Ctx, rank: int) -> list[int]:
    """Normalised, sorted axes; all of them when none are given (unless ``noop_with_empty_axes``)."""
    if "axes" in node.attrs:
        axes = [int(a) for a in node.attrs["axes"]]
    elif node.input(1):
        value = ctx.const(node.input(1))
        if value is None:
            raise Unsupported(f"{node.op_type}(non-constant axes)")
        axes = [int(a) for a in value.ravel()]
    else:
        axes = []
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            raise Unsupported(f"{node.op_type}(noop_with_empty_axes=1)")
        axes = list(range(rank))
    return sorted({a + rank if a < 0 else a for a in axes})


def _reduce_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    axes = _reduce_axes(node, ctx, len(x))
    if not all(0 <= a < len(x) for a in axes):
        raise Unsupported(f"{node.op_type}(axes={fmt(axes)})")
    if -1 in x and 0 in axes:
        raise BatchMixed(f"{node.op_type} over the dynamic batch")
    if node.attr("keepdims", 1):
        return [tuple(1 if i in axes else d for i, d in enumerate(x))]
    return [tuple(d for i, d in enumerate(x) if i not in axes)]


@rule(*_REDUCERS, infer=_reduce_infer)
def _reduce(node: Node, em: Emitter) -> None:
    """In NHWC when the input is there and the kept dimensions come out in ONNX order (``mean((2, 3))``)."""
    name = node.inputs[0]
    rank = len(em.shape(name))
    axes = _reduce_axes(node, em.ctx, rank)
    keep = bool(node.attr("keepdims", 1))
    kept_positions = [TO_NHWC.index(a) for a in range(rank) if a not in axes] if rank == 4 else []
    layout: Layout = "nhwc" if rank == 4 and em.layout_of(name) == "nhwc" and (
        keep or kept_positions == sorted(kept_positions)) else "onnx"
    tfl_axes = sorted(TO_NHWC.index(a) for a in axes) if layout == "nhwc" else axes
    opts = schema.ReducerOptionsT()
    opts.keepDims = keep
    out_layout: Layout = "nhwc" if layout == "nhwc" and keep else "onnx"
    em.op(_REDUCERS[node.op_type], [em.get(name, layout), em.ints(tfl_axes, "axes")],
          [em.define(node.outputs[0], out_layout)], opts)
