"""The Open Inference Protocol (KServe v2 REST, as Triton speaks it): the wire format, pure.

:func:`decode_request` turns a request body (JSON tensors, or Triton's binary tensor data
extension) into arrays checked against a model's inputs; :func:`encode_response` builds the
reply, with Triton's classification extension. No sockets here: agent.serve is the HTTP
server, agent.serve_client the client and the ``edgeship-agent infer`` command.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from agent.config import MiB
from agent.errors import UsageError
from agent.host import BadRequest, ModelInfo
from agent.manifest import TensorSpec

log = logging.getLogger(__name__)


SERVER_NAME = "edgeship-agent"
EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}
DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
             "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
             "float32": "FP32", "float64": "FP64"}
NUMPY_TYPES = {v: np.dtype(k) for k, v in DATATYPES.items()}
ADDRESS_FILE = "serve.json"
"""Written by the agent in its state directory when it serves on a port it picked (port = 0)."""


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """What one client may make the server hold. Header lines (64 KiB) and count (100) are http.server's."""

    max_body_bytes: int = 64 * MiB
    """Request body as received (and after gzip/deflate decoding)."""
    max_json_bytes: int = 16 * MiB
    """The JSON part of a request (JSON tensor data becomes Python lists: ~10x its size in memory)."""
    max_connections: int = 64
    """Open client connections (one thread each); more are answered 503 and closed."""
    idle_timeout: float = 30.0
    """Seconds a connection may sit idle, or stall mid-request, before it is closed."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UsageError(f"ServeLimits.{name} must be positive, got {value!r}")


class _HttpError(Exception):
    """An HTTP-level refusal. ``close``: the body was left unread, so the connection must end."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


# --- the wire format (pure) -----------------------------------------------------------------


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    def tensors(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": DATATYPES[s.dtype], "shape": list(s.shape)} for s in specs]

    return {"name": info.name, "versions": [info.version], "platform": PLATFORMS[info.runtime],
            "inputs": tensors(info.inputs), "outputs": tensors(info.outputs)}


@dataclass(frozen=True, kw_only=True)
class Requested:
    """One output the client asked for: as binary data or JSON, raw or as top-k classes."""

    name: str
    binary: bool
    classes: int = 0


@dataclass(frozen=True, kw_only=True)
class Request:
    inputs: dict[str, np.ndarray]
    outputs: tuple[Requested, ...]
    id: str | None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _json_tensor(data: Any, dtype: np.dtype[Any], shape: list[int], name: str) -> np.ndarray:
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(f"input {name!r}: 'data' is not a regular array of numbers") from None
    kind = arr.dtype.kind
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if arr.size != math.prod(shape):
        raise BadRequest(f"input {name!r}: {arr.size} value(s) in 'data' for shape {shape}")
    if arr.size and kind not in allowed:
        raise BadRequest(f"input {name!r}: 'data' holds {arr.dtype} values, not {DATATYPES[dtype.name]}")
    if arr.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise BadRequest(f"input {name!r}: a value is out of range for {DATATYPES[dtype.name]}")
    return arr.astype(dtype).reshape(shape)


def decode_request(body: bytes, header_length: int | None, info: ModelInfo, *,
                   max_json_bytes: int = ServeLimits.max_json_bytes) -> Request:
    """Parse an infer request (JSON, or JSON + binary tensors) for model ``info``. Raises BadRequest."""
    json_end = len(body) if header_length is None else header_length
    if not 0 <= json_end <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} exceeds the body ({len(body)} bytes)")
    if json_end > max_json_bytes:
        raise BadRequest(f"the JSON part of the request is larger than {max_json_bytes} bytes")
    try:
        doc = json.loads(body[:json_end])
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    doc = _obj(doc, "the request")
    binary = memoryview(body)[json_end:]
    specs = {s.name: s for s in info.inputs}
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        item = _obj(raw, f"inputs[{i}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{i}].name must be a string")
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(f"unknown input {name!r}; the model takes {list(specs)}")
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype != DATATYPES[spec.dtype]:
            raise BadRequest(f"input {name!r}: datatype {datatype!r} does not match the model's "
                             f"{DATATYPES[spec.dtype]}")
        shape = item.get("shape")
        if not isinstance(shape, list) or len(shape) > 16:
            raise BadRequest(f"input {name!r}: 'shape' must be a list of at most 16 sizes")
        shape = [_count(d, f"input {name!r}: a shape dimension") for d in shape]
        dtype = NUMPY_TYPES[datatype]
        params = _obj(item.get("parameters", {}), f"input {name!r}: 'parameters'")
        if "binary_data_size" in params:
            size = _count(params["binary_data_size"], f"input {name!r}: binary_data_size")
            if "data" in item:
                raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
            if size != math.prod(shape) * dtype.itemsize:
                raise BadRequest(f"input {name!r}: binary_data_size {size} does not fit shape {shape} of "
                                 f"{datatype} ({math.prod(shape) * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary data ends {offset + size - len(binary)} byte(s) "
                                 "past the request body")
            if size == 0:
                arr = np.empty(shape, dtype=dtype)
            else:
                arr = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            offset += size
            inputs[name] = arr if arr.flags.aligned else arr.copy()
        elif "data" in item:
            inputs[name] = _json_tensor(item["data"], dtype, shape, name)
        else:
            raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} byte(s) of binary data after the last input")
    params = _obj(doc.get("parameters", {}), "'parameters'")
    binary_default = params.get("binary_data_output", False) is True
    raw_outputs = doc.get("outputs")
    names = [s.name for s in info.outputs]
    if raw_outputs is None:
        outputs = tuple(Requested(name=n, binary=binary_default) for n in names)
    else:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        wanted: list[Requested] = []
        for i, raw in enumerate(raw_outputs):
            item = _obj(raw, f"outputs[{i}]")
            name = item.get("name")
            if name not in names:
                raise BadRequest(f"unknown output {name!r}; the model gives {names}")
            if any(r.name == name for r in wanted):
                raise BadRequest(f"output {name!r} is requested twice")
            oparams = _obj(item.get("parameters", {}), f"output {name!r}: 'parameters'")
            binary_flag = oparams.get("binary_data", binary_default)
            if not isinstance(binary_flag, bool):
                raise BadRequest(f"output {name!r}: binary_data must be true or false")
            classes = _count(oparams.get("classification", 0), f"output {name!r}: classification")
            wanted.append(Requested(name=name, binary=binary_flag, classes=classes))
        outputs = tuple(wanted)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    return Request(inputs=inputs, outputs=outputs, id=request_id)


def _classify(value: np.ndarray, k: int, labels: Sequence[str] | None) -> np.ndarray:
    """Triton's classification: the top ``k`` of each row as ``"score:index[:label]"``."""
    rows = value.reshape(1, -1) if value.ndim < 2 else value.reshape(value.shape[0], -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        for j, idx in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:k]):
            label = f":{labels[idx]}" if labels is not None and idx < len(labels) else ""
            out[r, j] = f"{float(row[idx]):f}:{int(idx)}{label}".encode()
    return out if value.ndim >= 2 else out.reshape(k)


def encode_response(info: ModelInfo, outputs: Mapping[str, np.ndarray], requested: Sequence[Requested],
                    request_id: str | None) -> tuple[list[bytes], int | None]:
    """The response body as parts, and the JSON length when binary tensors follow it (else None)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in requested:
        value = outputs[want.name]
        if want.classes:
            strings = _classify(value, want.classes, info.labels)
            entry: dict[str, Any] = {"name": want.name, "datatype": "BYTES", "shape": list(strings.shape)}
            if want.binary:
                blob = b"".join(len(s).to_bytes(4, "little") + s for s in strings.ravel())
            else:
                entry["data"] = [s.decode() for s in strings.ravel()]
        else:
            entry = {"name": want.name, "datatype": DATATYPES[value.dtype.name], "shape": list(value.shape)}
            if want.binary:
                blob = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            else:
                entry["data"] = value.ravel().tolist()
        if want.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": info.name, "model_version": info.version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    return [head, *blobs], (len(head) if blobs else None)


