"""Power cuts and misbehaving models, with real processes: Mosquitto, `edgeship serve`, `edgeship-agent run`.

The agent is SIGKILLed at each step of an update (``EDGESHIP_FAILPOINTS``
makes it kill itself exactly there), then restarted: every time it must serve
a whole, verified model (the old one or the new one, answering exactly as that
model does) through its inference API, and then finish the update.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from agent.runtime import open_session
from agent.store import Store
from packager.repo import publish
from tests.conftest import KeyPair, build
from tests.modelfactory import onnx_mlp
from tests.mosquitto import Broker, broker_module, stop_process  # noqa: F401 - fixture
from tests.updatechannel import make_repo, now

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)
POINTS = ["download.block", "verify.done", "stage.moved", "install.extracted", "switch.before", "switch.after",
          "watch.commit"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, broker_module: Broker, release_key: KeyPair) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("crash")
    models = {v: onnx_mlp(root / f"m{v}.onnx", seed=s, hidden=512) for v, s in (("1.0.0", 0), ("1.1.0", 1))}
    bundles = {v: build(m, release_key, root / f"mlp-{v}.edge", version=v).path for v, m in models.items()}
    expected = {}
    for v, m in models.items():
        with open_session("onnx", m) as s:
            expected[v] = s.run({"x": X})["probs"]
    assert not np.allclose(expected["1.0.0"], expected["1.1.0"])
    repo = make_repo(root / "repo", release_key.public, bundles["1.0.0"])
    server = subprocess.Popen([sys.executable, "-m", "packager.cli", "serve", "--repo", str(repo), "--broker",
                               broker_module.url], stderr=subprocess.DEVNULL)
    try:
        yield {"root": root, "repo": repo, "bundles": bundles, "expected": expected, "broker": broker_module}
    finally:
        stop_process(server)


def write_config(dest: Path, world: dict[str, Any], **watch: Any) -> Path:
    w = {"inferences": 3, "seconds": 1.0, **watch}
    text = (f'device_id = "crash-{dest.name}"\nstate_dir = "state"\nroot = "{world["repo"]}/metadata/1.root.json"\n'
            f'models = ["mlp"]\nrefresh_interval = 2\nreconnect_min = 0.1\nreconnect_max = 0.5\n'
            f'[broker]\nurl = "{world["broker"].url}"\n[serve]\nport = 0\n'
            f'[watch]\ninferences = {w["inferences"]}\nseconds = {w["seconds"]}\n'
            f'[limits]\nrequest_timeout = 2\n')
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "agent.toml").write_text(text)
    return dest / "agent.toml"


class AgentProcess:
    def __init__(self, config: Path, *, failpoints: str = "", fsize: int | None = None) -> None:
        env = {**os.environ, "EDGESHIP_FAILPOINTS": failpoints}

        def limits() -> None:
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.state = config.parent / "state"
        (self.state / "serve.json").unlink(missing_ok=True)
        self.log = open(config.parent / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                     env=env, stdout=self.log, stderr=self.log, preexec_fn=limits)

    def wait_dead(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def url(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent exited with {self.proc.returncode}"
            try:
                return str(json.loads((self.state / "serve.json").read_text())["url"])
            except (OSError, ValueError):
                time.sleep(0.05)
        raise AssertionError("the agent did not start its inference API")


def infer(url: str) -> tuple[int, Any]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": X.ravel().tolist()}]})
    conn.request("POST", "/v2/models/mlp/infer", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    return resp.status, doc


def served_version(url: str, world: dict[str, Any]) -> str:
    """Which whole model answers: its outputs must equal one version's exactly (to float tolerance)."""
    status, doc = infer(url)
    assert status == 200, doc
    out = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(world["expected"]["1.0.0"].shape)
    matches = [v for v, e in world["expected"].items() if np.allclose(out, e, rtol=1e-5, atol=1e-6)]
    assert len(matches) == 1, f"outputs match no whole model: {out}"
    return matches[0]


def wait_state(state: Path, pred: Any, timeout: float = 30, model: str = "mlp") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = Store(state).load(model)
        if pred(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"state never reached the expected condition; last: {Store(state).load(model)}")


@pytest.fixture(scope="module")
def v1_device(world: dict[str, Any]) -> Path:
    """A device state with 1.0.0 installed and committed (copied for each crash case)."""
    cfg = write_config(world["root"] / "baseline", world)
    agent = AgentProcess(cfg)
    try:
        url = agent.url()
        wait_state(agent.state, lambda st: st.active is not None and st.active.version == "1.0.0")
        for _ in range(3):
            assert served_version(url, world) == "1.0.0"
        wait_state(agent.state, lambda st: st.status == "active")
    finally:
        agent.stop()
    publish(world["repo"], world["bundles"]["1.1.0"], now=now())
    return cfg.parent / "state"


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_step_then_restart_serves_a_whole_model(world: dict[str, Any], v1_device: Path,
                                                              point: str) -> None:
    case = world["root"] / f"case-{point}"
    cfg = write_config(case, world)
    shutil.copytree(v1_device, case / "state")
    (case / "state" / "serve.json").unlink(missing_ok=True)
    if point == "watch.commit":  # the commit happens after inferences: send some while it watches
        agent = AgentProcess(cfg, failpoints=point)
        url = agent.url()
        wait_state(agent.state, lambda st: st.watch is not None)
        for _ in range(5):
            try:
                infer(url)
            except OSError:
                break
    else:
        agent = AgentProcess(cfg, failpoints=point)
    assert agent.wait_dead() == -signal.SIGKILL, f"the agent did not reach {point}"
    agent.stop()

    again = AgentProcess(cfg)
    try:
        url = again.url()
        first = served_version(url, world)  # at once, a whole model: the old or the new one
        assert first in ("1.0.0", "1.1.0")
        st = wait_state(again.state, lambda s: s.active is not None and s.active.version == "1.1.0")
        deadline = time.monotonic() + 20  # the state file switches first, then the host loads the model
        while served_version(url, world) != "1.1.0":
            assert time.monotonic() < deadline, "the new model never served"
            time.sleep(0.05)
        for _ in range(4):
            assert served_version(url, world) == "1.1.0"
        st = wait_state(again.state, lambda s: s.status == "active")
        assert st.previous is not None and st.previous.version == "1.0.0"
        releases = sorted(p.name for p in (again.state / "releases").iterdir())
        assert releases == sorted([st.active.sha256, st.previous.sha256])  # no leftovers
    finally:
        again.stop()


def test_disk_full_while_installing_keeps_the_old_model(world: dict[str, Any], v1_device: Path) -> None:
    case = world["root"] / "case-diskfull"
    cfg = write_config(case, world)
    shutil.copytree(v1_device, case / "state")
    # Stage 1.1.0 (killed right after extracting it, before the switch), then restart with a file-size limit
    # below the model file: extraction fails as it would on a full disk.
    first = AgentProcess(cfg, failpoints="install.extracted")
    assert first.wait_dead() == -signal.SIGKILL
    first.stop()
    model_size = (world["root"] / "m1.1.0.onnx").stat().st_size
    limited = AgentProcess(cfg, fsize=model_size // 2)
    try:
        url = limited.url()
        st = wait_state(limited.state, lambda s: s.last_error is not None and "disk is full" in s.last_error)
        assert st.active.version == "1.0.0" and st.staged is not None and st.staged.version == "1.1.0"  # type: ignore[union-attr]
        assert served_version(url, world) == "1.0.0"
        assert not [p for p in (limited.state / "releases").iterdir() if p.name.startswith(".")]
    finally:
        limited.stop()
