"""ONNX quantization with onnxruntime's own tools: fp16, dynamic int8, static int8 (QDQ).

* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  ``keep_io_types=True`` (weights and compute in float16, the interface stays
  float32). Not onnxconverter-common, whose output failed to load on a
  transformer (FIELD-NOTES).
* ``int8-dynamic``: ``quantize_dynamic``: int8 weights (symmetric, per channel
  where the operator allows it), activations quantized at run time;
  ``reduce_range=False`` (7-bit weights cost accuracy: FIELD-NOTES).
* ``int8``: ``quantize_static`` in QDQ format (standard ONNX operators), int8
  symmetric weights per channel, int8 or uint8 activations calibrated with MinMax
  (Percentile or Entropy on request) over the given feeds.

Both int8 modes run ``quant_pre_process`` first; when symbolic shape inference
fails it is retried without it, and when that fails too the model is quantized
as it is. ``details["preprocess"]`` says which happened.

The result keeps the source's input and output names, dtypes and shapes (checked
by loading it in onnxruntime before it replaces ``dst``), is written atomically,
and carries neither opset imports for domains it does not use nor the tools'
value_info annotations of intermediate tensors.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from agent.errors import EdgeshipError, ModelError, UsageError
from agent.manifest import version_tuple
from packager.introspect import ModelInfo, read_signature
from packager.quantize import (
    Calibration, CapturedOutput, Progress, QuantizedModel, QuantizeError, atomic_output, begin,
    calibration_feeds, captured_output, interface_differences, one_line,
)

log = logging.getLogger(__name__)

__all__ = ["quantize_onnx", "OnnxMode", "ActivationType", "CalibrationMethod", "MODES"]

OnnxMode = Literal["fp16", "int8-dynamic", "int8"]
ActivationType = Literal["int8", "uint8"]
CalibrationMethod = Literal["minmax", "percentile", "entropy"]
MODES: tuple[OnnxMode, ...] = ("fp16", "int8-dynamic", "int8")
_ACTIVATION_TYPES = ("int8", "uint8")
_CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def quantize_onnx(
    src: Path,
    dst: Path,
    *,
    mode: OnnxMode,
    calibration: Calibration | None = None,
    activation_type: ActivationType = "uint8",
    per_channel: bool = True,
    calibrate_method: CalibrationMethod = "minmax",
    exclude_nodes: Sequence[str] = (),
    progress: Progress | None = None,
) -> QuantizedModel:
    """Quantize the ONNX model ``src`` into ``dst`` (replaced atomically).

    ``calibration`` (static ``int8`` only, required there) is a list of feeds
    (input name -> array, batch 1) whose names, dtypes and shapes must match the
    model's inputs. ``progress(done, total)`` is called as calibration samples
    are consumed. ``exclude_nodes`` names nodes to leave in float (int8 modes).

    Raises :class:`UsageError` for bad arguments or calibration data, a source
    that is not an ONNX model, or a ``dst`` that would overwrite ``src``;
    :class:`QuantizeError` when onnxruntime's quantizer fails on the model or
    produces a model that does not load or changes the interface.
    """
    if mode not in MODES:
        raise UsageError(f"unknown ONNX quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if activation_type not in _ACTIVATION_TYPES:
        raise UsageError(f"activation type must be int8 or uint8, got {activation_type!r}")
    if calibrate_method not in _CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method {calibrate_method!r}; choose one of "
                         f"{', '.join(_CALIBRATION_METHODS)}")
    src, dst, clock, source = begin(src, dst, runtime="onnx", needs="quantize_onnx needs an ONNX model")
    feeds = calibration_feeds(mode, calibration, lambda: source.inputs)

    with tempfile.TemporaryDirectory(prefix=".edgeship-quant-", dir=dst.parent) as tmp, \
            _captured_onnxruntime() as captured:
        work = Path(tmp)
        try:
            if mode == "fp16":
                model, details = _fp16(src)
            else:
                prepared, details = _preprocess(src, work)
                out = work / "quantized.onnx"
                if mode == "int8":
                    details |= _static(prepared, out, feeds, activation_type=activation_type,
                                       per_channel=per_channel, method=calibrate_method,
                                       exclude=list(exclude_nodes), progress=progress)
                else:
                    details |= _dynamic(prepared, out, per_channel=per_channel, exclude=list(exclude_nodes))
                model = _load(out)
        except EdgeshipError:
            raise
        except Exception as exc:  # the quantizer's own failure, whatever its type
            log.debug("onnxruntime %s quantization of %s failed", mode, src, exc_info=True)
            raise QuantizeError(mode, one_line(exc)) from exc
        _tidy(model)
        details |= _describe(model)
        result = _write_checked(model, dst, source, mode)
        details["warnings"] = list(captured.warnings)

    min_rt = _raised_min_runtime(source, result)
    log.info("quantized %s (%s) -> %s: %d -> %d bytes in %.2f s", src.name, mode, dst.name,
             src.stat().st_size, dst.stat().st_size, clock.seconds)
    return QuantizedModel(path=dst, mode=mode, details=details, min_runtime_version=min_rt,
                          seconds=clock.seconds)


# --- the three quantizers ------------------------------------------------------


def _fp16(src: Path) -> tuple[Any, dict[str, Any]]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))  # external data (next to src) is loaded too
    model = convert_float_to_float16(model, keep_io_types=True)
    return model, {"converter": "onnxruntime.transformers.float16", "keep_io_types": True}


def _preprocess(src: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """``quant_pre_process``: full, then without symbolic shape inference, then none at all."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "preprocessed.onnx"
    failures: list[str] = []
    for outcome, skip_symbolic in (("full", False), ("no-symbolic-shape", True)):
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=skip_symbolic)
        except Exception as exc:  # sympy missing, "Incomplete symbolic shape inference", ...
            failures.append(f"{outcome}: {one_line(exc)}")
            log.debug("quant_pre_process (%s) failed on %s: %s", outcome, src.name, exc)
            continue
        log.debug("quant_pre_process (%s) done for %s", outcome, src.name)
        return out, {"preprocess": outcome, **({"preprocess_errors": failures} if failures else {})}
    log.warning("quantization pre-processing failed on %s; quantizing it as it is (%s)", src.name,
                "; ".join(failures))
    return src, {"preprocess": "none", "preprocess_errors": failures}


class _FeedReader:
    """A ``CalibrationDataReader`` over a list of feeds that reports progress as they are consumed."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], progress: Progress | None) -> None:
        self._feeds = feeds
        self._progress = progress
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        i, n = self._next, len(self._feeds)
        if self._progress is not None:
            self._progress(min(i, n), n)  # i samples have been run when the next one is asked for
        if i >= n:
            return None
        self._next += 1
        return dict(self._feeds[i])

    def rewind(self) -> None:
        self._next = 0


def _static(model: Path, out: Path, feeds: Sequence[Mapping[str, np.ndarray]], *, activation_type: ActivationType,
            per_channel: bool, method: CalibrationMethod, exclude: list[str],
            progress: Progress | None) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    act = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
    # No CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMax discards the collected chunk
    # instead of folding it into the ranges ("No data is collected." with 128 samples / 16).
    quantize_static(
        str(model), str(out), _FeedReader(feeds, progress),
        quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=False,
        activation_type=act, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None,
        calibrate_method=getattr(OrtMethod, _CALIBRATION_METHODS[method]),
        calibration_providers=["CPUExecutionProvider"],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    return {"format": "QDQ", "weight_type": "int8", "weight_symmetric": True, "per_channel": per_channel,
            "activation_type": activation_type, "reduce_range": False,
            "calibration_method": _CALIBRATION_METHODS[method], "calibration_samples": len(feeds),
            "nodes_excluded": exclude}


def _dynamic(model: Path, out: Path, *, per_channel: bool, exclude: list[str]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), per_channel=per_channel, reduce_range=False,
                     weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None)
    return {"format": "integer ops (dynamic)", "weight_type": "int8", "per_channel": per_channel,
            "reduce_range": False, "nodes_excluded": exclude}


# --- the result ------------------------------------------------------------------


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _used_domains(graph: Any, found: set[str]) -> None:
    for node in graph.node:
        found.add(node.domain or "")
        for attr in node.attribute:
            for g in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                _used_domains(g, found)


def _drop_unused_opsets(model: Any) -> list[str]:
    """Remove opset imports of domains no node uses (pre-processing declares ORT's internal ones)."""
    used: set[str] = set()
    _used_domains(model.graph, used)
    for fn in model.functions:
        used.add(fn.domain)
        for node in fn.node:
            used.add(node.domain or "")
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    dropped = [o.domain for o in model.opset_import if o not in keep]
    if dropped:
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return dropped


def _tidy(model: Any) -> None:
    """Drop what the tools added and no runtime needs: opset imports of unused domains, and the
    shapes of intermediate tensors that pre-processing / fp16 conversion record in value_info
    (onnxruntime infers them at load; on digits they were 3% of the int8 file)."""
    dropped = _drop_unused_opsets(model)
    if dropped:
        log.debug("dropped unused opset imports %s", dropped)
    if len(model.graph.value_info):
        log.debug("dropped value_info of %d intermediate tensors", len(model.graph.value_info))
        del model.graph.value_info[:]


def _describe(model: Any) -> dict[str, Any]:
    """What the output is made of: operator counts, and for QDQ models the operators left in float."""
    ops = Counter(n.op_type for n in model.graph.node)
    details: dict[str, Any] = {"op_counts": dict(sorted(ops.items())),
                               "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                                             None)}
    if ops.get("DequantizeLinear"):
        produced_by = {out: n.op_type for n in model.graph.node for out in n.output}
        float_ops = sorted({n.op_type for n in model.graph.node if n.op_type not in _QDQ_OPS
                            and not any(produced_by.get(i) == "DequantizeLinear" for i in n.input)})
        details["float_op_types"] = float_ops
    return details


def _write_checked(model: Any, dst: Path, source: ModelInfo, mode: str) -> ModelInfo:
    """Save ``model`` to ``dst`` atomically once it loads in onnxruntime with the source's interface."""
    import onnx

    from agent.runtime import open_session

    with atomic_output(dst) as tmp:
        try:
            onnx.save_model(model, str(tmp))
        except Exception as exc:  # e.g. a protobuf over 2 GiB
            raise QuantizeError(mode, f"cannot save the quantized model: {one_line(exc)}") from exc
        try:
            result = read_signature(tmp)
            with open_session("onnx", tmp):
                pass
        except (ModelError, UsageError) as exc:
            raise QuantizeError(mode, f"the quantized model does not load: {exc}") from exc
        changed = (interface_differences(source.inputs, result.inputs, "input")
                   + interface_differences(source.outputs, result.outputs, "output"))
        if changed:
            raise QuantizeError(mode, "the quantized model changed the interface: " + "; ".join(changed))
    return result


def _raised_min_runtime(source: ModelInfo, result: ModelInfo) -> str | None:
    """The result's minimum onnxruntime when its opset / IR version needs a newer one than the source."""
    if version_tuple(result.min_runtime_version) > version_tuple(source.min_runtime_version):
        return result.min_runtime_version
    return None


# --- onnxruntime's own output ------------------------------------------------------


@contextlib.contextmanager
def _captured_onnxruntime() -> Iterator[CapturedOutput]:
    """onnxruntime's Python logging, prints, warnings and C++ log, into this module's logger."""
    import onnxruntime as ort

    with captured_output(log, "onnxruntime", packages=("onnxruntime",)) as sink:
        def native(severity: int, category: str, logid: str, location: str, message: str) -> None:
            # Session-level warnings (initializers removed, ...) are noise here; errors raise anyway.
            sink.emit(logging.WARNING if severity >= 3 else logging.DEBUG, message)

        installed = False
        setter: Any = getattr(ort, "set_default_logger_callback", None)  # onnxruntime >= 1.32
        if setter is not None:
            try:
                setter(native, 2)
                installed = True
            except Exception as exc:
                log.debug("cannot install an onnxruntime log callback: %s", exc)
        try:
            yield sink
        finally:
            if installed:
                setter(None)  # back to the platform logger; the default severity (warning) stays
