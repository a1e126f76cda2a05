"""Analysis: fold constants, infer every shape, and list what cannot be converted - before writing anything.

One walk over the (topologically ordered) nodes. A node whose inputs are all
constant, or a ``Shape`` of a tensor whose dimensions are known, is evaluated
(:mod:`packager.convert.fold`) and disappears; any other node must have a
:class:`~packager.convert.rules.Rule`, whose ``infer`` gives its output shapes
or the reason it cannot be converted. Problems are collected, not raised one by
one, so the user sees the whole list at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import UsageError
from packager.convert.fold import fold_node, has_batch, shape_vector
from packager.convert.graph import Graph, Node
from packager.convert.rules import RULES, BatchMixed, Shape, SimpleCtx, Unsupported

log = logging.getLogger(__name__)

__all__ = ["Analysis", "analyze"]

_FLOAT = np.dtype(np.float32)

_SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range", "Cast"})
"""Ops that only compute shapes: folded when their input is known, so not reported downstream of a problem."""


@dataclass
class Analysis:
    graph: Graph
    """The graph after folding: constants in ``graph.consts``, only nodes that need lowering left."""
    shapes: dict[str, Shape]
    dtypes: dict[str, np.dtype[Any]]
    dynamic_batch: bool
    problems: Counter[str] = field(default_factory=Counter)


def _input_shapes(graph: Graph, dynamic_batch: bool) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for vi in graph.inputs:
        if vi.dims is None:
            raise UsageError(f"cannot convert to TFLite: input {vi.name!r} has no known rank")
        late = [i for i, d in enumerate(vi.dims) if d is None and i > 0]
        if late:
            raise UsageError(
                f"cannot convert to TFLite: input {vi.name!r} has dynamic dimension(s) {late}; only the first "
                "(batch) dimension may be dynamic: export the model with fixed sizes, or use --target onnx")
        dims = [d if d is not None else (-1 if dynamic_batch else 1) for d in vi.dims]
        shapes[vi.name] = tuple(dims)
    return shapes


def analyze(graph: Graph, *, dynamic_batch: bool) -> Analysis:
    """Fold and infer over a copy of ``graph`` (which is left as it is).

    With ``dynamic_batch`` a dynamic first input dimension stays ``-1``; else it
    is 1. Raises :class:`~packager.convert.rules.BatchMixed` when the model
    computes with a dynamic batch in a way that cannot be kept.
    """
    consts = dict(graph.consts)
    shapes = _input_shapes(graph, dynamic_batch)
    dtypes: dict[str, np.dtype[Any]] = {vi.name: vi.dtype for vi in graph.inputs}
    ctx = SimpleCtx(graph.opset, shapes, consts)
    unknown: set[str] = set()  # outputs of nodes that could not be analysed
    kept: list[Node] = []
    problems: Counter[str] = Counter()
    folded: Counter[str] = Counter(graph.folded)

    for node in graph.nodes:
        present = [n for n in node.inputs if n]
        missing = [n for n in present if n not in consts and n not in shapes and n not in unknown]
        if missing:
            raise UsageError(f"cannot convert to TFLite: node {node.name!r} reads {missing[0]!r}, which nothing "
                             "defines before it (the graph is not topologically sorted, or is invalid)")
        if node.domain:
            problems[f"{node.domain}.{node.op_type}"] += 1
            unknown.update(node.outputs)
            continue
        values = _fold(node, consts, shapes, unknown, graph.opset)
        if values is not None:
            for name, value in zip(node.outputs, values):
                if name:
                    consts[name] = value
            folded["constant_nodes"] += 1
            continue
        rule = RULES.get(node.op_type)
        downstream = any(n in unknown for n in present)
        if rule is None and not (downstream and node.op_type in _SHAPE_OPS):
            problems[node.op_type] += 1
        if rule is None or downstream:  # downstream of a problem: nothing more to learn
            unknown.update(node.outputs)
            continue
        try:
            for name in present:
                if name not in consts and dtypes.get(name, _FLOAT) != _FLOAT:
                    raise Unsupported(f"{node.op_type}({dtypes[name].name} input)")
                if name in consts and has_batch(consts[name]) and node.op_type != "Reshape":
                    raise BatchMixed(f"{node.op_type} {node.name!r} takes a shape computed from the dynamic batch")
            out_shapes = rule.infer(node, ctx)
        except Unsupported as exc:
            problems[exc.label] += 1
            unknown.update(node.outputs)
            continue
        for name, shape in zip(node.outputs, out_shapes):
            if name:
                shapes[name] = tuple(int(d) for d in shape)
                dtypes[name] = _FLOAT
        kept.append(node)

    for vi in graph.outputs:
        if vi.name in consts:
            raise UsageError(f"cannot convert to TFLite: output {vi.name!r} is a constant")
    result = Graph(nodes=kept, consts=consts, inputs=list(graph.inputs), outputs=list(graph.outputs),
                   opset=graph.opset, folded=folded)
    result.remove_dead_nodes()
    log.debug("analysis: %d node(s) to lower, %d folded, %d problem(s), batch %s", len(result.nodes),
              folded["constant_nodes"], sum(problems.values()), "dynamic" if dynamic_batch else "fixed")
    return Analysis(graph=result, shapes=shapes, dtypes=dtypes, dynamic_batch=dynamic_batch, problems=problems)


def _fold(node: Node, consts: dict[str, np.ndarray], shapes: dict[str, Shape], unknown: set[str],
          opset: int) -> list[np.ndarray] | None:
    """The node's constant outputs, or ``None`` when it must be lowered."""
    names = node.inputs
    if node.op_type in ("Shape", "Size") and names and names[0] in shapes:
        dims = shapes[names[0]]
        if node.op_type == "Size":
            if -1 in dims:
                return None
            return [np.array(int(np.prod(dims)), dtype=np.int64)]
        return [shape_vector(dims, int(node.attr("start", 0)), node.attr("end"))]
    if any(n and n not in consts for n in names):
        return None
    return fold_node(node, [consts[n] if n else None for n in names], opset)
