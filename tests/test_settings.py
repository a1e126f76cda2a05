"""The agent's TOML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import UsageError
from agent.settings import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent" / "agent.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


BASE = """
device_id = "dev-1"
state_dir = "state"
root = "root.json"
models = ["digits", "detector"]
[broker]
url = "mqtt://127.0.0.1:1883"
"""


def test_example_config_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device_id == "pi-kitchen-01" and cfg.broker.tls and cfg.broker.port == 8883
    assert cfg.limits.max_bundle_bytes == 512 * 1024 * 1024 and cfg.groups == ("canary",)


def test_relative_paths_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.state_dir == tmp_path / "state" and cfg.root == tmp_path / "root.json"
    assert cfg.models == ("digits", "detector") and not cfg.broker.tls


@pytest.mark.parametrize("text,match", [
    ("colour = 1\n" + BASE, "unknown key in the top level: colour"),
    (BASE + "colour = 1\n", r"unknown key in \[broker\]: colour"),
    (BASE + "[limits]\nrequest_timout = 3\n", r"unknown key in \[limits\]: request_timout"),
    (BASE + "[limits]\nrequest_timeout = -1\n", "positive"),
    (BASE.replace('"dev-1"', '"dev/1"'), "invalid device id"),
    (BASE.replace('"dev-1"', '"edgeship-server"'), "reserved"),
    (BASE.replace("mqtt://", "http://"), "mqtt:// or mqtts://"),
    (BASE + 'ca = "x"\n', "needs an mqtts://"),
    (BASE + 'password_env = "EDGESHIP_NOPE_UNSET"\n', "EDGESHIP_NOPE_UNSET"),
    (BASE.replace('models = ["digits", "detector"]', "models = []"), "at least one model"),
    ("device_id = [", "not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_password_never_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_T_PW", "hunter2")
    cfg = load_config(write(tmp_path, BASE + 'username = "u"\npassword_env = "EDGESHIP_T_PW"\n'))
    assert cfg.broker.password == "hunter2"
    assert "hunter2" not in repr(cfg)


def test_systemd_example_config_parses_and_unit_runs_the_agent() -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "systemd"
    cfg = load_config(root / "agent.toml")
    assert cfg.state_dir == Path("/var/lib/edgeship") and cfg.serve.host == "127.0.0.1"
    unit = (root / "edgeship-agent.service").read_text()
    assert "Restart=always" in unit and "StateDirectory=edgeship" in unit
    assert "edgeship-agent run --config /etc/edgeship/agent.toml" in unit
