"""Gemm and MatMul: FULLY_CONNECTED when the weights are constant, else BATCH_MATMUL.

FULLY_CONNECTED computes ``x @ W.T + b`` with ``W`` as ``[out, in]``. Gemm's
``alpha`` is folded into the weights and ``beta * C`` into the bias when ``C``
is a constant vector; a non-constant ``C`` becomes an ADD.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from packager.convert.emit import Emitter
from packager.convert.graph import Node
from packager.convert.rules import BatchMixed, Ctx, Shape, Unsupported, broadcast, const_or_unsupported, rule

__all__: list[str] = []


def _gemm_dims(node: Node, ctx: Ctx) -> tuple[int, int, int]:
    a = ctx.shape(node.inputs[0])
    if len(a) != 2:
        raise Unsupported(f"Gemm(rank {len(a)} input)")
    if ctx.const(node.inputs[0]) is not None:
        raise Unsupported("Gemm(constant A)")
    b = const_or_unsupported(node, ctx, 1, "B")
    if b.ndim != 2:
        raise Unsupported(f"Gemm(rank {b.ndim} B)")
    m, k = (a[1], a[0]) if node.attr("transA", 0) else a
    if node.attr("transA", 0) and -1 in a:
        raise BatchMixed("Gemm with transA=1 moves the dynamic batch")
    kb, n = (b.shape[1], b.shape[0]) if node.attr("transB", 0) else b.shape
    if k != kb:
        raise (BatchMixed if k == -1 else Unsupported)("Gemm(mismatched dimensions)")
    return m, k, int(n)


def _bias(node: Node, n: int, c: np.ndarray) -> np.ndarray | None:
    """``beta * C`` as a length-``n`` bias, when ``C`` broadcasts along the rows only."""
    if c.size == 1:
        return np.full(n, float(c.reshape(())) * float(node.attr("beta", 1.0)), np.float32)
    if c.size == n and (c.ndim == 1 or (c.ndim == 2 and c.shape[0] == 1)):
        return (c.reshape(n).astype(np.float64) * float(node.attr("beta", 1.0))).astype(np.float32)
    return None


def _gemm_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    m, _, n = _gemm_dims(node, ctx)
    c_name = node.input(2)
    if c_name:
        c = ctx.const(c_name)
        if c is not None:
            if _bias(node, n, c) is None:
                raise Unsupported(f"Gemm(C of shape {list(c.shape)})")
        elif float(node.attr("beta", 1.0)) != 1.0:
            raise Unsupported("Gemm(non-constant C with beta != 1)")
        else:
            broadcast(ctx.shape(c_name), (m, n))
    return [(m, n)]


@rule("Gemm", infer=_gemm_infer)
def _gemm(node: Node, em: Emitter) -> None:
    a = em.get(node.inputs[0], "onnx")
    b = em.const_value(node.inputs[1])
    assert b is not None
    w = b if node.attr("transB", 0) else b.T
    w = (w.astype(np.float64) * float(node.attr("alpha", 1.0))).astype(np.float32)
    n = int(w.shape[0])
    if node.attr("transA", 0):
        k, m = em.tshape(a)
        at = em.tensor(f"{node.name}/a_t", (m, k))
        em.op("TRANSPOSE", [a, em.ints([1, 0], "perm")], [at])
        a = at
    c_name = node.input(2)
    c = em.const_value(c_name) if c_name else None
    bias = _bias(node, n, c) if c is not None else None
    out = em.define(node.outputs[0], "onnx")
    add_activation = bool(c_name) and c is None
    opts = schema.FullyConnectedOptionsT()
    opts.fusedActivationFunction = schema.ActivationFunctionType.NONE if add_activation else em.activation(node)
    fc_out = em.tensor(f"{node.name}/fc", em.tshape(out)) if add_activation else out
    em.op("FULLY_CONNECTED", [a, em.weight(w, f"{node.name}/weights"),
                              em.weight(bias, f"{node.name}/bias") if bias is not None else None], [fc_out], opts)
    if add_activation:
        add = schema.AddOptionsT()
        add.fusedActivationFunction = em.activation(node)
        em.op("ADD", [fc_out, em.operand(c_name, "onnx", 2)], [out], add)


def _is_fc(const_b: np.ndarray | None, const_a: np.ndarray | None) -> bool:
    return const_b is not None and const_b.ndim == 2 and const_a is None


def _matmul_infer(node: Node, ctx: Ctx) -> Sequence[Shape]:
    a, b = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1])
    if len(a) < 2 or len(b) < 2:
        raise Unsupported("MatMul(1-D input)")
    if a[-1] != b[-2]:
        raise (BatchMixed if -1 in (a[-1], b[-2]) else Unsupported)("MatMul(mismatched dimensions)")
    if _is_fc(ctx.const(node.inputs[1]), ctx.const(node.inputs[0])):
        return [tuple(a[:-1]) + (b[-1],)]
    if max(len(a), len(b)) > 4:
        raise Unsupported(f"MatMul(rank {max(len(a), len(b))})")
    return [broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])]


@rule("MatMul", infer=_matmul_infer)
def _matmul(node: Node, em: Emitter) -> None:
    a_name, b_name = node.inputs[0], node.inputs[1]
    out = em.define(node.outputs[0], "onnx")
    b = em.const_value(b_name)
    if _is_fc(b, em.const_value(a_name)):
        assert b is not None
        rank = len(em.shape(a_name))
        opts = schema.FullyConnectedOptionsT()
        opts.fusedActivationFunction = em.activation(node)
        opts.keepNumDims = rank > 2
        em.op("FULLY_CONNECTED", [em.get(a_name, "onnx"), em.weight(b.T, f"{node.name}/weights"), None], [out],
              opts, version=5 if rank > 2 else 1)
        return
    a_rank, b_rank = len(em.shape(a_name)), len(em.shape(b_name))
    em.op("BATCH_MATMUL", [em.operand(a_name, "onnx", a_rank), em.operand(b_name, "onnx", b_rank)], [out],
          schema.BatchMatMulOptionsT())
