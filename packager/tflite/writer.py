"""Write small TFLite flatbuffers without TensorFlow.

:class:`TFLiteBuilder` is a thin layer over the object API that
``ai_edge_litert.schema_py_generated`` generates from the TFLite schema
(``ModelT``, ``SubGraphT``, ``TensorT``, ``OperatorT``...). It keeps the
bookkeeping the schema asks for and is easy to get wrong by hand:

* buffer 0 is the empty sentinel; tensors without data point at it;
* constant data is 16-byte aligned (the schema's ``force_align: 16``);
* a dynamic dimension (``-1``) is written as ``1`` in ``shape`` and ``-1`` in
  ``shape_signature``, as the TFLite converter does;
* operator codes are de-duplicated and ``deprecated_builtin_code`` is filled in;
* one subgraph and always a SignatureDef, whose input/output keys are the tensor
  names (LiteRT's signature runner and ``ai-edge-quantizer`` need one).

Operator options are the schema's own ``*OptionsT`` objects, passed through
untouched, so any builtin operator can be written. Beware that the schema's
defaults are zeros: ``SoftmaxOptionsT().beta`` is ``0.0``, which makes softmax
return a uniform distribution. :meth:`TFLiteBuilder.add_op` therefore fills in
``beta=1.0`` when SOFTMAX is given no options.

Builder misuse (duplicate or unknown tensor names, unknown operators) is a
programming error and raises :class:`ValueError`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from agent.manifest import QuantParams

__all__ = ["FILE_IDENTIFIER", "SCHEMA_VERSION", "TFLiteBuilder", "tensor_type"]

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
_ALIGN = 16
_PLACEHOLDER_FOR_GREATER_OP_CODES = schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES

_TENSOR_TYPES: dict[str, int] = {
    "float32": schema.TensorType.FLOAT32,
    "float16": schema.TensorType.FLOAT16,
    "float64": schema.TensorType.FLOAT64,
    "int8": schema.TensorType.INT8,
    "uint8": schema.TensorType.UINT8,
    "int16": schema.TensorType.INT16,
    "uint16": schema.TensorType.UINT16,
    "int32": schema.TensorType.INT32,
    "uint32": schema.TensorType.UINT32,
    "int64": schema.TensorType.INT64,
    "uint64": schema.TensorType.UINT64,
    "bool": schema.TensorType.BOOL,
}


def tensor_type(dtype: str | np.dtype[Any] | type) -> int:
    """The schema's ``TensorType`` code for a numpy dtype or a manifest dtype name."""
    name = np.dtype(dtype).name
    try:
        return _TENSOR_TYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} cannot be written to TFLite by this builder") from None


class _AlignedBufferT(schema.BufferT):  # type: ignore[misc]
    """A ``BufferT`` whose data vector starts on a 16-byte boundary of the file."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self._payload = payload

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (schema API name)
        n = len(self._payload)
        builder.StartVector(1, n, _ALIGN)
        builder.head = builder.head - n
        builder.Bytes[builder.head : builder.head + n] = self._payload
        data = builder.EndVector()
        schema.BufferStart(builder)
        schema.BufferAddData(builder, data)
        return int(schema.BufferEnd(builder))


def _quantization(q: QuantParams | None) -> schema.QuantizationParametersT | None:
    if q is None:
        return None
    qp = schema.QuantizationParametersT()
    qp.scale = [float(s) for s in q.scale]
    qp.zeroPoint = [int(z) for z in q.zero_point]
    qp.quantizedDimension = int(q.axis or 0)
    return qp


def _builtin_code(op: str | int) -> int:
    if isinstance(op, str):
        code = getattr(schema.BuiltinOperator, op.upper(), None)
        if not isinstance(code, int):
            raise ValueError(f"unknown TFLite builtin operator {op!r}")
        return code
    return int(op)


class TFLiteBuilder:
    """Accumulates tensors and operators of one subgraph, then packs a ``.tflite`` model.

    Tensors are referred to by name; every method that creates a tensor returns
    its index too. Typical use::

        b = TFLiteBuilder()
        b.add_input("x", (-1, 8), "float32")
        b.add_constant("w", w)                       # [out, in], as FULLY_CONNECTED wants
        b.add_constant("b", bias)
        b.add_tensor("y", (-1, 4), "float32")
        b.add_op("FULLY_CONNECTED", ["x", "w", "b"], ["y"],
                 schema.FullyConnectedOptionsT())
        b.mark_output("y")
        data = b.to_bytes()
    """

    def __init__(self, *, description: str = "edgeship") -> None:
        self.description = description
        self._tensors: list[schema.TensorT] = []
        self._index: dict[str, int] = {}
        self._payloads: list[bytes] = []  # buffer i+1 holds _payloads[i]; buffer 0 is the sentinel
        self._opcodes: dict[tuple[int, int], int] = {}  # (builtin code, version) -> index
        self._operators: list[schema.OperatorT] = []
        self._inputs: list[int] = []
        self._outputs: list[int] = []

    # --- tensors -----------------------------------------------------------

    def _new_tensor(self, name: str, shape: Sequence[int], ttype: int, buffer: int,
                    quantization: QuantParams | None) -> int:
        if not name or name in self._index:
            raise ValueError(f"tensor name {name!r} is empty or already used")
        dims = [int(d) for d in shape]
        if any(d < -1 for d in dims):
            raise ValueError(f"tensor {name!r}: invalid shape {dims}")
        t = schema.TensorT()
        t.name = name
        t.type = ttype
        t.buffer = buffer
        t.shape = [1 if d == -1 else d for d in dims]
        if -1 in dims:
            t.shapeSignature = dims
        t.hasRank = True
        t.quantization = _quantization(quantization)
        self._tensors.append(t)
        self._index[name] = len(self._tensors) - 1
        return len(self._tensors) - 1

    def add_tensor(self, name: str, shape: Sequence[int], dtype: Any = "float32", *,
                   quantization: QuantParams | None = None) -> int:
        """An intermediate or output tensor (no data). ``-1`` marks a dynamic dimension."""
        return self._new_tensor(name, shape, tensor_type(dtype), 0, quantization)

    def add_input(self, name: str, shape: Sequence[int], dtype: Any = "float32", *,
                  quantization: QuantParams | None = None) -> int:
        """A model input, in the order inputs are added."""
        index = self.add_tensor(name, shape, dtype, quantization=quantization)
        self._inputs.append(index)
        return index

    def add_constant(self, name: str, array: Any, *, quantization: QuantParams | None = None) -> int:
        """A constant tensor holding ``array`` (its dtype and shape are kept, bytes little-endian)."""
        arr = np.asarray(array)
        ttype = tensor_type(arr.dtype)
        payload = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        self._payloads.append(payload)
        return self._new_tensor(name, arr.shape, ttype, len(self._payloads), quantization)

    def index(self, name: str) -> int:
        """The index of the tensor called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"no tensor named {name!r}") from None

    def mark_output(self, name: str) -> None:
        """Make ``name`` a model output, in the order outputs are marked."""
        index = self.index(name)
        if index in self._outputs:
            raise ValueError(f"tensor {name!r} is already an output")
        self._outputs.append(index)

    # --- operators ---------------------------------------------------------

    def _opcode(self, code: int, version: int) -> int:
        key = (code, version)
        if key not in self._opcodes:
            self._opcodes[key] = len(self._opcodes)
        return self._opcodes[key]

    def add_op(self, op: str | int, inputs: Sequence[str | None], outputs: Sequence[str],
               options: Any = None, *, version: int = 1) -> int:
        """Append an operator; operators run in the order they are added.

        ``op`` is a ``BuiltinOperator`` name (``"FULLY_CONNECTED"``) or code.
        ``None`` in ``inputs`` is an omitted optional input (index ``-1``, e.g. a
        FULLY_CONNECTED without bias). ``options`` is the schema's options
        object for the operator (``FullyConnectedOptionsT``, ``AddOptionsT``,
        ``ReshapeOptionsT``...), or ``None``; its union type is derived from
        its class name, in ``BuiltinOptions`` or ``BuiltinOptions2``.
        ``version`` is the operator version the kernel must support (1 for the
        float kernels; quantized kernels need higher versions).
        """
        code = _builtin_code(op)
        if code == schema.BuiltinOperator.SOFTMAX and options is None:
            options = schema.SoftmaxOptionsT()
            options.beta = 1.0
        o = schema.OperatorT()
        o.opcodeIndex = self._opcode(code, version)
        o.inputs = [-1 if n is None else self.index(n) for n in inputs]
        o.outputs = [self.index(n) for n in outputs]
        if options is not None:
            kind = type(options).__name__.removesuffix("T")
            if isinstance(getattr(schema.BuiltinOptions, kind, None), int):
                o.builtinOptionsType = getattr(schema.BuiltinOptions, kind)
                o.builtinOptions = options
            elif isinstance(getattr(schema.BuiltinOptions2, kind, None), int):
                o.builtinOptions2Type = getattr(schema.BuiltinOptions2, kind)
                o.builtinOptions2 = options
            else:
                raise ValueError(f"{type(options).__name__} is not a TFLite builtin options type")
        self._operators.append(o)
        return len(self._operators) - 1

    # --- output ------------------------------------------------------------

    def to_bytes(self, signature_key: str = "serving_default") -> bytes:
        """Pack the model; its one SignatureDef maps each input/output name to its tensor."""
        if not self._inputs or not self._outputs:
            raise ValueError("a model needs at least one input and one output")
        subgraph = schema.SubGraphT()
        subgraph.name = "main"
        subgraph.tensors = list(self._tensors)
        subgraph.inputs = list(self._inputs)
        subgraph.outputs = list(self._outputs)
        subgraph.operators = list(self._operators)

        opcodes = []
        for code, version in self._opcodes:  # dicts keep insertion order = index order
            oc = schema.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, _PLACEHOLDER_FOR_GREATER_OP_CODES)
            oc.version = version
            opcodes.append(oc)

        def tensor_map(indices: list[int]) -> list[schema.TensorMapT]:
            maps = []
            for i in indices:
                m = schema.TensorMapT()
                m.name = self._tensors[i].name
                m.tensorIndex = i
                maps.append(m)
            return maps

        signature = schema.SignatureDefT()
        signature.signatureKey = signature_key
        signature.subgraphIndex = 0
        signature.inputs = tensor_map(self._inputs)
        signature.outputs = tensor_map(self._outputs)

        model = schema.ModelT()
        model.version = SCHEMA_VERSION
        model.description = self.description
        model.operatorCodes = opcodes
        model.subgraphs = [subgraph]
        model.buffers = [schema.BufferT(), *(_AlignedBufferT(p) for p in self._payloads)]
        model.signatureDefs = [signature]

        builder = flatbuffers.Builder(1024 + sum(len(p) + _ALIGN for p in self._payloads))
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())
