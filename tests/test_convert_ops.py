"""Each ONNX operator the TFLite converter supports, checked against onnxruntime.

Every case is a tiny graph built with ``onnx.helper``; it runs in onnxruntime
and, converted, in LiteRT's interpreter (through its ``serving_default``
signature, as devices run it), on seeded random inputs.

Tolerance: ``rtol=1e-5, atol=1e-5``. Both runtimes compute in float32 but
with different kernels (MLAS vs XNNPACK/ruy), different accumulation order and
FMA use, so sums of a few dozen products differ in the last bits (~1e-6
relative); folding BatchNormalization or Gemm's alpha into weights rounds once
more. 1e-5 is well above that noise and far below any real conversion error
(a wrong layout or padding gives differences of order 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

from packager.convert import ConversionResult, convert_onnx_to_tflite

RTOL = ATOL = 1e-5


# --- helpers shared with test_convert.py ----------------------------------


def onnx_model(nodes: list[Any], inputs: Mapping[str, tuple[Any, ...]], outputs: list[str], *,
               initializers: Mapping[str, np.ndarray] | None = None, opset: int = 17) -> Any:
    """A float32 model; input dims may be strings (dynamic); output shapes are left to the runtimes."""
    graph = helper.make_graph(
        nodes, "case",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeship-tests")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_tflite(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")
    return dict(runner(**feeds))


def convert_and_compare(tmp_path: Path, model: Any, feeds: dict[str, np.ndarray], *,
                        rtol: float = RTOL, atol: float = ATOL, **kw: Any) -> ConversionResult:
    src = tmp_path / "model.onnx"
    onnx.save_model(model, str(src))
    result = convert_onnx_to_tflite(src, tmp_path / "model.tflite", **kw)
    expected = run_onnx(src, feeds)
    got = run_tflite(result.path, feeds)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=rtol, atol=atol, err_msg=name)
    return result


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# --- the cases --------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    nodes: list[Any]
    inputs: Mapping[str, tuple[int, ...]]
    init: Mapping[str, np.ndarray] = field(default_factory=dict)
    outputs: tuple[str, ...] = ("y",)
    opset: int = 17
    ops: dict[str, int] = field(default_factory=dict)
    """TFLite op counts the conversion must produce (only the listed ones are checked)."""
    absent: tuple[str, ...] = ()
    """TFLite ops that must not appear."""
    batch_first: bool = True
    """Dimension 0 of the inputs is a batch (the case also runs with it dynamic)."""


N = helper.make_node
X4 = {"x": (1, 3, 8, 8)}


def conv(out: str = "y", *, inp: str = "x", w: str = "w", b: str | None = "b", **attrs: Any) -> Any:
    return N("Conv", [inp, w] + ([b] if b else []), [out], **attrs)


def W(o: int, i: int, kh: int = 3, kw: int = 3, seed: int = 1) -> np.ndarray:
    return rand(o, i, kh, kw, seed=seed, scale=0.3)


def B(n: int, seed: int = 2) -> np.ndarray:
    return rand(n, seed=seed, scale=0.1)


CASES = [
    # Conv
    Case("conv-same", [conv(pads=[1, 1, 1, 1])], X4, {"w": W(4, 3), "b": B(4)},
         ops={"CONV_2D": 1, "TRANSPOSE": 2}, absent=("PAD",)),
    Case("conv-stride2-pads", [conv(pads=[1, 1, 1, 1], strides=[2, 2])], X4, {"w": W(4, 3), "b": B(4)},
         ops={"CONV_2D": 1, "PAD": 1}),
    Case("conv-rect-no-bias", [conv(b=None, strides=[1, 2])], X4, {"w": W(5, 3, 2, 3)}, ops={"CONV_2D": 1}),
    Case("conv-asym-pads-same", [conv(pads=[0, 0, 1, 1], strides=[2, 2])], X4,
         {"w": W(4, 3), "b": B(4)}, absent=("PAD",)),
    Case("conv-unused-end-pad-valid", [conv(pads=[0, 0, 1, 1], strides=[2, 2], kernel_shape=[2, 2])], X4,
         {"w": W(4, 3, 2, 2), "b": B(4)}, absent=("PAD",)),
    Case("conv-auto-pad-same-lower", [conv(auto_pad="SAME_LOWER", strides=[2, 2])], {"x": (1, 3, 9, 9)},
         {"w": W(4, 3, 2, 2), "b": B(4)}),
    Case("conv-dilated", [conv(pads=[2, 2, 2, 2], dilations=[2, 2])], X4, {"w": W(4, 3), "b": B(4)},
         ops={"CONV_2D": 1}),
    Case("conv-depthwise", [conv(pads=[1, 1, 1, 1], group=3)], X4, {"w": W(3, 1), "b": B(3)},
         ops={"DEPTHWISE_CONV_2D": 1}),
    Case("conv-depthwise-multiplier-stride2", [conv(pads=[1, 1, 1, 1], group=3, strides=[2, 2])], X4,
         {"w": W(6, 1), "b": B(6)}, ops={"DEPTHWISE_CONV_2D": 1}),
    Case("conv-depthwise-dilated", [conv(pads=[2, 2, 2, 2], group=3, dilations=[2, 2])], X4,
         {"w": W(3, 1), "b": B(3)}, ops={"DEPTHWISE_CONV_2D": 1}),
    Case("conv-grouped", [conv(pads=[1, 1, 1, 1], group=2)], {"x": (1, 4, 6, 6)}, {"w": W(6, 2), "b": B(6)},
         ops={"SPLIT": 1, "CONV_2D": 2, "CONCATENATION": 1}),
    Case("conv-relu-maxpool-no-bounce", [conv("c", pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
                                         N("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
         X4, {"w": W(4, 3), "b": B(4)}, ops={"TRANSPOSE": 2, "CONV_2D": 1, "MAX_POOL_2D": 1}, absent=("RELU",)),
    # Gemm / MatMul
    Case("gemm-transB", [N("Gemm", ["x", "w", "b"], ["y"], transB=1)], {"x": (2, 6)},
         {"w": rand(4, 6, seed=1), "b": B(4)}, ops={"FULLY_CONNECTED": 1}),
    Case("gemm-alpha-beta", [N("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, beta=2.0)], {"x": (2, 6)},
         {"w": rand(6, 4, seed=1), "b": B(4).reshape(1, 4)}, ops={"FULLY_CONNECTED": 1}),
    Case("gemm-transA-no-C", [N("Gemm", ["x", "w"], ["y"], transA=1)], {"x": (6, 3)}, {"w": rand(6, 4, seed=1)},
         ops={"TRANSPOSE": 1, "FULLY_CONNECTED": 1}, batch_first=False),
    Case("gemm-C-activation", [N("Gemm", ["x", "w", "c"], ["y"], transB=1)], {"x": (2, 6), "c": (2, 4)},
         {"w": rand(4, 6, seed=1)}, ops={"FULLY_CONNECTED": 1, "ADD": 1}),
    Case("matmul-2d", [N("MatMul", ["x", "w"], ["y"])], {"x": (3, 6)}, {"w": rand(6, 5, seed=1)},
         ops={"FULLY_CONNECTED": 1}),
    Case("matmul-3d-keep-dims", [N("MatMul", ["x", "w"], ["y"])], {"x": (2, 3, 6)}, {"w": rand(6, 5, seed=1)},
         ops={"FULLY_CONNECTED": 1}),
    Case("matmul-activations", [N("MatMul", ["x", "z"], ["y"])], {"x": (2, 3, 6), "z": (2, 6, 4)},
         ops={"BATCH_MATMUL": 1}),
    # elementwise
    Case("add-channel-bias-after-conv", [conv("c"), N("Add", ["c", "k"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4), "k": rand(4, 1, 1, seed=3)}, ops={"ADD": 1, "TRANSPOSE": 2}),
    Case("mul-two-activations-nhwc", [conv("c"), conv("c2", w="w2"), N("Mul", ["c", "c2"], ["y"])], X4,
         {"w": W(4, 3), "w2": W(4, 3, seed=5), "b": B(4)}, ops={"MUL": 1}),
    Case("sub-broadcast-2d", [N("Sub", ["k", "x"], ["y"])], {"x": (3, 5)}, {"k": rand(5, seed=3)}, ops={"SUB": 1}),
    Case("div", [N("Div", ["x", "k"], ["y"])], {"x": (2, 3, 4)}, {"k": np.abs(rand(3, 1, seed=3)) + 0.5},
         ops={"DIV": 1}),
    Case("add-relu-fused", [N("Add", ["x", "z"], ["s"]), N("Relu", ["s"], ["y"])], {"x": (2, 5), "z": (2, 5)},
         ops={"ADD": 1}, absent=("RELU",)),
    # activations
    Case("relu", [N("Relu", ["x"], ["y"])], X4, ops={"RELU": 1}),
    Case("sigmoid", [N("Sigmoid", ["x"], ["y"])], X4, ops={"LOGISTIC": 1}),
    Case("tanh", [N("Tanh", ["x"], ["y"])], {"x": (2, 7)}, ops={"TANH": 1}),
    Case("leaky-relu", [N("LeakyRelu", ["x"], ["y"], alpha=0.2)], X4, ops={"LEAKY_RELU": 1}),
    Case("exp-log-sqrt-neg-abs", [N("Abs", ["x"], ["a"]), N("Sqrt", ["a"], ["s"]), N("Exp", ["s"], ["e"]),
                                  N("Log", ["e"], ["l"]), N("Neg", ["l"], ["y"])], {"x": (2, 7)},
         ops={"ABS": 1, "SQRT": 1, "EXP": 1, "LOG": 1, "NEG": 1}),
    Case("hard-swish", [N("HardSwish", ["x"], ["y"])], {"x": (2, 7)}, ops={"HARD_SWISH": 1}),
    Case("clip-relu6", [N("Clip", ["x", "lo", "hi"], ["y"])], X4,
         {"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}, ops={"RELU6": 1}),
    Case("clip-n1-to-1", [N("Clip", ["x", "lo", "hi"], ["y"])], X4,
         {"lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)}, ops={"RELU_N1_TO_1": 1}),
    Case("clip-general", [N("Clip", ["x", "lo", "hi"], ["y"])], X4,
         {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}, ops={"MAXIMUM": 1, "MINIMUM": 1}),
    Case("clip-max-only", [N("Clip", ["x", "", "hi"], ["y"])], X4, {"hi": np.array(0.3, np.float32)},
         ops={"MINIMUM": 1}, absent=("MAXIMUM",)),
    Case("clip-attrs-opset10", [N("Clip", ["x"], ["y"], min=0.0, max=6.0)], X4, opset=10, ops={"RELU6": 1}),
    Case("conv-clip6-fused", [conv("c"), N("Clip", ["c", "lo", "hi"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)},
         absent=("RELU6",)),
    # pools
    Case("maxpool-2x2", [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], X4,
         ops={"MAX_POOL_2D": 1}),
    Case("maxpool-pads", [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
         X4, ops={"PADV2": 1, "MAX_POOL_2D": 1}),
    Case("maxpool-same-upper", [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                  auto_pad="SAME_UPPER")], {"x": (1, 2, 7, 7)}, absent=("PADV2",)),
    Case("avgpool-valid", [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], X4,
         ops={"AVERAGE_POOL_2D": 1}),
    Case("avgpool-pads-include", [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                    count_include_pad=1)], X4, ops={"PAD": 1, "AVERAGE_POOL_2D": 1}),
    Case("avgpool-pads-exclude-same", [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
         X4, ops={"AVERAGE_POOL_2D": 1}, absent=("PAD",)),
    Case("global-avgpool", [N("GlobalAveragePool", ["x"], ["y"])], X4, ops={"MEAN": 1}),
    Case("global-maxpool", [N("GlobalMaxPool", ["x"], ["y"])], X4, ops={"REDUCE_MAX": 1}),
    Case("reduce-mean-hw-nhwc", [conv("c"), N("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=0)], X4,
         {"w": W(4, 3), "b": B(4)}, opset=13, ops={"MEAN": 1, "TRANSPOSE": 1}),
    Case("reduce-max-channels-keepdims", [conv("c"), N("ReduceMax", ["c", "ax"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4), "ax": np.array([1], np.int64)}, opset=18, ops={"REDUCE_MAX": 1}),
    Case("reduce-sum-not-in-order", [conv("c"), N("ReduceSum", ["c", "ax"], ["y"], keepdims=0)], X4,
         {"w": W(4, 3), "b": B(4), "ax": np.array([2], np.int64)}, ops={"SUM": 1}),
    Case("reduce-min-all", [N("ReduceMin", ["x"], ["y"], keepdims=0)], {"x": (2, 7)}, opset=13, batch_first=False),
    # shapes and layout
    Case("flatten-after-conv", [conv("c", pads=[1, 1, 1, 1]), N("Flatten", ["c"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4)}, ops={"RESHAPE": 1}),
    Case("reshape-after-conv", [conv("c"), N("Reshape", ["c", "s"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4), "s": np.array([1, 4, -1], np.int64)}),
    Case("gap-flatten-no-transpose", [conv("c"), N("GlobalAveragePool", ["c"], ["g"]), N("Flatten", ["g"], ["y"])],
         X4, {"w": W(4, 3), "b": B(4)}, ops={"TRANSPOSE": 1}),
    Case("unsqueeze-squeeze", [N("Unsqueeze", ["x", "a"], ["u"]), N("Squeeze", ["u", "a"], ["y"])], {"x": (2, 5)},
         {"a": np.array([1], np.int64)}),
    Case("transpose", [N("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {"x": (1, 2, 3, 4)}, ops={"TRANSPOSE": 1}),
    Case("transpose-default-perm", [N("Transpose", ["x"], ["y"])], {"x": (2, 3, 4)}),
    Case("nhwc-input-transpose-conv", [N("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), conv(inp="t"),
                                       ], {"x": (1, 8, 8, 3)}, {"w": W(4, 3), "b": B(4)},
         ops={"TRANSPOSE": 1}),  # only the output one: the input transpose cancels out
    Case("concat-channels", [conv("a"), conv("c", w="w2", b=None), N("Concat", ["a", "c"], ["y"], axis=1)], X4,
         {"w": W(4, 3), "w2": W(2, 3, seed=7), "b": B(4)}, ops={"CONCATENATION": 1}),
    Case("concat-with-constant", [N("Concat", ["x", "k"], ["y"], axis=-1)], {"x": (2, 3)}, {"k": rand(2, 2, seed=4)},
         batch_first=False),
    Case("pad-after-conv", [conv("c"), N("Pad", ["c", "p"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4), "p": np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)}, ops={"PAD": 1}),
    Case("pad-value", [N("Pad", ["x", "p", "v"], ["y"])], {"x": (2, 3)},
         {"p": np.array([0, 1, 1, 0], np.int64), "v": np.array(1.5, np.float32)}, ops={"PADV2": 1}),
    Case("pad-reflect", [N("Pad", ["x", "p"], ["y"], mode="reflect")], X4,
         {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, ops={"MIRROR_PAD": 1}),
    Case("slice-channels-nhwc", [conv("c"), N("Slice", ["c", "st", "en", "ax"], ["y"])], X4,
         {"w": W(4, 3), "b": B(4), "st": np.array([1], np.int64), "en": np.array([3], np.int64),
          "ax": np.array([1], np.int64)}, ops={"STRIDED_SLICE": 1, "TRANSPOSE": 2}),
    Case("slice-negative-step", [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], {"x": (3, 7)},
         {"st": np.array([-1, 5], np.int64), "en": np.array([-2**63, 0], np.int64), "ax": np.array([1, 0], np.int64),
          "sp": np.array([-2, -1], np.int64)}, ops={"STRIDED_SLICE": 1}, batch_first=False),
    Case("slice-open-end", [N("Slice", ["x", "st", "en"], ["y"])], {"x": (4, 6)},
         {"st": np.array([1, -4], np.int64), "en": np.array([2**63 - 1, -1], np.int64)}, batch_first=False),
    Case("gather-axis1", [N("Gather", ["x", "i"], ["y"], axis=1)], {"x": (2, 5, 3)},
         {"i": np.array([4, 0, -1], np.int64)}, ops={"GATHER": 1}),
    Case("gather-scalar", [N("Gather", ["x", "i"], ["y"], axis=2)], {"x": (2, 5, 3)}, {"i": np.array(1, np.int64)}),
    Case("softmax-last", [N("Softmax", ["x"], ["y"])], {"x": (3, 10)}, ops={"SOFTMAX": 1}),
    Case("softmax-channels-4d", [conv("c"), N("Softmax", ["c"], ["y"], axis=1)], X4, {"w": W(4, 3), "b": B(4)},
         ops={"SOFTMAX": 1, "TRANSPOSE": 2}),
    Case("softmax-opset11", [N("Softmax", ["x"], ["y"], axis=1)], {"x": (3, 10)}, opset=11),
    Case("log-softmax", [N("LogSoftmax", ["x"], ["y"])], {"x": (3, 10)}, ops={"LOG_SOFTMAX": 1}),
    # folding, pass-through
    Case("batchnorm-standalone", [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)], X4,
         {"s": rand(3, seed=1), "b": B(3), "m": rand(3, seed=3), "v": np.abs(rand(3, seed=4)) + 0.5},
         ops={"MUL": 1, "ADD": 1}),
    Case("batchnorm-relu-fused", [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]), N("Relu", ["n"], ["y"])],
         X4, {"s": rand(3, seed=1), "b": B(3), "m": rand(3, seed=3), "v": np.abs(rand(3, seed=4)) + 0.5},
         ops={"MUL": 1, "ADD": 1}, absent=("RELU",)),
    Case("maxpool-unused-indices", [N("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2], strides=[2, 2])], X4,
         ops={"MAX_POOL_2D": 1}),
    Case("identity-output", [N("Relu", ["x"], ["r"]), N("Identity", ["r"], ["y"])], {"x": (2, 5)}),
    Case("dropout-inference", [N("Dropout", ["x"], ["d"], ), N("Tanh", ["d"], ["y"])], {"x": (2, 5)},
         ops={"TANH": 1}),
    Case("constant-node", [N("Constant", [], ["k"], value=numpy_helper.from_array(rand(5, seed=9))),
                           N("Add", ["x", "k"], ["y"])], {"x": (2, 5)}, ops={"ADD": 1}),
    Case("two-outputs", [N("Relu", ["x"], ["y"]), N("Sigmoid", ["x"], ["z"])], {"x": (2, 5)}, outputs=("y", "z")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_operator_matches_onnxruntime(case: Case, tmp_path: Path) -> None:
    model = onnx_model(case.nodes, case.inputs, list(case.outputs), initializers=case.init, opset=case.opset)
    feeds = {name: rand(*shape, seed=11 + i) for i, (name, shape) in enumerate(case.inputs.items())}
    result = convert_and_compare(tmp_path, model, feeds)
    for op, count in case.ops.items():
        assert result.op_counts.get(op, 0) == count, (op, dict(result.op_counts))
    for op in case.absent:
        assert op not in result.op_counts, (op, dict(result.op_counts))


BATCHED = [c for c in CASES if c.batch_first]


@pytest.mark.parametrize("case", BATCHED, ids=[c.id for c in BATCHED])
def test_operator_with_dynamic_batch(case: Case, tmp_path: Path) -> None:
    """The same graphs with a dynamic first input dimension: kept dynamic (and run at batch 3) or fixed to 1."""
    dynamic = {name: ("N", *shape[1:]) for name, shape in case.inputs.items()}
    model = onnx_model(case.nodes, dynamic, list(case.outputs), initializers=case.init, opset=case.opset)
    feeds = {name: rand(*shape, seed=11 + i) for i, (name, shape) in enumerate(case.inputs.items())}
    result = convert_and_compare(tmp_path, model, feeds)
    kept = any(note.startswith("dynamic batch kept") for note in result.notes)
    assert kept or any(note.startswith("batch fixed to 1") for note in result.notes)
    if kept:
        batch3 = {name: rand(3, *shape[1:], seed=21 + i) for i, (name, shape) in enumerate(case.inputs.items())}
        expected = run_onnx(tmp_path / "model.onnx", batch3)
        got = run_tflite(result.path, batch3)
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
