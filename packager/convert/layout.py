"""Layouts and permutations.

ONNX convolutions and pools are channels-first (NCHW); TFLite's are
channels-last (NHWC). Every 4-D tensor the converter writes exists in one or
both of two layouts: ``"onnx"`` (ONNX's own order, whatever it means) and
``"nhwc"`` (``onnx.transpose(TO_NHWC)``). Tensors of any other rank are always
in ONNX order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "TO_NHWC", "TO_ONNX", "Layout", "compose", "const_to_layout", "is_identity", "memory_equivalent", "permute",
    "to_layout",
]

Layout = Literal["onnx", "nhwc"]

TO_NHWC: tuple[int, ...] = (0, 2, 3, 1)
TO_ONNX: tuple[int, ...] = (0, 3, 1, 2)


def compose(first: Sequence[int], then: Sequence[int]) -> tuple[int, ...]:
    """The permutation equal to transposing by ``first`` and then by ``then``."""
    return tuple(int(first[i]) for i in then)


def is_identity(perm: Sequence[int]) -> bool:
    return all(int(p) == i for i, p in enumerate(perm))


def permute(shape: Sequence[int], perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(shape[p]) for p in perm)


def memory_equivalent(shape: Sequence[int], perm: Sequence[int]) -> bool:
    """True when transposing a tensor of ``shape`` by ``perm`` leaves its bytes in the same order.

    That is the case when only dimensions of size 1 move: the dims other than 1
    keep their relative order. ``-1`` (dynamic) counts as a real dimension.
    """
    kept = [p for p in perm if shape[p] != 1]
    return kept == sorted(kept)


def to_layout(shape: Sequence[int], layout: Layout) -> tuple[int, ...]:
    """The TFLite shape of an ONNX-order ``shape`` held in ``layout``."""
    return permute(shape, TO_NHWC) if layout == "nhwc" else tuple(int(d) for d in shape)


def const_to_layout(value: np.ndarray, rank: int, layout: Layout) -> np.ndarray:
    """A constant operand broadcast against a tensor of ``rank``: leading 1s added, then permuted."""
    value = np.asarray(value)
    if value.ndim < rank:
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if layout == "nhwc" and value.ndim == 4:
        value = value.transpose(TO_NHWC)
    return value
