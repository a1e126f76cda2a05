"""A new model that passes its self-test but emits NaN in service is rolled back; one whose self-test
fails is refused. Real processes: Mosquitto, `edgeship serve`, `edgeship-agent run`, HTTP inference."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from agent.fsutil import sha256_file
from packager.repo import publish
from tests.conftest import KeyPair, build, with_other_model
from tests.modelfactory import onnx_mlp, onnx_sqrt_model
from tests.mosquitto import Broker, broker_module, stop_process  # noqa: F401 - fixture
from tests.test_crash import AgentProcess
from tests.test_crash import wait_state as wait_mlp_state
from tests.updatechannel import make_repo, now


def wait_state(state: Path, pred: Any, timeout: float = 30) -> Any:
    return wait_mlp_state(state, pred, timeout, model="m")


def infer(url: str, x: np.ndarray) -> tuple[int, dict[str, Any]]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    conn.request("POST", "/v2/models/m/infer", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    return resp.status, doc


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, broker_module: Broker, release_key: KeyPair) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rollback")
    samples = root / "positive.npz"
    np.savez(samples, x=np.abs(np.random.default_rng(0).standard_normal((4, 4))).astype(np.float32))
    v1 = build(onnx_mlp(root / "mlp.onnx", in_features=4), release_key, root / "m-1.0.0.edge", name="m",
               version="1.0.0").path
    v2 = build(onnx_sqrt_model(root / "sqrt.onnx"), release_key, root / "m-1.1.0.edge", name="m",
               version="1.1.0", sample_inputs=samples).path
    # 1.2.0: validly signed, but the model inside is not the one its self-test was recorded with
    base = build(onnx_mlp(root / "mlp2.onnx", in_features=4, seed=1), release_key, root / "base.edge", name="m",
                 version="1.2.0").path
    v3 = with_other_model(base, onnx_mlp(root / "other.onnx", in_features=4, seed=7), release_key, root / "x",
                          root / "m-1.2.0.edge", subject="m")
    repo = make_repo(root / "repo", release_key.public, v1)
    server = subprocess.Popen([sys.executable, "-m", "packager.cli", "serve", "--repo", str(repo), "--broker",
                               broker_module.url], stderr=subprocess.DEVNULL)
    cfg = root / "dev" / "agent.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'device_id = "rb-1"\nstate_dir = "state"\nroot = "{repo}/metadata/1.root.json"\nmodels = ["m"]\n'
                   f'refresh_interval = 1\nreconnect_min = 0.1\nreconnect_max = 0.5\n'
                   f'[broker]\nurl = "{broker_module.url}"\n[serve]\nport = 0\n'
                   f'[watch]\ninferences = 20\nseconds = 60\n')
    agent = AgentProcess(cfg)
    try:
        yield {"repo": repo, "agent": agent, "url": agent.url(), "bundles": {"1.1.0": v2, "1.2.0": v3}}
    finally:
        agent.stop()
        stop_process(server)


def test_nan_in_the_watch_window_rolls_back_then_a_failed_selftest_is_refused(setup: dict[str, Any]) -> None:
    agent, url, repo = setup["agent"], setup["url"], setup["repo"]
    good = np.full((1, 4), 0.5, np.float32)
    st = wait_state(agent.state, lambda s: s.active is not None and s.active.version == "1.0.0")
    for _ in range(20):  # serve v1 through its watch window
        assert infer(url, good)[0] == 200
    wait_state(agent.state, lambda s: s.status == "active")

    publish(repo, setup["bundles"]["1.1.0"], now=now())  # passes its self-test (positive inputs)
    st = wait_state(agent.state, lambda s: s.watch is not None and s.active.version == "1.1.0")
    v2_sha = st.active.sha256
    deadline = time.monotonic() + 10
    status, doc = infer(url, good)
    while doc.get("model_version") != "1.1.0" and time.monotonic() < deadline:  # the host loads it after the switch
        status, doc = infer(url, good)
    assert status == 200 and np.isfinite(doc["outputs"][0]["data"]).all()
    status, doc = infer(url, -good)  # in service: NaN
    assert status == 200 and np.isnan(np.asarray(doc["outputs"][0]["data"], dtype=float)).all()
    st = wait_state(agent.state, lambda s: s.status == "rolled_back")
    assert st.active.version == "1.0.0" and v2_sha in st.refused and "NaN" in st.refused[v2_sha]
    # The state file is written first (a power cut now must come back on 1.0.0), then the host
    # loads 1.0.0: a request in between is still answered, by 1.1.0.
    deadline = time.monotonic() + 10
    status, doc = infer(url, good)
    while doc.get("model_version") != "1.0.0" and time.monotonic() < deadline:
        assert status == 200
        status, doc = infer(url, good)
    assert status == 200 and doc["model_version"] == "1.0.0" and doc["outputs"][0]["name"] == "probs"

    publish(repo, setup["bundles"]["1.2.0"], now=now())  # its self-test fails on the real runtime
    v3_sha = sha256_file(setup["bundles"]["1.2.0"])[1]
    st = wait_state(agent.state, lambda s: v3_sha in s.refused)
    assert "SelfTestFailed" in st.refused[v3_sha] and st.status == "failed"
    assert st.active.version == "1.0.0"
    status, doc = infer(url, good)
    assert status == 200 and doc["model_version"] == "1.0.0"
    # neither failed release is fetched again: the device stays on 1.0.0
    assert sorted(p.name for p in (agent.state / "releases").iterdir()) == [st.active.sha256]
