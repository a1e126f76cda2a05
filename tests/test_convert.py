"""The ONNX -> TFLite converter end to end: real models, the error contract, atomic output.

Numerics are compared with onnxruntime; see test_convert_ops.py for the
per-operator cases and the tolerance rationale.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import helper

from agent.errors import ModelError, UsageError
from packager.convert import ConversionResult, UnsupportedOperators, convert_onnx_to_tflite
from tests.conftest import EXAMPLES
from tests.modelfactory import onnx_mlp
from tests.test_convert_ops import B, W, conv, convert_and_compare, onnx_model, rand, run_onnx, run_tflite

DIGITS = EXAMPLES / "digits" / "digits.onnx"
N = helper.make_node
INT64 = np.int64


def _tflite_io(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:  # type: ignore[type-arg]
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return runner.get_input_details(), runner.get_output_details()


@pytest.fixture(scope="module")
def digits_tflite(tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    return convert_onnx_to_tflite(DIGITS, tmp_path_factory.mktemp("digits") / "digits.tflite")


# --- real models -----------------------------------------------------------


def test_digits_cnn_matches_onnx_on_the_eval_set(digits_tflite: ConversionResult) -> None:
    data = np.load(EXAMPLES / "digits" / "eval.npz")
    x = data["x"]
    expected = run_onnx(DIGITS, {"x": x})["logits"]
    whole = run_tflite(digits_tflite.path, {"x": x})["logits"]  # the dynamic batch: all 397 at once
    one_by_one = np.concatenate([run_tflite(digits_tflite.path, {"x": x[i:i + 1]})["logits"] for i in range(40)])
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one_by_one, expected[:40], rtol=1e-4, atol=1e-4)
    assert (whole.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_digits_layout_and_folding(digits_tflite: ConversionResult) -> None:
    ops = dict(digits_tflite.op_counts)
    # Conv->Relu->Conv->Clip->Conv->Relu->MaxPool->Conv->Relu->GAP->Flatten->Gemm->Relu->Gemm: NHWC throughout.
    # The 1-channel input and the [N,1,1,C] pool output change layout by a RESHAPE: no TRANSPOSE at all.
    assert ops == {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 1, "MAX_POOL_2D": 1, "MEAN": 1, "RESHAPE": 2,
                   "FULLY_CONNECTED": 2}
    assert dict(digits_tflite.folded) == {"Relu": 4, "Clip": 1, "constant_nodes": 2}
    assert any("dynamic batch kept" in n for n in digits_tflite.notes)


def test_interface_is_the_onnx_one(digits_tflite: ConversionResult) -> None:
    inputs, outputs = _tflite_io(digits_tflite.path)
    assert list(inputs) == ["x"] and list(outputs) == ["logits"]
    assert list(inputs["x"]["shape"]) == [1, 1, 8, 8] and list(inputs["x"]["shape_signature"]) == [-1, 1, 8, 8]
    assert inputs["x"]["dtype"] == np.float32 and outputs["logits"]["dtype"] == np.float32
    assert list(outputs["logits"]["shape_signature"]) == [-1, 10]


def test_mlp_end_to_end(tmp_path: Path) -> None:
    src = onnx_mlp(tmp_path / "mlp.onnx", in_features=8, hidden=16, classes=4)
    x = rand(5, 8, seed=3)
    res = convert_onnx_to_tflite(src, tmp_path / "mlp.tflite")
    np.testing.assert_allclose(run_tflite(res.path, {"x": x})["probs"], run_onnx(src, {"x": x})["probs"],
                               rtol=1e-5, atol=1e-6)
    assert dict(res.op_counts) == {"FULLY_CONNECTED": 2, "SOFTMAX": 1}
    assert res.folded == {"Relu": 1}


def test_external_data_model(tmp_path: Path) -> None:
    src = onnx_mlp(tmp_path / "ext.onnx", external_data=True)
    x = rand(2, 8, seed=4)
    res = convert_onnx_to_tflite(src, tmp_path / "ext.tflite")
    np.testing.assert_allclose(run_tflite(res.path, {"x": x})["probs"], run_onnx(src, {"x": x})["probs"],
                               rtol=1e-5, atol=1e-6)


def test_fp16_weights(tmp_path: Path, digits_tflite: ConversionResult) -> None:
    res = convert_onnx_to_tflite(DIGITS, tmp_path / "digits16.tflite", fp16_weights=True)
    assert res.op_counts["DEQUANTIZE"] >= 6
    assert res.path.stat().st_size < 0.6 * digits_tflite.path.stat().st_size
    x = np.load(EXAMPLES / "digits" / "eval.npz")["x"][:50]
    expected = run_onnx(DIGITS, {"x": x})["logits"]
    got = run_tflite(res.path, {"x": x})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=5e-2)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98


# --- folding ----------------------------------------------------------------


def test_batchnorm_folded_into_conv(tmp_path: Path) -> None:
    nodes = [conv("c", pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-5),
             N("Relu", ["n"], ["y"])]
    init = {"w": W(4, 3), "b": B(4), "s": rand(4, seed=5), "bb": B(4, seed=6), "m": rand(4, seed=7),
            "v": np.abs(rand(4, seed=8)) + 0.2}
    model = onnx_model(nodes, {"x": ("N", 3, 8, 8)}, ["y"], initializers=init)
    res = convert_and_compare(tmp_path, model, {"x": rand(2, 3, 8, 8, seed=1)})
    assert res.folded["BatchNormalization"] == 1 and res.folded["Relu"] == 1
    assert "MUL" not in res.op_counts and "ADD" not in res.op_counts and "RELU" not in res.op_counts
    assert res.op_counts["CONV_2D"] == 1


def _torch_style_flatten(batch: str | int) -> object:
    """Conv -> Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape -> Gemm, as torch exports x.view(n, -1)."""
    nodes = [conv("c", pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
             N("Shape", ["r"], ["shape"]),
             N("Constant", [], ["zero"], value=helper.make_tensor("zero", 7, [], [0])),
             N("Gather", ["shape", "zero"], ["n"], axis=0),
             N("Unsqueeze", ["n", "axes0"], ["n1"]),
             N("Concat", ["n1", "minus1"], ["target"], axis=0),
             N("Reshape", ["r", "target"], ["flat"]),
             N("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1)]
    init = {"w": W(4, 3), "b": B(4), "axes0": np.array([0], INT64), "minus1": np.array([-1], INT64),
            "fc": rand(5, 4 * 6 * 6, seed=3, scale=0.1), "fcb": B(5)}
    return onnx_model(nodes, {"x": (batch, 3, 6, 6)}, ["y"], initializers=init)


@pytest.mark.parametrize("batch", ["N", 1])
def test_shape_subgraph_folded(tmp_path: Path, batch: str | int) -> None:
    res = convert_and_compare(tmp_path, _torch_style_flatten(batch), {"x": rand(1, 3, 6, 6, seed=2)})
    assert res.folded["constant_nodes"] == 5  # Shape, Constant, Gather, Unsqueeze, Concat
    assert set(res.op_counts) == {"TRANSPOSE", "CONV_2D", "RESHAPE", "FULLY_CONNECTED"}
    if batch == "N":  # the folded target is [BATCH, -1]: the model still takes any batch
        x = rand(3, 3, 6, 6, seed=5)
        expected = run_onnx(tmp_path / "model.onnx", {"x": x})["y"]
        np.testing.assert_allclose(run_tflite(res.path, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_batch_arithmetic_fixes_the_batch_to_one(tmp_path: Path) -> None:
    """Reshape to [2*N, 12] computes with the batch size: kept static at 1, and said so."""
    nodes = [N("Shape", ["x"], ["s"]), N("Gather", ["s", "i0"], ["n"], axis=0), N("Mul", ["n", "two"], ["n2"]),
             N("Unsqueeze", ["n2", "axes0"], ["n2v"]), N("Concat", ["n2v", "twelve"], ["t"], axis=0),
             N("Reshape", ["x", "t"], ["r"]), N("Relu", ["r"], ["y"])]
    init = {"i0": np.array(0, INT64), "two": np.array(2, INT64), "axes0": np.array([0], INT64),
            "twelve": np.array([12], INT64)}
    model = onnx_model(nodes, {"x": ("N", 4, 6)}, ["y"], initializers=init)
    res = convert_and_compare(tmp_path, model, {"x": rand(1, 4, 6, seed=1)})
    assert any(n.startswith("batch fixed to 1") for n in res.notes)
    inputs, _ = _tflite_io(res.path)
    assert list(inputs["x"]["shape_signature"]) == [1, 4, 6]


# --- errors ------------------------------------------------------------------


def test_unsupported_operators_listed_and_nothing_written(tmp_path: Path) -> None:
    nodes = [N("Erf", ["x"], ["a"]), N("Erf", ["a"], ["b"]), N("Cos", ["b"], ["y"])]
    src = tmp_path / "odd.onnx"
    onnx.save_model(onnx_model(nodes, {"x": (1, 4)}, ["y"]), str(src))
    dst = tmp_path / "odd.tflite"
    with pytest.raises(UnsupportedOperators) as exc:
        convert_onnx_to_tflite(src, dst)
    assert str(exc.value) == ("cannot convert to TFLite: unsupported ONNX operator(s) Erf (2), Cos (1); "
                              "use --target onnx to ship this model to the ONNX runtime")
    assert isinstance(exc.value, UsageError) and dict(exc.value.problems) == {"Erf": 2, "Cos": 1}
    assert list(tmp_path.iterdir()) == [src]


def test_unsupported_attribute_combinations(tmp_path: Path) -> None:
    nodes = [N("AveragePool", ["x"], ["a"], kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
             N("MaxPool", ["a"], ["m"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
             N("Conv", ["m", "w"], ["y"], group=1)]
    src = tmp_path / "attrs.onnx"
    onnx.save_model(onnx_model(nodes, {"x": (1, 3, 8, 8)}, ["y"], initializers={"w": W(2, 3, 1, 1)}), str(src))
    with pytest.raises(UnsupportedOperators, match=r"unsupported ONNX operator\(s\) "
                       r"AveragePool\(pads=\[1,1,1,1\], count_include_pad=0\) \(1\); use --target onnx"):
        convert_onnx_to_tflite(src, tmp_path / "attrs.tflite")
    assert not (tmp_path / "attrs.tflite").exists()


def test_conv1d_and_ceil_mode_are_reported(tmp_path: Path) -> None:
    nodes = [N("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
             N("Conv", ["z", "w1"], ["y2"])]
    model = onnx_model(nodes, {"x": (1, 3, 8, 8), "z": (1, 3, 10)}, ["m", "y2"], initializers={"w1": rand(2, 3, 3)})
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedOperators) as exc:
        convert_onnx_to_tflite(tmp_path / "m.onnx", tmp_path / "m.tflite")
    assert dict(exc.value.problems) == {"MaxPool(ceil_mode=1)": 1, "Conv(1-D)": 1}


@pytest.mark.parametrize("content", [b"not a model at all\n", b"", b"\x08\x07" * 100])
def test_not_an_onnx_file(tmp_path: Path, content: bytes) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(content)
    with pytest.raises(UsageError):
        convert_onnx_to_tflite(src, tmp_path / "out.tflite")
    assert not (tmp_path / "out.tflite").exists()


def test_missing_source_tflite_source_and_missing_directory(tmp_path: Path, digits_tflite: ConversionResult) -> None:
    with pytest.raises(UsageError):
        convert_onnx_to_tflite(tmp_path / "absent.onnx", tmp_path / "out.tflite")
    with pytest.raises(UsageError, match="not ONNX"):
        convert_onnx_to_tflite(digits_tflite.path, tmp_path / "out.tflite")
    with pytest.raises(UsageError, match="does not exist"):
        convert_onnx_to_tflite(DIGITS, tmp_path / "no" / "out.tflite")


def test_dynamic_non_batch_dimension_is_a_usage_error(tmp_path: Path) -> None:
    onnx.save_model(onnx_model([N("Relu", ["x"], ["y"])], {"x": (1, "L")}, ["y"]), str(tmp_path / "m.onnx"))
    with pytest.raises(UsageError, match="dynamic dimension"):
        convert_onnx_to_tflite(tmp_path / "m.onnx", tmp_path / "m.tflite")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from packager.convert import onnx2tflite

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(onnx2tflite.os, "replace", fail)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OSError, match="disk full"):
        convert_onnx_to_tflite(DIGITS, out_dir / "digits.tflite")
    assert list(out_dir.iterdir()) == []


def test_output_replaced_atomically_and_readable(tmp_path: Path) -> None:
    dst = tmp_path / "digits.tflite"
    dst.write_bytes(b"old")
    res = convert_onnx_to_tflite(DIGITS, dst)
    assert res.path == dst and dst.read_bytes()[4:8] == b"TFL3"
    assert oct(dst.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in tmp_path.iterdir()] == ["digits.tflite"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_model_litert_cannot_load_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from packager.convert import onnx2tflite

    monkeypatch.setattr(onnx2tflite.Emitter, "finish", lambda self: b"\x1c\x00\x00\x00TFL3garbage")
    with pytest.raises(ModelError, match="does not load in LiteRT"):
        convert_onnx_to_tflite(DIGITS, tmp_path / "bad.tflite")
    assert list(tmp_path.iterdir()) == []


def test_result_is_frozen(digits_tflite: ConversionResult) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits_tflite.path = Path("elsewhere")  # type: ignore[misc]
    with pytest.raises(TypeError):
        digits_tflite.op_counts["CONV_2D"] = 0  # type: ignore[index]
    with pytest.raises(ValueError):
        ConversionResult(path=Path("x"), op_counts={"ADD": -1})


def test_output_is_deterministic(tmp_path: Path) -> None:
    """Same model in, same bytes out (nodes without names included): bundles can be rebuilt bit for bit."""
    model = onnx_model([N("Conv", ["x", "w"], ["c"]), N("Relu", ["c"], ["y"])], {"x": ("N", 3, 8, 8)}, ["y"],
                       initializers={"w": W(4, 3)})
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    a = convert_onnx_to_tflite(tmp_path / "m.onnx", tmp_path / "a.tflite").path.read_bytes()
    b = convert_onnx_to_tflite(tmp_path / "m.onnx", tmp_path / "b.tflite").path.read_bytes()
    assert a == b


def test_unsupported_node_no_output_needs_is_dropped(tmp_path: Path) -> None:
    model = onnx_model([N("Relu", ["x"], ["y"]), N("Erf", ["x"], ["unused"])], {"x": (2, 3)}, ["y"])
    res = convert_and_compare(tmp_path, model, {"x": rand(2, 3)})
    assert dict(res.op_counts) == {"RELU": 1}


def test_model_local_functions_are_inlined(tmp_path: Path) -> None:
    """Newer exporters wrap subgraphs in model-local functions; they convert like plain nodes."""
    two = onnx.numpy_helper.from_array(np.array(2, np.float32))
    body = [N("Relu", ["a"], ["r"]), N("Constant", [], ["two"], value=two), N("Mul", ["r", "two"], ["b"])]
    fn = helper.make_function("custom", "DoubleRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([N("DoubleRelu", ["x"], ["y"], domain="custom")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[fn])
    model.ir_version = 8
    res = convert_and_compare(tmp_path, model, {"x": rand(2, 3)})
    assert dict(res.op_counts) == {"RELU": 1, "MUL": 1}
