"""Constant folding: evaluate nodes whose inputs are all known at conversion time.

Two evaluators, chosen per node:

* structural shape operators (``Shape`` results and what torch's exporter does
  with them: ``Gather``, ``Slice``, ``Concat``, ``Unsqueeze``, ``Squeeze``,
  ``Cast``, ``Identity``) run in numpy here. They understand :data:`BATCH`, a
  sentinel standing for a dynamic batch size inside a shape vector, so that
  ``Shape -> Gather(0) -> Unsqueeze -> Concat -> Reshape`` folds to a constant
  target shape ``[BATCH, 32]`` even when the batch is dynamic;
* everything else runs in ONNX's own reference implementation
  (``onnx.reference.ReferenceEvaluator``): it implements every standard operator
  with ONNX's semantics, needs no runtime session, and its cost only matters
  for constant subgraphs, which are small.

Arithmetic on :data:`BATCH` (``Mul(batch, 2)``) cannot be represented: it raises
:class:`BatchMixed`, and the converter fixes the batch size to 1 instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from packager.convert.graph import Node
from packager.convert.rules import BatchMixed

log = logging.getLogger(__name__)

__all__ = ["BATCH", "NOT_FOLDABLE", "fold_node", "has_batch", "shape_vector"]

BATCH = np.int64(-(2**62) + 7)
"""Stands for the dynamic batch size in a folded int64 shape vector."""

NOT_FOLDABLE = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "Optional",
})
"""Nodes that are never evaluated at conversion time (non-deterministic, or with subgraphs)."""

Value = np.ndarray


def has_batch(a: np.ndarray) -> bool:
    return a.dtype == np.int64 and bool(np.any(a == BATCH))


def shape_vector(dims: Sequence[int], start: int = 0, end: int | None = None) -> np.ndarray:
    """The value of ``Shape`` for a tensor of ``dims`` (``-1`` = the dynamic batch)."""
    vec = np.array([BATCH if d == -1 else d for d in dims], dtype=np.int64)
    return vec[start:end]


def _axes(node: Node, args: Sequence[Value | None], index: int) -> list[int] | None:
    """Axes from the ``axes`` attribute (older opsets) or the input at ``index`` (newer)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    arg = args[index] if index < len(args) else None
    return None if arg is None else [int(a) for a in np.asarray(arg).ravel()]


def _gather(node: Node, args: Sequence[Value | None]) -> Value:
    data, indices = args[0], args[1]
    assert data is not None and indices is not None
    return np.take(data, indices.astype(np.int64), axis=int(node.attr("axis", 0)))


def _unsqueeze(node: Node, args: Sequence[Value | None]) -> Value:
    axes = _axes(node, args, 1)
    assert args[0] is not None and axes is not None
    return np.expand_dims(args[0], tuple(axes))


def _squeeze(node: Node, args: Sequence[Value | None]) -> Value:
    axes = _axes(node, args, 1)
    assert args[0] is not None
    return np.squeeze(args[0], axis=None if axes is None else tuple(axes))


def _concat(node: Node, args: Sequence[Value | None]) -> Value:
    return np.concatenate([a for a in args if a is not None], axis=int(node.attrs["axis"]))


def _slice(node: Node, args: Sequence[Value | None]) -> Value:
    data = args[0]
    assert data is not None
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        def arg(i: int) -> list[int] | None:
            a = args[i] if i < len(args) else None
            return None if a is None else [int(x) for x in a.ravel()]
        starts, ends = arg(1) or [], arg(2) or []
        axes = arg(3) or list(range(len(starts)))
        steps = arg(4) or [1] * len(starts)
    index: list[slice] = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(s, e, st)
    return data[tuple(index)]


def _cast(node: Node, args: Sequence[Value | None]) -> Value:
    from onnx import helper

    x = args[0]
    assert x is not None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if has_batch(x) and dtype != np.int64:
        raise BatchMixed("a shape containing the dynamic batch is cast to another type")
    return x.astype(dtype)


def _constant(node: Node, args: Sequence[Value | None]) -> Value:
    from onnx import numpy_helper

    if "value" in node.attrs:
        return numpy_helper.to_array(node.attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in node.attrs:
            return np.asarray(node.attrs[key], dtype=dtype)
    raise ValueError("a Constant without a dense value")  # sparse_value, value_string(s): the reference decides


def _identity(node: Node, args: Sequence[Value | None]) -> Value:
    assert args[0] is not None
    return args[0]


_STRUCTURAL: dict[str, Callable[[Node, Sequence[Value | None]], Value]] = {
    "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat,
    "Slice": _slice, "Cast": _cast, "Identity": _identity, "Constant": _constant,
}


def _reference(node: Node, args: Sequence[Value | None], opset: int) -> list[Value] | None:
    from onnx.reference import ReferenceEvaluator

    feeds = {name: value for name, value in zip(node.inputs, args) if name and value is not None}
    try:
        outputs = ReferenceEvaluator(node.to_proto(), opsets={"": opset}).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 (foreign code; any failure means "not foldable")
        log.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
        return None
    return [np.asarray(o) for o in outputs]


def fold_node(node: Node, args: Sequence[Value | None], opset: int) -> list[Value] | None:
    """The node's outputs computed from constant ``args`` (``None`` = omitted input), or ``None``.

    Raises :class:`BatchMixed` when the node computes with the dynamic batch size.
    """
    if node.op_type in NOT_FOLDABLE or node.domain:
        return None
    symbolic = any(a is not None and has_batch(a) for a in args)
    if node.op_type in _STRUCTURAL:
        try:
            return [_STRUCTURAL[node.op_type](node, args)]
        except BatchMixed:
            raise
        except (ValueError, IndexError, KeyError, TypeError) as exc:  # malformed: the reference evaluator decides
            log.debug("numpy folding of %s failed (%s); trying the reference evaluator", node.name, exc)
    if symbolic:
        raise BatchMixed(f"{node.op_type} {node.name!r} computes with the dynamic batch size")
    return _reference(node, args, opset)
