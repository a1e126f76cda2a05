"""The agent's configuration file (TOML), parsed into one frozen :class:`AgentConfig`.

Example (see examples/agent/agent.toml)::

    device_id = "pi-kitchen-01"
    state_dir = "/var/lib/edgeship"
    root = "/etc/edgeship/root.json"     # the device trust anchor from `edgeship repo init`
    models = ["digits"]
    groups = ["canary"]
    refresh_interval = 300

    [broker]
    url = "mqtts://broker.example:8883"
    ca = "ca.crt"
    cert = "pi-kitchen-01.crt"
    key = "pi-kitchen-01.key"
    # username = "..."; password_env = "EDGESHIP_MQTT_PASSWORD"

    [device]
    arch = "auto"
    accelerators = []

    [limits]
    request_timeout = 20
    download_deadline = 3600

Relative paths are relative to the file. Unknown keys are errors (a typo must
not silently fall back to a default).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from agent.cliutil import password_from_env
from agent.config import InstallConfig, ServeConfig, UpdateLimits, WatchConfig
from agent.errors import UsageError
from agent.manifest import check_name
from agent.mqtt import BrokerSettings, parse_broker_url
from agent.protocol import ProtocolError, check_device_id
from agent.telemetry import TelemetryConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    device_id: str
    broker: BrokerSettings
    root: Path
    state_dir: Path
    models: tuple[str, ...]
    groups: tuple[str, ...] = ()
    machine: str = platform.machine()
    accelerators: frozenset[str] = frozenset()
    refresh_interval: float = 300.0
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0
    protocol: str = "3.1.1"
    limits: UpdateLimits = UpdateLimits()
    watch: WatchConfig = WatchConfig()
    install: InstallConfig = InstallConfig()
    serve: ServeConfig = ServeConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    def __post_init__(self) -> None:
        try:
            check_device_id(self.device_id)
        except ProtocolError as e:
            raise UsageError(str(e)) from None
        if not self.models:
            raise UsageError("config: 'models' must name at least one model")
        for m in self.models:
            check_name(m)
        if self.refresh_interval <= 0 or not 0 < self.reconnect_min <= self.reconnect_max:
            raise UsageError("config: refresh_interval and reconnect delays must be positive")
        if self.protocol not in ("5", "3.1.1"):
            raise UsageError("config: protocol must be \"5\" or \"3.1.1\"")


_TOP = {"device_id", "state_dir", "root", "models", "groups", "refresh_interval", "reconnect_min", "reconnect_max",
        "protocol", "broker", "device", "limits", "watch", "install", "serve", "telemetry"}
_BROKER = {"url", "ca", "cert", "key", "username", "password_env", "keepalive"}
_DEVICE = {"arch", "accelerators"}


def _unknown(section: str, got: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise UsageError(f"config: unknown key{'s' if len(extra) > 1 else ''} in {section}: {', '.join(extra)}")


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"config: {what} must be a list of strings")
    return tuple(value)


T = TypeVar("T")


def _section(raw: dict[str, Any], name: str, cls: type[T]) -> T:
    """A [name] table -> the frozen dataclass ``cls``; unknown keys and bad values are UsageErrors."""
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise UsageError(f"config: [{name}] must be a table")
    _unknown(f"[{name}]", table, {f.name for f in fields(cls)})  # type: ignore[arg-type]
    try:
        return cls(**table)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config: [{name}]: {e}") from None


def load_config(path: Path) -> AgentConfig:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config {path} is not valid TOML: {e}") from None
    return parse_config(raw, base=path.parent)


def parse_config(raw: dict[str, Any], *, base: Path) -> AgentConfig:
    _unknown("the top level", raw, _TOP)
    for key in ("device_id", "state_dir", "root", "models", "broker"):
        if key not in raw:
            raise UsageError(f"config: missing required key {key!r}")

    def path(v: Any, what: str) -> Path:
        if not isinstance(v, str) or not v:
            raise UsageError(f"config: {what} must be a path")
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else base / p

    b = raw["broker"]
    if not isinstance(b, dict):
        raise UsageError("config: [broker] must be a table")
    _unknown("[broker]", b, _BROKER)
    password = password_from_env(str(b["password_env"]), option="config broker.password_env") if "password_env" in b else None
    broker = parse_broker_url(
        str(b.get("url", "")),
        ca=path(b["ca"], "broker.ca") if "ca" in b else None,
        cert=path(b["cert"], "broker.cert") if "cert" in b else None,
        key=path(b["key"], "broker.key") if "key" in b else None,
        username=b.get("username"), password=password, keepalive=b.get("keepalive"),
    )
    d = raw.get("device", {})
    _unknown("[device]", d, _DEVICE)
    arch = d.get("arch", "auto")
    limits = _section(raw, "limits", UpdateLimits)
    watch = _section(raw, "watch", WatchConfig)
    install = _section(raw, "install", InstallConfig)
    serve = _section(raw, "serve", ServeConfig)
    telemetry = _section(raw, "telemetry", TelemetryConfig)
    if serve.unix_socket:
        serve = ServeConfig(**{**serve.__dict__, "unix_socket": str(path(serve.unix_socket, "serve.unix_socket"))})
    extra: dict[str, Any] = {k: float(raw[k]) for k in ("refresh_interval", "reconnect_min", "reconnect_max")
                             if k in raw}
    return AgentConfig(
        device_id=str(raw["device_id"]), broker=broker, root=path(raw["root"], "root"),
        state_dir=path(raw["state_dir"], "state_dir"), models=_strings(raw["models"], "models"),
        groups=_strings(raw.get("groups", []), "groups"),
        machine=platform.machine() if arch == "auto" else str(arch),
        accelerators=frozenset(_strings(d.get("accelerators", []), "device.accelerators")),
        protocol=str(raw.get("protocol", "3.1.1")), limits=limits, watch=watch, install=install, serve=serve,
        telemetry=telemetry, **extra,
    )
