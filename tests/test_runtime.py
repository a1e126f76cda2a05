"""agent.runtime and agent.selftest against the real runtimes (onnxruntime, LiteRT) and real small models."""

from __future__ import annotations

import importlib.metadata
import io
import json
import sys
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelError, SelfTestFailed, UsageError
from agent.manifest import QuantParams, TensorSpec
from agent.runtime import litert_as_tflite, Session, open_session, runtime_version
from agent.selftest import (
    SelfTestResult,
    default_tolerance,
    generate_inputs,
    load_cases,
    run_selftest,
    save_cases,
)
from tests import modelfactory as mf

MB = 1 << 20


@dataclass(frozen=True)
class Models:
    onnx: Path
    tflite: Path
    nan: Path
    two_io: Path
    dequant: Path
    tflite_nosig: Path
    dir: Path


def _strip_signatures(src: Path, dst: Path) -> Path:
    """The same TFLite model without its SignatureDef (LiteRT then names tensors by the subgraph)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(src.read_bytes()), 0)
    model.signatureDefs = []
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    dst.write_bytes(bytes(builder.Output()))
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = tmp_path_factory.mktemp("runtime-models")
    tfl = mf.tflite_mlp(d / "mlp.tflite")
    return Models(
        onnx=mf.onnx_mlp(d / "mlp.onnx"), tflite=tfl, nan=mf.onnx_nan_model(d / "nan.onnx"),
        two_io=mf.onnx_two_io(d / "two.onnx"), dequant=mf.tflite_dequantize(d / "dq.tflite"),
        tflite_nosig=_strip_signatures(tfl, d / "nosig.tflite"), dir=d,
    )


def _mlp_path(models: Models, runtime: str) -> Path:
    return {"onnx": models.onnx, "tflite": models.tflite, "tflite-nosig": models.tflite_nosig}[runtime]


RUNTIMES = ["onnx", "tflite", "tflite-nosig"]
X_SPEC = TensorSpec(name="x", dtype="float32", shape=(-1, 8))


def _x(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 8)).astype(np.float32)


# --- sessions: results and specs ----------------------------------------------


@pytest.mark.parametrize("kind", RUNTIMES)
def test_mlp_matches_numpy_reference(models: Models, kind: str) -> None:
    weights = mf.mlp_weights()
    with open_session(kind.split("-")[0], _mlp_path(models, kind)) as s:  # type: ignore[arg-type]
        for batch in (1, 5, 2, 5):  # dynamic batch: resizes back and forth
            x = _x(batch, batch)
            out = s.run({"x": x})
            assert list(out) == ["probs"]
            assert out["probs"].dtype == np.float32 and out["probs"].shape == (batch, 4)
            np.testing.assert_allclose(out["probs"], mf.mlp_reference(x, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", RUNTIMES)
def test_mlp_specs(models: Models, kind: str) -> None:
    with open_session(kind.split("-")[0], _mlp_path(models, kind)) as s:  # type: ignore[arg-type]
        assert s.inputs == (X_SPEC,)
        assert s.outputs == (TensorSpec(name="probs", dtype="float32", shape=(-1, 4)),)
        assert s.runtime == kind.split("-")[0]
        expected_backend = "onnxruntime " if kind == "onnx" else "ai-edge-litert "
        assert s.backend.startswith(expected_backend) and s.backend.split()[1][0].isdigit()


def test_two_inputs_two_outputs_specs_and_run(models: Models) -> None:
    with open_session("onnx", models.two_io) as s:
        assert s.inputs == (TensorSpec(name="a", dtype="float32", shape=(-1, 3)),
                            TensorSpec(name="b", dtype="int64", shape=(3,)))
        assert s.outputs == (TensorSpec(name="sum", dtype="float32", shape=(-1, 3)),
                             TensorSpec(name="argmax", dtype="int64", shape=(-1,)))
        a = np.array([[0, 1, 3], [5, 0, 0]], dtype=np.float32)
        b = np.array([1, 0, -1], dtype=np.int64)
        out = s.run({"b": b, "a": a})
        assert list(out) == ["sum", "argmax"]
        np.testing.assert_array_equal(out["sum"], a + b)
        np.testing.assert_array_equal(out["argmax"], [2, 0])


def test_tflite_quantized_input_spec(models: Models) -> None:
    with open_session("tflite", models.dequant) as s:
        (q,) = s.inputs
        assert q.name == "q" and q.dtype == "int8" and q.shape == (1, 4)
        assert q.quantization is not None and q.quantization.axis is None
        assert q.quantization.zero_point == (-3,)
        assert q.quantization.scale[0] == pytest.approx(0.05, rel=1e-6)
        assert s.outputs[0].quantization is None
        out = s.run({"q": np.array([[-3, 0, 17, 127]], dtype=np.int8)})["y"]
        np.testing.assert_allclose(out, 0.05 * (np.array([[-3, 0, 17, 127]]) + 3), rtol=1e-6)


def test_threads_option(models: Models) -> None:
    for runtime, path in (("onnx", models.onnx), ("tflite", models.tflite)):
        with open_session(runtime, path, threads=2) as s:  # type: ignore[arg-type]
            assert s.run({"x": _x(3, 0)})["probs"].shape == (3, 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="threads"):
            open_session("onnx", models.onnx, threads=bad)  # type: ignore[arg-type]


# --- feed validation ------------------------------------------------------------


@pytest.mark.parametrize("kind", RUNTIMES)
@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({}, "missing input 'x'"),
        ({"x": np.zeros((1, 8), np.float32), "y": np.zeros(1)}, r"unknown input\(s\) \['y'\]"),
        ({"x": np.zeros((1, 8), np.float64)}, "input 'x': dtype float64 does not match the model's float32"),
        ({"x": np.zeros((1, 7), np.float32)}, r"input 'x': shape \(1, 7\) does not match"),
        ({"x": np.zeros((8,), np.float32)}, r"input 'x': shape \(8,\) does not match"),
        ({"x": [[0.0] * 8]}, "input 'x': expected a numpy array, got list"),
    ],
)
def test_feed_validation(models: Models, kind: str, feeds: dict, message: str) -> None:  # type: ignore[type-arg]
    with open_session(kind.split("-")[0], _mlp_path(models, kind)) as s:  # type: ignore[arg-type]
        with pytest.raises(ModelError, match=message):
            s.run(feeds)
        # the session still works after a rejected feed
        assert s.run({"x": _x(2, 0)})["probs"].shape == (2, 4)


def test_non_contiguous_feed_is_accepted(models: Models) -> None:
    x = _x(4, 3)
    strided = np.asfortranarray(x)
    for runtime, path in (("onnx", models.onnx), ("tflite", models.tflite)):
        with open_session(runtime, path) as s:  # type: ignore[arg-type]
            np.testing.assert_allclose(s.run({"x": strided})["probs"], s.run({"x": x})["probs"], rtol=1e-6)


def test_scalar_input(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    path = tmp_path / "scale.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                     .SerializeToString())
    with open_session("onnx", path) as s:
        assert s.inputs[1] == TensorSpec(name="s", dtype="float32", shape=())
        out = s.run({"x": np.ones((2, 3), np.float32), "s": np.array(2.5, np.float32)})
        np.testing.assert_array_equal(out["y"], np.full((2, 3), 2.5, np.float32))
        with pytest.raises(ModelError, match="input 's': shape"):
            s.run({"x": np.ones((2, 3), np.float32), "s": np.array([2.5], np.float32)})


def test_runtime_failure_is_a_model_error(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    # Reshape to a shape the data does not fit: only fails when run.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "reshape.onnx"
    path.write_bytes(model.SerializeToString())
    with open_session("onnx", path) as s:
        with pytest.raises(ModelError, match=r"onnxruntime \S+ failed to run the model: ") as err:
            s.run({"x": np.zeros(5, np.float32), "shape": np.array([2, 2], np.int64)})
        assert "\n" not in str(err.value) and "[ONNXRuntimeError]" not in str(err.value)


# --- loading errors ---------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_missing_file(tmp_path: Path, runtime: str) -> None:
    path = tmp_path / "nope.model"
    with pytest.raises(ModelError, match=f"model file {path} does not exist"):
        open_session(runtime, path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("runtime", "reason"),
    [("onnx", "Protobuf parsing failed"), ("tflite", "not a valid Flatbuffer")],
)
def test_garbage_file(tmp_path: Path, runtime: str, reason: str) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelError, match=f"cannot load {path} with .*: .*{reason}") as err:
        open_session(runtime, path)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_wrong_runtime_for_file(models: Models) -> None:
    with pytest.raises(ModelError, match=f"cannot load {models.tflite} with onnxruntime"):
        open_session("onnx", models.tflite)
    with pytest.raises(ModelError, match=f"cannot load {models.onnx} with ai-edge-litert"):
        open_session("tflite", models.onnx)


def test_unknown_runtime(models: Models) -> None:
    with pytest.raises(ModelError, match="unknown runtime 'tensorrt'"):
        open_session("tensorrt", models.onnx)  # type: ignore[arg-type]


def test_missing_onnxruntime(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelError, match=r"^runtime 'onnx' is not installed: pip install onnxruntime$"):
        open_session("onnx", models.onnx)


def test_missing_tflite_runtimes(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(ModelError, match=r"^runtime 'tflite' is not installed: pip install ai-edge-litert$"):
        open_session("tflite", models.tflite)


def test_falls_back_to_tflite_runtime(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_edge_litert.interpreter import Interpreter

    package = types.ModuleType("tflite_runtime")
    module = types.ModuleType("tflite_runtime.interpreter")
    module.Interpreter = Interpreter  # type: ignore[attr-defined]
    package.interpreter = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", module)
    with open_session("tflite", models.tflite) as s:
        assert s.backend.startswith("tflite-runtime ")
        x = _x(3, 1)
        np.testing.assert_allclose(s.run({"x": x})["probs"], mf.mlp_reference(x, mf.mlp_weights()), rtol=1e-5)


def test_runtime_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    assert runtime_version("onnx") == onnxruntime.__version__
    # ai-edge-litert is reported in TensorFlow Lite numbering, which bundles record
    litert = importlib.metadata.version("ai-edge-litert")
    assert runtime_version("tflite") == litert_as_tflite(litert)
    assert litert_as_tflite("2.3.0") == "2.20.0" and litert_as_tflite("1.0.1") == "2.18.0"

    real = importlib.metadata.version

    def only_tflite_runtime(dist: str) -> str:
        if dist == "tflite-runtime":
            return "2.14.0"
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", only_tflite_runtime)
    assert runtime_version("tflite") == "2.14.0"
    assert runtime_version("onnx") is None
    monkeypatch.setattr(importlib.metadata, "version", real)


def test_closed_session(models: Models) -> None:
    s = open_session("tflite", models.tflite)
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.run({"x": _x(1, 0)})
    assert isinstance(s, Session)


# --- concurrency ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", RUNTIMES)
def test_concurrent_runs(models: Models, kind: str) -> None:
    weights = mf.mlp_weights()
    jobs = [_x(1 + i % 4, i) for i in range(8 * 25)]  # varying batch sizes force resizes in between

    with open_session(kind.split("-")[0], _mlp_path(models, kind), threads=1) as s:  # type: ignore[arg-type]
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda x: s.run({"x": x})["probs"], jobs))
    for x, y in zip(jobs, results):
        np.testing.assert_allclose(y, mf.mlp_reference(x, weights), rtol=1e-5, atol=1e-6)


# --- self-test: inputs and tolerances ------------------------------------------------------


def test_generate_inputs_is_deterministic_and_typed() -> None:
    specs = [
        TensorSpec(name="f", dtype="float32", shape=(-1, 3)),
        TensorSpec(name="h", dtype="float16", shape=(2,)),
        TensorSpec(name="i8", dtype="int8", shape=(1000,)),
        TensorSpec(name="u16", dtype="uint16", shape=(-1, -1)),
        TensorSpec(name="q", dtype="uint8", shape=(1000,),
                   quantization=QuantParams(scale=(0.02,), zero_point=(128,))),
        TensorSpec(name="m", dtype="bool", shape=(4, 4)),
        TensorSpec(name="s", dtype="int64", shape=()),
    ]
    a = generate_inputs(specs, cases=3, seed=7)
    b = generate_inputs(specs, cases=3, seed=7)
    c = generate_inputs(specs, cases=3, seed=8)
    assert len(a) == 3
    for case_a, case_b in zip(a, b):
        assert list(case_a) == [s.name for s in specs]
        for name in case_a:
            np.testing.assert_array_equal(case_a[name], case_b[name])
    assert not np.array_equal(a[0]["f"], c[0]["f"])
    assert not np.array_equal(a[0]["f"], a[1]["f"])  # cases differ
    case = a[0]
    assert {n: (v.dtype.name, v.shape) for n, v in case.items()} == {
        "f": ("float32", (1, 3)), "h": ("float16", (2,)), "i8": ("int8", (1000,)), "u16": ("uint16", (1, 1)),
        "q": ("uint8", (1000,)), "m": ("bool", (4, 4)), "s": ("int64", ()),
    }
    assert case["i8"].min() < -100 and case["i8"].max() > 100  # the whole int8 range
    dequant = 0.02 * (case["q"].astype(np.float64) - 128)  # a standard normal seen through the quantization
    assert abs(dequant.mean()) < 0.15 and 0.8 < dequant.std() < 1.2
    with pytest.raises(UsageError):
        generate_inputs(specs, cases=0)


def test_default_tolerance() -> None:
    assert default_tolerance("float32", False) == (1e-4, 1e-5)
    assert default_tolerance("float16", False) == (1e-2, 1e-3)
    assert default_tolerance("float64", False) == (1e-7, 1e-9)
    assert default_tolerance("float32", True) == (2e-2, 2e-2)
    assert default_tolerance("int8", True) == (0.0, 1.0)
    assert default_tolerance("uint8", True) == (0.0, 1.0)
    assert default_tolerance("int64", False) == (0.0, 0.0)
    assert default_tolerance("bool", False) == (0.0, 0.0)


# --- self-test: the check ----------------------------------------------------------


def _golden(session: Session, cases: int = 4) -> tuple[list, list]:  # type: ignore[type-arg]
    inputs = generate_inputs(session.inputs, cases=cases, seed=0)
    return inputs, [session.run(f) for f in inputs]


def test_selftest_passes(models: Models) -> None:
    with open_session("onnx", models.onnx) as s:
        inputs, expected = _golden(s)
        result = run_selftest(s, inputs, expected, rtol=1e-4, atol=1e-5)
    assert result == SelfTestResult(cases=4, max_abs_error=0.0, max_rel_error=0.0, passed=True)


def test_selftest_golden_from_onnx_passes_on_tflite(models: Models) -> None:
    """The same MLP in both formats: float32 outputs agree within the default tolerance."""
    with open_session("onnx", models.onnx) as s:
        inputs, expected = _golden(s, 8)
    rtol, atol = default_tolerance("float32", False)
    with open_session("tflite", models.tflite) as t:
        result = run_selftest(t, inputs, expected, rtol=rtol, atol=atol)
    assert result.passed and result.cases == 8
    assert 0 < result.max_abs_error < 1e-6


def test_selftest_fails_on_perturbed_output(models: Models) -> None:
    with open_session("tflite", models.tflite) as s:
        inputs, expected = _golden(s, 3)
        expected[2] = {"probs": expected[2]["probs"].copy()}
        expected[2]["probs"][0, 1] += 1e-3
        with pytest.raises(SelfTestFailed, match=r"output 'probs' of case 2 differs .* at \(0, 1\)") as err:
            run_selftest(s, inputs, expected, rtol=1e-4, atol=1e-5)
        assert "atol 1e-05 + rtol 0.0001" in str(err.value)
        # within a looser tolerance it passes, and the error is reported
        result = run_selftest(s, inputs, expected, rtol=0.0, atol=2e-3)
        assert result.max_abs_error == pytest.approx(1e-3, rel=1e-3)


def test_selftest_fails_on_nan(models: Models) -> None:
    with open_session("onnx", models.nan) as s:
        inputs, expected = _golden(s, 1)
        expected_finite = [{"y": np.zeros_like(expected[0]["y"])}]
        with pytest.raises(SelfTestFailed, match=r"^output 'y' of case 0 contains NaN$"):
            run_selftest(s, inputs, expected_finite, rtol=1e-4, atol=1e-5)
        with pytest.raises(SelfTestFailed, match="contains NaN"):
            run_selftest(s, inputs, expected, rtol=1e-4, atol=1e-5)


def test_selftest_rejects_inputs_that_do_not_fit(models: Models) -> None:
    with open_session("onnx", models.onnx) as s:
        inputs, expected = _golden(s, 2)
        wrong_dtype = [inputs[0], {"x": inputs[1]["x"].astype(np.float64)}]
        with pytest.raises(SelfTestFailed, match=r"case 1: input 'x' is float64\[1, 8\], the model takes float32"):
            run_selftest(s, wrong_dtype, expected, rtol=1e-4, atol=1e-5)
        wrong_shape = [{"x": np.zeros((1, 9), np.float32)}, inputs[1]]
        with pytest.raises(SelfTestFailed, match=r"case 0: input 'x' is float32\[1, 9\]"):
            run_selftest(s, wrong_shape, expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(SelfTestFailed, match="case 0: inputs"):
            run_selftest(s, [{"z": inputs[0]["x"]}, inputs[1]], expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(SelfTestFailed, match="expected outputs"):
            run_selftest(s, inputs, [{"logits": expected[0]["probs"]}, expected[1]], rtol=1e-4, atol=1e-5)
        with pytest.raises(SelfTestFailed, match="2 input case"):
            run_selftest(s, inputs, expected[:1], rtol=1e-4, atol=1e-5)
        with pytest.raises(SelfTestFailed, match="shape"):
            run_selftest(s, inputs, [{"probs": expected[0]["probs"][:, :3]}, expected[1]], rtol=1e-4, atol=1e-5)


def test_selftest_integer_outputs_compare_exactly(models: Models) -> None:
    with open_session("onnx", models.two_io) as s:
        inputs: list[dict[str, np.ndarray]] = [{"a": np.array([[0, 1, 2]], np.float32),
                                                "b": np.array([0, 0, 0], np.int64)}]
        ok: list[dict[str, np.ndarray]] = [{"sum": np.array([[0, 1, 2]], np.float32), "argmax": np.array([2], np.int64)}]
        assert run_selftest(s, inputs, ok, rtol=0.0, atol=0.0).passed
        bad: list[dict[str, np.ndarray]] = [{"sum": ok[0]["sum"], "argmax": np.array([1], np.int64)}]
        with pytest.raises(SelfTestFailed, match="output 'argmax' of case 0"):
            run_selftest(s, inputs, bad, rtol=0.0, atol=0.0)


# --- self-test: the file --------------------------------------------------------------


ODD_NAMES = ["serving_default_x:0", "a/b/c", "in.0.1", "ü ñ", "meta"]


def _odd_cases() -> tuple[list, list]:  # type: ignore[type-arg]
    rng = np.random.default_rng(3)
    inputs, outputs = [], []
    for c in range(3):
        inputs.append({
            ODD_NAMES[0]: rng.standard_normal((2, 3)).astype(np.float32),
            ODD_NAMES[1]: rng.integers(-128, 127, (4,), dtype=np.int8),
            ODD_NAMES[2]: np.asfortranarray(rng.standard_normal((3, 2))).astype(np.float16),
            ODD_NAMES[3]: rng.random((2, 2)) < 0.5,
            ODD_NAMES[4]: np.array(c, dtype=np.int64),  # 0-d
        })
        outputs.append({"out/0:0": rng.standard_normal((1, 5)).astype(np.float64), "n": np.zeros((0, 3), np.uint8)})
    return inputs, outputs


def test_cases_round_trip_with_odd_names() -> None:
    inputs, outputs = _odd_cases()
    data = save_cases(inputs, outputs)
    assert save_cases(inputs, outputs) == data  # deterministic bytes
    got_in, got_out = load_cases(data, max_bytes=MB)
    assert len(got_in) == len(got_out) == 3
    for want, got in ((inputs, got_in), (outputs, got_out)):
        for w, g in zip(want, got):
            assert list(g) == list(w)
            for name in w:
                assert g[name].dtype == w[name].dtype and g[name].shape == w[name].shape
                np.testing.assert_array_equal(g[name], w[name])
    # a plain .npz: numpy reads it without pickles
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
        assert meta["inputs"] == ODD_NAMES and meta["format"] == 1 and meta["cases"] == 3
        np.testing.assert_array_equal(npz["in.1.0"], inputs[1][ODD_NAMES[0]])


def test_save_cases_rejects_inconsistent_cases() -> None:
    x = {"x": np.zeros(2, np.float32)}
    with pytest.raises(UsageError):
        save_cases([x, x], [x])
    with pytest.raises(UsageError, match="case 1"):
        save_cases([x, {"y": np.zeros(2, np.float32)}], [x, x])
    with pytest.raises(UsageError, match="numeric or bool"):
        save_cases([{"x": np.array(["a"])}], [x])
    with pytest.raises(UsageError):
        save_cases([], [])


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_load_rejects_pickles() -> None:
    x = {"x": np.zeros((1, 2), np.float32)}
    members = _members(save_cases([x], [x]))
    members["in.0.0.npy"] = _npy(np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelError, match="no pickles"):
        load_cases(_zip(members), max_bytes=MB)
    # an ordinary np.savez with an object array is refused too
    buf = io.BytesIO()
    np.savez(buf, meta=np.array([1, 2], dtype=object))
    with pytest.raises(ModelError):
        load_cases(buf.getvalue(), max_bytes=MB)


def test_load_rejects_malformed_files() -> None:
    x = {"x": np.zeros((1, 2), np.float32)}
    good = _members(save_cases([x, x], [x, x]))

    def variant(**changes: bytes | None) -> bytes:
        m = dict(good)
        for name, data in changes.items():
            name = name.replace("_", ".") + ".npy"
            if data is None:
                m.pop(name)
            else:
                m[name] = data
        return _zip(m)

    def meta(**fields: object) -> bytes:
        d = {"format": 1, "cases": 2, "inputs": ["x"], "outputs": ["x"], **fields}
        return _npy(np.frombuffer(json.dumps(d).encode(), dtype=np.uint8))

    lying_header = _npy(np.zeros((1, 2), np.float32)).replace(b"(1, 2)", b"(9, 9)")
    bad = {
        "not a zip": b"PK\x03\x04 nothing",
        "random": np.random.default_rng(0).bytes(300),
        "missing member": variant(out_1_0=None),
        "extra member": variant(in_2_0=_npy(np.zeros(2, np.float32))),
        "odd member name": _zip({**good, "../x.npy": b""}),
        "no meta": variant(meta=None),
        "meta not json": variant(meta=_npy(np.frombuffer(b"{nope", dtype=np.uint8))),
        "meta wrong dtype": variant(meta=_npy(np.zeros(3, np.float32))),
        "unknown format": variant(meta=meta(format=2)),
        "bad cases": variant(meta=meta(cases=0)),
        "duplicate names": variant(meta=meta(inputs=["x", "x"])),
        "lying header": variant(in_0_0=lying_header),
        "truncated npy": variant(in_0_0=_npy(np.zeros((1, 2), np.float32))[:-3]),
        "not npy": variant(in_0_0=b"hello world, not an array"),
        "string dtype": variant(in_0_0=_npy(np.array(["abc"]))),
    }
    encrypted = bytearray(variant())
    encrypted[6] |= 0x1  # the first local header's "encrypted" flag...
    cd = encrypted.find(b"PK\x01\x02")
    encrypted[cd + 8] |= 0x1  # ...and the central directory's
    bad["encrypted"] = bytes(encrypted)
    for what, data in bad.items():
        with pytest.raises(ModelError) as err:
            load_cases(data, max_bytes=MB)
        assert "self-test" in str(err.value), what
    # duplicate member names
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in good.items():
            zf.writestr(name, data)
        with pytest.warns(UserWarning):
            zf.writestr("in.0.0.npy", good["in.0.0.npy"])
    with pytest.raises(ModelError, match="duplicate"):
        load_cases(buf.getvalue(), max_bytes=MB)


def test_load_enforces_max_bytes() -> None:
    x = {"x": np.zeros((64, 64), np.float32)}
    data = save_cases([x], [x])
    load_cases(data, max_bytes=len(data))
    with pytest.raises(ModelError, match="over the limit"):
        load_cases(data, max_bytes=len(data) - 1)
    # a compressed member that unpacks past the limit
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, member in _members(data).items():
            zf.writestr(name, member)
    small = buf.getvalue()
    assert len(small) < 4096
    with pytest.raises(ModelError, match="unpacks to more than"):
        load_cases(small, max_bytes=4096)
