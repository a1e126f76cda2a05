"""Model runtimes: one :class:`Session` interface over onnxruntime and LiteRT.

Both runtimes are optional and imported lazily, only when a session for them is
opened: a device carries the one its bundles need. For TFLite, ``ai-edge-litert``
is preferred and ``tflite-runtime`` is the fallback (it needs numpy < 2 and runs
some recent quantized models wrongly; see FIELD-NOTES).

The :class:`Session` base class owns the invariants, so each backend writes
``_run`` and ``_close`` only:

* feeds are checked against the declared input specs (names, dtype, shape) and a
  mismatch raises :class:`ModelError` naming the tensor;
* every foreign error from a runtime becomes a :class:`ModelError` with the
  runtime's one-line reason;
* ``run`` may be called from several threads at once (onnxruntime sessions are
  thread-safe; a LiteRT interpreter is not, so its backend holds a lock around
  resize/set/invoke/get).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence, cast

import numpy as np

from agent.errors import ModelError, UsageError
from agent.manifest import DTYPES, RUNTIMES, DType, QuantParams, Runtime, TensorSpec

log = logging.getLogger(__name__)

__all__ = ["Session", "open_session", "runtime_version", "INSTALL_HINT"]

_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    # Distributions that provide the ``onnxruntime`` module, the CPU build first.
    "onnx": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
             "onnxruntime-qnn"),
    "tflite": ("ai-edge-litert", "tflite-runtime"),
}
INSTALL_HINT: dict[str, str] = {"onnx": "pip install onnxruntime", "tflite": "pip install ai-edge-litert"}

_ORT_TYPES: dict[str, DType] = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


def _check_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ModelError(f"unknown runtime {name!r} (expected one of {RUNTIMES})")
    return cast(Runtime, name)


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ai-edge-litert (LiteRT) numbers its releases afresh; bundles record the minimum TFLite
# runtime in TensorFlow Lite's numbering (tflite-runtime 2.14 = TensorFlow 2.14). Each LiteRT
# release line is at least as capable as the TensorFlow release it was cut from.
_LITERT_AS_TFLITE: tuple[tuple[tuple[int, ...], str], ...] = (
    ((1, 3), "2.20.0"),
    ((1, 1), "2.19.0"),
    ((1, 0), "2.18.0"),
    ((0,), "2.17.0"),
)


def litert_as_tflite(version: str) -> str:
    """The TensorFlow Lite release an ``ai-edge-litert`` release corresponds to (at least)."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3]) or (0,)
    for floor, tflite in _LITERT_AS_TFLITE:
        if parts >= floor:
            return tflite
    return "2.17.0"


def runtime_version(name: Runtime) -> str | None:
    """The installed version of runtime ``name`` as bundles count it, or None when absent.

    Reads package metadata only (nothing heavy is imported). For ``onnx`` this is
    the onnxruntime version. For ``tflite`` it is in TensorFlow Lite numbering:
    ``tflite-runtime``'s own version, or for ``ai-edge-litert`` (preferred when
    both are installed) the TensorFlow Lite release it corresponds to.
    """
    for dist in _DISTRIBUTIONS[_check_runtime(name)]:
        version = _dist_version(dist)
        if version is not None:
            return litert_as_tflite(version) if dist == "ai-edge-litert" else version
    return None


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_LOAD = re.compile(r"^Load model from .*? failed:")
_SOURCE_LOC = re.compile(r"^\S+\.(?:cc|cpp|h):\d+ ")
_CXX_SIGNATURE = re.compile(r"^(?:[\w:<>*& ]+ )?[\w<>~]+(?:::[\w<>~]+)+\(")


def _reason(exc: BaseException, limit: int = 300) -> str:
    """A runtime exception as one readable line (onnxruntime's C++ decoration removed)."""
    text = str(exc).strip() or type(exc).__name__
    text = _ORT_PREFIX.sub("", text.splitlines()[0] if text.splitlines() else text)
    text = _ORT_LOAD.sub("", text).strip()
    loc = _SOURCE_LOC.match(text)
    if loc:
        text = text[loc.end():]
        sig = _CXX_SIGNATURE.match(text)
        if sig:  # skip "ns::Class::Method(args...) " up to the matching parenthesis
            depth = 0
            for i in range(sig.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    text = text[i + 1:].strip()
                    break
    text = text.strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_name(dtype: Any, where: str) -> DType:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ModelError(f"{where}: unsupported tensor type {name!r}")
    return cast(DType, name)


class Session(ABC):
    """A loaded model, ready to run.

    ``inputs`` and ``outputs`` are read from the live runtime: ``-1`` marks a
    dynamic dimension; TFLite tensors carry their quantization parameters.
    ``run`` validates the feeds, is thread-safe, and returns the outputs by name
    in the order of ``outputs``. Use as a context manager or call ``close()``.
    """

    runtime: Runtime
    backend: str
    """The runtime package and version that runs the model, e.g. ``"ai-edge-litert 2.3.0"``."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __init__(self, *, runtime: Runtime, backend: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec]) -> None:
        self.runtime = runtime
        self.backend = backend
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._closed = False
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            if not names or len(set(names)) != len(names):
                raise ModelError(f"the model's {kind} names are missing or not unique: {names}")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on ``feeds`` (input name -> array) and return outputs by name."""
        if self._closed:
            raise RuntimeError("run() on a closed session")
        unknown = sorted(set(feeds) - {s.name for s in self.inputs})
        if unknown:
            raise ModelError(f"unknown input(s) {unknown}; the model takes {[s.name for s in self.inputs]}")
        prepared: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ModelError(f"missing input {spec.name!r}")
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray):
                raise ModelError(f"input {spec.name!r}: expected a numpy array, got {type(value).__name__}")
            if value.dtype != np.dtype(spec.dtype):
                raise ModelError(f"input {spec.name!r}: dtype {value.dtype} does not match the model's {spec.dtype}")
            if not spec.matches_shape(value.shape):
                raise ModelError(
                    f"input {spec.name!r}: shape {tuple(value.shape)} does not match the model's {spec.shape}"
                    " (-1 is any size)"
                )
            # (not np.ascontiguousarray: it turns a 0-d array into a 1-d one)
            prepared[spec.name] = value if value.flags.c_contiguous else value.copy(order="C")
        try:
            results = self._run(prepared)
        except ModelError:
            raise
        except Exception as exc:  # a foreign runtime error: wrap it, never leak its type
            raise ModelError(f"{self.backend} failed to run the model: {_reason(exc)}") from exc
        try:
            return {s.name: np.asarray(results[s.name]) for s in self.outputs}
        except KeyError as exc:
            raise ModelError(f"{self.backend} did not return output {exc.args[0]!r}") from None

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Run on validated, contiguous feeds; return at least every declared output by name."""

    def prepared_runner(self) -> Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]:
        """The backend call without :meth:`run`'s checks, for a caller that already checked the feeds
        (names, dtypes, shapes) against :attr:`inputs` and wraps the backend's own errors."""
        return self._run

    def direct_runner(self) -> Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None:
        """The cheapest call the backend offers, for feeds that match :attr:`inputs` exactly (the
        declared names, numpy arrays of the declared dtypes and shapes; both runtimes copy a
        non-contiguous array themselves), or None when there is none.

        It checks nothing the runtime does not check itself, and a runtime may accept what
        :meth:`run` would refuse (a list for an array); so a caller uses it only for feeds it has
        recognised as exact, and on any exception goes back to validating them."""
        return None

    def close(self) -> None:
        """Release the runtime's resources. Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    @abstractmethod
    def _close(self) -> None: ...

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend} inputs={[s.name for s in self.inputs]}>"


# --- onnxruntime ----------------------------------------------------------


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"tensor {arg.name!r}: unsupported type {arg.type!r}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


class _OrtSession(Session):
    def __init__(self, session: Any, backend: str) -> None:
        super().__init__(runtime="onnx", backend=backend,
                         inputs=[_ort_spec(a) for a in session.get_inputs()],
                         outputs=[_ort_spec(a) for a in session.get_outputs()])
        self._session = session
        self._output_names = [s.name for s in self.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        values = self._session.run(self._output_names, feeds)  # InferenceSession.run is thread-safe
        return dict(zip(self._output_names, values))

    def direct_runner(self) -> Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None:
        # InferenceSession.run checks the feed names in Python (about 1 us a call) before calling
        # its C++ session, which checks names, types and shapes again; call that session directly.
        binding = getattr(self._session, "_sess", None)
        run = getattr(binding, "run", None)
        if run is None:
            return None
        names = self._output_names

        def direct(feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            if self._session is None:
                raise ValueError("the session is closed")
            return dict(zip(names, run(names, feeds, None)))
        return direct

    def _close(self) -> None:
        self._session = None


def _open_onnx(path: Path, threads: int) -> Session:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(f"runtime 'onnx' is not installed: {INSTALL_HINT['onnx']}") from exc
    backend = f"onnxruntime {ort.__version__}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings are ours to report, not the runtime's
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"cannot load {path} with {backend}: {_reason(exc)}") from exc
    log.debug("opened %s with %s, %d thread(s)", path, backend, threads)
    return _OrtSession(session, backend)


# --- LiteRT / tflite-runtime ----------------------------------------------


def _tflite_spec(name: str, details: Mapping[str, Any]) -> TensorSpec:
    dtype = _dtype_name(details["dtype"], f"tensor {name!r}")
    signature = details.get("shape_signature")
    dims = signature if signature is not None and len(signature) == len(details["shape"]) else details["shape"]
    qp = details.get("quantization_parameters") or {}
    scales = np.asarray(qp.get("scales", ()), dtype=np.float64).ravel()
    quant = None
    if scales.size:
        zero_points = np.asarray(qp.get("zero_points", ()), dtype=np.int64).ravel()
        if zero_points.size != scales.size:  # one zero point shared by all channels
            zero_points = np.resize(zero_points if zero_points.size else np.zeros(1, np.int64), scales.size)
        quant = QuantParams(scale=tuple(float(s) for s in scales), zero_point=tuple(int(z) for z in zero_points),
                            axis=int(qp.get("quantized_dimension", 0)) if scales.size > 1 else None)
    return TensorSpec(name=name, dtype=dtype, shape=tuple(int(d) if d >= 0 else -1 for d in dims),
                      quantization=quant)


class _TFLiteSession(Session):
    """One interpreter behind a lock: LiteRT interpreters are not thread-safe."""

    def __init__(self, interpreter: Any, backend: str) -> None:
        self._interpreter = interpreter
        self._lock = threading.Lock()
        signatures = interpreter.get_signature_list()
        self._runner: Any = None
        if len(signatures) == 1:  # tensor names = the signature's keys
            self._runner = interpreter.get_signature_runner(next(iter(signatures)))
            in_details = list(self._runner.get_input_details().items())
            out_details = list(self._runner.get_output_details().items())
        else:  # tensor names = the subgraph's tensor names
            in_details = [(d["name"], d) for d in interpreter.get_input_details()]
            out_details = [(d["name"], d) for d in interpreter.get_output_details()]
        super().__init__(runtime="tflite", backend=backend,
                         inputs=[_tflite_spec(n, d) for n, d in in_details],
                         outputs=[_tflite_spec(n, d) for n, d in out_details])
        self._in_index = {n: int(d["index"]) for n, d in in_details}
        self._out_index = {n: int(d["index"]) for n, d in out_details}
        self._shapes = {n: tuple(int(x) for x in d["shape"]) for n, d in in_details}
        # The signature gave the names; set_tensor/invoke/get_tensor on its (primary) subgraph's
        # indices are faster than the runner (measured 7.7 against 9.0 us per call on digits).
        self._runner = None
        # Faster still: the interpreter's C++ wrapper itself. Its Python methods check before each
        # call that no numpy view of a tensor buffer is alive (a reference count of the wrapper);
        # this session never hands out such views, so it calls the wrapper directly. Holding the
        # wrapper makes that check fail, so from here on every call goes through it.
        raw = getattr(interpreter, "_interpreter", None)
        if raw is not None and all(hasattr(raw, m) for m in
                                   ("SetTensor", "Invoke", "GetTensor", "ResizeInputTensor", "AllocateTensors")):
            self._set, self._invoke, self._get = raw.SetTensor, raw.Invoke, raw.GetTensor
            self._allocate = raw.AllocateTensors
            self._resize = lambda index, shape: raw.ResizeInputTensor(index, np.array(shape, dtype=np.int32), False)
        else:  # an interpreter without that wrapper: its public methods
            self._set, self._invoke, self._get = interpreter.set_tensor, interpreter.invoke, interpreter.get_tensor
            self._allocate = interpreter.allocate_tensors
            self._resize = lambda index, shape: interpreter.resize_tensor_input(index, list(shape), strict=False)

    def _run(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        with self._lock:
            if self._interpreter is None:
                raise ModelError("the session is closed")
            resized = False
            for name, value in feeds.items():
                if self._shapes[name] != value.shape:
                    self._resize(self._in_index[name], value.shape)
                    self._shapes[name] = value.shape
                    resized = True
            if resized:
                self._allocate()
            for name, value in feeds.items():
                self._set(self._in_index[name], value)
            self._invoke()
            get = self._get
            return {name: get(index, 0) for name, index in self._out_index.items()}

    def direct_runner(self) -> Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None:
        if len(self._in_index) != 1 or len(self._out_index) != 1:
            return None
        ((in_name, in_index),) = self._in_index.items()
        ((out_name, out_index),) = self._out_index.items()
        lock, set_tensor, get_tensor, invoke = self._lock, self._set, self._get, self._invoke

        def direct(feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            value = feeds[in_name]
            with lock:
                if self._interpreter is None:
                    raise ValueError("the session is closed")
                # SetTensor checks the dtype and dims against the allocated tensor; a batch size
                # other than the allocated one raises, and the caller's validated call resizes.
                set_tensor(in_index, value)
                invoke()
                return {out_name: get_tensor(out_index, 0)}
        return direct

    def _close(self) -> None:
        with self._lock:
            self._runner = None
            self._interpreter = None
            self._resize = self._allocate = self._set = self._invoke = self._get = _closed


def _closed(*_args: Any) -> Any:
    raise ModelError("the session is closed")


def _open_tflite(path: Path, threads: int) -> Session:
    try:
        from ai_edge_litert.interpreter import Interpreter

        backend = f"ai-edge-litert {_dist_version('ai-edge-litert') or '?'}"
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found, import-untyped, no-redef, unused-ignore]

            backend = f"tflite-runtime {_dist_version('tflite-runtime') or '?'}"
        except ImportError as exc:
            raise ModelError(f"runtime 'tflite' is not installed: {INSTALL_HINT['tflite']}") from exc
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        session = _TFLiteSession(interpreter, backend)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load {path} with {backend}: {_reason(exc)}") from exc
    log.debug("opened %s with %s, %d thread(s)", path, backend, threads)
    return session


def open_session(runtime: Runtime, model_path: Path, *, threads: int = 1) -> Session:
    """Load ``model_path`` with ``runtime`` on the CPU, using ``threads`` threads.

    Raises :class:`ModelError` when the runtime is not installed, the file is
    missing, or the runtime cannot load it (the message names the file and
    carries the runtime's reason).
    """
    runtime = _check_runtime(runtime)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist or is not a file")
    return _open_onnx(path, threads) if runtime == "onnx" else _open_tflite(path, threads)
