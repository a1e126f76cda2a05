"""Conv (regular, depthwise, grouped) and standalone BatchNormalization.

ONNX weights are ``[O, C/g, kh, kw]``. CONV_2D wants ``[O, kh, kw, C]``;
DEPTHWISE_CONV_2D wants ``[1, kh, kw, C*m]`` (output channel ``c*m + j`` reads
input channel ``c``, the same order as ONNX). Other group counts are split
into ``g`` CONV_2Ds and concatenated, which every TFLite runtime runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.graph import Node
from packager.convert.ops.spatial import apply_padding, geometry, padding_plan
from packager.convert.rules import Ctx, Shape, Unsupported, const_or_unsupported, rule

__all__: list[str] = []


def _conv_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    if len(x) != 4:
        raise Unsupported(f"Conv({len(x) - 2}-D)")
    w = const_or_unsupported(node, ctx, 1, "weights")
    bias = ctx.const(node.input(2)) if node.input(2) else None
    if node.input(2) and bias is None:
        raise Unsupported("Conv(non-constant bias)")
    groups = int(node.attr("group", 1))
    out_ch = int(w.shape[0])
    if w.ndim != 4 or x[1] != w.shape[1] * groups or out_ch % groups:
        raise Unsupported(f"Conv(group={groups} with weights {list(w.shape)} on {x[1]} channels)")
    if bias is not None and bias.size != out_ch:
        raise Unsupported(f"Conv(bias of {bias.size} for {out_ch} channels)")
    geo = geometry(node, x, (int(w.shape[2]), int(w.shape[3])))
    oh, ow = geo.out_hw()
    if oh < 1 or ow < 1:
        raise Unsupported("Conv(empty output)")
    return [(x[0], out_ch, oh, ow)]


@rule("Conv", infer=_conv_infer)
def _conv(node: Node, em: Emitter) -> None:
    x = em.get(node.inputs[0], "nhwc")
    w = em.const_value(node.inputs[1])
    assert w is not None
    w = w.astype(np.float32)
    out_ch, in_per_group = int(w.shape[0]), int(w.shape[1])
    b = em.const_value(node.input(2))
    bias = np.zeros(out_ch, np.float32) if b is None else b.astype(np.float32).reshape(out_ch)
    geo = geometry(node, em.shape(node.inputs[0]), (int(w.shape[2]), int(w.shape[3])))
    x, padding = apply_padding(em, x, geo, padding_plan(geo))
    groups = int(node.attr("group", 1))
    channels = in_per_group * groups
    out = em.define(node.outputs[0], "nhwc")
    (sh, sw), (dh, dw) = geo.strides, geo.dilations
    act = em.activation(node)

    def conv2d(src: str, weights: np.ndarray, b: np.ndarray, dst: str, tag: str) -> None:
        opts = schema.Conv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = padding, sh, sw
        opts.dilationHFactor, opts.dilationWFactor, opts.fusedActivationFunction = dh, dw, act
        em.op("CONV_2D", [src, em.weight(weights.transpose(0, 2, 3, 1), f"{node.name}/filter{tag}"),
                          em.weight(b, f"{node.name}/bias{tag}")], [dst], opts)

    if groups == 1:
        conv2d(x, w, bias, out, "")
    elif in_per_group == 1:  # depthwise, with a depth multiplier of out_ch / channels
        opts = schema.DepthwiseConv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = padding, sh, sw
        opts.dilationHFactor, opts.dilationWFactor, opts.fusedActivationFunction = dh, dw, act
        opts.depthMultiplier = out_ch // channels
        em.op("DEPTHWISE_CONV_2D", [x, em.weight(w.transpose(1, 2, 3, 0), f"{node.name}/filter"),
                                    em.weight(bias, f"{node.name}/bias")], [out], opts,
              version=2 if (dh, dw) != (1, 1) else 1)
    else:
        n, h, wd, _ = em.tshape(x)
        parts = [em.tensor(f"{node.name}/in{g}", (n, h, wd, in_per_group)) for g in range(groups)]
        split = schema.SplitOptionsT()
        split.numSplits = groups
        em.op("SPLIT", [em.ints(np.array(3), "axis"), x], parts, split)
        per = out_ch // groups
        outs = []
        oshape = em.tshape(out)
        for g in range(groups):
            dst = em.tensor(f"{node.name}/out{g}", (*oshape[:3], per))
            conv2d(parts[g], w[g * per:(g + 1) * per], bias[g * per:(g + 1) * per], dst, str(g))
            outs.append(dst)
        cat = schema.ConcatenationOptionsT()
        cat.axis = 3
        em.op("CONCATENATION", outs, [out], cat)


def _bn_params(node: Node, const: Callable[[str], np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """``y = x * scale + shift`` per channel (axis 1)."""
    params = [const(node.input(i)) for i in (1, 2, 3, 4)]
    if any(p is None for p in params):
        raise Unsupported("BatchNormalization(non-constant parameters)")
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    scale = gamma / np.sqrt(var + float(node.attr("epsilon", 1e-5)))
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _bn_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    x = ctx.shape(node.inputs[0])
    if node.attr("training_mode", 0) or any(o for o in node.outputs[1:]):
        raise Unsupported("BatchNormalization(training_mode=1)")
    if len(x) < 2 or len(x) > 4:
        raise Unsupported(f"BatchNormalization(rank {len(x)})")
    scale, _ = _bn_params(node, ctx.const)
    if scale.size != x[1]:
        raise Unsupported("BatchNormalization(parameters do not match the channels)")
    return [x]


@rule("BatchNormalization", infer=_bn_infer)
def _batchnorm(node: Node, em: Emitter) -> None:
    """A BatchNormalization not folded into a Conv: MUL + ADD with per-channel constants."""
    name = node.inputs[0]
    rank = len(em.shape(name))
    layout = em.layout_of(name) if rank == 4 else "onnx"
    scale, shift = _bn_params(node, em.const_value)
    shape = (-1,) if layout == "nhwc" else (-1,) + (1,) * (rank - 2)
    x = em.get(name, layout)
    out = em.define(node.outputs[0], layout)
    tmp = em.tensor(f"{node.name}/scaled", em.tshape(out))
    em.op("MUL", [x, em.weight(scale.reshape(shape), f"{node.name}/scale")], [tmp], schema.MulOptionsT())
    add = schema.AddOptionsT()
    add.fusedActivationFunction = em.activation(node)
    em.op("ADD", [tmp, em.weight(shift.reshape(shape), f"{node.name}/shift")], [out], add)
