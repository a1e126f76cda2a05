"""Graph rewrites that remove ONNX nodes: Identity/Dropout, BatchNormalization into Conv, fused activations.

Each rewrite keeps every remaining tensor's name and shape, and counts what it
removed in ``graph.folded``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from packager.convert.graph import Graph, Node

log = logging.getLogger(__name__)

__all__ = [
    "CLIP_ACTIVATIONS", "clip_bounds", "drop_unused_outputs", "fold_batchnorm", "fuse_activations", "remove_identities",
]


def _dropout_is_identity(node: Node, graph: Graph) -> bool:
    if any(node.outputs[1:]):
        return False  # the mask is used (see drop_unused_outputs)
    training = node.input(2)
    if not training:
        return True
    value = graph.consts.get(training)
    return value is not None and not bool(np.asarray(value).item())


def drop_unused_outputs(graph: Graph) -> None:
    """Blank optional outputs nothing reads (BatchNormalization statistics, Dropout's mask, MaxPool's indices)."""
    read = set(graph.consumers()) | graph.output_names()
    for node in graph.nodes:
        node.outputs = node.outputs[:1] + [o if o in read else "" for o in node.outputs[1:]]


def remove_identities(graph: Graph) -> None:
    """Identity, and Dropout at inference, read their input in their consumers' place.

    A node whose output is a graph output stays (it becomes a copy, or nothing).
    """
    outputs = graph.output_names()
    kept: list[Node] = []
    for node in graph.nodes:
        removable = node.op_type == "Identity" or (node.op_type == "Dropout" and _dropout_is_identity(node, graph))
        if removable and node.outputs[0] not in outputs and node.inputs and node.inputs[0]:
            graph.rename(node.outputs[0], node.inputs[0])
            graph.folded[node.op_type] += 1
            continue
        kept.append(node)
    graph.nodes = kept


CLIP_ACTIVATIONS: dict[tuple[float | None, float | None], str] = {
    (0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1", (0.0, None): "RELU",
}
"""Clip bounds TFLite has an activation for."""


def clip_bounds(node: Node, opset: int, const: Callable[[str], np.ndarray | None]
                ) -> tuple[float | None, float | None] | None:
    """Clip's (min, max) when constant (``None`` for an absent bound), else ``None``."""
    if opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        lo = None if lo is None or lo <= -3.4e38 else float(lo)
        hi = None if hi is None or hi >= 3.4e38 else float(hi)
        return lo, hi
    bounds: list[float | None] = []
    for i in (1, 2):
        name = node.input(i)
        if not name:
            bounds.append(None)
            continue
        value = const(name)
        if value is None or np.asarray(value).size != 1:
            return None
        bounds.append(float(np.asarray(value).item()))
    return bounds[0], bounds[1]


def _activation_of(node: Node, graph: Graph) -> str | None:
    """The TFLite fused activation equal to ``node``, if there is one."""
    if node.op_type == "Relu":
        return "RELU"
    if node.op_type == "Clip":
        bounds = clip_bounds(node, graph.opset, graph.consts.get)
        return CLIP_ACTIVATIONS.get(bounds) if bounds else None
    return None


def _sole_consumer(node: Node, users: dict[str, list[Node]], outputs: set[str]) -> Node | None:
    if len([o for o in node.outputs if o]) != 1 or node.outputs[0] in outputs:
        return None
    readers = users.get(node.outputs[0], [])
    return readers[0] if len(readers) == 1 and readers[0].inputs.count(node.outputs[0]) == 1 else None


def fold_batchnorm(graph: Graph) -> None:
    """``Conv -> BatchNormalization`` becomes one Conv with scaled weights and a shifted bias."""
    users = graph.consumers()
    outputs = graph.output_names()
    removed: set[int] = set()
    for conv in graph.nodes:
        if conv.op_type != "Conv" or conv.input(1) not in graph.consts:
            continue
        bn = _sole_consumer(conv, users, outputs)
        if bn is None or bn.op_type != "BatchNormalization" or bn.inputs[0] != conv.outputs[0]:
            continue
        if bn.attr("training_mode", 0) or any(o for o in bn.outputs[1:]):
            continue
        params = [graph.consts.get(bn.input(i)) for i in (1, 2, 3, 4)]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
        w = graph.consts[conv.input(1)].astype(np.float64)
        if scale.size != w.shape[0]:
            continue
        b = graph.consts[conv.input(2)].astype(np.float64) if conv.input(2) else np.zeros(w.shape[0])
        w_name, b_name = _new_const_name(graph, conv.input(1) + "/bn"), _new_const_name(graph, conv.name + "/bias/bn")
        graph.consts[w_name] = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        graph.consts[b_name] = ((b - mean) * scale + beta).astype(np.float32)
        conv.inputs = [conv.inputs[0], w_name, b_name]
        conv.outputs = [bn.outputs[0]]
        removed.add(id(bn))
        graph.folded["BatchNormalization"] += 1
        log.debug("folded BatchNormalization %s into Conv %s", bn.name, conv.name)
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


_FUSES_ACTIVATION = frozenset({"Conv", "Gemm", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool", "Concat",
                               "BatchNormalization"})


def fuse_activations(graph: Graph) -> None:
    """Relu / Clip(0,6) / Clip(-1,1) after an op TFLite can fuse them into become its fused activation."""
    users = graph.consumers()
    outputs = graph.output_names()
    removed: set[int] = set()
    for node in graph.nodes:
        fusable = node.op_type in _FUSES_ACTIVATION or (
            node.op_type == "MatMul" and node.input(1) in graph.consts and graph.consts[node.input(1)].ndim == 2)
        if not fusable or node.fused_activation or id(node) in removed:
            continue
        act = _sole_consumer(node, users, outputs)
        kind = _activation_of(act, graph) if act is not None else None
        if act is None or kind is None:
            continue
        node.fused_activation = kind
        node.outputs = [act.outputs[0]]
        removed.add(id(act))
        graph.folded[act.op_type] += 1
        log.debug("fused %s %s into %s %s as %s", act.op_type, act.name, node.op_type, node.name, kind)
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _new_const_name(graph: Graph, base: str) -> str:
    taken = set(graph.consts) | {o for n in graph.nodes for o in n.outputs} | {i.name for i in graph.inputs}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
