"""Shape and data movement: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, Pad, Softmax.

Reshapes read their input in ONNX byte order (an NHWC producer is transposed
back first, unless only size-1 dimensions would move), so they match ONNX
exactly. A dynamic batch stays ``-1`` in a RESHAPE target only in dimension 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.fold import BATCH
from packager.convert.graph import Node
from packager.convert.layout import TO_NHWC, TO_ONNX, Layout, compose
from packager.convert.rules import BatchMixed, Ctx, Shape, Unsupported, const_or_unsupported, fmt, rule

__all__: list[str] = []


def _check_batch(out: Sequence[int], what: str) -> Shape:
    if any(d == -1 for d in out[1:]):
        raise BatchMixed(f"{what} moves the dynamic batch out of dimension 0")
    return tuple(int(d) for d in out)


def _reshape_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    if node.op_type == "Reshape" and ctx.opset < 5:
        target = [int(v) for v in node.attrs["shape"]]
    else:
        target = [int(v) for v in const_or_unsupported(node, ctx, 1, "shape").ravel()]
    allow_zero = bool(node.attr("allowzero", 0))
    out: list[int | None] = []
    for i, v in enumerate(target):
        if v == BATCH:
            out.append(-1)
        elif v == 0 and not allow_zero:
            if i >= len(x):
                raise Unsupported("Reshape(invalid shape)")
            out.append(x[i])
        elif v == -1:
            out.append(None)
        elif v < 1:
            raise Unsupported(f"Reshape(shape={fmt(target)})")
        else:
            out.append(v)
    dynamic_in = -1 in x
    static_in = math.prod(d for d in x if d != -1)
    static_out = math.prod(d for d in out if d is not None and d != -1)
    if out.count(None) > 1:
        raise Unsupported(f"Reshape(shape={fmt(target)})")
    if None in out:
        fill, rest = divmod(static_in, static_out)
        if rest:
            raise Unsupported("Reshape(incompatible shape)")
        # with a dynamic input and no batch elsewhere, the -1 absorbs it (batch * fill)
        out[out.index(None)] = -1 if dynamic_in and -1 not in out else fill
    elif static_in != static_out or dynamic_in != (-1 in out):
        if dynamic_in or -1 in out:
            raise BatchMixed("Reshape to a fixed size of a tensor with a dynamic batch")
        raise Unsupported("Reshape(incompatible shape)")
    return [_check_batch([int(d) for d in out], "Reshape")]  # type: ignore[arg-type]


def _flatten_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    axis = int(node.attr("axis", 1))
    axis = axis + len(x) if axis < 0 else axis
    if axis == 0:
        if -1 in x:
            raise BatchMixed("Flatten(axis=0) folds the dynamic batch into the features")
        return [(1, math.prod(x))]
    head = -1 if -1 in x[:axis] else math.prod(x[:axis])
    if -1 in x[axis:]:
        raise BatchMixed("Flatten moves the dynamic batch")
    return [(head, math.prod(x[axis:]))]


def _axes(node: Node, ctx: Ctx, rank: int) -> list[int] | None:
    if "axes" in node.attrs:
        axes = [int(a) for a in node.attrs["axes"]]
    elif node.input(1):
        axes = [int(a) for a in const_or_unsupported(node, ctx, 1, "axes").ravel()]
    else:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


def _squeeze_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    axes = _axes(node, ctx, len(x))
    if axes is None:
        if -1 in x:
            raise BatchMixed("Squeeze without axes on a tensor with a dynamic batch")
        axes = [i for i, d in enumerate(x) if d == 1]
    if any(x[a] != 1 for a in axes):
        raise (BatchMixed if any(x[a] == -1 for a in axes) else Unsupported)("Squeeze of a dimension that is not 1")
    return [_check_batch([d for i, d in enumerate(x) if i not in axes], "Squeeze")]


def _unsqueeze_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    axes = _axes(node, ctx, 0)
    if axes is None:
        raise Unsupported("Unsqueeze(no axes)")
    rank = len(x) + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)
    out = list(x)
    for a in axes:
        out.insert(a, 1)
    if -1 in x and out[0] != -1:
        raise BatchMixed("Unsqueeze moves the dynamic batch")
    return [tuple(out)]


@rule("Reshape", infer=_reshape_infer)
@rule("Flatten", infer=_flatten_infer)
@rule("Squeeze", infer=_squeeze_infer)
@rule("Unsqueeze", infer=_unsqueeze_infer)
def _reshape(node: Node, em: Emitter) -> None:
    src = em.get_for_reshape(node.inputs[0])
    em.reshape(src, em.define(node.outputs[0], "onnx"))


def _transpose_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    perm = [int(p) for p in node.attr("perm", list(range(len(x)))[::-1])]
    if sorted(perm) != list(range(len(x))):
        raise Unsupported(f"Transpose(perm={fmt(perm)})")
    if len(x) > 5:
        raise Unsupported(f"Transpose(rank {len(x)})")
    return [_check_batch([x[p] for p in perm], "Transpose")]


@rule("Transpose", infer=_transpose_infer)
def _transpose(node: Node, em: Emitter) -> None:
    """A view: composed with its input's own transpose and written only where it is read."""
    name = node.inputs[0]
    rank = len(em.shape(name))
    perm = tuple(int(p) for p in node.attr("perm", list(range(rank))[::-1]))
    view = em.view_of(name)
    if view is not None:
        src, first = view
        em.define_view(node.outputs[0], src, compose(first, perm))
    elif em.has(name, "onnx") or not em.has(name, "nhwc"):
        em.define_view(node.outputs[0], em.get(name, "onnx"), perm)
    else:
        em.define_view(node.outputs[0], em.get(name, "nhwc"), compose(TO_ONNX, perm))


def _concat_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    shapes = [ctx.shape(n) for n in node.inputs if n]
    rank = len(shapes[0])
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    if any(len(s) != rank for s in shapes) or not 0 <= axis < rank:
        raise Unsupported(f"Concat(axis={axis})")
    if any(s[axis] == -1 for s in shapes):
        raise BatchMixed("Concat along the dynamic batch")
    for i in range(rank):
        if i != axis and len({s[i] for s in shapes}) != 1:
            raise (BatchMixed if any(s[i] == -1 for s in shapes) else Unsupported)("Concat(mismatched shapes)")
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return [tuple(out)]


@rule("Concat", infer=_concat_infer)
def _concat(node: Node, em: Emitter) -> None:
    names = [n for n in node.inputs if n]
    rank = len(em.shape(node.outputs[0]))
    axis = int(node.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    activations = [n for n in names if em.const_value(n) is None]
    layout: Layout = "nhwc" if rank == 4 and any(em.layout_of(n) == "nhwc" for n in activations) else "onnx"
    opts = schema.ConcatenationOptionsT()
    opts.axis = TO_NHWC.index(axis) if layout == "nhwc" else axis
    opts.fusedActivationFunction = em.activation(node)
    em.op("CONCATENATION", [em.operand(n, layout, rank) for n in names], [em.define(node.outputs[0], layout)], opts)


def _pad_spec(node: Node, ctx: Ctx) -> tuple[list[int], float, str]:
    """(ONNX pads ``[b1..bn, e1..en]``, constant value, mode)."""
    rank = len(ctx.shape(node.inputs[0]))
    mode = str(node.attr("mode", "constant"))
    if ctx.opset < 11:
        pads, value = [int(p) for p in node.attrs["pads"]], float(node.attr("value", 0.0))
    else:
        pads = [int(p) for p in const_or_unsupported(node, ctx, 1, "pads").ravel()]
        value = float(const_or_unsupported(node, ctx, 2, "value").item()) if node.input(2) else 0.0
        if node.input(3):
            axes = [int(a) + (rank if a < 0 else 0) for a in const_or_unsupported(node, ctx, 3, "axes").ravel()]
            full = [0] * (2 * rank)
            for i, a in enumerate(axes):
                full[a], full[a + rank] = pads[i], pads[i + len(axes)]
            pads = full
    if mode not in ("constant", "reflect"):
        raise Unsupported(f"Pad(mode={mode})")
    if len(pads) != 2 * rank or min(pads) < 0:
        raise Unsupported(f"Pad(pads={fmt(pads)})")
    return pads, value, mode


def _pad_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    pads, _, mode = _pad_spec(node, ctx)
    rank = len(x)
    if x[0] == -1 and (pads[0] or pads[rank]):
        raise BatchMixed("Pad of the dynamic batch dimension")
    if mode == "reflect" and any(p >= d for p, d in zip(pads, list(x) * 2) if d != -1 and p):
        raise Unsupported("Pad(reflect wider than the input)")
    return [tuple(d if d == -1 else d + pads[i] + pads[i + rank] for i, d in enumerate(x))]


@rule("Pad", infer=_pad_infer)
def _pad(node: Node, em: Emitter) -> None:
    name = node.inputs[0]
    rank = len(em.shape(name))
    pads, value, mode = _pad_spec(node, em.ctx)
    pairs = [[pads[i], pads[i + rank]] for i in range(rank)]
    layout: Layout = em.layout_of(name) if rank == 4 else "onnx"
    if layout == "nhwc":
        pairs = [pairs[p] for p in TO_NHWC]
    x, out = em.get(name, layout), em.define(node.outputs[0], layout)
    paddings = em.ints(pairs, "paddings")
    if mode == "reflect":
        opts = schema.MirrorPadOptionsT()
        opts.mode = schema.MirrorPadMode.REFLECT
        em.op("MIRROR_PAD", [x, paddings], [out], opts)
    elif value == 0.0:
        em.op("PAD", [x, paddings], [out], schema.PadOptionsT())
    else:
        em.op("PADV2", [x, paddings, em.const(np.array(value, np.float32), f"{node.name}/value")], [out],
              schema.PadV2OptionsT())


def _softmax_axis(node: Node, opset: int, rank: int) -> int:
    axis = int(node.attr("axis", 1 if opset < 13 else -1))
    return axis + rank if axis < 0 else axis


def _softmax_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    axis = _softmax_axis(node, ctx.opset, len(x))
    if axis != len(x) - 1 and not (ctx.opset >= 13 and len(x) == 4 and axis == 1):
        raise Unsupported(f"{node.op_type}(axis={node.attr('axis')})")
    return [x]


@rule("Softmax", "LogSoftmax", infer=_softmax_infer)
def _softmax(node: Node, em: Emitter) -> None:
    """Over the last axis; over the channels of a 4-D tensor, which is the last axis in NHWC."""
    name = node.inputs[0]
    rank = len(em.shape(name))
    layout: Layout = "onnx" if _softmax_axis(node, em.opset, rank) == rank - 1 else "nhwc"
    x, out = em.get(name, layout), em.define(node.outputs[0], layout)
    if node.op_type == "Softmax":
        opts = schema.SoftmaxOptionsT()
        opts.beta = 1.0
        em.op("SOFTMAX", [x], [out], opts)
    else:
        em.op("LOG_SOFTMAX", [x], [out], schema.LogSoftmaxOptionsT())
