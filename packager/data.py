"""Sample files (.npz) for self-test inputs, calibration and evaluation.

Convention: one array per model input, keyed by the input's name, with the
samples stacked on axis 0 (``x: (K, 1, 8, 8)`` for an input ``x: [N, 1, 8, 8]``),
plus an optional ``labels`` array of K class indices. A model with a single
input also accepts any one array key (for files written without knowing the
input's name).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.errors import UsageError
from agent.manifest import TensorSpec

log = logging.getLogger(__name__)

LABELS_KEY = "labels"


@dataclass(frozen=True, kw_only=True)
class SampleSet:
    """K samples; ``batch(i)`` gives sample i as model feeds with batch size 1."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    count: int

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        return {name: arr[i : i + 1] for name, arr in self.inputs.items()}

    def all_feeds(self, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        n = self.count if limit is None else min(limit, self.count)
        return [self.feeds(i) for i in range(n)]


def load_samples(path: Path, specs: Sequence[TensorSpec], *, what: str = "sample file") -> SampleSet:
    """Load and check an .npz file against the model's inputs; errors name the file and tensor."""
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UsageError(f"{what} {path.name} is not a readable .npz file ({e})") from None
    labels = arrays.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        only = next(iter(arrays))
        log.debug("%s: using array %r for the single input %r", path.name, only, names[0])
        arrays = {names[0]: arrays[only]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(
            f"{what} {path.name} has no array for input(s) {missing}; it holds {sorted(arrays)}"
        )
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise UsageError(f"{what} {path.name} holds array(s) {extra} that are not model inputs {names}")
    counts = set()
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = arrays[spec.name]
        if arr.ndim != len(spec.shape):
            raise UsageError(
                f"{what} {path.name}: array {spec.name!r} has shape {arr.shape}; input expects "
                f"{len(spec.shape)} dimensions {list(spec.shape)} with samples on axis 0"
            )
        want = spec.shape[1:]
        if any(w != -1 and w != a for w, a in zip(want, arr.shape[1:])):
            raise UsageError(
                f"{what} {path.name}: array {spec.name!r} has shape {arr.shape}, input expects [K, {', '.join(map(str, want))}]"
            )
        if arr.dtype.kind != np.dtype(spec.dtype).kind and not (arr.dtype.kind in "fiu" and np.dtype(spec.dtype).kind in "fiu"):
            raise UsageError(f"{what} {path.name}: array {spec.name!r} has dtype {arr.dtype}, input is {spec.dtype}")
        out[spec.name] = np.ascontiguousarray(arr.astype(spec.dtype, copy=False))
        counts.add(arr.shape[0])
    if len(counts) != 1:
        raise UsageError(f"{what} {path.name}: arrays hold different numbers of samples {sorted(counts)}")
    count = counts.pop()
    if count == 0:
        raise UsageError(f"{what} {path.name} holds no samples")
    if labels is not None:
        if labels.shape != (count,) or labels.dtype.kind not in "iu":
            raise UsageError(f"{what} {path.name}: 'labels' must be {count} integer class indices, got {labels.dtype} {labels.shape}")
    return SampleSet(inputs=out, labels=labels, count=count)
