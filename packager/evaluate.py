"""Measure a model on its target runtime: outputs, accuracy, agreement, cosine, size, latency.

Only measurement lives here; the decisions are in :mod:`packager.gate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from agent.manifest import Runtime
from agent.runtime import Session, open_session

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]
Outputs = Mapping[str, np.ndarray]


def run_all(session: Session, feeds: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    return [session.run(f) for f in feeds]


def _flat(outs: Outputs, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(outs[n], dtype=np.float64).ravel() for n in names])


def mean_cosine(a: Sequence[Outputs], b: Sequence[Outputs], names: Sequence[str]) -> float:
    """Mean over samples of the cosine similarity of all outputs (flattened) of ``a`` and ``b``."""
    sims = []
    for x, y in zip(a, b):
        u, v = _flat(x, names), _flat(y, names)
        nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        if nu == 0.0 and nv == 0.0:
            sims.append(1.0)
        elif nu == 0.0 or nv == 0.0 or not (np.isfinite(nu) and np.isfinite(nv)):
            sims.append(0.0)
        else:
            sims.append(float(np.dot(u, v) / (nu * nv)))
    return float(np.mean(sims)) if sims else float("nan")


def top1(outs: Sequence[Outputs], name: str) -> np.ndarray:
    """Arg-max over the last axis of output ``name`` for each sample (batch 1)."""
    return np.array([int(np.argmax(np.asarray(o[name]).reshape(-1, np.asarray(o[name]).shape[-1])[0])) for o in outs])


def is_classifier(outs: Sequence[Outputs], name: str) -> bool:
    return bool(outs) and np.asarray(outs[0][name]).ndim >= 1 and np.asarray(outs[0][name]).shape[-1] > 1


def agreement(a: Sequence[Outputs], b: Sequence[Outputs], name: str) -> float | None:
    if not is_classifier(a, name):
        return None
    return float(np.mean(top1(a, name) == top1(b, name)))


def accuracy(outs: Sequence[Outputs], name: str, labels: np.ndarray) -> float:
    return float(np.mean(top1(outs, name) == labels[: len(outs)]))


def max_abs_diff(a: Sequence[Outputs], b: Sequence[Outputs], names: Sequence[str]) -> float:
    return max(float(np.max(np.abs(_flat(x, names) - _flat(y, names)))) for x, y in zip(a, b))


def within_tolerance(a: Sequence[Outputs], b: Sequence[Outputs], names: Sequence[str], *, rtol: float, atol: float) -> bool:
    """Element-wise ``|a - b| <= atol + rtol * |b|`` for every sample and output."""
    for x, y in zip(a, b):
        u, v = _flat(x, names), _flat(y, names)
        if not np.all(np.abs(u - v) <= atol + rtol * np.abs(v)):
            return False
    return True


@dataclass(frozen=True, kw_only=True)
class Latency:
    p50_ms: float
    p99_ms: float
    runs: int


def latency(session: Session, feeds: Feeds, *, budget_s: float = 1.0, max_runs: int = 2000, warmup: int = 20) -> Latency:
    """Single-sample latency of ``session.run`` (the session decides its threads; build uses 1)."""
    for _ in range(warmup):
        session.run(feeds)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 50 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
    arr = np.array(times) * 1000.0
    return Latency(p50_ms=float(np.percentile(arr, 50)), p99_ms=float(np.percentile(arr, 99)), runs=len(times))


@dataclass(frozen=True, kw_only=True)
class Measured:
    """What one model did on the shared data."""

    check_outputs: list[dict[str, np.ndarray]]
    eval_outputs: list[dict[str, np.ndarray]] | None
    latency: Latency
    size: int
    backend: str
    output_names: tuple[str, ...]


def measure(
    path: Path,
    runtime: Runtime,
    *,
    check_feeds: Sequence[Feeds],
    eval_feeds: Sequence[Feeds] | None,
    latency_budget_s: float = 1.0,
) -> Measured:
    """Run the model at ``path`` on 1 thread over the check and eval inputs, and time it."""
    size = sum(p.stat().st_size for p in _model_files(path))
    with open_session(runtime, path, threads=1) as session:
        check = run_all(session, check_feeds)
        ev = run_all(session, eval_feeds) if eval_feeds is not None else None
        lat = latency(session, check_feeds[0], budget_s=latency_budget_s)
        return Measured(check_outputs=check, eval_outputs=ev, latency=lat, size=size, backend=session.backend,
                        output_names=tuple(s.name for s in session.outputs))


def _model_files(path: Path) -> list[Path]:
    """The model file and, for ONNX, external-data files next to it (``NAME.data`` convention)."""
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files
