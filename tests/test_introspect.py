"""packager.introspect (model kind, signature, external data, versions) and packager.tflite.writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import UsageError
from agent.manifest import QuantParams, TensorSpec
from agent.runtime import open_session
from packager import introspect
from packager.introspect import ModelInfo, model_runtime, onnx_min_runtime_version, read_signature
from packager.tflite import TFLiteBuilder
from tests import modelfactory as mf

X = TensorSpec(name="x", dtype="float32", shape=(-1, 8))
PROBS = TensorSpec(name="probs", dtype="float32", shape=(-1, 4))


# --- which runtime ------------------------------------------------------------------


def test_model_runtime_by_content(tmp_path: Path) -> None:
    onnx_file = mf.onnx_mlp(tmp_path / "a.onnx")
    tfl_file = mf.tflite_mlp(tmp_path / "b.tflite")
    assert model_runtime(onnx_file) == "onnx"
    assert model_runtime(tfl_file) == "tflite"
    # the file name does not matter
    (tmp_path / "model.bin").write_bytes(tfl_file.read_bytes())
    (tmp_path / "model.tflite").write_bytes(onnx_file.read_bytes())
    assert model_runtime(tmp_path / "model.bin") == "tflite"
    assert model_runtime(tmp_path / "model.tflite") == "onnx"


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n", b"\x08", b"\x08\x07", b"\x08\x07:\x05abc", np.random.default_rng(1).bytes(4096),
     b"PK\x03\x04" + bytes(100), b"\x00\x00\x00\x00TFL"],
    ids=["empty", "text", "tag-only", "no-graph", "graph-overruns", "random", "zip", "short-tflite"],
)
def test_not_a_model(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=r"^model.bin is not an ONNX or TFLite model$"):
        model_runtime(path)
    with pytest.raises(UsageError, match="is not an ONNX or TFLite model"):
        read_signature(path)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        model_runtime(tmp_path / "nope.onnx")
    with pytest.raises(UsageError, match="does not exist"):
        read_signature(tmp_path)  # a directory is not a model file either


def test_truncated_onnx(tmp_path: Path) -> None:
    data = mf.onnx_mlp(tmp_path / "m.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError):
        read_signature(path)


# --- signatures ------------------------------------------------------------------------


def test_onnx_signature(tmp_path: Path) -> None:
    info = read_signature(mf.onnx_mlp(tmp_path / "mlp.onnx"))
    assert info == ModelInfo(runtime="onnx", inputs=(X,), outputs=(PROBS,), external_data_files=(), opset=17,
                             min_runtime_version="1.14")


def test_onnx_two_io_signature(tmp_path: Path) -> None:
    info = read_signature(mf.onnx_two_io(tmp_path / "two.onnx"))
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("a", "float32", (-1, 3)), ("b", "int64", (3,))]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [("sum", "float32", (-1, 3)),
                                                                  ("argmax", "int64", (-1,))]


def test_tflite_signature(tmp_path: Path) -> None:
    info = read_signature(mf.tflite_mlp(tmp_path / "mlp.tflite"))
    assert info == ModelInfo(runtime="tflite", inputs=(X,), outputs=(PROBS,), external_data_files=(), opset=None,
                             min_runtime_version="2.14.0")
    q = read_signature(mf.tflite_dequantize(tmp_path / "dq.tflite", scale=0.25, zero_point=5)).inputs[0]
    assert q.dtype == "int8" and q.quantization == QuantParams(scale=(0.25,), zero_point=(5,))


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_signature_agrees_with_the_agent_session(tmp_path: Path, kind: str) -> None:
    path = mf.onnx_mlp(tmp_path / "m.onnx") if kind == "onnx" else mf.tflite_mlp(tmp_path / "m.tflite")
    info = read_signature(path)
    with open_session(info.runtime, path) as s:
        assert (s.inputs, s.outputs) == (info.inputs, info.outputs)


def test_initializers_listed_as_inputs_are_not_inputs(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    path = mf.onnx_mlp(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for init in model.graph.initializer:  # the IR < 4 convention: weights are graph inputs too
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.save_model(model, str(path))
    assert read_signature(path).inputs == (X,)


def test_output_shapes_are_inferred_when_missing(tmp_path: Path) -> None:
    import onnx

    path = mf.onnx_mlp(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    onnx.save_model(model, str(path))
    (out,) = read_signature(path).outputs
    assert out.name == "probs" and out.dtype == "float32" and len(out.shape) == 2 and out.shape[1] == 4


def test_unsupported_onnx_types(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    path = tmp_path / "s.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(UsageError, match="input 's' has an unsupported type"):
        read_signature(path)


# --- external data ---------------------------------------------------------------------


def test_external_data_detected(tmp_path: Path) -> None:
    path = mf.onnx_mlp(tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    info = read_signature(path)
    assert info.external_data_files == ("ext.onnx.data",)
    assert info.inputs == (X,) and info.outputs == (PROBS,)
    with open_session("onnx", path) as s:  # the runtime finds the weights next to the model
        x = np.ones((2, 8), np.float32)
        np.testing.assert_allclose(s.run({"x": x})["probs"], mf.mlp_reference(x, mf.mlp_weights()), rtol=1e-5)


def test_external_data_file_missing(tmp_path: Path) -> None:
    path = mf.onnx_mlp(tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(UsageError, match="external data file 'ext.onnx.data' .* is missing"):
        read_signature(path)


def _set_location(path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    "location",
    ["../ext.onnx.data", "/etc/passwd", "sub/ext.onnx.data", "..", ".", "", "C:\\w.data", "C:w.data",
     "..\\w.data", "./ext.onnx.data", "a\x00b"],
)
def test_escaping_external_data_location_rejected(tmp_path: Path, location: str) -> None:
    d = tmp_path / "models"
    path = mf.onnx_mlp(d / "ext.onnx", external_data=True)
    (d / "sub").mkdir()
    (d / "sub" / "ext.onnx.data").write_bytes((d / "ext.onnx.data").read_bytes())
    _set_location(path, location)
    with pytest.raises(UsageError, match="only a plain file name next to the model is accepted"):
        read_signature(path)


# --- opset and minimum runtime version ----------------------------------------------------------


@pytest.mark.parametrize(
    ("opset", "expected"),
    [(13, "1.14"), (17, "1.14"), (18, "1.16"), (19, "1.17"), (20, "1.18"), (21, "1.20"), (22, "1.21")],
)
def test_opset_and_min_version(tmp_path: Path, opset: int, expected: str) -> None:
    info = read_signature(mf.onnx_mlp(tmp_path / "m.onnx", opset=opset))
    assert info.opset == opset
    assert info.min_runtime_version == expected


def test_min_version_table() -> None:
    assert onnx_min_runtime_version(17, 8) == "1.14"
    assert onnx_min_runtime_version(17, 9) == "1.17"  # the IR version can require more than the opset
    assert onnx_min_runtime_version(21, 9) == "1.20"
    assert onnx_min_runtime_version(None, 7) == "1.14"


def test_min_version_beyond_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(introspect, "runtime_version", lambda name: "1.32.0")
    assert onnx_min_runtime_version(23, 11) == "1.32"
    assert onnx_min_runtime_version(17, 12) == "1.32"
    monkeypatch.setattr(introspect, "runtime_version", lambda name: None)
    with pytest.raises(UsageError, match="newer than"):
        onnx_min_runtime_version(30, 8)


def test_newest_ir_stamp_raises_min_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx.helper stamps its newest IR version; old runtimes refuse it whatever the opset."""
    import onnx

    monkeypatch.setattr(introspect, "runtime_version", lambda name: "1.32.0")
    path = mf.onnx_mlp(tmp_path / "m.onnx", opset=17)
    model = onnx.load(str(path))
    model.ir_version = onnx.IR_VERSION
    onnx.save_model(model, str(path))
    info = read_signature(path)
    assert info.opset == 17 and info.min_runtime_version == "1.32"


# --- the TFLite writer ---------------------------------------------------------------------


def _run(data: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=data).get_signature_runner("serving_default")
    return dict(runner(**feeds))


def test_writer_add_relu_reshape_and_fc_without_bias() -> None:
    from ai_edge_litert import schema_py_generated as schema

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    c = rng.standard_normal((2, 3)).astype(np.float32)
    b = TFLiteBuilder()
    b.add_input("in:0", (2, 4), "float32")
    b.add_constant("w", w)
    b.add_constant("c", c)
    b.add_constant("shape", np.array([-1], np.int32))
    for name, shape in (("fc", (2, 3)), ("sum", (2, 3)), ("act", (2, 3)), ("flat", (6,))):
        b.add_tensor(name, shape, np.float32)
    b.add_op("FULLY_CONNECTED", ["in:0", "w", None], ["fc"], schema.FullyConnectedOptionsT())
    b.add_op("ADD", ["fc", "c"], ["sum"], schema.AddOptionsT())
    b.add_op("RELU", ["sum"], ["act"])
    b.add_op(schema.BuiltinOperator.RESHAPE, ["act", "shape"], ["flat"])
    b.mark_output("flat")
    b.mark_output("sum")
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out = _run(b.to_bytes(), {"in:0": x})
    np.testing.assert_allclose(out["sum"], x @ w.T + c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["flat"], np.maximum(x @ w.T + c, 0).ravel(), rtol=1e-5, atol=1e-6)


def test_writer_structure_and_alignment() -> None:
    from ai_edge_litert import schema_py_generated as schema

    b = TFLiteBuilder(description="unit")
    b.add_input("x", (-1, 3), "float32")
    b.add_constant("odd", np.arange(3, dtype=np.int8))  # 3 bytes: the next buffer must realign
    b.add_constant("w", np.ones((2, 3), np.float32))
    b.add_tensor("y", (-1, 2), "float32")
    b.add_op("FULLY_CONNECTED", ["x", "w", None], ["y"], schema.FullyConnectedOptionsT())
    b.mark_output("y")
    raw = b.to_bytes(signature_key="infer")
    assert raw[4:8] == b"TFL3"
    model = schema.ModelT.InitFromPackedBuf(bytearray(raw), 0)
    assert model.version == 3 and model.description == b"unit"
    assert len(model.buffers) == 3 and model.buffers[0].data is None  # buffer 0: the empty sentinel
    assert [oc.builtinCode for oc in model.operatorCodes] == [schema.BuiltinOperator.FULLY_CONNECTED]
    (sig,) = model.signatureDefs
    assert sig.signatureKey == b"infer" and [m.name for m in sig.inputs] == [b"x"]
    x_tensor = model.subgraphs[0].tensors[0]
    assert list(x_tensor.shape) == [1, 3] and list(x_tensor.shapeSignature) == [-1, 3]
    packed = schema.Model.GetRootAs(raw, 0)
    for i in (1, 2):
        buf = packed.Buffers(i)
        start = buf._tab.Vector(buf._tab.Offset(4))
        assert start % 16 == 0, f"buffer {i} data starts at {start}"
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32, 6, packed.Buffers(2)._tab.Vector(
        packed.Buffers(2)._tab.Offset(4))), np.ones(6, np.float32))


def test_writer_softmax_defaults_to_beta_one() -> None:
    b = TFLiteBuilder()
    b.add_input("x", (1, 3), "float32")
    b.add_tensor("p", (1, 3), "float32")
    b.add_op("SOFTMAX", ["x"], ["p"])
    b.mark_output("p")
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(_run(b.to_bytes(), {"x": x})["p"], mf.softmax(x), rtol=1e-5)


def test_writer_misuse_is_a_value_error() -> None:
    from ai_edge_litert import schema_py_generated as schema

    b = TFLiteBuilder()
    b.add_input("x", (1, 3), "float32")
    with pytest.raises(ValueError, match="already used"):
        b.add_tensor("x", (1, 3), "float32")
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        b.add_op("RELU", ["nope"], ["x"])
    with pytest.raises(ValueError, match="unknown TFLite builtin operator"):
        b.add_op("NOT_AN_OP", ["x"], ["x"])
    with pytest.raises(ValueError, match="not a TFLite builtin options type"):
        b.add_op("RELU", ["x"], ["x"], schema.TensorT())
    with pytest.raises(ValueError, match="cannot be written"):
        b.add_constant("s", np.array([1 + 2j]))
    with pytest.raises(ValueError, match="at least one input and one output"):
        b.to_bytes()
