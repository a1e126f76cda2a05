"""Small real models for tests: deterministic, built in milliseconds, no torch, no TensorFlow.

ONNX models are written with ``onnx.helper``; TFLite models with edgeship's own
:class:`packager.tflite.TFLiteBuilder`. The MLPs of both formats share their
weights (:func:`mlp_weights`) and numpy reference (:func:`mlp_reference`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "mlp_weights", "mlp_reference", "onnx_mlp", "onnx_nan_model", "onnx_two_io", "tflite_mlp",
    "tflite_dequantize", "softmax",
]


def mlp_weights(*, in_features: int = 8, hidden: int = 16, classes: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of a 2-layer MLP; matrices are ``[out, in]`` (Gemm transB=1 and TFLite FULLY_CONNECTED)."""
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((hidden, in_features)) / np.sqrt(in_features)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
        "w2": (rng.standard_normal((classes, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(classes)).astype(np.float32),
    }


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mlp_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """``softmax(relu(x @ w1.T + b1) @ w2.T + b2)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    h = np.maximum(x @ weights["w1"].T.astype(np.float64) + weights["b1"], 0.0)
    return softmax(h @ weights["w2"].T.astype(np.float64) + weights["b2"])


def _save_onnx(model, path: Path, *, external_data: bool = False) -> Path:  # type: ignore[no-untyped-def]
    import onnx

    # Stamp the oldest IR version the opsets allow (onnx.helper stamps its newest, which old runtimes refuse).
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def onnx_mlp(path: Path, *, in_features: int = 8, hidden: int = 16, classes: int = 4, seed: int = 0,
             opset: int = 17, external_data: bool = False) -> Path:
    """Gemm -> Relu -> Gemm -> Softmax; input ``x`` [batch, in_features] float32, output ``probs``.

    With ``external_data`` the weights go to ``<name>.data`` next to the model.
    """
    from onnx import TensorProto, helper, numpy_helper

    w = mlp_weights(in_features=in_features, hidden=hidden, classes=classes, seed=seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeship-tests")
    return _save_onnx(model, path, external_data=external_data)


def onnx_nan_model(path: Path) -> Path:
    """``y = (x - x) / (x - x)``: NaN for every finite input. Input ``x`` [batch, 4] float32."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sub", ["x", "x"], ["zero"]), helper.make_node("Div", ["zero", "zero"], ["y"])]
    graph = helper.make_graph(
        nodes, "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def onnx_two_io(path: Path) -> Path:
    """Inputs ``a`` [batch, 3] float32 and ``b`` [3] int64; outputs ``sum`` = a + b and ``argmax`` (int64)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "bf"], ["sum"]),
        helper.make_node("ArgMax", ["sum"], ["argmax"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "two_io",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("argmax", TensorProto.INT64, ["batch"])],
    )
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def tflite_mlp(path: Path, *, in_features: int = 8, hidden: int = 16, classes: int = 4, seed: int = 0) -> Path:
    """The MLP of :func:`onnx_mlp` as TFLite: FULLY_CONNECTED(+RELU) -> FULLY_CONNECTED -> SOFTMAX.

    Input ``x`` [-1, in_features] float32, output ``probs``, one ``serving_default`` signature.
    """
    from ai_edge_litert import schema_py_generated as schema

    from packager.tflite import TFLiteBuilder

    w = mlp_weights(in_features=in_features, hidden=hidden, classes=classes, seed=seed)
    b = TFLiteBuilder()
    b.add_input("x", (-1, in_features), "float32")
    for name, value in w.items():
        b.add_constant(name, value)
    b.add_tensor("hidden", (-1, hidden), "float32")
    b.add_tensor("logits", (-1, classes), "float32")
    b.add_tensor("probs", (-1, classes), "float32")
    relu = schema.FullyConnectedOptionsT()
    relu.fusedActivationFunction = schema.ActivationFunctionType.RELU
    b.add_op("FULLY_CONNECTED", ["x", "w1", "b1"], ["hidden"], relu)
    b.add_op("FULLY_CONNECTED", ["hidden", "w2", "b2"], ["logits"], schema.FullyConnectedOptionsT())
    softmax_options = schema.SoftmaxOptionsT()
    softmax_options.beta = 1.0
    b.add_op("SOFTMAX", ["logits"], ["probs"], softmax_options)
    b.mark_output("probs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b.to_bytes())
    return path


def tflite_dequantize(path: Path, *, scale: float = 0.05, zero_point: int = -3) -> Path:
    """An int8-quantized input ``q`` [1, 4] dequantized to float output ``y`` = scale * (q - zero_point)."""
    from agent.manifest import QuantParams
    from packager.tflite import TFLiteBuilder

    b = TFLiteBuilder()
    b.add_input("q", (1, 4), "int8", quantization=QuantParams(scale=(scale,), zero_point=(zero_point,)))
    b.add_tensor("y", (1, 4), "float32")
    b.add_op("DEQUANTIZE", ["q"], ["y"], version=2)  # version 2: int8 input
    b.mark_output("y")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b.to_bytes())
    return path


def onnx_sqrt_model(path: Path) -> Path:
    """``y = sqrt(x)``: finite for x >= 0, NaN for negative inputs. Input ``x`` [batch, 4] float32.

    Its self-test (built from non-negative samples) passes; negative inputs in service emit NaN."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])], "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
