"""The update channel end to end against real Mosquitto: repository -> server -> broker -> agent."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import agent.mqttread
from agent.daemon import Agent
from agent.mqtt import BrokerSettings
from packager.repo import publish
from tests.conftest import KeyPair, build
from tests.mosquitto import Broker, broker, broker_module, make_pki, start_broker  # noqa: F401 - fixture
from tests.updatechannel import agent_config, make_repo, now, running_agent, running_server, wait_for


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, mlp_onnx: Path, release_key: KeyPair) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("channel-bundles")
    return {v: build(mlp_onnx, release_key, out / f"mlp-{v}.edge", version=v).path for v in ("1.0.0", "1.1.0", "1.2.0")}


@pytest.fixture
def repo(tmp_path: Path, release_key: KeyPair, bundles: dict[str, Path]) -> Path:
    return make_repo(tmp_path / "repo", release_key.public, bundles["1.0.0"])


def root_of(repo: Path) -> Path:
    return repo / "metadata" / "1.root.json"


def staged(agent: Agent, model: str = "mlp") -> str | None:
    s = agent.model_state(model).current
    return None if s is None else s.version


def test_fresh_device_stages_then_follows_a_newer_release(broker_module: Broker, repo: Path, tmp_path: Path,
                                                          bundles: dict[str, Path]) -> None:
    cfg = agent_config(broker_module.url, tmp_path / "state", root_of(repo), watch={"seconds": 0.3})
    events: list[dict[str, Any]] = []

    async def scenario() -> Agent:
        async with running_server(repo, broker_module.url):
            async with running_agent(cfg, events) as agent:
                await wait_for(lambda: staged(agent) == "1.0.0", what="v1 staged")
                publish(repo, bundles["1.1.0"], now=now())
                await wait_for(lambda: staged(agent) == "1.1.0", what="v1.1 staged after the hint")
                await wait_for(lambda: agent.model_state("mlp").status == "active", what="v1.1 committed")
                return agent

    agent = asyncio.run(scenario())
    state = agent.model_state("mlp")
    assert state.seen.keys() == {"1.0.0", "1.1.0"}
    assert state.current.sha256 == hashlib.sha256(bundles["1.1.0"].read_bytes()).hexdigest()  # type: ignore[union-attr]
    assert (tmp_path / "state" / "releases" / state.current.sha256 / "model.onnx").is_file()  # type: ignore[union-attr]
    steps = [e["step"] for e in events]
    assert steps.count("staged") == 2 and steps.count("installed") == 2 and "error" not in steps
    # the hint woke it: far fewer cycles than a poll would need, and refresh_interval is 30 s
    assert agent.status.cycles <= 4


def test_a_device_updates_over_tls_through_the_shipped_acl(tmp_path: Path, repo: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """mqtts:// with per-device certificates and examples/mosquitto/acl.conf: the agent stages
    the release, and every reply came through agent.mqttread.PacketReader reading the TLS socket
    (the server's requests do too)."""
    pki = make_pki(tmp_path / "pki", devices=["device-1"])
    b = start_broker(tmp_path / "mosquitto", tls=pki, acl=Path(__file__).parent.parent / "examples" / "mosquitto" / "acl.conf")
    readers: list[agent.mqttread.PacketReader] = []
    install = agent.mqttread.install

    def spy(client: Any, topic_filter: str, deliver: Any) -> agent.mqttread.PacketReader | None:
        reader = install(client, topic_filter, deliver)
        if reader is not None and topic_filter == "edgeship/v1/resp/device-1":  # not the server's
            readers.append(reader)
        return reader

    monkeypatch.setattr(agent.mqttread, "install", spy)
    dev, srv = pki.client("device-1"), pki.client("edgeship-server")
    url = f"mqtts://{b.host}:{b.port}"
    cfg = agent_config(url, tmp_path / "state", root_of(repo), device="device-1",
                       broker={"url": url, "ca": str(pki.ca_cert), "cert": str(dev.cert), "key": str(dev.key)})
    server_tls = BrokerSettings(host=b.host, port=b.port, tls=True, ca=pki.ca_cert, cert=srv.cert, key=srv.key)

    async def scenario() -> Agent:
        async with running_server(repo, server_tls):
            agent = Agent(cfg)
            await agent.run_once()
            return agent

    try:
        agent_ = asyncio.run(scenario())
    finally:
        b.stop()
    assert staged(agent_) == "1.0.0"
    [channel] = agent_.status.channels  # one connection
    assert len(readers) == 1 and channel.replies > 0 and channel.malformed == channel.unmatched == 0
    assert readers[0].delivered == channel.replies


def test_run_once_cli_style_and_up_to_date(broker_module: Broker, repo: Path, tmp_path: Path) -> None:
    cfg = agent_config(broker_module.url, tmp_path / "state", root_of(repo))

    async def scenario() -> tuple[Agent, Agent]:
        async with running_server(repo, broker_module.url):
            first = Agent(cfg)
            await first.run_once()
            second = Agent(cfg)  # a restart: nothing to do
            await second.run_once()
            return first, second

    first, second = asyncio.run(scenario())
    assert staged(first) == "1.0.0"
    assert len(first.status.downloads) == 1 and second.status.downloads == []


def test_agent_cli_run_once(broker_module: Broker, repo: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "cli-dev"\nstate_dir = "state"\nroot = "{root_of(repo)}"\nmodels = ["mlp"]\n'
                    f'[broker]\nurl = "{broker_module.url}"\n')
    stop = threading.Event()

    def serve() -> None:
        async def go() -> None:
            async with running_server(repo, broker_module.url):
                while not stop.is_set():
                    await asyncio.sleep(0.05)
        asyncio.run(go())

    t = threading.Thread(target=serve)
    t.start()
    try:
        import time
        time.sleep(1.0)
        cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(conf), "--once", "--json",
               "--log-level", "warning"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        t.join()
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["models"]["mlp"]["active"]["version"] == "1.0.0" and doc["timestamp_version"] >= 2

    bad = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: config file not found")
    conf.write_text(conf.read_text().replace(broker_module.url, "mqtt://127.0.0.1:1"))
    down = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(conf), "--once"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 3 and "error: broker mqtt://127.0.0.1:1" in down.stderr


def test_telemetry_produced_offline_is_delivered_on_reconnect(broker: Broker, repo: Path, tmp_path: Path) -> None:
    """The agent runs with the broker down: telemetry and events pile up in its disk outbox, and when
    the broker returns every record arrives, in order, none lost (the bound is far away)."""

    from agent.mqtt import make_client, parse_broker_url
    from agent.protocol import TELEMETRY_FILTER

    cfg = agent_config(broker.url, tmp_path / "state", root_of(repo), device="tel-1",
                       telemetry={"interval": 0.05}, reconnect_min=1.0, reconnect_max=1.0)
    broker.stop()
    received: list[dict[str, Any]] = []

    async def scenario() -> int:
        async with running_agent(cfg) as agent:
            await asyncio.sleep(1.5)  # offline: ~30 telemetry records queue up
            queued = agent.reporting.outbox.pending
            assert queued >= 10 and not agent.status.connected
            await asyncio.to_thread(broker.restart)
            async with make_client(parse_broker_url(broker.url), identifier="edgeship-fleet-t",
                                   protocol="3.1.1") as sub:
                await sub.subscribe(TELEMETRY_FILTER, qos=1)
                async for msg in sub.messages:
                    received.append(json.loads(bytes(msg.payload)))  # type: ignore[arg-type]
                    if len(received) >= queued:
                        break
            return queued

    queued = asyncio.run(asyncio.wait_for(scenario(), 30))
    seqs = [r["seq"] for r in received]
    assert len(received) >= queued and seqs == sorted(seqs)
    assert seqs[:queued] == list(range(seqs[0], seqs[0] + queued))  # no gap: nothing lost
    assert all(r["device"] == "tel-1" and r["dropped"] == 0 for r in received)
