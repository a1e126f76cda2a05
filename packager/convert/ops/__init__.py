"""Per-operator rules; importing this package registers them in :data:`packager.convert.rules.RULES`."""

from packager.convert.ops import conv, dense, eltwise, index, pool, tensor

__all__ = ["conv", "dense", "eltwise", "index", "pool", "tensor"]
