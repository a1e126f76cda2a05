"""Model conversion for edge runtimes: ONNX -> TFLite without TensorFlow.

See :mod:`packager.convert.onnx2tflite` for the pipeline and its decisions.
"""

from packager.convert.onnx2tflite import convert_onnx_to_tflite, supported_operators
from packager.convert.result import ConversionResult, UnsupportedOperators

__all__ = ["ConversionResult", "UnsupportedOperators", "convert_onnx_to_tflite", "supported_operators"]
