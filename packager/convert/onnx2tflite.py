"""ONNX -> TFLite, without TensorFlow: :func:`convert_onnx_to_tflite`.

The pipeline, one module per step:

1. :mod:`~packager.convert.graph` loads the model (external data included)
   and :func:`~packager.convert.rewrite.remove_identities` drops Identity and
   inference-time Dropout;
2. :mod:`~packager.convert.analyze` folds constants (:mod:`~packager.convert.fold`),
   infers every shape and collects what cannot be converted; if anything
   cannot, :class:`UnsupportedOperators` is raised and nothing is written;
3. :mod:`~packager.convert.rewrite` folds BatchNormalization into the
   preceding Conv and fuses Relu/Clip activations into their producer;
4. the rules in :mod:`packager.convert.ops` lower each node through an
   :class:`~packager.convert.emit.Emitter` (layout tracking, see
   :mod:`~packager.convert.layout`) into a :class:`packager.tflite.TFLiteBuilder`;
5. the bytes are loaded once in LiteRT, then written atomically.

Batch: a dynamic first input dimension is kept (TFLite ``shape`` 1,
``shape_signature`` -1, so LiteRT can resize the inputs) as long as every
operator keeps the batch in dimension 0 and never computes with it; otherwise
the batch is fixed to 1, and a note says why.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from agent.fsutil import fsync_dir
from pathlib import Path

from agent.errors import ModelError, UsageError
from packager.convert import ops as _ops  # noqa: F401  (registers the operator rules)
from packager.convert.analyze import Analysis, analyze
from packager.convert.emit import Emitter
from packager.convert.graph import Graph, load_graph
from packager.convert.result import ConversionResult, UnsupportedOperators
from packager.convert.rewrite import drop_unused_outputs, fold_batchnorm, fuse_activations, remove_identities
from packager.convert.rules import RULES, BatchMixed

log = logging.getLogger(__name__)

__all__ = ["convert_onnx_to_tflite", "supported_operators"]


def supported_operators() -> tuple[str, ...]:
    """ONNX op types with a lowering (attribute limits apply); constant-only subgraphs of any op fold away."""
    return tuple(sorted(RULES))


def _analyze(graph: Graph) -> tuple[Analysis, list[str]]:
    notes: list[str] = []
    dynamic = [vi.name for vi in graph.inputs if vi.dims and vi.dims[0] is None]
    if not dynamic:
        return analyze(graph, dynamic_batch=False), notes
    try:
        analysis = analyze(graph, dynamic_batch=True)
        notes.append(f"dynamic batch kept: input(s) {', '.join(dynamic)} have shape_signature -1 in dimension 0")
    except BatchMixed as exc:
        log.debug("dynamic batch cannot be kept (%s): fixing it to 1", exc)
        analysis = analyze(graph, dynamic_batch=False)
        notes.append(f"batch fixed to 1: {exc}")
    return analysis, notes


def _check_loads(data: bytes) -> None:
    """Load and allocate the model in LiteRT: a converter bug must not reach the disk."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_content=data).allocate_tensors()
    except Exception as exc:  # LiteRT raises RuntimeError/ValueError with its own text
        raise ModelError(f"the converted model does not load in LiteRT: {exc}") from exc




def _write_atomic(dst: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # a model is not a secret; mkstemp's 0600 is
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def convert_onnx_to_tflite(src: Path, dst: Path, *, fp16_weights: bool = False) -> ConversionResult:
    """Convert the ONNX model ``src`` into a float TFLite model at ``dst``.

    Inputs and outputs keep their ONNX names, dtypes and (NCHW) shapes, and
    are the keys of the ``serving_default`` SignatureDef. Weights are float32,
    or float16 behind DEQUANTIZE operators with ``fp16_weights``.

    Raises :class:`UnsupportedOperators` (a :class:`UsageError`) listing every
    operator or attribute combination that cannot be converted, and
    :class:`UsageError` for a file that is not a usable ONNX model; nothing is
    written then. ``dst`` is replaced atomically.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not dst.parent.is_dir():
        raise UsageError(f"cannot write {dst}: directory {dst.parent} does not exist")
    graph = load_graph(src)
    graph.remove_dead_nodes()  # an unsupported node no output needs is no obstacle
    drop_unused_outputs(graph)
    remove_identities(graph)
    analysis, notes = _analyze(graph)
    if analysis.problems:
        raise UnsupportedOperators(analysis.problems)
    g = analysis.graph
    fold_batchnorm(g)
    fuse_activations(g)
    em = Emitter(g, analysis.shapes, analysis.dtypes, fp16_weights=fp16_weights,
                 description=f"edgeship onnx2tflite from {src.name}")
    for node in g.nodes:
        RULES[node.op_type].lower(node, em)
    data = em.finish()
    _check_loads(data)
    if fp16_weights:
        notes.append("weights stored as float16, dequantized to float32 at load time")
    _write_atomic(dst, data)
    result = ConversionResult(path=dst, op_counts=dict(sorted(em.op_counts.items())),
                              folded=dict(sorted(g.folded.items())), notes=tuple(notes))
    log.info("converted %s -> %s in %.2f s: %d TFLite op(s), %d bytes", src.name, dst.name,
             time.perf_counter() - started, sum(em.op_counts.values()), len(data))
    return result
