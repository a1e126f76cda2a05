"""edgeship device agent and the dependency-light core shared with the packager.

Nothing in this package may import ``packager``, ``onnx``, the quantizers, torch
or TensorFlow: it must run on a device with only the base dependencies.
"""

__version__ = "0.1.0"
