"""Quantizers as library functions: a float model file in, a quantized model file out.

* :mod:`packager.quantize.onnx_quant` - onnxruntime's quantizers (fp16, dynamic and
  static int8 in QDQ format) for ONNX models;
* :mod:`packager.quantize.tflite_quant` - ai-edge-quantizer (no TensorFlow) for
  TFLite models (dynamic-range, weight-only and static int8).

Both return a :class:`QuantizedModel` and raise :class:`QuantizeError` when the
quantizer fails on a model, :class:`~agent.errors.UsageError` for input the user
can fix (no calibration data for static int8, calibration names that do not match
the model). The quantizers' own output (Python logging, prints, warnings, the
onnxruntime C++ log) is captured into this package's loggers at DEBUG level;
warnings are also returned in ``details["warnings"]``.

This module also holds what both quantizers share: calibration checks, the atomic
file write, and the output capture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from agent.errors import ModelError, UsageError
from agent.manifest import TensorSpec

if TYPE_CHECKING:
    from packager.introspect import ModelInfo

log = logging.getLogger(__name__)

__all__ = ["QuantizedModel", "QuantizeError", "Calibration", "Progress"]

Calibration = Sequence[Mapping[str, np.ndarray]]
"""Calibration data: a list of feeds, each input name -> array with batch size 1."""
Progress = Callable[[int, int], None]
"""``progress(done, total)``: called as calibration samples are consumed."""

MAX_WARNINGS = 20
"""At most this many distinct quantizer warnings are kept in ``details["warnings"]``."""


@dataclass(frozen=True, kw_only=True)
class QuantizedModel:
    """A quantized model file and how it was made."""

    path: Path
    mode: str
    """The mode asked for: ``fp16``, ``int8-dynamic``, ``int8`` or ``weight-only``."""
    details: Mapping[str, Any]
    """What was used (per_channel, activation type, recipe, preprocessing outcome...). Read-only."""
    min_runtime_version: str | None
    """The oldest runtime that runs this model correctly, when quantization raises it above the
    source model's; ``None`` when it does not."""
    seconds: float
    """Wall time of the quantization, calibration included."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            raise TypeError(f"path must be a pathlib.Path, got {type(self.path).__name__}")
        if not self.mode:
            raise ValueError("mode must not be empty")
        if self.seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {self.seconds}")
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


class QuantizeError(ModelError):
    """A quantizer failed on a model. The message names the mode and the quantizer's reason."""

    def __init__(self, mode: str, reason: str) -> None:
        super().__init__(f"{mode} quantization failed: {reason}")
        self.mode = mode
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.mode, self.reason))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its first non-empty line, or its type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        text = type(exc).__name__
    elif isinstance(exc, (KeyError, IndexError, AssertionError, ImportError)):  # cryptic without their type
        text = f"{type(exc).__name__}: {lines[0]}"
    else:
        text = lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_source(src: Path) -> Path:
    """The source model path, or :class:`UsageError` when it is not a file."""
    src = Path(src)
    if not src.is_file():
        raise UsageError(f"model file {src} does not exist or is not a file")
    return src


def check_destination(src: Path, dst: Path) -> Path:
    dst = Path(dst)
    if dst.resolve() == src.resolve():
        raise UsageError(f"the quantized model would overwrite its source {src}; choose another output path")
    if not dst.parent.is_dir():
        raise UsageError(f"output directory {dst.parent} does not exist")
    return dst


def check_calibration(calibration: Calibration | None, specs: Sequence[TensorSpec], *,
                      what: str) -> list[dict[str, np.ndarray]]:
    """Calibration feeds checked against the model's inputs (names, dtypes, shapes).

    Raises :class:`UsageError` naming what is wrong, so the quantizer never sees
    data that would make it fail with a traceback of its own.
    """
    if calibration is None or len(calibration) == 0:
        raise UsageError(f"{what} needs --calibration FILE.npz")
    expected = {s.name: s for s in specs}
    feeds: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(calibration):
        if not isinstance(feed, Mapping):
            raise UsageError(f"calibration sample {i} is a {type(feed).__name__}, not a mapping of input name -> array")
        unknown = sorted(set(feed) - set(expected))
        missing = sorted(set(expected) - set(feed))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown input name(s) {unknown}")
            if missing:
                parts.append(f"missing input(s) {missing}")
            raise UsageError(f"calibration sample {i}: {' and '.join(parts)}; the model's inputs are {sorted(expected)}")
        checked: dict[str, np.ndarray] = {}
        for name, spec in expected.items():
            value = feed[name]
            if not isinstance(value, np.ndarray):
                raise UsageError(f"calibration sample {i}, input {name!r}: expected a numpy array, "
                                 f"got {type(value).__name__}")
            if value.dtype != np.dtype(spec.dtype):
                raise UsageError(f"calibration sample {i}, input {name!r}: dtype {value.dtype} does not match "
                                 f"the model's {spec.dtype}")
            if not spec.matches_shape(value.shape):
                raise UsageError(f"calibration sample {i}, input {name!r}: shape {tuple(value.shape)} does not "
                                 f"match the model's {spec.shape} (-1 is any size)")
            checked[name] = np.ascontiguousarray(value) if value.ndim else value
        feeds.append(checked)
    return feeds


def interface_differences(before: Sequence[TensorSpec], after: Sequence[TensorSpec], kind: str) -> list[str]:
    """How a model's inputs or outputs changed: names, order, dtypes, shapes (empty when kept)."""
    b = [(s.name, s.dtype, s.shape) for s in before]
    a = [(s.name, s.dtype, s.shape) for s in after]
    if b == a:
        return []
    if [x[0] for x in b] != [x[0] for x in a]:
        return [f"{kind} names {[x[0] for x in b]} became {[x[0] for x in a]}"]
    return [f"{kind} {n!r} {d}{list(s)} became {d2}{list(s2)}"
            for (n, d, s), (_, d2, s2) in zip(b, a) if (d, s) != (d2, s2)]


# --- writing ------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """A temporary path next to ``dst``; on success it is fsynced and renamed over ``dst``.

    The block writes the temporary file (and may check it); if the block raises,
    the temporary file is removed and ``dst`` is left as it was.
    """
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.tmp"
    open(tmp, "xb").close()  # (not mkstemp: its 0600 mode would stay on the model; this honours umask)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- capturing a quantizer's own output ------------------------------------------


class CapturedOutput:
    """Messages a foreign library emitted while captured; warnings are kept (deduplicated)."""

    def __init__(self, logger: logging.Logger, source: str) -> None:
        self._log = logger
        self._source = source
        self.warnings: list[str] = []

    def emit(self, level: int, message: str) -> None:
        message = message.strip()
        if not message:
            return
        self._log.debug("%s: %s", self._source, message)
        if level >= logging.WARNING and message not in self.warnings and len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message if len(message) <= 300 else message[:297] + "...")


class _Forward(logging.Handler):
    def __init__(self, sink: CapturedOutput) -> None:
        super().__init__(logging.DEBUG)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.emit(record.levelno, record.getMessage())
        except Exception:  # a malformed foreign record must not break quantization
            self.handleError(record)


def _package_dirs(packages: Sequence[str]) -> tuple[str, ...]:
    dirs: list[str] = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(os.path.join(os.path.realpath(d), "") for d in spec.submodule_search_locations)
    return tuple(dirs)


class _FromPackages(logging.Filter):
    """On the root logger: takes records that the packages log through ``logging.warning(...)``."""

    def __init__(self, dirs: tuple[str, ...], forward: _Forward) -> None:
        super().__init__()
        self._dirs = dirs
        self._forward = forward

    def filter(self, record: logging.LogRecord) -> bool:
        if self._dirs and os.path.realpath(record.pathname).startswith(self._dirs):
            self._forward.handle(record)
            return False
        return True


@contextlib.contextmanager
def captured_output(logger: logging.Logger, source: str, *, packages: Sequence[str],
                    loggers: Sequence[str] = ()) -> Iterator[CapturedOutput]:
    """Route a library's Python-level output into ``logger`` (DEBUG) while the block runs.

    Captured: records of the ``packages``' own loggers and of ``loggers``; records
    the packages log on the root logger (``logging.warning(...)`` at module level,
    which would otherwise also install a stderr handler on an unconfigured root);
    ``print`` to stdout; Python warnings. Not captured: stderr (a progress display
    of the caller's may be drawing there) and native code writing to file
    descriptors directly.
    """
    sink = CapturedOutput(logger, source)
    forward = _Forward(sink)
    root = logging.getLogger()
    guard = None
    if not root.handlers:  # keep logging.warning() from calling basicConfig() on the way
        guard = logging.NullHandler()
        root.addHandler(guard)
    root_filter = _FromPackages(_package_dirs(packages), forward)
    root.addFilter(root_filter)
    saved: list[tuple[logging.Logger, bool]] = []
    for name in dict.fromkeys([*packages, *loggers]):
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate))
        lg.addHandler(forward)
        lg.propagate = False
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            try:
                yield sink
            finally:
                for w in caught:  # library warnings about its own internals: debug only
                    sink.emit(logging.DEBUG, f"{w.category.__name__}: {w.message}")
    finally:
        for lg, propagate in saved:
            lg.removeHandler(forward)
            lg.propagate = propagate
        root.removeFilter(root_filter)
        if guard is not None:
            root.removeHandler(guard)
        for line in stdout.getvalue().splitlines():
            sink.emit(logging.DEBUG, line)


class Stopwatch:
    """``seconds`` since creation (monotonic)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start


def begin(src: Path, dst: Path, *, runtime: str, needs: str) -> tuple[Path, Path, Stopwatch, ModelInfo]:
    """What every quantizer starts with: the checked source and destination, a started clock,
    and the source's signature. :class:`UsageError` unless the source is a ``runtime`` model
    (``needs`` names the function and what it takes, for the message)."""
    from packager.introspect import read_signature

    src = check_source(src)
    dst = check_destination(src, dst)
    clock = Stopwatch()
    source = read_signature(src)
    if source.runtime != runtime:
        article = "an" if source.runtime == "onnx" else "a"
        raise UsageError(f"{src.name} is {article} {source.runtime} model; {needs}")
    return src, dst, clock, source


def calibration_feeds(mode: str, calibration: Calibration | None,
                      specs: Callable[[], Sequence[TensorSpec]]) -> list[dict[str, np.ndarray]]:
    """The calibration feeds static int8 quantization needs (checked against ``specs()``); none
    for the other modes, which ignore any calibration given."""
    if mode == "int8":
        return check_calibration(calibration, specs(), what="int8 static quantization")
    if calibration:
        log.debug("%s needs no calibration: %d sample(s) ignored", mode, len(calibration))
    return []
