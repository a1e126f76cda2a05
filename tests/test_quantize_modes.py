"""The quantizers on real small models: the committed digits CNN, a CNN built with onnx.helper,
an MLP in ONNX and in TFLite. Each output is loaded in its runtime and compared with float."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import EdgeshipError, ModelError, UsageError
from packager.quantize import QuantizedModel, QuantizeError
from packager.quantize.onnx_quant import quantize_onnx
from packager.quantize.tflite_quant import quantize_tflite
from tests.modelfactory import onnx_mlp, tflite_mlp

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


# --- helpers -------------------------------------------------------------------------


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def interface(session: Any) -> list[tuple[str, str, list[Any]]]:
    return [(a.name, a.type, list(a.shape)) for a in [*session.get_inputs(), *session.get_outputs()]]


def accuracy(path: Path, x: np.ndarray, labels: np.ndarray) -> float:
    logits = ort_session(path).run(None, {"x": x})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def initializer_bytes(path: Path) -> int:
    import onnx

    return sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)


def initializers(path: Path) -> dict[str, Any]:
    import onnx

    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    calibration = np.load(DIGITS / "calibration.npz")["x"]
    ev = np.load(DIGITS / "eval.npz")
    model = DIGITS / "digits.onnx"
    return {
        "model": model,
        "feeds": [{"x": calibration[i : i + 1]} for i in range(len(calibration))],
        "x": ev["x"], "labels": ev["labels"],
        "fp32_accuracy": accuracy(model, ev["x"], ev["labels"]),
    }


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv(1->8, 3x3) -> Relu -> MaxPool(2) -> Flatten -> Gemm(128->10); input ``image`` [N,1,8,8]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = {
        "conv_w": (rng.standard_normal((8, 1, 3, 3)) / 3).astype(np.float32),
        "conv_b": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "fc_w": (rng.standard_normal((10, 128)) / np.sqrt(128)).astype(np.float32),
        "fc_b": (0.1 * rng.standard_normal(10)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mlp_tfl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float TFLite MLP large enough (64 -> 128 -> 10) for int8 weights to shrink the file."""
    return tflite_mlp(tmp_path_factory.mktemp("tfl") / "mlp.tflite", in_features=64, hidden=128, classes=10)


def random_feeds(name: str, shape: tuple[int, ...], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(n)]


# --- ONNX on digits ------------------------------------------------------------------------

ONNX_CASES = {
    # name: (mode, activation type, max file ratio, max initializer-bytes ratio)
    "fp16": ("fp16", "uint8", 0.60, 0.55),
    "int8-dynamic": ("int8-dynamic", "uint8", 0.55, 0.40),
    "int8-uint8": ("int8", "uint8", 0.55, 0.40),
    "int8-int8": ("int8", "int8", 0.55, 0.40),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_mode_on_digits(case: str, digits: dict[str, Any], tmp_path: Path) -> None:
    mode, act, max_file_ratio, max_weight_ratio = ONNX_CASES[case]
    src: Path = digits["model"]
    q = quantize_onnx(src, tmp_path / f"{case}.onnx", mode=mode,  # type: ignore[arg-type]
                      calibration=digits["feeds"] if mode == "int8" else None, activation_type=act)  # type: ignore[arg-type]

    assert isinstance(q, QuantizedModel) and q.mode == mode and q.path == tmp_path / f"{case}.onnx"
    assert interface(ort_session(q.path)) == interface(ort_session(src))  # names, tensor(float), shapes
    # digits is small enough (54 KB) that the graph itself (node and tensor names) is a quarter of an
    # int8 file: the weights shrink ~4x, the file ~2x.
    assert q.path.stat().st_size < max_file_ratio * src.stat().st_size
    assert initializer_bytes(q.path) < max_weight_ratio * initializer_bytes(src)
    acc = accuracy(q.path, digits["x"], digits["labels"])
    assert acc >= digits["fp32_accuracy"] - 0.02, f"{case}: {acc:.3f} vs fp32 {digits['fp32_accuracy']:.3f}"
    assert q.min_runtime_version is None  # opset 17 / IR 8 kept
    assert q.seconds > 0
    if mode != "fp16":
        assert q.details["preprocess"] == "full" and q.details["per_channel"] is True
    if mode == "int8":
        assert q.details["activation_type"] == act and q.details["calibration_method"] == "MinMax"
        assert q.details["calibration_samples"] == 128 and q.details["format"] == "QDQ"
        assert q.details["op_counts"]["QuantizeLinear"] > 0
    with pytest.raises(TypeError):
        q.details["mode"] = "changed"  # type: ignore[index]
    json.dumps(dict(q.details))  # goes into the signed manifest's quantization report


def _input_zero_point(path: Path) -> Any:
    import onnx

    model = onnx.load(str(path))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    return initializers(path)[q.input[2]]


def test_static_activation_type_sets_zero_point_dtype(digits: dict[str, Any], tmp_path: Path) -> None:
    from onnx import TensorProto

    u8 = quantize_onnx(digits["model"], tmp_path / "u8.onnx", mode="int8", calibration=digits["feeds"],
                       activation_type="uint8")
    i8 = quantize_onnx(digits["model"], tmp_path / "i8.onnx", mode="int8", calibration=digits["feeds"],
                       activation_type="int8")
    assert _input_zero_point(u8.path).data_type == TensorProto.UINT8
    assert _input_zero_point(i8.path).data_type == TensorProto.INT8


def _weight_scale_sizes(path: Path) -> list[int]:
    """Element counts of the scales that dequantize int8 weight initializers (rank >= 2)."""
    import onnx
    from onnx import TensorProto

    inits = initializers(path)
    sizes = []
    for node in onnx.load(str(path)).graph.node:
        w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if w is not None and w.data_type == TensorProto.INT8 and len(w.dims) >= 2:
            sizes.append(int(np.prod(inits[node.input[1]].dims)))
    return sizes


def test_static_per_channel_scales(digits: dict[str, Any], tmp_path: Path) -> None:
    per_channel = quantize_onnx(digits["model"], tmp_path / "pc.onnx", mode="int8", calibration=digits["feeds"])
    per_tensor = quantize_onnx(digits["model"], tmp_path / "pt.onnx", mode="int8", calibration=digits["feeds"],
                               per_channel=False)
    pc, pt = _weight_scale_sizes(per_channel.path), _weight_scale_sizes(per_tensor.path)
    assert pc and max(pc) > 1  # one scale per output channel
    assert pt and set(pt) == {1}
    assert per_tensor.details["per_channel"] is False


def test_static_reports_calibration_progress(digits: dict[str, Any], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    quantize_onnx(digits["model"], tmp_path / "p.onnx", mode="int8", calibration=digits["feeds"][:20],
                  progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 20) and calls[-1] == (20, 20)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --- ONNX on other models ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fp16", "int8-dynamic", "int8"])
def test_onnx_modes_on_helper_cnn(mode: str, cnn_onnx: Path, tmp_path: Path) -> None:
    feeds = random_feeds("image", (1, 8, 8), 64, seed=1)
    q = quantize_onnx(cnn_onnx, tmp_path / "q.onnx", mode=mode,  # type: ignore[arg-type]
                      calibration=feeds if mode == "int8" else None)
    assert interface(ort_session(q.path)) == interface(ort_session(cnn_onnx))
    x = np.concatenate([f["image"] for f in random_feeds("image", (1, 8, 8), 32, seed=2)])
    ref = ort_session(cnn_onnx).run(None, {"image": x})[0]
    out = ort_session(q.path).run(None, {"image": x})[0]
    assert out.shape == ref.shape == (32, 10)
    assert cosine(out, ref) > 0.99


def test_onnx_source_with_external_data_becomes_one_file(tmp_path: Path) -> None:
    src = onnx_mlp(tmp_path / "src" / "mlp.onnx", external_data=True)
    q = quantize_onnx(src, tmp_path / "mlp-int8.onnx", mode="int8-dynamic")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mlp-int8.onnx"]  # no temp files left
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert cosine(ort_session(q.path).run(None, {"x": x})[0], ort_session(src).run(None, {"x": x})[0]) > 0.99


def test_preprocess_falls_back(digits: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization.shape_inference as si

    real = si.quant_pre_process

    def no_symbolic(*args: Any, **kwargs: Any) -> None:
        if not kwargs.get("skip_symbolic_shape"):
            raise Exception("Incomplete symbolic shape inference")
        real(*args, **kwargs)

    monkeypatch.setattr(si, "quant_pre_process", no_symbolic)
    q = quantize_onnx(digits["model"], tmp_path / "a.onnx", mode="int8-dynamic")
    assert q.details["preprocess"] == "no-symbolic-shape"
    assert "Incomplete symbolic shape inference" in q.details["preprocess_errors"][0]


def test_without_preprocessing_onnxruntime_warning_is_captured(
        digits: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime.quantization.shape_inference as si

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no pre-processing today")

    monkeypatch.setattr(si, "quant_pre_process", broken)
    with caplog.at_level(logging.DEBUG):
        q = quantize_onnx(digits["model"], tmp_path / "s.onnx", mode="int8", calibration=digits["feeds"][:8])
    assert q.details["preprocess"] == "none" and len(q.details["preprocess_errors"]) == 2
    # onnxruntime says "Please consider to run pre-processing" with logging.warning() on the root logger:
    # it arrives through our logger, is kept in details, and never reaches the root logger as itself.
    assert any("pre-processing" in w for w in q.details["warnings"])
    assert not [r for r in caplog.records if r.name == "root"]
    assert any(r.name == "packager.quantize.onnx_quant" and "pre-processing" in r.getMessage()
               for r in caplog.records)
    out = capsys.readouterr()
    assert "pre-processing" not in out.out + out.err
    assert accuracy(q.path, digits["x"], digits["labels"]) >= 0.9


# --- TFLite ---------------------------------------------------------------------------------

TFLITE_MIN_RUNTIME = {"int8-dynamic": "2.17.0", "weight-only": None, "int8": None}


def tflite_run(path: Path, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return runner(x=x)["probs"], runner.get_input_details(), runner.get_output_details()


@pytest.mark.parametrize("mode", ["int8-dynamic", "weight-only", "int8"])
def test_tflite_mode_on_mlp(mode: str, mlp_tfl: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    q = quantize_tflite(mlp_tfl, tmp_path / f"{mode}.tflite", mode=mode,  # type: ignore[arg-type]
                        calibration=random_feeds("x", (64,), 64, seed=3) if mode == "int8" else None,
                        progress=lambda d, n: calls.append((d, n)))
    assert q.mode == mode and q.path.stat().st_size < 0.45 * mlp_tfl.stat().st_size
    assert q.min_runtime_version == TFLITE_MIN_RUNTIME[mode]
    assert q.details["io_dtypes"] == {"inputs": {"x": "float32"}, "outputs": {"probs": "float32"}}
    x = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32)  # a batch of 64
    ref, ref_in, ref_out = tflite_run(mlp_tfl, x)
    out, q_in, q_out = tflite_run(q.path, x)
    assert out.shape == ref.shape == (64, 10) and out.dtype == np.float32
    assert min(cosine(a, b) for a, b in zip(out, ref)) > 0.99  # every sample
    for before, after in ((ref_in, q_in), (ref_out, q_out)):  # the signature, dynamic batch included
        assert {k: list(v["shape_signature"]) for k, v in before.items()} == \
               {k: list(v["shape_signature"]) for k, v in after.items()}
    json.dumps(dict(q.details))
    if mode == "int8":
        assert calls[0] == (0, 64) and calls[-1] == (64, 64)
        assert q.details["recipe"] == "static_wi8_ai8" and q.details["float_io"] is True
        assert q.details["op_counts"]["QUANTIZE"] == 1 and q.details["op_counts"]["DEQUANTIZE"] == 1
    else:
        assert calls == []


def test_tflite_static_with_unverified_op_needs_litert_line(tmp_path: Path) -> None:
    """An operator whose int8 kernel was not measured on tflite-runtime 2.14 holds the model to 2.17."""
    from ai_edge_litert import schema_py_generated as schema

    from packager.tflite import TFLiteBuilder

    rng = np.random.default_rng(5)
    b = TFLiteBuilder()
    b.add_input("x", (-1, 16), "float32")
    b.add_constant("w", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
    b.add_constant("b", np.zeros(16, np.float32))
    b.add_tensor("h", (-1, 16), "float32")
    b.add_tensor("y", (-1, 16), "float32")
    b.add_op("FULLY_CONNECTED", ["x", "w", "b"], ["h"], schema.FullyConnectedOptionsT())
    b.add_op("TANH", ["h"], ["y"])
    b.mark_output("y")
    src = tmp_path / "tanh.tflite"
    src.write_bytes(b.to_bytes())
    q = quantize_tflite(src, tmp_path / "tanh-int8.tflite", mode="int8", calibration=random_feeds("x", (16,), 32, 6))
    assert "TANH" in q.details["op_counts"]
    assert q.min_runtime_version == "2.17.0"


def _without_signature(src: Path, dst: Path) -> Path:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(src.read_bytes(), 0)
    model.signatureDefs = []
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    dst.write_bytes(bytes(builder.Output()))
    return dst


def test_tflite_static_needs_a_signature(mlp_tfl: Path, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    bare = _without_signature(mlp_tfl, tmp_path / "bare.tflite")
    assert Interpreter(model_path=str(bare)).get_signature_list() == {}
    with pytest.raises(UsageError, match="no SignatureDef"):
        quantize_tflite(bare, tmp_path / "q.tflite", mode="int8", calibration=random_feeds("x", (64,), 4, 0))
    # the other modes need none
    q = quantize_tflite(bare, tmp_path / "d.tflite", mode="weight-only")
    assert q.path.is_file()
    with pytest.raises(UsageError, match="no SignatureDef 'other'.*serving_default"):
        quantize_tflite(mlp_tfl, tmp_path / "q.tflite", mode="int8", signature_key="other",
                        calibration=random_feeds("x", (64,), 4, 0))


# --- errors ------------------------------------------------------------------------------------


def test_int8_without_calibration(digits: dict[str, Any], mlp_tfl: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"int8 static quantization needs --calibration FILE\.npz"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int8")
    with pytest.raises(UsageError, match=r"needs --calibration"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int8", calibration=[])
    with pytest.raises(UsageError, match=r"int8 static quantization needs --calibration FILE\.npz"):
        quantize_tflite(mlp_tfl, tmp_path / "q.tflite", mode="int8")
    assert not list(tmp_path.iterdir())


def test_calibration_with_wrong_names(digits: dict[str, Any], mlp_tfl: Path, tmp_path: Path) -> None:
    bad = [{"image": f["x"]} for f in digits["feeds"][:4]]
    with pytest.raises(UsageError, match=r"unknown input name\(s\) \['image'\].*missing input\(s\) \['x'\]"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int8", calibration=bad)
    with pytest.raises(UsageError, match=r"unknown input name\(s\) \['input_1'\]"):
        quantize_tflite(mlp_tfl, tmp_path / "q.tflite", mode="int8",
                        calibration=[{"x": np.zeros((1, 64), np.float32), "input_1": np.zeros((1, 64), np.float32)}])


def test_calibration_with_wrong_dtype_or_shape(digits: dict[str, Any], tmp_path: Path) -> None:
    x = digits["feeds"][0]["x"]
    with pytest.raises(UsageError, match=r"input 'x': dtype float64 does not match the model's float32"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int8", calibration=[{"x": x.astype(np.float64)}])
    with pytest.raises(UsageError, match=r"input 'x': shape \(1, 8, 8\) does not match"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int8", calibration=[{"x": x[0]}])


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_not_a_model(suffix: str, tmp_path: Path) -> None:
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"TFL3" * 3 + bytes(range(256)) if suffix == ".tflite" else bytes(range(256)) * 4)
    with pytest.raises((UsageError, ModelError)) as info:
        if suffix == ".onnx":
            quantize_onnx(junk, tmp_path / "q.onnx", mode="int8-dynamic")
        else:
            quantize_tflite(junk, tmp_path / "q.tflite", mode="int8-dynamic")
    assert isinstance(info.value, EdgeshipError) and "junk" in str(info.value)
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_wrong_model_kind_and_arguments(digits: dict[str, Any], mlp_tfl: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs an ONNX model"):
        quantize_onnx(mlp_tfl, tmp_path / "q.onnx", mode="fp16")
    with pytest.raises(UsageError, match="needs a TFLite model"):
        quantize_tflite(digits["model"], tmp_path / "q.tflite", mode="weight-only")
    with pytest.raises(UsageError, match="unknown ONNX quantization mode"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int4")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown TFLite quantization mode"):
        quantize_tflite(mlp_tfl, tmp_path / "q.tflite", mode="fp16")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="activation type"):
        quantize_onnx(digits["model"], tmp_path / "q.onnx", mode="int8", activation_type="int16")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx", mode="fp16")
    with pytest.raises(UsageError, match="overwrite its source"):
        quantize_onnx(digits["model"], digits["model"], mode="fp16")


def test_quantizer_failure_is_a_quantize_error_and_leaves_dst(
        digits: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as oq

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Unsupported model IR version\n  File deep inside")

    monkeypatch.setattr(oq, "quantize_dynamic", boom)
    dst = tmp_path / "q.onnx"
    dst.write_bytes(b"previous")
    with pytest.raises(QuantizeError) as info:
        quantize_onnx(digits["model"], dst, mode="int8-dynamic")
    assert str(info.value) == "int8-dynamic quantization failed: Unsupported model IR version"
    assert isinstance(info.value, ModelError) and info.value.mode == "int8-dynamic"
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.reason == info.value.reason


def test_tflite_quantizer_failure_is_a_quantize_error(mlp_tfl: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_edge_quantizer import recipe

    def boom() -> None:
        raise ValueError("Unsupported op FOO")

    monkeypatch.setattr(recipe, "weight_only_wi8_afp32", boom)
    with pytest.raises(QuantizeError, match=r"^weight-only quantization failed: Unsupported op FOO$"):
        quantize_tflite(mlp_tfl, tmp_path / "q.tflite", mode="weight-only")
    assert not (tmp_path / "q.tflite").exists()


def test_quantized_model_validates() -> None:
    with pytest.raises(TypeError):
        QuantizedModel(path="x.onnx", mode="fp16", details={}, min_runtime_version=None, seconds=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        QuantizedModel(path=Path("x.onnx"), mode="fp16", details={}, min_runtime_version=None, seconds=-1)
