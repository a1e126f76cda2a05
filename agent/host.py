"""The in-process model host: the models this device serves, swapped atomically, with statistics.

:class:`ModelHost` keeps one live :class:`~agent.runtime.Session` per model name.

* :meth:`ModelHost.activate` opens the new session first and then swaps it in
  under the model's lock. A request holds the activation it started on (an
  entry in its list of users, taken without a lock: see ``_enter``), so a swap
  never fails a request:
  requests already running finish on the old session, and the old session is
  closed when its last in-flight request ends.
* :meth:`ModelHost.infer` validates the feeds against the declared inputs (the
  manifest's specs narrowed by what the live runtime reports) and raises
  :class:`BadRequest` naming the tensor, or :class:`UnknownModel`. A runtime
  failure raises :class:`~agent.errors.ModelError`.
* Every model keeps statistics (:class:`ModelStats`: inferences, errors,
  rejected requests, non-finite outputs (sampled after the watch window), a
  latency ring buffer), and every
  activation keeps the counters the daemon's watch window reads to commit or
  roll back (:class:`WatchCounters`). Non-finite outputs are returned to the
  caller unchanged and counted.

The hot path is kept small on purpose: one dict lookup, a lock-free hold on the
activation, one exact-match check, the runtime's binding (a request that is not
exactly what the model declares is validated in full instead), atomic counters,
and a NaN/Inf check on every call in a watch window, one in ``NONFINITE_SAMPLE``
after it. Pure Python, thread-safe, no network.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence

import numpy as np

from agent.errors import BadData, ModelError, UsageError
from agent.manifest import Manifest, Runtime, TensorSpec, check_name
from agent.runtime import Session, open_session

log = logging.getLogger(__name__)

__all__ = [
    "BadRequest", "ModelHost", "ModelInfo", "ModelStats", "UnknownModel", "WatchCounters",
]

MAX_LABELS_BYTES = 1 << 20
_now = time.perf_counter
_SMALL_FLOAT_OUTPUT = 32
"""Float outputs up to this many elements are checked for NaN/Inf by summing a list (faster than numpy there)."""
NONFINITE_SAMPLE = 16
"""Outside its watch window a model's outputs are checked for NaN/Inf on one call in this many
(every call inside it): the statistics still show a model going bad, at a 16th of the cost."""


def _value(counter: itertools.count[int]) -> int:
    """How many times ``next`` was called on ``counter`` (an atomic counter under the GIL)."""
    return int(repr(counter)[6:-1])


class UnknownModel(UsageError):
    """No model of that name (or of that version) is active here."""


class BadRequest(BadData):
    """The request does not fit the model: tensor names, dtypes or shapes are wrong."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What serves under a model name. ``inputs``/``outputs`` are the specs requests are checked against."""

    name: str
    version: str
    sha256: str
    runtime: Runtime
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ready: bool
    activated_at: float
    """``time.monotonic()`` when this version was swapped in."""
    labels: tuple[str, ...] | None = None
    """Class labels (one per line of the bundle's labels file), when the bundle has them."""


@dataclass(frozen=True, kw_only=True)
class WatchCounters:
    """Counters of one activation, read by the daemon to commit or roll back a new release.

    ``inferences`` counts calls that ran the model; ``errors`` those the runtime failed;
    ``nonfinite`` those with NaN/Inf in a float output; ``over_budget`` those slower
    than the activation's latency budget (never, when the budget is 0). Rejected
    requests (:class:`BadRequest`) are the caller's fault and are not counted here.
    """

    activated_at: float
    version: str
    sha256: str
    inferences: int
    errors: int
    nonfinite: int
    over_budget: int
    latency_budget_ms: float


@dataclass(frozen=True, kw_only=True)
class ModelStats:
    """Statistics of a model name since it was first activated or last reset (across versions)."""

    name: str
    version: str
    inferences: int
    errors: int
    rejected: int
    nonfinite: int
    in_flight: int
    window: int
    """Latency samples behind the percentiles (the most recent successful calls)."""
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence, in milliseconds."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1] * 1e3


def _narrow(kind: str, declared: Sequence[TensorSpec], live: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The live runtime's specs, with each dynamic dimension the manifest fixes made fixed.

    Raises ModelError when the two disagree (names, dtypes, ranks or fixed sizes).
    """
    by_name = {s.name: s for s in declared}
    if set(by_name) != {s.name for s in live}:
        raise ModelError(f"the model's {kind}s {sorted(s.name for s in live)} differ from the manifest's "
                         f"{sorted(by_name)}")
    out = []
    for spec in live:
        d = by_name[spec.name]
        if d.dtype != spec.dtype or len(d.shape) != len(spec.shape) or any(
                a != -1 and b != -1 and a != b for a, b in zip(d.shape, spec.shape)):
            raise ModelError(f"{kind} {spec.name!r} is {spec.dtype}{list(spec.shape)} in the model but "
                             f"{d.dtype}{list(d.shape)} in the manifest")
        shape = tuple(b if b != -1 else a for a, b in zip(d.shape, spec.shape))
        out.append(TensorSpec(name=spec.name, dtype=spec.dtype, shape=shape,
                              quantization=spec.quantization or d.quantization))
    return tuple(out)


def _read_labels(path: Path) -> tuple[str, ...] | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_LABELS_BYTES + 1)
        if len(data) > MAX_LABELS_BYTES:
            raise ValueError(f"larger than {MAX_LABELS_BYTES} bytes")
        return tuple(line.strip() for line in data.decode("utf-8").splitlines())
    except (OSError, ValueError) as exc:
        log.warning("labels %s not used: %s", path, exc)
        return None


def _shape_check(shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(the exact shape when fully fixed, else None; the fixed dims after a dynamic batch dim, else None).

    A fixed shape is one tuple comparison, a dynamic batch one slice comparison; any other
    dynamic shape falls back to TensorSpec.matches_shape.
    """
    if -1 not in shape:
        return shape, None
    if shape[0] == -1 and -1 not in shape[1:]:
        return None, shape[1:]
    return None, None


class _Activation:
    """One session of one model version. Every mutable field is guarded by the owning slot's lock."""

    def __init__(self, session: Session, info: ModelInfo, latency_budget_ms: float, watching: bool) -> None:
        self.session = session
        self.info = info
        self.budget_s = latency_budget_ms / 1e3 if latency_budget_ms > 0 else math.inf
        self.latency_budget_ms = latency_budget_ms
        self.users: list[None] = []
        """One entry per request running on this activation: list.append and list.pop are atomic,
        so the hot path takes no lock to hold the activation (see ModelHost._enter)."""
        self.retired = False
        self.closed = False
        self.watching = watching
        self.calls = itertools.count()
        """Calls that ran the model (watch counter ``inferences``)."""
        self.errors = self.nonfinite = self.over_budget = 0  # rare: counted under the slot's lock
        self.n_inputs = len(info.inputs)
        self.checks = [(s.name, np.dtype(s.dtype), *_shape_check(s.shape), s) for s in info.inputs]
        self.output_names = [s.name for s in info.outputs]
        self.float_outputs = [(s.name, s.dtype != "float64") for s in info.outputs if s.dtype.startswith("float")]
        self.run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]] = session.prepared_runner()
        # Feeds are validated here, once; Session.run would validate them again, so the host calls
        # the backend's _run directly and wraps its foreign errors the way Session.run does.
        exact_ok = all(shape is not None or tail is not None for _, _, shape, tail, _ in self.checks)
        self.direct = session.direct_runner() if exact_ok else None
        self.exact = self._exact_check()

    def _exact_check(self) -> Callable[[Mapping[str, np.ndarray]], bool]:
        """Is a request exactly what the model declares (names, ndarray, dtype, shape: fixed, or
        any batch size before fixed dims)? Then it may take the direct lane; anything else is
        validated by :meth:`prepare`."""
        fixed = [(name, dtype, shape, tail) for name, dtype, shape, tail, _ in self.checks]
        n, nd = len(fixed), np.ndarray
        if n == 1:
            ((name, dtype, shape, tail),) = fixed
            if shape is not None:
                def one_fixed(inputs: Mapping[str, np.ndarray]) -> bool:
                    v = inputs.get(name) if len(inputs) == 1 else None
                    return type(v) is nd and v.dtype is dtype and v.shape == shape  # type: ignore[union-attr]
                return one_fixed

            def one_batched(inputs: Mapping[str, np.ndarray]) -> bool:
                v = inputs.get(name) if len(inputs) == 1 else None
                return (type(v) is nd and v.dtype is dtype  # type: ignore[union-attr]
                        and bool(vs := v.shape) and vs[1:] == tail)  # type: ignore[union-attr]
            return one_batched

        def each(inputs: Mapping[str, np.ndarray]) -> bool:
            if len(inputs) != n:
                return False
            for name, dtype, shape, tail in fixed:
                v = inputs.get(name)
                if type(v) is not nd or v.dtype is not dtype:  # type: ignore[union-attr]
                    return False
                vs = v.shape  # type: ignore[union-attr]
                if vs != shape and not (tail is not None and vs and vs[1:] == tail):
                    return False
            return True
        return each

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != self.n_inputs:
            self._name_error(inputs)
        feeds: dict[str, np.ndarray] = {}
        for name, dtype, shape, tail, spec in self.checks:
            try:
                value = inputs[name]
            except KeyError:
                self._name_error(inputs)
            if not isinstance(value, np.ndarray):
                raise BadRequest(f"input {name!r}: expected a numpy array, got {type(value).__name__}")
            if value.dtype is not dtype and value.dtype != dtype:
                raise BadRequest(f"input {name!r}: dtype {value.dtype} does not match the model's {spec.dtype}")
            vs = value.shape
            if vs != shape and not (
                    (vs and vs[1:] == tail) if tail is not None else (shape is None and spec.matches_shape(vs))):
                raise BadRequest(f"input {name!r}: shape {list(value.shape)} does not match the model's "
                                 f"{list(spec.shape)} (-1 is any size)")
            flags = value.flags
            if not (flags.c_contiguous and flags.aligned):
                value = value.copy(order="C")
            feeds[name] = value
        return feeds

    def _name_error(self, inputs: Mapping[str, Any]) -> NoReturn:
        want = [name for name, *_ in self.checks]
        unknown = sorted(str(k) for k in inputs if k not in want)
        missing = [n for n in want if n not in inputs]
        if unknown:
            raise BadRequest(f"unknown input(s) {unknown}; the model takes {want}")
        raise BadRequest(f"missing input(s) {missing}; the model takes {want}")

    def has_nonfinite(self, outputs: dict[str, np.ndarray]) -> bool:
        for name, summable in self.float_outputs:
            value = outputs[name]
            if summable and value.size <= _SMALL_FLOAT_OUTPUT:
                # float16/32 values summed as Python floats cannot overflow at this size; NaN or
                # inf - inf gives NaN. For a few elements this beats np.isfinite(...).all() 4x.
                if not math.isfinite(sum(value.ravel().tolist())):
                    return True
            elif not np.isfinite(value).all():
                return True
        return False


class _Slot:
    """One model name: its lock, its current activation and its statistics (across versions)."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.active: _Activation | None = None
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.calls = itertools.count()  # atomic: the hot path counts without the lock
        self.errors = self.rejected = self.nonfinite = 0
        self.latencies: deque[float] = deque(maxlen=self.window)  # append is atomic too


class ModelHost:
    """The models this process serves. Thread-safe; see the module docstring.

    ``latency_window`` is the number of recent latency samples kept per model for the percentiles.
    """

    def __init__(self, *, latency_window: int = 1024) -> None:
        if isinstance(latency_window, bool) or not isinstance(latency_window, int) or latency_window < 1:
            raise UsageError(f"latency_window must be a positive integer, got {latency_window!r}")
        self._window = latency_window
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()  # guards _slots (creation and removal of model names)
        self._open = 0  # sessions not yet closed (active + draining), guarded by _lock
        self._drained = threading.Condition(self._lock)

    # --- activation -------------------------------------------------------------------

    def activate(self, model: str, *, version: str, sha256: str, model_path: Path, runtime: Runtime,
                 manifest: Manifest, threads: int = 1, latency_budget_ms: float = 0.0,
                 labels: Sequence[str] | None = None, watching: bool = True) -> None:
        """Load ``model_path`` and make it what serves ``model`` (:meth:`info` then describes it).

        The new session is opened and checked against ``manifest`` before anything is
        swapped: on any error (:class:`~agent.errors.ModelError`) the old version keeps
        serving. ``labels`` default to the bundle's labels file next to the model file.
        The watch counters start from zero for the new activation; the model's
        statistics carry on. While ``watching`` (until :meth:`end_watch`) every call's outputs
        are checked for NaN/Inf; after it, one call in ``NONFINITE_SAMPLE``.
        """
        check_name(model)
        if manifest.name != model or manifest.version != version or manifest.runtime.name != runtime:
            raise UsageError(f"activate {model} {version} ({runtime}): the manifest is for {manifest.name} "
                             f"{manifest.version} ({manifest.runtime.name})")
        if (isinstance(latency_budget_ms, bool) or not isinstance(latency_budget_ms, (int, float))
                or not 0 <= latency_budget_ms < math.inf):
            raise UsageError(f"latency_budget_ms must be >= 0, got {latency_budget_ms!r}")
        session = open_session(runtime, Path(model_path), threads=threads)
        try:
            if labels is None and manifest.labels:
                candidate = Path(model_path).parent / manifest.labels
                labels = _read_labels(candidate) if candidate.is_file() else None
            info = ModelInfo(
                name=model, version=version, sha256=sha256, runtime=runtime, backend=session.backend,
                inputs=_narrow("input", manifest.inputs, session.inputs),
                outputs=_narrow("output", manifest.outputs, session.outputs),
                ready=True, activated_at=time.monotonic(),
                labels=None if labels is None else tuple(labels),
            )
            new = _Activation(session, info, float(latency_budget_ms), watching)
        except BaseException:
            session.close()
            raise
        with self._lock:
            slot = self._slots.get(model)
            if slot is None:
                slot = self._slots[model] = _Slot(model, self._window)
            self._open += 1
            with slot.lock:
                old, slot.active = slot.active, new
        log.info("activated %s %s (%s, %s)", model, version, sha256[:12], session.backend)
        if old is not None:
            self._retire(slot, old)

    def deactivate(self, model: str) -> None:
        """Stop serving ``model`` (its session closes when its in-flight requests end). Idempotent."""
        with self._lock:
            slot = self._slots.pop(model, None)
            if slot is None:
                log.debug("deactivate %s: not active", model)
                return
            with slot.lock:
                old, slot.active = slot.active, None
        log.info("deactivated %s", model)
        if old is not None:
            self._retire(slot, old)

    def close(self, timeout: float | None = None) -> bool:
        """Deactivate every model; wait up to ``timeout`` s for in-flight requests. True when all closed."""
        for model in self._names():
            self.deactivate(model)
        with self._lock:
            return self._drained.wait_for(lambda: self._open == 0, timeout)

    def _retire(self, slot: _Slot, act: _Activation) -> None:
        act.retired = True  # from here on no request starts on it (see _enter)
        if act.users:
            log.debug("%s %s retired with %d request(s) in flight: closing after them",
                      slot.name, act.info.version, len(act.users))
        self._close_if_idle(act)

    def _close_if_idle(self, act: _Activation) -> None:
        """Close a retired activation's session once no request holds it (exactly once)."""
        if act.users:
            return
        with self._lock:
            if act.closed:
                return
            act.closed = True
        act.session.close()
        with self._lock:
            self._open -= 1
            self._drained.notify_all()
        log.debug("closed the session of %s %s", act.info.name, act.info.version)

    def end_watch(self, model: str) -> None:
        """The release serving ``model`` left its watch window: sample the NaN/Inf check from now on."""
        act = self._active(model)
        if act is not None:
            act.watching = False

    # --- inference --------------------------------------------------------------------

    def infer(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (name -> array); return every output by name."""
        return self.call(model, inputs)[0]

    def call(self, model: str, inputs: Mapping[str, np.ndarray], *,
             version: str | None = None) -> tuple[dict[str, np.ndarray], ModelInfo]:
        """:meth:`infer`, also returning what ran; with ``version``, only that version may run.

        Raises :class:`UnknownModel`, :class:`BadRequest` or :class:`~agent.errors.ModelError`.
        """
        slot = self._slots.get(model)
        if slot is None:
            raise UnknownModel(f"model {model!r} is not active here")
        act = slot.active  # _enter, inlined for the common case
        if act is None or version is not None:
            act = self._enter(slot, model, version)
        else:
            act.users.append(None)
            if act.retired:
                act.users.pop()
                self._close_if_idle(act)
                act = self._enter(slot, model, version)
        try:
            start = _now()
            outputs: dict[str, np.ndarray] | None = None
            direct = act.direct
            if direct is not None and act.exact(inputs):
                try:
                    outputs = direct(inputs)  # type: ignore[assignment]
                except Exception:  # noqa: BLE001 - taken again the validated way below, which names it
                    outputs = None
            if outputs is None:
                outputs = self._validated_call(slot, act, model, inputs)
            elapsed = _now() - start
            slot.latencies.append(elapsed)
            n = next(slot.calls)
            if elapsed > act.budget_s:
                with slot.lock:
                    act.over_budget += 1
            if (act.watching or not n % NONFINITE_SAMPLE) and act.float_outputs and act.has_nonfinite(outputs):
                with slot.lock:
                    act.nonfinite += 1
                    slot.nonfinite += 1
            next(act.calls)  # last: a watch that sees this call counted sees its faults counted too
            return outputs, act.info
        finally:
            act.users.pop()
            if act.retired:
                self._close_if_idle(act)

    def _enter(self, slot: _Slot, model: str, version: str | None) -> _Activation:
        """The activation serving ``model``, held for one request (no lock: see _Activation.users).

        A request registers itself and only then checks that the activation is not retired; a
        swap marks it retired and only then looks for requests. So either the request sees the
        mark and moves to the new activation, or the swap sees the request and the session
        stays open until the request ends."""
        while True:
            act = slot.active
            if act is None or (version is not None and act.info.version != version):
                what = repr(model) if act is None else f"{model!r} version {version!r} (serving {act.info.version})"
                raise UnknownModel(f"model {what} is not active here")
            act.users.append(None)
            if not act.retired:
                return act
            act.users.pop()
            self._close_if_idle(act)

    def _validated_call(self, slot: _Slot, act: _Activation, model: str,
                        inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            feeds = act.prepare(inputs)
        except BadRequest:
            with slot.lock:
                slot.rejected += 1
            raise
        try:
            results = act.run(feeds)
            outputs = {}
            for name in act.output_names:
                value = results[name]
                outputs[name] = value if type(value) is np.ndarray else np.asarray(value)
            return outputs
        except Exception as exc:  # a foreign runtime error: wrap it, never leak its type
            with slot.lock:
                act.errors += 1
                slot.errors += 1
            next(slot.calls)
            next(act.calls)  # after the error, as in call()
            raise ModelError(f"{act.info.backend} failed to run {model} {act.info.version}: "
                             f"{_describe(exc)}") from exc

    # --- observation ------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """What serves now, by model name."""
        out = []
        for name in self._names():
            act = self._active(name)
            if act is not None:
                out.append(act.info)
        return out

    def info(self, model: str) -> ModelInfo:
        act = self._active(model)
        if act is None:
            raise UnknownModel(f"model {model!r} is not active here")
        return act.info

    def watch_counters(self, model: str) -> WatchCounters:
        """The counters of the activation serving ``model`` now."""
        slot = self._slot(model)
        with slot.lock:
            act = slot.active
            if act is None:
                raise UnknownModel(f"model {model!r} is not active here")
            return WatchCounters(activated_at=act.info.activated_at, version=act.info.version,
                                 sha256=act.info.sha256, inferences=_value(act.calls), errors=act.errors,
                                 nonfinite=act.nonfinite, over_budget=act.over_budget,
                                 latency_budget_ms=act.latency_budget_ms)

    def stats(self, model: str) -> ModelStats:
        slot = self._slot(model)
        with slot.lock:
            act = slot.active
            if act is None:
                raise UnknownModel(f"model {model!r} is not active here")
            samples = sorted(slot.latencies)
            stats = ModelStats(name=model, version=act.info.version, inferences=_value(slot.calls),
                               errors=slot.errors, rejected=slot.rejected, nonfinite=slot.nonfinite,
                               in_flight=len(act.users), window=len(samples), p50_ms=_percentile(samples, 50),
                               p95_ms=_percentile(samples, 95), p99_ms=_percentile(samples, 99))
        return stats

    def reset_stats(self, model: str | None = None) -> None:
        """Zero the statistics of ``model`` (of every model when None). Watch counters are kept."""
        if model is not None:
            slots = [self._slot(model)]
        else:
            with self._lock:
                slots = list(self._slots.values())
        for slot in slots:
            with slot.lock:
                slot.reset()

    def open_sessions(self) -> int:
        """Sessions not closed yet: one per active model plus the retired ones still draining."""
        with self._lock:
            return self._open

    def _names(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def _slot(self, model: str) -> _Slot:
        slot = self._slots.get(model)
        if slot is None:
            raise UnknownModel(f"model {model!r} is not active here")
        return slot

    def _active(self, model: str) -> _Activation | None:
        slot = self._slots.get(model)
        return None if slot is None else slot.active


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
