"""Writing TFLite models without TensorFlow (see :mod:`packager.tflite.writer`)."""

from packager.tflite.writer import TFLiteBuilder

__all__ = ["TFLiteBuilder"]
