"""TFLite quantization with ai-edge-quantizer (no TensorFlow).

Modes and the recipes behind them:

* ``int8-dynamic`` - ``dynamic_wi8_afp32``: int8 per-channel weights, activations
  quantized by the kernels at run time;
* ``weight-only`` - ``weight_only_wi8_afp32``: int8 per-channel weights followed by
  DEQUANTIZE, float compute;
* ``int8`` - ``static_wi8_ai8`` plus two rules that leave the model's INPUT and
  OUTPUT unquantized, so the model keeps float32 inputs and outputs (a QUANTIZE
  op follows each input, a DEQUANTIZE precedes each output) and the same data
  feeds the float and the quantized model. Needs a SignatureDef and calibration
  feeds for it.

ai-edge-quantizer takes ~0.6 s to import (it pulls scipy): it is imported on first use.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, cast

import numpy as np

from agent.errors import EdgeshipError, ModelError, UsageError
from agent.manifest import DType, TensorSpec
from packager.introspect import ModelInfo, read_signature
from packager.quantize import (
    Calibration, Progress, QuantizedModel, QuantizeError, atomic_output, begin, calibration_feeds,
    captured_output, interface_differences, one_line,
)

log = logging.getLogger(__name__)

__all__ = ["quantize_tflite", "TFLiteMode", "MODES", "RECIPES", "DYNAMIC_RANGE_MIN_RUNTIME"]

TFLiteMode = Literal["int8-dynamic", "weight-only", "int8"]
MODES: tuple[TFLiteMode, ...] = ("int8-dynamic", "weight-only", "int8")
RECIPES: dict[TFLiteMode, str] = {
    "int8-dynamic": "dynamic_wi8_afp32",
    "weight-only": "weight_only_wi8_afp32",
    "int8": "static_wi8_ai8",
}

# Minimum runtimes, in TensorFlow Lite numbering (agent.runtime.litert_as_tflite). Measured with
# ai-edge-quantizer 0.10.0 output, run on tflite-runtime 2.14.0 (the oldest runtime edgeship
# supports, packager.introspect.TFLITE_MIN_VERSION) and on ai-edge-litert 2.3.0, for: an MLP
# (FULLY_CONNECTED, SOFTMAX); a CONV_2D/RESHAPE/FULLY_CONNECTED net; a net with CONV_2D,
# DEPTHWISE_CONV_2D, ADD, MAX_POOL_2D, MEAN, FULLY_CONNECTED, LOGISTIC; and examples/digits
# converted by packager.convert (float accuracy 0.972 on eval.npz).
# * dynamic-range: 2.14 loads the models (ai-edge-quantizer leaves every operator at version 1)
#   and runs them silently wrong: cosine to float 0.83 on the MLP, all-zero outputs on the conv
#   nets, digits accuracy 0.103; LiteRT was right (cosine 1.0000, digits 0.972). It needs the
#   LiteRT line, >= 2.17 (as FIELD-NOTES say).
# * weight-only: int8 weights go through DEQUANTIZE and every other operator stays the source's
#   float one; 2.14 matched float everywhere (cosine 1.0000, same top-1; digits 0.972). It does
#   not raise the source's minimum.
# * static int8: 2.14 gave LiteRT's outputs (cosine to float 0.9926 / 0.9988 / 1.0000 on the
#   three nets, digits 0.972 on both) with the operators listed below. A model with any other
#   operator is held to the LiteRT line (2.17), the oldest that ai-edge-quantizer targets: that
#   operator's int8 kernel was not measured on 2.14, and the file cannot tell (versions stay 1).
DYNAMIC_RANGE_MIN_RUNTIME = "2.17.0"
UNVERIFIED_STATIC_MIN_RUNTIME = "2.17.0"
STATIC_OPS_VERIFIED_ON_2_14 = frozenset({
    "ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "FULLY_CONNECTED", "LOGISTIC", "MAX_POOL_2D",
    "MEAN", "QUANTIZE", "RESHAPE", "SOFTMAX",
})


def quantize_tflite(
    src: Path,
    dst: Path,
    *,
    mode: TFLiteMode,
    calibration: Calibration | None = None,
    signature_key: str = "serving_default",
    progress: Progress | None = None,
) -> QuantizedModel:
    """Quantize the float TFLite model ``src`` into ``dst`` (replaced atomically).

    ``calibration`` (``int8`` only, required there) is a list of feeds keyed by
    the input names of SignatureDef ``signature_key``; ``progress(done, total)``
    is called as calibration samples are consumed.

    Raises :class:`UsageError` for bad arguments or calibration data, a source
    that is not a TFLite model, or static quantization of a model without that
    SignatureDef; :class:`QuantizeError` when ai-edge-quantizer fails on the
    model or its output does not load or changes the interface.
    """
    if mode not in MODES:
        raise UsageError(f"unknown TFLite quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    src, dst, clock, source = begin(src, dst, runtime="tflite", needs="quantize_tflite needs a TFLite model")
    feeds = calibration_feeds(mode, calibration, lambda: _signature_inputs(src, signature_key))

    recipe_name = RECIPES[mode]
    details: dict[str, Any] = {"quantizer": "ai-edge-quantizer", "recipe": recipe_name,
                               "weight_type": "int8", "weight_granularity": "per-channel"}
    float_model = src.read_bytes()
    with captured_output(log, "ai-edge-quantizer", packages=("ai_edge_quantizer", "ai_edge_litert"),
                         loggers=("absl",)) as captured:
        try:
            aeq = _import_quantizer()
            recipe = _recipe(aeq, mode)
            qsvs = None
            if mode == "int8":
                qsvs = _calibrate(aeq, float_model, recipe, signature_key, feeds, progress)
                details |= {"signature_key": signature_key, "calibration_samples": len(feeds),
                            "calibration_method": "MinMax", "activation_type": "int8", "float_io": True}
            qt = aeq.quantizer.Quantizer(float_model, recipe)
            quantized = bytes(qt.quantize(qsvs, enable_progress_report=False).quantized_model)
        except EdgeshipError:
            raise
        except Exception as exc:  # the quantizer's own failure, whatever its type
            log.debug("ai-edge-quantizer %s quantization of %s failed", mode, src, exc_info=True)
            raise QuantizeError(mode, one_line(exc)) from exc
        quantized, restored = _restore_dynamic_io_dims(quantized, float_model)
        if restored:
            details["restored_dynamic_dims"] = restored
        result = _write_checked(quantized, dst, source, mode)
        details["warnings"] = list(captured.warnings)

    ops = _op_counts(quantized)
    details["op_counts"] = dict(sorted(ops.items()))
    details["io_dtypes"] = {"inputs": {s.name: s.dtype for s in result.inputs},
                            "outputs": {s.name: s.dtype for s in result.outputs}}
    min_rt = _min_runtime(mode, set(ops))
    log.info("quantized %s (%s) -> %s: %d -> %d bytes in %.2f s", src.name, mode, dst.name,
             len(float_model), len(quantized), clock.seconds)
    return QuantizedModel(path=dst, mode=mode, details=details, min_runtime_version=min_rt,
                          seconds=clock.seconds)


def _min_runtime(mode: TFLiteMode, ops: set[str]) -> str | None:
    if mode == "int8-dynamic":
        return DYNAMIC_RANGE_MIN_RUNTIME
    if mode == "int8":
        unverified = sorted(ops - STATIC_OPS_VERIFIED_ON_2_14)
        if unverified:
            log.debug("static int8 operators not verified on tflite-runtime 2.14: %s", unverified)
            return UNVERIFIED_STATIC_MIN_RUNTIME
    return None


# --- the source's signature ------------------------------------------------------


def _signature_inputs(src: Path, signature_key: str) -> list[TensorSpec]:
    """The inputs of SignatureDef ``signature_key``, or :class:`UsageError` explaining what is missing."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(src))
        signatures = interpreter.get_signature_list()
    except Exception as exc:
        raise UsageError(f"{src.name} cannot be loaded by LiteRT: {one_line(exc)}") from exc
    if not signatures:
        raise UsageError(
            f"{src.name} has no SignatureDef: static int8 quantization (ai-edge-quantizer) calibrates through "
            f"a signature. Export the model with one (e.g. {signature_key!r}), or use --quantize int8-dynamic "
            "or weight-only, which need none")
    if signature_key not in signatures:
        raise UsageError(f"{src.name} has no SignatureDef {signature_key!r}; its signatures are "
                         f"{sorted(signatures)}")
    details = interpreter.get_signature_runner(signature_key).get_input_details()
    return [_spec(name, d) for name, d in details.items()]


def _spec(name: str, d: Mapping[str, Any]) -> TensorSpec:
    signature = d.get("shape_signature")
    dims = signature if signature is not None and len(signature) == len(d["shape"]) else d["shape"]
    return TensorSpec(name=name, dtype=cast(DType, np.dtype(d["dtype"]).name),
                      shape=tuple(int(x) if x >= 0 else -1 for x in dims))


# --- ai-edge-quantizer -------------------------------------------------------------


class _AEQ:
    """The ai-edge-quantizer modules used here, imported once."""

    def __init__(self) -> None:
        from ai_edge_quantizer import algorithm_manager, calibrator, qtyping, quantizer, recipe, recipe_manager

        self.algorithm_manager = algorithm_manager
        self.calibrator = calibrator
        self.qtyping = qtyping
        self.quantizer = quantizer
        self.recipe = recipe
        self.recipe_manager = recipe_manager


_aeq: _AEQ | None = None


def _import_quantizer() -> _AEQ:
    global _aeq
    if _aeq is None:
        start = time.perf_counter()
        _aeq = _AEQ()
        log.debug("imported ai-edge-quantizer in %.2f s", time.perf_counter() - start)
    return _aeq


def _recipe(aeq: _AEQ, mode: TFLiteMode) -> Any:
    recipe = getattr(aeq.recipe, RECIPES[mode])()
    if mode != "int8":
        return recipe
    # Keep float32 model inputs and outputs: the virtual INPUT/OUTPUT ops stay unquantized, so the
    # quantizer puts QUANTIZE after each input and DEQUANTIZE before each output.
    manager = aeq.recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    for op in (aeq.qtyping.TFLOperationName.INPUT, aeq.qtyping.TFLOperationName.OUTPUT):
        manager.add_quantization_config(regex=".*", operation_name=op,
                                        algorithm_key=aeq.algorithm_manager.AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def _calibrate(aeq: _AEQ, float_model: bytes, recipe: Any, signature_key: str,
               feeds: Sequence[Mapping[str, np.ndarray]], progress: Progress | None) -> Any:
    """Calibrate one sample at a time, so ``progress`` follows along; ranges are the true min/max.

    One calibrator keeps its statistics across the calls, so this is
    ``Quantizer.calibrate`` over all feeds, and it keeps the quantizer's own tqdm
    bar away (that bar only shows for calls of >= 100 operator steps).

    The quantizer's default range update is a moving average (0.95) of each
    sample's min/max, which tracks a typical sample's range rather than the
    data's: on a 64-128-10 MLP with 64 random samples it clipped the logits to
    [-1.27, 1.44] (true range [-2.59, 2.59]); cosine to float per sample fell to
    0.86 (min) and top-1 agreement to 0.91. With min/max: 0.9965 and 1.0. MinMax
    is also what the ONNX quantizer uses.
    """
    from ai_edge_quantizer.utils import qsv_utils

    manager = aeq.recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    calib = aeq.calibrator.Calibrator(float_model, num_threads=min(os.cpu_count() or 1, 16),
                                      qsv_update_func=qsv_utils.min_max_update)
    n = len(feeds)
    if progress is not None:
        progress(0, n)
    for i, feed in enumerate(feeds):
        calib.calibrate({signature_key: [dict(feed)]}, manager)
        if progress is not None:
            progress(i + 1, n)
    return calib.get_model_qsvs()


# --- the result ----------------------------------------------------------------------


def _write_checked(data: bytes, dst: Path, source: ModelInfo, mode: str) -> ModelInfo:
    """Write ``data`` to ``dst`` atomically once it loads in LiteRT with the source's interface."""
    with atomic_output(dst) as tmp:
        tmp.write_bytes(data)
        try:
            result = read_signature(tmp)  # loads it through LiteRT
        except (ModelError, UsageError) as exc:
            raise QuantizeError(mode, f"the quantized model does not load: {exc}") from exc
        changed = (interface_differences(source.inputs, result.inputs, "input")
                   + interface_differences(source.outputs, result.outputs, "output"))
        if changed:
            raise QuantizeError(mode, "the quantized model changed the interface: " + "; ".join(changed))
    return result


def _io_signatures(model: Any) -> list[tuple[list[int], list[tuple[list[int], list[int] | None]]]]:
    """Per subgraph: its input and output tensor indices, and each one's (shape, shape signature)."""
    out = []
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        indices = [*(int(i) for i in sg.InputsAsNumpy()), *(int(i) for i in sg.OutputsAsNumpy())] \
            if sg.InputsLength() + sg.OutputsLength() else []
        specs = []
        for i in indices:
            t = sg.Tensors(i)
            sig = [int(d) for d in t.ShapeSignatureAsNumpy()] if t.ShapeSignatureLength() else None
            specs.append(([int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else [], sig))
        out.append((indices, specs))
    return out


def _restore_dynamic_io_dims(data: bytes, float_model: bytes) -> tuple[bytes, list[str]]:
    """Give model inputs/outputs back the dynamic dimensions (-1) the float model declared.

    ai-edge-quantizer 0.10 makes the tensors of the QUANTIZE/DEQUANTIZE ops it adds at the
    model's inputs and outputs from the source tensor's ``shape`` without its ``shape_signature``,
    so a float ``[-1, 10]`` output is declared ``[1, 10]`` (the model still runs at any batch
    size: those kernels resize their outputs). The model is repacked only when something is
    restored; buffers stored after the flatbuffer (the quantizer's layout for larger models)
    are carried over with their offsets shifted and their 16-byte alignment kept.
    """
    from ai_edge_litert import schema_py_generated as schema

    src = _io_signatures(schema.Model.GetRootAsModel(float_model, 0))
    if not any(sig is not None and -1 in sig for _, specs in src for _, sig in specs):
        return data, []
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    restored: list[str] = []
    for sg, (src_indices, src_specs) in zip(model.subgraphs or [], src):
        indices = [*(sg.inputs if sg.inputs is not None else []), *(sg.outputs if sg.outputs is not None else [])]
        if len(indices) != len(src_indices):
            continue
        for i, (shape, sig) in zip(indices, src_specs):
            t = sg.tensors[int(i)]
            if sig is None or -1 not in sig or t.shapeSignature is not None:
                continue
            if [int(d) for d in t.shape] == shape:
                t.shapeSignature = list(sig)
                restored.append(t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name))
    if not restored:
        return data, []
    log.debug("restored dynamic dimensions of %s", restored)
    return _repack(model, data), restored


def _repack(model: Any, original: bytes) -> bytes:
    import flatbuffers

    def pack() -> bytes:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    external = [b for b in model.buffers or [] if b.offset and b.offset > 1]
    big_options = [op for sg in model.subgraphs or [] for op in sg.operators or []
                   if op.largeCustomOptionsOffset and op.largeCustomOptionsOffset > 1]
    if not external and not big_options:
        return pack()
    start = min([b.offset for b in external] + [op.largeCustomOptionsOffset for op in big_options])
    tail = original[start:]
    size = len(pack())  # offsets are fixed-size fields: shifting them does not change the size
    shift = -(-size // 16) * 16 - start
    for b in external:
        b.offset += shift
    for op in big_options:
        op.largeCustomOptionsOffset += shift
    head = pack()
    if len(head) != size:
        raise QuantizeError("int8", "repacking the quantized model changed its layout unexpectedly")
    return head + bytes(start + shift - size) + tail


def _op_counts(data: bytes) -> Counter[str]:
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if isinstance(v, int)}
    model = schema.Model.GetRootAsModel(data, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        codes.append(names.get(code, f"builtin {code}") if code != schema.BuiltinOperator.CUSTOM
                     else f"CUSTOM {(oc.CustomCode() or b'').decode(errors='replace')}")
    ops: Counter[str] = Counter()
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for o in range(sg.OperatorsLength()):
            ops[codes[sg.Operators(o).OpcodeIndex()]] += 1
    return ops
