"""The converter's view of an ONNX graph, and loading one from a file.

:class:`Graph` is a small mutable IR private to the converter: nodes with plain
Python attribute values, constants as numpy arrays, inputs and outputs with
their dtypes and dimensions (``None`` for a dynamic one). The rewrites in
:mod:`packager.convert.rewrite` edit it in place; nothing here touches TFLite.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["MIN_OPSET", "Graph", "Node", "ValueInfo", "load_graph"]

MIN_OPSET = 7
"""Older opsets differ in attribute semantics this converter does not model."""


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: name, dtype and dims (``None`` = dynamic or unknown)."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int | None, ...] | None


@dataclass
class Node:
    """One ONNX node. ``inputs`` keeps ``""`` for an omitted optional input."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    domain: str = ""
    attribute_protos: list[Any] = field(default_factory=list, repr=False)
    fused_activation: str | None = None
    """TFLite fused activation (``"RELU"``, ``"RELU6"``...) merged into this node by a rewrite."""

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input(self, i: int) -> str:
        """The i-th input's name, ``""`` when absent."""
        return self.inputs[i] if i < len(self.inputs) else ""

    def to_proto(self) -> Any:
        """An ``onnx.NodeProto`` for this node as it is now (for the reference evaluator)."""
        from onnx import helper

        proto = helper.make_node(self.op_type, self.inputs, self.outputs, name=self.name, domain=self.domain)
        proto.attribute.extend(self.attribute_protos)
        return proto


@dataclass
class Graph:
    nodes: list[Node]
    consts: dict[str, np.ndarray]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    opset: int
    folded: Counter[str] = field(default_factory=Counter)
    """ONNX nodes removed by a rewrite, by op type (``"constant_nodes"`` for constant evaluation)."""

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def output_names(self) -> set[str]:
        return {o.name for o in self.outputs}

    def rename(self, old: str, new: str) -> None:
        """Make every consumer read ``new`` instead of ``old``."""
        for node in self.nodes:
            node.inputs = [new if n == old else n for n in node.inputs]

    def remove_dead_nodes(self) -> None:
        """Drop nodes nothing needed by a graph output depends on."""
        needed = self.output_names()
        keep: list[Node] = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.outputs):
                keep.append(node)
                needed.update(n for n in node.inputs if n)
        dropped = len(self.nodes) - len(keep)
        if dropped:
            log.debug("dropped %d node(s) that no output depends on", dropped)
        self.nodes = keep[::-1]
        self.consts = {k: v for k, v in self.consts.items() if k in needed}


def _np_dtype(elem_type: int) -> np.dtype[Any]:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"cannot convert to TFLite: ONNX element type {elem_type} is not supported") from None


def _value_info(vi: Any) -> ValueInfo:
    tt = vi.type.tensor_type
    dims: tuple[int | None, ...] | None = None
    if tt.HasField("shape"):
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
    return ValueInfo(name=vi.name, dtype=_np_dtype(tt.elem_type), dims=dims)


def _node(proto: Any, index: int) -> Node:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    return Node(op_type=proto.op_type, name=proto.name or f"{proto.op_type}_{index}",
                inputs=list(proto.input), outputs=list(proto.output), attrs=attrs,
                domain=proto.domain if proto.domain != "ai.onnx" else "",
                attribute_protos=list(proto.attribute))


def load_graph(src: Path) -> Graph:
    """Read the ONNX model at ``src`` (and its external data) into a :class:`Graph`.

    Raises :class:`UsageError` when ``src`` is missing or not an ONNX model, or
    the model is older than opset :data:`MIN_OPSET`.
    """
    import onnx
    from onnx import numpy_helper

    from packager.introspect import read_signature

    src = Path(src)
    info = read_signature(src)  # a missing file, not ONNX, unsafe external data: UsageError
    if info.runtime != "onnx":
        raise UsageError(f"{src.name} is a {info.runtime} model, not ONNX: there is nothing to convert")
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # protobuf and external-data errors, whatever their class
        raise UsageError(f"{src.name} is not a readable ONNX model: {exc}") from exc
    if len(model.functions):  # model-local functions (newer exporters): inline them into plain nodes
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise UsageError(f"cannot convert to TFLite: {src.name} uses ONNX opset {opset}; "
                         f"the converter needs opset >= {MIN_OPSET} (upgrade it with onnx.version_converter)")
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    if len(g.sparse_initializer):
        raise UsageError(f"cannot convert to TFLite: {src.name} has sparse initializers")
    inputs = [_value_info(vi) for vi in g.input if vi.name not in consts]
    outputs = [_value_info(vi) for vi in g.output]
    nodes = [_node(n, i) for i, n in enumerate(g.node)]
    graph = Graph(nodes=nodes, consts=consts, inputs=inputs, outputs=outputs, opset=opset)
    log.debug("loaded %s: opset %d, %d nodes, %d initializers", src.name, opset, len(graph.nodes),
              len(consts))
    return graph

