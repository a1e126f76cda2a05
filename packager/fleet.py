"""Fleet status: read what the devices report and summarize it.

The broker already holds the answer: every device's state and presence are retained,
so a new subscriber receives all of them at once. :func:`collect` subscribes, gathers
that flood until it goes quiet (``quiet`` seconds without a retained message, capped by
``wait``), optionally waits for a round of telemetry, and disconnects. The rest is pure:
:class:`FleetSnapshot` parses and keeps the latest document of each kind per device
(malformed ones are counted and skipped), :func:`summarize` filters by group and model
and computes the rows and the summary of :class:`FleetView`.

The subscription is QoS 0 on purpose: Mosquitto queues QoS 1 deliveries beyond its
in-flight window and drops past ``max_queued_messages`` (default 1000). Measured with the
default: a QoS 1 subscriber got 1064 of 4000 retained messages, a QoS 0 subscriber all 4000.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from agent import safejson
from agent.errors import JsonError, LinkError, ManifestError, UsageError
from agent.manifest import semver_key
from agent.mqtt import BrokerSettings, make_client
from agent.protocol import (
    PREFIX,
    PRESENCE_FILTER,
    PROTOCOL_VERSION,
    STATE_FILTER,
    TELEMETRY_FILTER,
    ProtocolError,
    check_device_id,
)

log = logging.getLogger(__name__)

MAX_DOC_BYTES = 64 * 1024
FAILURE_STATUSES = frozenset({"failed", "rolled_back"})
_TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


# --- documents (lenient about extra fields, strict about the ones used) --------


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    version: str | None
    status: str
    runtime: str | None = None
    previous: str | None = None
    staged: str | None = None
    last_error: str | None = None
    updated: str | None = None


@dataclass(frozen=True, kw_only=True)
class DeviceState:
    device: str
    agent_version: str
    groups: tuple[str, ...]
    ts: datetime
    models: dict[str, ModelInfo]


@dataclass(frozen=True, kw_only=True)
class Presence:
    device: str
    online: bool
    ts: datetime


@dataclass(frozen=True, kw_only=True)
class ModelCounters:
    version: str | None
    inferences: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, kw_only=True)
class Telemetry:
    device: str
    seq: int
    ts: datetime
    cpu_percent: float
    rss_bytes: int
    uptime_s: float
    disk_free_bytes: int
    dropped: int
    models: dict[str, ModelCounters]


def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], *, null: bool = False) -> Any:
    if key not in obj:
        raise ProtocolError(f"missing field {key!r}")
    v = obj[key]
    if v is None and null:
        return None
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(f"field {key!r} has type bool")
    if not isinstance(v, types):
        raise ProtocolError(f"field {key!r} has type {type(v).__name__}")
    return v


def _ts(obj: dict[str, Any]) -> datetime:
    text = _get(obj, "ts", str)
    if not _TS_RE.fullmatch(text):
        raise ProtocolError(f"ts {text[:40]!r} is not an RFC3339 time")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        raise ProtocolError(f"ts {text[:40]!r} is not an RFC3339 time") from None


def _doc(payload: bytes, device: str, what: str) -> dict[str, Any]:
    try:
        obj = safejson.loads(payload, max_bytes=MAX_DOC_BYTES, max_depth=6, what=what)
    except JsonError as e:
        raise ProtocolError(str(e)) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: unsupported version {obj.get('v')!r}")
    if obj.get("device") != device:
        raise ProtocolError(f"{what}: device {obj.get('device')!r} differs from its topic's {device!r}")
    return obj


def _table(obj: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = _get(obj, key, dict)
    if not all(isinstance(k, str) and isinstance(v, dict) for k, v in models.items()):
        raise ProtocolError(f"{key} must map names to objects")
    return models


def parse_state(payload: bytes, device: str) -> DeviceState:
    obj = _doc(payload, device, "state")
    groups = _get(obj, "groups", list)
    if not all(isinstance(g, str) for g in groups):
        raise ProtocolError("groups must be strings")
    models = {}
    for name, m in _table(obj, "models").items():
        status = _get(m, "status", str)
        if status not in ("none", "active", "watching", "rolled_back", "failed"):
            raise ProtocolError(f"model {name!r}: unknown status {status!r}")
        models[name] = ModelInfo(
            version=_get(m, "version", str, null=True), status=status,
            **{k: m[k] if isinstance(m.get(k), str) else None
               for k in ("runtime", "previous", "staged", "last_error", "updated")})
    return DeviceState(device=device, agent_version=_get(obj, "agent_version", str), groups=tuple(groups),
                       ts=_ts(obj), models=models)


def parse_presence(payload: bytes, device: str) -> Presence:
    obj = _doc(payload, device, "presence")
    return Presence(device=device, online=_get(obj, "online", bool), ts=_ts(obj))


def parse_telemetry(payload: bytes, device: str) -> Telemetry:
    obj = _doc(payload, device, "telemetry")
    num = (int, float)
    models = {
        name: ModelCounters(version=_get(m, "version", str, null=True), inferences=_get(m, "inferences", int),
                            errors=_get(m, "errors", int), p50_ms=_get(m, "p50_ms", num, null=True),
                            p95_ms=_get(m, "p95_ms", num, null=True), p99_ms=_get(m, "p99_ms", num, null=True))
        for name, m in _table(obj, "models").items()
    }
    return Telemetry(device=device, seq=_get(obj, "seq", int), ts=_ts(obj),
                     cpu_percent=float(_get(obj, "cpu_percent", num)),
                     rss_bytes=_get(obj, "rss_bytes", int), uptime_s=float(_get(obj, "uptime_s", num)),
                     disk_free_bytes=_get(obj, "disk_free_bytes", int), dropped=_get(obj, "dropped", int),
                     models=models)


# --- accumulating what arrives (pure) -------------------------------------------


@dataclass
class FleetSnapshot:
    """The latest state, presence and telemetry per device, from (topic, payload) pairs."""

    states: dict[str, DeviceState] = field(default_factory=dict)
    presences: dict[str, Presence] = field(default_factory=dict)
    telemetry: dict[str, Telemetry] = field(default_factory=dict)
    malformed: Counter[str] = field(default_factory=Counter)
    messages: int = 0

    def ingest(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns its kind, or None when it was skipped (malformed, cleared, foreign)."""
        self.messages += 1
        parts = topic.split("/")
        if len(parts) != 4 or "/".join(parts[:2]) != PREFIX or parts[2] not in ("state", "presence", "telemetry"):
            return None
        kind, device = parts[2], parts[3]
        if not payload:  # a retained message was cleared
            return None
        try:
            check_device_id(device)
            if kind == "state":
                self.states[device] = parse_state(payload, device)
            elif kind == "presence":
                self.presences[device] = parse_presence(payload, device)
            else:
                tel = parse_telemetry(payload, device)
                old = self.telemetry.get(device)
                if old is None or tel.seq > old.seq or tel.ts > old.ts:
                    self.telemetry[device] = tel
        except ProtocolError as e:
            self.malformed[kind] += 1
            log.debug("skipped a malformed %s message from %s: %s", kind, device, e)
            return None
        return kind


# --- the view (pure) ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Row:
    device: str
    model: str | None
    version: str | None
    status: str | None
    online: bool | None
    last_seen: datetime | None
    agent_version: str | None
    groups: tuple[str, ...]
    last_error: str | None = None
    inferences: int | None = None
    errors: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    dropped: int | None = None


@dataclass(frozen=True, kw_only=True)
class FleetView:
    rows: list[Row]
    devices: int
    online: int
    offline: int
    unknown: int
    versions: dict[str, dict[str, int]]
    """model -> version -> number of devices running it."""
    statuses: dict[str, dict[str, int]]
    failures: list[Row]
    """Rows whose model status is failed or rolled_back."""
    malformed: int = 0

    def to_dict(self) -> dict[str, Any]:
        def row(r: Row) -> dict[str, Any]:
            d = asdict(r)
            d["groups"] = list(r.groups)
            d["last_seen"] = None if r.last_seen is None else r.last_seen.strftime("%Y-%m-%dT%H:%M:%SZ")
            return d

        return {"devices": self.devices, "online": self.online, "offline": self.offline, "unknown": self.unknown,
                "versions": self.versions, "statuses": self.statuses, "malformed": self.malformed,
                "failures": [row(r) for r in self.failures], "rows": [row(r) for r in self.rows]}


def version_key(version: str | None) -> tuple[Any, ...]:
    """Sort key: semver precedence (agent.manifest.semver_key); a version a device reports that is
    not semver sorts after the valid ones, None last."""
    if version is None:
        return (2,)
    try:
        return (0, semver_key(version))
    except ManifestError:
        return (1, version)


def summarize(states: dict[str, DeviceState], presences: dict[str, Presence], telemetry: dict[str, Telemetry], *,
              group: str | None = None, model: str | None = None, malformed: int = 0) -> FleetView:
    """One row per (device, model); a device with no state (or no models) gets one row without a model.
    With ``group``, only devices whose state lists it; with ``model``, only that model's rows."""
    rows: list[Row] = []
    devices = sorted(set(states) | set(presences) | set(telemetry))
    counted: dict[str, bool | None] = {}
    versions: dict[str, Counter[str]] = {}
    statuses: dict[str, Counter[str]] = {}
    for dev in devices:
        st, pr, tel = states.get(dev), presences.get(dev), telemetry.get(dev)
        if group is not None and (st is None or group not in st.groups):
            continue
        models = st.models if st is not None else {}
        if model is not None and model not in models:
            continue
        seen = [doc.ts for doc in (st, pr, tel) if doc is not None]
        base: dict[str, Any] = {
            "device": dev, "online": pr.online if pr is not None else None, "last_seen": max(seen, default=None),
            "agent_version": st.agent_version if st else None, "groups": st.groups if st else (),
            "cpu_percent": tel.cpu_percent if tel else None, "rss_bytes": tel.rss_bytes if tel else None,
            "dropped": tel.dropped if tel else None,
        }
        counted[dev] = base["online"]
        names = [model] if model is not None else sorted(models)
        if not names:
            rows.append(Row(model=None, version=None, status=None, **base))
        for name in names:
            info = models[name]
            counters = tel.models.get(name) if tel else None
            if counters is not None and counters.version != info.version:
                counters = None  # telemetry from before the last switch
            rows.append(Row(model=name, version=info.version, status=info.status, last_error=info.last_error,
                            inferences=counters.inferences if counters else None,
                            errors=counters.errors if counters else None,
                            p50_ms=counters.p50_ms if counters else None,
                            p99_ms=counters.p99_ms if counters else None, **base))
            if info.version is not None:
                versions.setdefault(name, Counter())[info.version] += 1
            statuses.setdefault(name, Counter())[info.status] += 1
    online = sum(1 for v in counted.values() if v is True)
    offline = sum(1 for v in counted.values() if v is False)
    return FleetView(
        rows=rows, devices=len(counted), online=online, offline=offline, unknown=len(counted) - online - offline,
        versions={m: dict(sorted(c.items(), key=lambda kv: version_key(kv[0]), reverse=True))
                  for m, c in sorted(versions.items())},
        statuses={m: dict(sorted(c.items())) for m, c in sorted(statuses.items())},
        failures=[r for r in rows if r.status in FAILURE_STATUSES], malformed=malformed,
    )


# --- collecting from the broker (I/O) ------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CollectLimits:
    wait: float = 10.0
    """Longest time for the retained flood (seconds from the start)."""
    quiet: float = 0.3
    """The flood is over after this long without a retained message."""
    telemetry_wait: float = 0.0
    """Then wait up to this long (from subscribing) until every online device sent telemetry."""

    def __post_init__(self) -> None:
        if not (0 < self.quiet <= self.wait and self.telemetry_wait >= 0):
            raise UsageError("fleet: need 0 < quiet <= wait and telemetry_wait >= 0")


@dataclass(frozen=True, kw_only=True)
class Collected:
    snapshot: FleetSnapshot
    connect_s: float
    retained_s: float
    """From subscribing until the flood went quiet (the last ``quiet`` seconds included)."""
    total_s: float


async def collect(settings: BrokerSettings, limits: CollectLimits = CollectLimits()) -> Collected:
    """Subscribe as a fleet reader and gather the retained flood (and telemetry), then disconnect."""
    import aiomqtt

    snap = FleetSnapshot()
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    last_retained = start
    client = make_client(settings, identifier=f"edgeship-fleet-{secrets.token_hex(6)}",
                         protocol="3.1.1")

    async def read() -> None:
        nonlocal last_retained
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
            snap.ingest(str(msg.topic), bytes(payload))
            if msg.retain:
                last_retained = time.monotonic()

    async def until(done: Any, deadline: float) -> None:
        while not done() and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait({reader}, timeout=min(left, 0.05))
            if reader.done():
                reader.result()  # re-raises a lost connection
                raise LinkError("the broker closed the connection")

    try:
        async with client:
            connected = time.monotonic()
            reader = loop.create_task(read())
            try:
                await client.subscribe([(STATE_FILTER, 0), (PRESENCE_FILTER, 0), (TELEMETRY_FILTER, 0)])
                subscribed = last_retained = time.monotonic()
                await until(lambda: time.monotonic() - last_retained >= limits.quiet, start + limits.wait)
                retained = time.monotonic()
                log.debug("retained flood: %d messages in %.3f s", snap.messages, retained - subscribed)
                if limits.telemetry_wait > 0:
                    def all_reported() -> bool:
                        online = [d for d, p in snap.presences.items() if p.online]
                        return bool(online) and all(d in snap.telemetry for d in online)

                    await until(all_reported, subscribed + limits.telemetry_wait)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    except aiomqtt.MqttError as e:
        raise LinkError(f"broker {settings.url}: {e}") from None
    return Collected(snapshot=snap, connect_s=connected - start, retained_s=retained - subscribed,
                     total_s=time.monotonic() - start)


def view_of(got: Collected, *, group: str | None = None, model: str | None = None) -> FleetView:
    """:func:`summarize` of what :func:`collect` gathered."""
    snap = got.snapshot
    return summarize(snap.states, snap.presences, snap.telemetry, group=group, model=model,
                     malformed=sum(snap.malformed.values()))


def cell(value: Any, fmt: str = "{}") -> str:
    """A table cell: ``value`` formatted, or "-" when there is none."""
    return "-" if value is None else fmt.format(value)
