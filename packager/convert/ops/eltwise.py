"""Elementwise operators: activations, Clip, Add/Sub/Mul/Div, and the Identity/Dropout left in the graph.

They work in whatever layout their input already has. A binary op between
4-D tensors runs in NHWC when one of them is already there; a constant
operand is broadcast to the output rank and permuted to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.graph import Node
from packager.convert.layout import Layout
from packager.convert.rewrite import CLIP_ACTIVATIONS, clip_bounds
from packager.convert.rules import Ctx, Shape, Unsupported, broadcast, rule

__all__: list[str] = []


def _same_shape(node: Node, ctx: Ctx) -> Sequence[Shape]:
    return [ctx.shape(node.inputs[0])]


def _unary(em: Emitter, node: Node, op: str, options: Any = None) -> None:
    name = node.inputs[0]
    layout = em.layout_of(name)
    em.op(op, [em.get(name, layout)], [em.define(node.outputs[0], layout)], options)


_UNARY = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH", "HardSwish": "HARD_SWISH", "Exp": "EXP",
          "Log": "LOG", "Sqrt": "SQRT", "Neg": "NEG", "Abs": "ABS"}


@rule(*_UNARY, infer=_same_shape)
def _activation(node: Node, em: Emitter) -> None:
    _unary(em, node, _UNARY[node.op_type])


@rule("LeakyRelu", infer=_same_shape)
def _leaky_relu(node: Node, em: Emitter) -> None:
    opts = schema.LeakyReluOptionsT()
    opts.alpha = float(node.attr("alpha", 0.01))
    _unary(em, node, "LEAKY_RELU", opts)


def _clip_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    if clip_bounds(node, ctx.opset, ctx.const) is None:
        raise Unsupported("Clip(non-constant min/max)")
    return [ctx.shape(node.inputs[0])]


@rule("Clip", infer=_clip_infer)
def _clip(node: Node, em: Emitter) -> None:
    """RELU6 / RELU_N1_TO_1 / RELU when the bounds match, else MAXIMUM and/or MINIMUM with scalars."""
    bounds = clip_bounds(node, em.opset, em.const_value)
    assert bounds is not None
    lo, hi = bounds
    special = CLIP_ACTIVATIONS.get((lo, hi))
    if special:
        _unary(em, node, special)
        return
    name = node.inputs[0]
    layout = em.layout_of(name)
    x = em.get(name, layout)
    if lo is None and hi is None:
        em.alias(node.outputs[0], layout, x)
        return
    out = em.define(node.outputs[0], layout)
    if lo is not None:
        dst = em.tensor(f"{node.name}/max", em.tshape(out)) if hi is not None else out
        em.op("MAXIMUM", [x, em.const(np.array(lo, np.float32), f"{node.name}/min")], [dst],
              schema.MaximumMinimumOptionsT())
        x = dst
    if hi is not None:
        em.op("MINIMUM", [x, em.const(np.array(hi, np.float32), f"{node.name}/max")], [out],
              schema.MaximumMinimumOptionsT())


_BINARY = {"Add": ("ADD", schema.AddOptionsT), "Sub": ("SUB", schema.SubOptionsT),
           "Mul": ("MUL", schema.MulOptionsT), "Div": ("DIV", schema.DivOptionsT)}


def _binary_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    out = broadcast(ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1]))
    if len(out) > 4:
        raise Unsupported(f"{node.op_type}(rank {len(out)})")
    return [out]


def binary_layout(em: Emitter, names: Sequence[str], rank: int) -> Layout:
    """NHWC when the output is 4-D, every activation input is 4-D and one of them is already NHWC."""
    activations = [n for n in names if em.const_value(n) is None]
    if rank == 4 and all(len(em.shape(n)) == 4 for n in activations) and any(
            em.layout_of(n) == "nhwc" for n in activations):
        return "nhwc"
    return "onnx"


@rule(*_BINARY, infer=_binary_infer)
def _binary(node: Node, em: Emitter) -> None:
    op, options_type = _BINARY[node.op_type]
    rank = len(em.shape(node.outputs[0]))
    layout = binary_layout(em, node.inputs[:2], rank)
    opts = options_type()
    opts.fusedActivationFunction = em.activation(node)
    em.op(op, [em.operand(n, layout, rank) for n in node.inputs[:2]], [em.define(node.outputs[0], layout)], opts)


def _passthrough_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    if node.op_type == "Dropout":
        if len(node.outputs) > 1 and node.outputs[1]:
            raise Unsupported("Dropout(mask output)")
        training = node.input(2)
        if training:
            value = ctx.const(training)
            if value is None or bool(np.asarray(value).item()):
                raise Unsupported("Dropout(training_mode=1)")
    return [ctx.shape(node.inputs[0])]


@rule("Identity", "Dropout", infer=_passthrough_infer)
def _passthrough(node: Node, em: Emitter) -> None:
    """Left in the graph only when its output is a graph output: an alias (copied under its name at the end)."""
    name = node.inputs[0]
    layout = em.layout_of(name)
    em.alias(node.outputs[0], layout, em.get(name, layout))
