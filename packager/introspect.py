"""What a model file is and what its tensor signature looks like (workstation side).

:func:`model_runtime` tells ONNX from TFLite by content, :func:`read_signature`
reads inputs, outputs, external-data files, the opset and the oldest runtime
release that can run the model. ONNX graphs are read with the ``onnx`` package
(without loading external weights); TFLite models through the same LiteRT
session the agent uses, so the names and dtypes match what devices will see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, Iterator

import numpy as np

from agent.errors import ModelError, UsageError
from agent.manifest import DTYPES, Runtime, TensorSpec
from agent.runtime import open_session, runtime_version

log = logging.getLogger(__name__)

__all__ = ["ModelInfo", "model_runtime", "read_signature", "onnx_min_runtime_version", "TFLITE_MIN_VERSION"]

TFLITE_MIN_VERSION = "2.14.0"
"""Oldest LiteRT/TFLite runtime assumed for float builtin ops (tflite-runtime 2.14 is the last
release of that package). Quantizing steps raise it: dynamic-range models need >= 2.17."""

# ONNX opset (default domain) -> oldest onnxruntime that runs every op of it. Deliberately one
# release later than the one that first "implemented" the opset: new ops often landed partially.
_OPSET_ORT = {17: "1.14", 18: "1.16", 19: "1.17", 20: "1.18", 21: "1.20", 22: "1.21"}
# ONNX IR version -> oldest onnxruntime that loads it (a newer IR is refused outright).
_IR_ORT = {8: "1.14", 9: "1.17", 10: "1.20"}

# Top-level fields of onnx.ModelProto and their protobuf wire types (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The signature of a model file and what it needs to run."""

    runtime: Runtime
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data_files: tuple[str, ...] = ()
    """ONNX external-data files, plain names in the model's directory, sorted."""
    opset: int | None = None
    """ONNX default-domain opset; None for TFLite."""
    min_runtime_version: str


# --- which runtime --------------------------------------------------------


def _varint(f: BinaryIO) -> int | None:
    value = 0
    for shift in range(0, 70, 7):
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
    return None


def _looks_like_onnx(path: Path, size: int) -> bool:
    """Walk the top-level protobuf fields (skipping payloads): a ModelProto with ir_version and graph."""
    seen: set[int] = set()
    with path.open("rb") as f:
        while f.tell() < size:
            key = _varint(f)
            if key is None or key >> 3 == 0:
                return False
            field, wire = key >> 3, key & 7
            if field in _MODEL_FIELDS and _MODEL_FIELDS[field] != wire:
                return False
            if wire == 0:
                if _varint(f) is None:
                    return False
            elif wire in (1, 2, 5):
                n = {1: 8, 5: 4}.get(wire) if wire != 2 else _varint(f)
                if n is None or f.tell() + n > size:
                    return False
                f.seek(n, 1)
            else:
                return False
            seen.add(field)
    return 1 in seen and 7 in seen


def model_runtime(path: Path) -> Runtime:
    """``"tflite"`` for a TFLite flatbuffer (identifier ``TFL3``), ``"onnx"`` for an ONNX protobuf.

    Decided by content, not by the file name. Raises :class:`UsageError` for a
    missing file or anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) == 8 and head[4:8] == b"TFL3":
        return "tflite"
    if size and _looks_like_onnx(path, size):
        return "onnx"
    raise UsageError(f"{path.name} is not an ONNX or TFLite model")


# --- ONNX -----------------------------------------------------------------


def _version_for(value: int, table: dict[int, str]) -> str | None:
    if value <= min(table):
        return table[min(table)]
    return table.get(value)


def onnx_min_runtime_version(opset: int | None, ir_version: int) -> str:
    """Oldest onnxruntime for a model with this default-domain opset and IR version.

    ======== ===== ============
    opset    IR    onnxruntime
    ======== ===== ============
    <= 17    <= 8  1.14
    18             1.16
    19       9     1.17
    20             1.18
    21       10    1.20
    22             1.21
    ======== ===== ============

    The larger of the opset's and the IR version's entry wins. Beyond the table
    the answer is the onnxruntime installed here (the packager pins it), the
    only release known to load the model; a newer IR than a runtime knows is
    refused outright by that runtime, so lowering ``ir_version`` when saving
    (``onnx.helper.find_min_ir_version_for``) widens the fleet a model runs on.
    """
    candidates = [_version_for(ir_version, _IR_ORT)]
    if opset is not None:
        candidates.append(_version_for(opset, _OPSET_ORT))
    if any(c is None for c in candidates):
        installed = runtime_version("onnx")
        if installed is None:
            raise UsageError(f"opset {opset} / IR version {ir_version} is newer than edgeship's table; "
                             "install onnxruntime so the packager can check it")
        log.warning("opset %s / IR %s is beyond the known table: requiring onnxruntime >= %s",
                    opset, ir_version, installed)
        return ".".join(installed.split(".")[:2])
    known = [c for c in candidates if c is not None]
    return max(known, key=lambda v: tuple(int(p) for p in v.split(".")))


def _node_tensors(nodes: Any) -> Iterator[Any]:
    """Every TensorProto in nodes' attributes, descending into subgraphs (If/Loop/Scan bodies)."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for g in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                yield from _graph_tensors(g)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _plain_file_name(location: str) -> bool:
    return (location not in ("", ".", "..") and "\x00" not in location and ":" not in location
            and location == PurePosixPath(location).name == PureWindowsPath(location).name)


def _external_files(model: Any, path: Path) -> tuple[str, ...]:
    from onnx import TensorProto

    tensors = [*_graph_tensors(model.graph), *(t for fn in model.functions for t in _node_tensors(fn.node))]
    files: set[str] = set()
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if not _plain_file_name(location):
            raise UsageError(f"{path.name}: tensor {tensor.name!r} has external data at {location!r}; "
                             "only a plain file name next to the model is accepted")
        if not (path.parent / location).is_file():
            raise UsageError(f"{path.name}: external data file {location!r} of tensor {tensor.name!r} "
                             f"is missing from {path.parent}")
        files.add(location)
    return tuple(sorted(files))


def _onnx_spec(value_info: Any, where: str) -> TensorSpec:
    from onnx import helper

    tt = value_info.type.tensor_type if value_info.type.HasField("tensor_type") else None
    if tt is None or not tt.HasField("shape"):
        raise UsageError(f"{where} {value_info.name!r} is not a tensor of known rank")
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    except (KeyError, TypeError, ValueError):
        dtype = f"elem_type {tt.elem_type}"
    if dtype not in DTYPES:
        raise UsageError(f"{where} {value_info.name!r} has an unsupported type ({dtype})")
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim)
    return TensorSpec(name=value_info.name, dtype=dtype, shape=shape)  # type: ignore[arg-type]


def _read_onnx(path: Path) -> ModelInfo:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UsageError(f"{path.name} is not a valid ONNX model: {exc}") from exc
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    graph = model.graph
    if any(not vi.type.tensor_type.HasField("shape") for vi in graph.output):
        # Exporters may leave output shapes out; infer them from the graph (weights not needed).
        try:
            graph = onnx.shape_inference.infer_shapes(model).graph
        except Exception as exc:
            log.debug("shape inference failed for %s: %s", path, exc)
    initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = tuple(_onnx_spec(vi, "input") for vi in graph.input if vi.name not in initializers)
    outputs = tuple(_onnx_spec(vi, "output") for vi in graph.output)
    if not inputs or not outputs:
        raise UsageError(f"{path.name}: a model needs at least one input and one output")
    return ModelInfo(
        runtime="onnx", inputs=inputs, outputs=outputs,
        external_data_files=_external_files(model, path), opset=opset,
        min_runtime_version=onnx_min_runtime_version(opset, int(model.ir_version)),
    )


# --- TFLite ---------------------------------------------------------------


def _read_tflite(path: Path) -> ModelInfo:
    try:
        session = open_session("tflite", path)
    except ModelError as exc:
        raise UsageError(str(exc)) from exc
    with session:
        return ModelInfo(runtime="tflite", inputs=session.inputs, outputs=session.outputs,
                         min_runtime_version=TFLITE_MIN_VERSION)


def read_signature(path: Path) -> ModelInfo:
    """Inputs, outputs and runtime requirements of the model file at ``path``.

    ONNX: inputs exclude initializers; dynamic dimensions are ``-1``; external
    data locations must be plain file names that exist next to the model (a
    directory component, an absolute path or ``..`` is a :class:`UsageError`);
    ``min_runtime_version`` follows :func:`onnx_min_runtime_version`.
    TFLite: read through LiteRT (signature keys as names when the model has
    exactly one SignatureDef); ``min_runtime_version`` is
    :data:`TFLITE_MIN_VERSION`.
    """
    path = Path(path)
    runtime = model_runtime(path)
    info = _read_onnx(path) if runtime == "onnx" else _read_tflite(path)
    log.debug("%s: %s model, %d input(s), %d output(s), needs %s >= %s", path.name, runtime,
              len(info.inputs), len(info.outputs), runtime, info.min_runtime_version)
    return info
