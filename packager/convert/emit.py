"""The :class:`Emitter`: writes TFLite tensors and operators, and tracks where each ONNX tensor lives.

Each ONNX activation may exist as a TFLite tensor in ONNX order and/or in
NHWC order (see :mod:`packager.convert.layout`). Lowerings ask for an input in
the layout they need with :meth:`Emitter.get`; a missing layout is made once,
with a TRANSPOSE (or a RESHAPE when only size-1 dimensions move), and cached,
so a chain of NHWC operators never bounces through NCHW. An ONNX ``Transpose``
is a *view* (:meth:`Emitter.define_view`): it is only written when, and in the
layout, someone reads it, so ``Transpose(0,3,1,2) -> Conv`` on an NHWC input
costs nothing. The ONNX-order tensor of an ONNX name carries that exact name,
which is how model inputs and outputs keep their names.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.graph import Graph, Node
from packager.convert.layout import (
    TO_NHWC,
    TO_ONNX,
    Layout,
    compose,
    const_to_layout,
    is_identity,
    memory_equivalent,
    to_layout,
)
from packager.convert.rules import Shape, SimpleCtx
from packager.tflite import TFLiteBuilder

log = logging.getLogger(__name__)

__all__ = ["ACTIVATIONS", "Emitter"]

ACTIVATIONS: dict[str | None, int] = {
    None: schema.ActivationFunctionType.NONE,
    "RELU": schema.ActivationFunctionType.RELU,
    "RELU6": schema.ActivationFunctionType.RELU6,
    "RELU_N1_TO_1": schema.ActivationFunctionType.RELU_N1_TO_1,
}


class Emitter:
    """Accumulates one TFLite subgraph for a :class:`Graph` whose shapes are known."""

    def __init__(self, graph: Graph, shapes: dict[str, Shape], dtypes: dict[str, np.dtype[Any]], *,
                 fp16_weights: bool = False, description: str = "edgeship onnx2tflite") -> None:
        self.graph = graph
        self.opset = graph.opset
        self.fp16_weights = fp16_weights
        self.builder = TFLiteBuilder(description=description)
        self.op_counts: Counter[str] = Counter()
        self._shapes = shapes
        self._dtypes = dtypes
        self._values: dict[str, dict[Layout, str]] = {}
        self._views: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._tshapes: dict[str, Shape] = {}
        self._cache: dict[tuple[Any, ...], str] = {}
        self._used: set[str] = set()
        self._reserved = {vi.name for vi in graph.inputs} | {vi.name for vi in graph.outputs} | set(graph.consts)
        for node in graph.nodes:
            self._reserved.update(node.inputs)
            self._reserved.update(node.outputs)
        for vi in graph.inputs:
            self._used.add(vi.name)
            self.builder.add_input(vi.name, shapes[vi.name], vi.dtype)
            self._tshapes[vi.name] = shapes[vi.name]
            self._values[vi.name] = {"onnx": vi.name}

    # --- names, shapes, constants ------------------------------------------

    def fresh(self, base: str) -> str:
        """A tensor name used nowhere, neither in the ONNX graph nor here."""
        name, i = base, 0
        while name in self._reserved or name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def shape(self, name: str) -> Shape:
        """ONNX-order shape of an ONNX tensor (``-1``: dynamic batch)."""
        value = self.graph.consts.get(name)
        return tuple(value.shape) if value is not None else self._shapes[name]

    def const_value(self, name: str) -> np.ndarray | None:
        return self.graph.consts.get(name) if name else None

    @property
    def ctx(self) -> SimpleCtx:
        """The analysis view (shapes, constants) for helpers shared with ``infer``."""
        return SimpleCtx(self.opset, self._shapes, self.graph.consts)

    def const(self, value: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.builder.add_constant(name, value)
        self._tshapes[name] = tuple(np.shape(value))
        return name

    def ints(self, values: Any, base: str) -> str:
        """An int32 vector constant (shapes, permutations, axes, paddings), shared by equal uses."""
        arr = np.asarray(values, dtype=np.int32)
        key = ("ints", arr.shape, arr.tobytes())
        if key not in self._cache:
            self._cache[key] = self.const(arr, base)
        return self._cache[key]

    def weight(self, value: np.ndarray, base: str) -> str:
        """A float32 weight tensor; with ``fp16_weights`` stored as float16 behind a DEQUANTIZE."""
        value = np.ascontiguousarray(value, dtype=np.float32)
        if not self.fp16_weights:
            return self.const(value, base)
        half = self.const(value.astype(np.float16), base + "/fp16")
        out = self.tensor(base, value.shape)
        self.op("DEQUANTIZE", [half], [out], version=3)  # float16 input needs DEQUANTIZE v3
        return out

    def operand(self, name: str, layout: Layout, rank: int) -> str:
        """An input of an elementwise op: an activation in ``layout``, or a constant shaped to broadcast."""
        value = self.const_value(name)
        if value is None:
            return self.get(name, layout)
        key = ("operand", name, layout, rank)
        if key not in self._cache:
            arr = const_to_layout(value, rank, layout)
            self._cache[key] = self.weight(arr, name) if arr.dtype == np.float32 else self.const(arr, name)
        return self._cache[key]

    def tensor(self, base: str, tshape: Sequence[int], dtype: Any = np.float32) -> str:
        """A new intermediate tensor (TFLite shape; ``-1`` for the dynamic batch)."""
        name = self.fresh(base)
        self.builder.add_tensor(name, tshape, dtype)
        self._tshapes[name] = tuple(int(d) for d in tshape)
        return name

    def tshape(self, tensor: str) -> Shape:
        return self._tshapes[tensor]

    # --- operators ---------------------------------------------------------

    def op(self, op: str, inputs: Sequence[str | None], outputs: Sequence[str], options: Any = None, *,
           version: int = 1) -> None:
        self.op_counts[op] += 1
        self.builder.add_op(op, inputs, outputs, options, version=version)

    def reshape(self, src: str, out: str) -> None:
        """RESHAPE ``src`` into the already defined tensor ``out`` (its shape, ``-1`` kept for the batch)."""
        self.op("RESHAPE", [src, self.ints(self._tshapes[out], "shape")], [out])

    @staticmethod
    def activation(node: Node) -> int:
        return ACTIVATIONS[node.fused_activation]

    # --- where ONNX tensors live ------------------------------------------

    def layout_of(self, name: str) -> Layout:
        """The layout an op that does not care should use for ``name``: the cheapest one to read."""
        values = self._values.get(name, {})
        if "nhwc" in values:
            return "nhwc"
        if "onnx" in values:
            return "onnx"
        view = self._views.get(name)
        if view is not None and len(view[1]) == 4 and is_identity(compose(view[1], TO_NHWC)):
            return "nhwc"
        return "onnx"

    def has(self, name: str, layout: Layout) -> bool:
        return layout in self._values.get(name, {})

    def define(self, name: str, layout: Layout) -> str:
        """The output tensor an op writes for ONNX tensor ``name`` in ``layout``."""
        tshape = to_layout(self.shape(name), layout)
        if layout == "onnx" and name not in self._used:
            self._used.add(name)
            self.builder.add_tensor(name, tshape, self._dtypes.get(name, np.float32))
            self._tshapes[name] = tshape
            tensor = name
        else:
            tensor = self.tensor(f"{name}/{layout}", tshape, self._dtypes.get(name, np.float32))
        self._values.setdefault(name, {})[layout] = tensor
        return tensor

    def alias(self, name: str, layout: Layout, tensor: str) -> None:
        """ONNX tensor ``name`` in ``layout`` is ``tensor`` (Identity, Dropout, a no-op Clip)."""
        self._values.setdefault(name, {})[layout] = tensor

    def define_view(self, name: str, src: str, perm: Sequence[int]) -> None:
        """ONNX tensor ``name`` (ONNX order) is ``transpose(src, perm)``; written only when read."""
        self._views[name] = (src, tuple(int(p) for p in perm))

    def view_of(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        return self._views.get(name)

    def get(self, name: str, layout: Layout) -> str:
        """The TFLite tensor holding ONNX tensor ``name`` in ``layout``, converting it on first use."""
        values = self._values.setdefault(name, {})
        if layout in values:
            return values[layout]
        rank = len(self.shape(name))
        if layout == "nhwc" and rank != 4:
            raise ValueError(f"{name!r} has rank {rank}: only 4-D tensors have an NHWC layout")
        value = self.const_value(name)
        if value is not None:
            tensor = self.operand(name, layout, rank)
        elif name in self._views:
            src, perm = self._views[name]
            tensor = self._transpose(src, perm if layout == "onnx" else compose(perm, TO_NHWC), name, layout)
        else:
            other: Layout = "nhwc" if layout == "onnx" else "onnx"
            tensor = self._transpose(values[other], TO_NHWC if layout == "nhwc" else TO_ONNX, name, layout)
        values[layout] = tensor
        return tensor

    def get_for_reshape(self, name: str) -> str:
        """``name`` with its bytes in ONNX order (what RESHAPE/Flatten need), avoiding a transpose if possible.

        An NHWC tensor whose NCHW order is the same bytes (``[N, 1, 1, C]``, as
        after a global pool) is used as is.
        """
        values = self._values.get(name, {})
        if "onnx" not in values and "nhwc" in values and memory_equivalent(self._tshapes[values["nhwc"]], TO_ONNX):
            return values["nhwc"]
        return self.get(name, "onnx")

    def _transpose(self, src: str, perm: Sequence[int], name: str, layout: Layout) -> str:
        if is_identity(perm):
            return src
        out = self.define(name, layout)
        if memory_equivalent(self._tshapes[src], perm):
            log.debug("%s -> %s: only size-1 dims move, RESHAPE instead of TRANSPOSE", name, layout)
            self.reshape(src, out)
        else:
            self.op("TRANSPOSE", [src, self.ints(perm, "perm")], [out])
        return out

    # --- the end -----------------------------------------------------------

    def finish(self) -> bytes:
        """Mark the graph outputs (ONNX order, ONNX names) and pack the model."""
        for vi in self.graph.outputs:
            tensor = self.get(vi.name, "onnx")
            if tensor != vi.name:  # an alias of another tensor: copy it under the output's name
                self._used.add(vi.name)
                self.builder.add_tensor(vi.name, self._tshapes[tensor], self._dtypes.get(vi.name, np.float32))
                self._tshapes[vi.name] = self._tshapes[tensor]
                self.reshape(tensor, vi.name)
            self.builder.mark_output(vi.name)
        return self.builder.to_bytes()
