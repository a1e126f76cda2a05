"""The demo's devices: their agent configuration, their state as their own files say it, and
predictions sent through their inference API.

A device's claims are checked the way an operator would check them: the state file the agent
writes atomically (``STATE/models/<model>.json``, read without side effects), the
``edgeship-agent status --json`` command, and answers from its HTTP inference API compared with
the labels of the committed evaluation set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import safejson
from agent.errors import EdgeshipError
from agent.store import ModelState
from agent.serve import ADDRESS_FILE, Client

MODEL = "digits"


@dataclass(frozen=True, kw_only=True)
class AgentTuning:
    """The agent settings that make the demo quick (each is an ordinary agent.toml key)."""

    refresh_interval: float = 5.0
    watch_inferences: int = 5
    watch_seconds: float = 2.0
    telemetry_interval: float = 1.0
    request_timeout: float = 2.0


@dataclass(frozen=True, kw_only=True)
class Device:
    device_id: str
    home: Path
    """Holds agent.toml and state/."""

    @property
    def config(self) -> Path:
        return self.home / "agent.toml"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    def write_config(self, *, broker_url: str, root: Path, groups: list[str], tuning: AgentTuning,
                     username: str | None = None, password_env: str | None = None) -> Path:
        """An ordinary agent.toml (see examples/agent/agent.toml), with short intervals."""
        self.home.mkdir(parents=True, exist_ok=True)
        text = "\n".join([
            "# written by `edgeship demo`",
            f"device_id = {json.dumps(self.device_id)}",
            'state_dir = "state"',
            f"root = {json.dumps(str(root))}",
            f"models = [{json.dumps(MODEL)}]",
            f"groups = {json.dumps(groups)}",
            f"refresh_interval = {tuning.refresh_interval}",
            "reconnect_min = 0.2",
            "reconnect_max = 2.0",
            "",
            "[broker]",
            f"url = {json.dumps(broker_url)}",
            *([f"username = {json.dumps(username)}"] if username is not None else []),
            *([f"password_env = {json.dumps(password_env)}"] if password_env is not None else []),
            "",
            "[serve]",
            'host = "127.0.0.1"',
            "port = 0",
            "",
            "[watch]",
            f"inferences = {tuning.watch_inferences}",
            f"seconds = {tuning.watch_seconds}",
            "",
            "[telemetry]",
            f"interval = {tuning.telemetry_interval}",
            "",
            "[limits]",
            f"request_timeout = {tuning.request_timeout}",
            "",
        ])
        self.config.write_text(text, encoding="utf-8")
        return self.config

    def api_url(self) -> str | None:
        """The inference API's address from ``STATE/serve.json``, once the agent serves."""
        try:
            return str(json.loads((self.state_dir / ADDRESS_FILE).read_text(encoding="utf-8"))["url"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def model_state(self) -> ModelState | None:
        """The model's state file as the agent last wrote it (None before the first write)."""
        path = self.state_dir / "models" / f"{MODEL}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return ModelState.from_dict(safejson.loads(data, max_bytes=1 << 20, max_depth=8))

    def phase(self, st: ModelState | None) -> str:
        """One short word or two for the progress line: what the device is doing now, given its
        :meth:`model_state`."""
        downloading = any((self.state_dir / "downloads").glob("*.part"))
        if st is None or (st.active is None and st.staged is None):
            return "downloading" if downloading else "waiting"
        if st.watch is not None and st.active is not None:
            return f"{st.active.version} watching"
        if st.staged is not None:
            return f"{st.staged.version} staged"
        if downloading:
            return f"{st.active.version if st.active else '-'} active, downloading"
        return f"{st.active.version if st.active else '-'} {st.status}"


def agent_status(devices: list[Device], *, timeout: float,
                 env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``edgeship-agent status --config ... --json`` for every device (run in parallel; ``env`` is added to
    the environment, for a broker password the configuration names)."""
    procs = {d.device_id: subprocess.Popen([sys.executable, "-m", "agent.cli", "status", "--config", str(d.config),
                                            "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           env={**os.environ, **(env or {})})
             for d in devices}
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        for dev, p in procs.items():
            stdout, stderr = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            if p.returncode != 0:
                raise EdgeshipError(f"`edgeship-agent status` for {dev} exited {p.returncode}: "
                                    f"{stderr.decode(errors='replace').strip()[-300:]}")
            out[dev] = json.loads(stdout)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@dataclass(frozen=True, kw_only=True)
class Predictions:
    device: str
    versions: tuple[str, ...]
    """Model versions that answered (the reply's model_version)."""
    samples: int
    correct: int
    p50_ms: float
    max_ms: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "correct": self.correct, "accuracy": round(self.accuracy, 4),
                "versions": list(self.versions), "p50_ms": round(self.p50_ms, 3), "max_ms": round(self.max_ms, 3)}


def predict(device: Device, x: np.ndarray, labels: np.ndarray, *, timeout: float) -> Predictions:
    """Send each sample as its own request (batch of 1) and compare the argmax with its label."""
    url = device.api_url()
    if url is None:
        raise EdgeshipError(f"{device.device_id} has no inference API address in {device.state_dir / ADDRESS_FILE}")
    client = Client(url, timeout=timeout)
    try:
        meta = client.metadata(MODEL)
        name = meta["inputs"][0]["name"]
        versions: list[str] = []
        correct = 0
        times = []
        for i in range(len(x)):
            t0 = time.perf_counter()
            reply = client.infer(MODEL, {name: x[i:i + 1].astype(np.float32)})
            times.append((time.perf_counter() - t0) * 1000)
            out = reply["outputs"][0]
            logits = np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])
            correct += int(int(np.argmax(logits[0])) == int(labels[i]))
            v = str(reply.get("model_version"))
            if v not in versions:
                versions.append(v)
    finally:
        client.close()
    return Predictions(device=device.device_id, versions=tuple(versions), samples=len(x), correct=correct,
                       p50_ms=float(np.median(times)), max_ms=float(max(times)))
