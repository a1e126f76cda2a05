"""What a device tells the fleet: state, presence, telemetry and events (format v1).

Documents (docs/protocol.md; the device id in a payload always equals the one in its topic)::

    edgeship/v1/state/<device>      retained  state_doc(): agent, groups, runtimes, every model's status
    edgeship/v1/presence/<device>   retained  presence_doc(True) on connect; the last will is
                                              presence_doc(False, ts=<connect time>)
    edgeship/v1/telemetry/<device>            telemetry_doc(): process figures, per-model counters
    edgeship/v1/events/<device>               event_doc(): one update step

The builders are pure and return the JSON-ready dict; :func:`encode` makes the
payload. :class:`Reporter` numbers telemetry and events with one sequence (the
outbox record id, so ``seq`` keeps growing across restarts) and queues them in the
:class:`~agent.outbox.Outbox`; state and presence are retained "latest wins" and
are published directly (republish them on every connect). :func:`drain` and
:func:`publish_loop` publish the outbox in order over QoS 1, removing each record once
the broker acknowledged it.

Standard library only: the sampler reads ``os.times()`` for CPU, ``/proc/self/status``
for RSS (peak RSS from ``resource`` where there is no /proc), ``os.statvfs`` for disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from agent.aio import wait_event
from agent.config import MiB
from agent.errors import LinkError, UsageError
from agent.outbox import Outbox
from agent.protocol import PROTOCOL_VERSION, check_device_id, events_topic, telemetry_topic
from agent.store import Status as ModelStatus

log = logging.getLogger(__name__)


MODEL_STATUSES: tuple[ModelStatus, ...] = ("none", "active", "watching", "rolled_back", "failed")
Step = Literal["refreshed", "downloading", "downloaded", "staged", "installing", "installed", "watching",
               "committed", "rolled_back", "refused", "error"]
STEPS: tuple[Step, ...] = ("refreshed", "downloading", "downloaded", "staged", "installing", "installed",
                           "watching", "committed", "rolled_back", "refused", "error")
MAX_DETAIL = 500


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    interval: float = 30.0
    """Seconds between telemetry documents."""
    buffer_bytes: int = 1 * MiB
    """Bound of the on-disk outbox; the oldest telemetry/events are dropped past it."""
    sync_interval: float = 5.0
    """Longest time an appended record waits for fsync (a power cut can lose that much)."""
    batch: int = 64
    """Publishes in flight while draining the outbox."""

    def __post_init__(self) -> None:
        if not 0 < self.interval <= 86400:
            raise UsageError(f"telemetry interval must be in (0, 86400] seconds, got {self.interval}")
        if not 4096 <= self.buffer_bytes <= 1 << 32:
            raise UsageError(f"telemetry buffer_bytes must be in [4096, 4 GiB], got {self.buffer_bytes}")
        if self.sync_interval < 0 or not 1 <= self.batch <= 1024:
            raise UsageError("telemetry sync_interval must be >= 0 and batch in [1, 1024]")


def rfc3339(t: float | None = None) -> str:
    """UTC, whole seconds: ``2026-11-27T21:00:00Z`` (``t`` in seconds since the epoch; default now)."""
    when = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return when.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode(doc: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON payload (no NaN or Infinity)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


# --- documents --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelReport:
    """One model in the state document."""

    version: str | None = None
    sha256: str | None = None
    runtime: str | None = None
    status: ModelStatus = "none"
    previous: str | None = None
    """The version kept for rollback."""
    staged: str | None = None
    """A verified version waiting to be installed."""
    last_error: str | None = None
    updated: str | None = None
    """RFC3339 time of the last status change."""

    def __post_init__(self) -> None:
        if self.status not in MODEL_STATUSES:
            raise ValueError(f"unknown model status {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "runtime": self.runtime, "status": self.status,
                "previous": self.previous, "staged": self.staged,
                "last_error": None if self.last_error is None else self.last_error[:MAX_DETAIL],
                "updated": self.updated}


@dataclass(frozen=True, kw_only=True)
class ModelStats:
    """One model in the telemetry document: counters since the agent started, latency of recent calls."""

    version: str | None
    inferences: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(float(v), 3)

        return {"version": self.version, "inferences": int(self.inferences), "errors": int(self.errors),
                "p50_ms": ms(self.p50_ms), "p95_ms": ms(self.p95_ms), "p99_ms": ms(self.p99_ms)}


def state_doc(*, device: str, agent_version: str, groups: Sequence[str], runtimes: Mapping[str, str | None],
              models: Mapping[str, ModelReport], ts: str | None = None) -> dict[str, Any]:
    """The retained state; ``runtimes`` maps a runtime name to its version (None: not installed, left out)."""
    return {"v": PROTOCOL_VERSION, "device": check_device_id(device), "agent_version": agent_version,
            "groups": list(groups), "runtimes": {k: v for k, v in sorted(runtimes.items()) if v is not None},
            "ts": ts or rfc3339(), "models": {name: models[name].to_dict() for name in sorted(models)}}


def presence_doc(online: bool, *, device: str, ts: str | None = None) -> dict[str, Any]:
    """``online=True`` on connect; ``online=False`` with ``ts`` = the connect time is the last will."""
    return {"v": PROTOCOL_VERSION, "device": check_device_id(device), "online": bool(online), "ts": ts or rfc3339()}


@dataclass(frozen=True, kw_only=True)
class ProcessSample:
    uptime_s: float
    cpu_percent: float
    rss_bytes: int
    disk_free_bytes: int


def telemetry_doc(*, device: str, seq: int, sample: ProcessSample, dropped: int, models: Mapping[str, ModelStats],
                  ts: str | None = None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "device": check_device_id(device), "seq": seq, "ts": ts or rfc3339(),
            "uptime_s": round(sample.uptime_s, 1), "cpu_percent": round(sample.cpu_percent, 1),
            "rss_bytes": sample.rss_bytes, "disk_free_bytes": sample.disk_free_bytes, "dropped": dropped,
            "models": {name: models[name].to_dict() for name in sorted(models)}}


def event_doc(*, device: str, seq: int, model: str, version: str | None, step: Step, detail: str = "",
              ts: str | None = None) -> dict[str, Any]:
    if step not in STEPS:
        raise ValueError(f"unknown event step {step!r}")
    return {"v": PROTOCOL_VERSION, "device": check_device_id(device), "seq": seq, "ts": ts or rfc3339(),
            "model": model, "version": version, "step": step, "detail": detail[:MAX_DETAIL]}


# --- process figures ------------------------------------------------------------


class ProcessSampler:
    """CPU since the previous sample, RSS, free disk under ``state_dir``, uptime since creation."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = Path(state_dir)
        self._clock = clock
        self._started = clock()
        self._last_wall = self._started
        self._last_cpu = _cpu_seconds()

    def uptime_s(self) -> float:
        return self._clock() - self._started

    def cpu_percent(self) -> float:
        """Process CPU time over wall time since the previous call, in percent of one core
        (a busy process on two cores reads 200)."""
        wall, cpu = self._clock(), _cpu_seconds()
        dw, dc = wall - self._last_wall, cpu - self._last_cpu
        self._last_wall, self._last_cpu = wall, cpu
        return 0.0 if dw <= 0 else max(0.0, 100.0 * dc / dw)

    def rss_bytes(self) -> int:
        try:
            with open("/proc/self/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmRSS:"):
                        return int(line.split()[1]) * 1024  # "VmRSS:  41000 kB"
        except (OSError, ValueError, IndexError):
            pass
        try:
            import resource
        except ImportError:  # pragma: no cover - not POSIX
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the peak instead
        return int(peak if os.uname().sysname == "Darwin" else peak * 1024)

    def disk_free_bytes(self) -> int:
        try:
            st = os.statvfs(self.state_dir)
        except OSError as e:
            log.debug("statvfs %s failed: %s", self.state_dir, e)
            return 0
        return st.f_bavail * st.f_frsize

    def sample(self) -> ProcessSample:
        return ProcessSample(uptime_s=self.uptime_s(), cpu_percent=self.cpu_percent(),
                             rss_bytes=self.rss_bytes(), disk_free_bytes=self.disk_free_bytes())


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# --- the device side ------------------------------------------------------------


class Reporter:
    """Numbers and queues telemetry and events for one device; sets ``wake`` after each append so
    that :func:`agent.outbox.publish_loop` drains the outbox."""

    def __init__(self, *, device: str, outbox: Outbox, sampler: ProcessSampler) -> None:
        self.device = check_device_id(device)
        self.outbox = outbox
        self.sampler = sampler
        self.wake = asyncio.Event()
        self._telemetry_topic = telemetry_topic(device)
        self._events_topic = events_topic(device)

    def _append(self, topic: str, doc: dict[str, Any]) -> int:
        seq = self.outbox.append(topic, encode(doc))
        assert seq == doc["seq"], "the outbox numbers records; seq must be its next id"
        self.wake.set()
        return seq

    def event(self, *, model: str, version: str | None, step: Step, detail: str = "") -> int:
        """Queue one update step; returns its seq."""
        doc = event_doc(device=self.device, seq=self.outbox.next_id, model=model, version=version, step=step,
                        detail=detail)
        return self._append(self._events_topic, doc)

    def telemetry(self, models: Mapping[str, ModelStats]) -> int:
        """Sample the process and queue one telemetry document; returns its seq."""
        doc = telemetry_doc(device=self.device, seq=self.outbox.next_id, sample=self.sampler.sample(),
                            dropped=self.outbox.dropped, models=models)
        return self._append(self._telemetry_topic, doc)

    async def run(self, models: Callable[[], Mapping[str, ModelStats]], interval: float,
                  stop: asyncio.Event) -> None:
        """Queue telemetry every ``interval`` seconds until ``stop`` (online or not), then fsync the outbox."""
        try:
            while not stop.is_set():
                if not await wait_event(stop, interval):
                    self.telemetry(models())
                    self.outbox.sync()
        finally:
            self.outbox.sync()


# --- publishing the outbox -----------------------------------------------------------

Publish = Callable[[str, bytes], Awaitable[None]]
LINK_ERRORS: tuple[type[BaseException], ...] = (LinkError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, kw_only=True)
class DrainResult:
    sent: int
    pending: int
    error: BaseException | None = None
    """The link error that stopped the drain, or None when the outbox was emptied."""


async def drain(outbox: Outbox, publish: Publish, *, batch: int = 64,
                link_errors: tuple[type[BaseException], ...] = LINK_ERRORS) -> DrainResult:
    """Publish the pending records in order, up to ``batch`` in flight, acking each after its
    publish completed. A publish raising one of ``link_errors`` stops the drain and leaves
    that record and the rest queued (a later record may already have gone out: it is sent
    again later, so a reader may see it twice). Other exceptions propagate."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    sent = 0
    while True:
        records = outbox.peek(batch)
        if not records:
            return DrainResult(sent=sent, pending=0)
        # Tasks start in creation order, so the publishes reach the client (and the wire) in order.
        tasks = [asyncio.ensure_future(publish(r.topic, r.payload)) for r in records]
        error: BaseException | None = None
        try:
            for rec, task in zip(records, tasks, strict=True):
                try:
                    await task
                except link_errors as e:
                    error = e
                    break
                outbox.ack([rec.id])
                sent += 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        outbox.flush()
        if error is not None:
            log.info("outbox: publish failed after %d record(s), %d left: %s", sent, outbox.pending, error)
            return DrainResult(sent=sent, pending=outbox.pending, error=error)


async def publish_loop(outbox: Outbox, publish: Publish, wake: asyncio.Event, *, batch: int = 64,
                       link_errors: tuple[type[BaseException], ...] = LINK_ERRORS) -> None:
    """Drain now and whenever ``wake`` is set, for one connection's lifetime. Raises
    :class:`LinkError` when a publish fails (the connection is gone: reconnect, run again)."""
    while True:
        wake.clear()
        result = await drain(outbox, publish, batch=batch, link_errors=link_errors)
        if result.error is not None:
            raise LinkError(f"publishing the outbox: {result.error}") from result.error
        await wake.wait()
