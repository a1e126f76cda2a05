"""Fleet status: parsing and summarizing (pure), then against a real Mosquitto: retained state and
presence, offline through a real last will (a device process killed with SIGKILL), the CLI's JSON
and table, the group filter, the shipped ACL (TLS identities) and 2,000 simulated devices."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import aiomqtt
import pytest
from click.testing import CliRunner

from agent.mqtt import parse_broker_url
from agent.protocol import presence_topic, state_topic, telemetry_topic
from agent.telemetry import (
    ModelReport,
    ModelStats,
    ProcessSample,
    encode,
    presence_doc,
    state_doc,
    telemetry_doc,
)
from packager.fleet import CollectLimits, FleetSnapshot, collect, summarize, version_key
from packager.fleet_cli import fleet
from tests.mosquitto import Broker, TlsFiles, broker, make_pki, start_broker  # noqa: F401  (broker: a fixture)

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "examples" / "mosquitto" / "acl.conf"
TS = "2026-11-27T21:00:00Z"


def state(device: str, *, groups: tuple[str, ...] = (), ts: str = TS, **models: ModelReport) -> bytes:
    return encode(state_doc(device=device, agent_version="0.1.0", groups=groups, runtimes={"onnx": "1.32.0"},
                            models=models, ts=ts))


def active(version: str, status: str = "active", **kw: str) -> ModelReport:
    return ModelReport(version=version, sha256="ab" * 32, runtime="onnx", status=status, **kw)  # type: ignore[arg-type]


def telemetry(device: str, seq: int = 1, ts: str = TS, **models: ModelStats) -> bytes:
    sample = ProcessSample(uptime_s=10.0, cpu_percent=2.5, rss_bytes=40 << 20, disk_free_bytes=1 << 30)
    return encode(telemetry_doc(device=device, seq=seq, sample=sample, dropped=0, models=models, ts=ts))


# --- pure: parsing and summarizing ----------------------------------------------


def small_fleet() -> FleetSnapshot:
    snap = FleetSnapshot()
    msgs = [
        (state_topic("d1"), state("d1", groups=("canary",), digits=active("1.1.0"), kws=active("2.0.0"))),
        (presence_topic("d1"), encode(presence_doc(True, device="d1", ts="2026-11-27T21:05:00Z"))),
        (telemetry_topic("d1"), telemetry("d1", 7, "2026-11-27T21:06:00Z",
                                          digits=ModelStats(version="1.1.0", inferences=1200, errors=2,
                                                            p50_ms=0.21, p95_ms=0.4, p99_ms=0.9))),
        (state_topic("d2"), state("d2", digits=active("1.0.0", "rolled_back", last_error="self-test failed"))),
        (presence_topic("d2"), encode(presence_doc(False, device="d2"))),
        (state_topic("d3"), state("d3", groups=("canary",), digits=active("1.1.0", "failed"))),
        (presence_topic("d4"), encode(presence_doc(True, device="d4"))),  # no state yet
    ]
    for topic, payload in msgs:
        assert snap.ingest(topic, payload) is not None
    return snap


def test_summarize_rows_and_summary() -> None:
    snap = small_fleet()
    view = summarize(snap.states, snap.presences, snap.telemetry)
    assert [(r.device, r.model) for r in view.rows] == [
        ("d1", "digits"), ("d1", "kws"), ("d2", "digits"), ("d3", "digits"), ("d4", None)]
    d1 = view.rows[0]
    assert (d1.version, d1.status, d1.online, d1.inferences, d1.errors, d1.p50_ms, d1.p99_ms) == (
        "1.1.0", "active", True, 1200, 2, 0.21, 0.9)
    assert d1.last_seen == datetime(2026, 11, 27, 21, 6, tzinfo=timezone.utc)  # newest of state/presence/telemetry
    assert view.rows[1].inferences is None  # no telemetry for kws
    assert (view.devices, view.online, view.offline, view.unknown) == (4, 2, 1, 1)
    assert view.versions == {"digits": {"1.1.0": 2, "1.0.0": 1}, "kws": {"2.0.0": 1}}
    assert view.statuses["digits"] == {"active": 1, "failed": 1, "rolled_back": 1}
    assert [(r.device, r.status, r.last_error) for r in view.failures] == [
        ("d2", "rolled_back", "self-test failed"), ("d3", "failed", None)]
    doc = view.to_dict()
    assert json.loads(json.dumps(doc))["rows"][0]["last_seen"] == "2026-11-27T21:06:00Z"


def test_summarize_filters_by_group_and_model() -> None:
    snap = small_fleet()
    view = summarize(snap.states, snap.presences, snap.telemetry, group="canary")
    assert sorted({r.device for r in view.rows}) == ["d1", "d3"] and view.devices == 2
    view = summarize(snap.states, snap.presences, snap.telemetry, model="kws")
    assert [(r.device, r.model) for r in view.rows] == [("d1", "kws")] and view.versions == {"kws": {"2.0.0": 1}}
    view = summarize(snap.states, snap.presences, snap.telemetry, group="canary", model="digits")
    assert [r.device for r in view.rows] == ["d1", "d3"] and view.online == 1 and view.unknown == 1
    assert summarize(snap.states, snap.presences, snap.telemetry, group="nobody").rows == []


def test_telemetry_of_an_older_version_is_not_shown_against_the_new_one() -> None:
    snap = FleetSnapshot()
    snap.ingest(state_topic("d1"), state("d1", digits=active("1.2.0")))
    snap.ingest(telemetry_topic("d1"), telemetry("d1", digits=ModelStats(version="1.1.0", inferences=5)))
    [row] = summarize(snap.states, snap.presences, snap.telemetry).rows
    assert row.inferences is None and row.cpu_percent == 2.5


def test_newest_telemetry_wins() -> None:
    snap = FleetSnapshot()
    snap.ingest(telemetry_topic("d1"), telemetry("d1", 9, "2026-11-27T21:09:00Z"))
    snap.ingest(telemetry_topic("d1"), telemetry("d1", 8, "2026-11-27T21:08:00Z"))
    assert snap.telemetry["d1"].seq == 9


MALFORMED = {
    "not-json": b"{nope",
    "not-an-object": b"[1, 2]",
    "wrong-version": json.dumps({"v": 2, "device": "d9"}).encode(),
    "device-differs-from-topic": state("d8", digits=active("1.0.0")),
    "missing-field": json.dumps({"v": 1, "device": "d9", "groups": [], "ts": TS, "models": {}}).encode(),
    "bad-timestamp": state("d9", ts="yesterday"),
    "unknown-status": state("d9").replace(b'"models":{}', b'"models":{"m":{"version":"1","status":"dancing"}}'),
    "duplicate-keys": b'{"v":1,"v":1}',
    "too-large": b'{"v":1,"x":"' + b"a" * 70_000 + b'"}',
    "too-deep": b'{"v":1,"models":' + b'{"a":' * 20 + b"1" + b"}" * 21,
    "bool-as-int": telemetry("d9").replace(b'"seq":1', b'"seq":true'),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_state_is_counted_and_skipped(name: str) -> None:
    snap = small_fleet()
    kind = "telemetry" if name == "bool-as-int" else "state"
    topic = telemetry_topic("d9") if kind == "telemetry" else state_topic("d9")
    assert snap.ingest(topic, MALFORMED[name]) is None
    assert snap.malformed == {kind: 1}
    assert "d9" not in snap.states and "d9" not in snap.telemetry
    assert summarize(snap.states, snap.presences, snap.telemetry, malformed=1).malformed == 1


def test_cleared_and_foreign_topics_are_ignored() -> None:
    snap = FleetSnapshot()
    assert snap.ingest(state_topic("d1"), b"") is None  # a cleared retained message
    assert snap.ingest("edgeship/v1/state/bad+id", state("d1")) is None
    assert snap.ingest("edgeship/v1/other/d1", b"{}") is None
    assert not snap.states and sum(snap.malformed.values()) <= 1


def test_version_key_orders_semver() -> None:
    assert sorted(["1.10.0", "1.2.0", "1.2.0-rc.10", "1.2.0-rc.9", "0.9.9", None, "garbage"], key=version_key) == [
        "0.9.9", "1.2.0-rc.9", "1.2.0-rc.10", "1.2.0", "1.10.0", "garbage", None]


# --- against a real Mosquitto ---------------------------------------------------

DEVICE = r"""
import asyncio, sys
from pathlib import Path
import aiomqtt
from agent.mqtt import make_client, parse_broker_url
from agent.protocol import presence_topic, state_topic
from agent.telemetry import ModelReport, encode, presence_doc, rfc3339, state_doc

url, device, version = sys.argv[1:4]
will_for = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else device
tls = dict(zip(("ca", "cert", "key"), map(Path, sys.argv[5:8])))

async def main():
    connected_at = rfc3339()
    will = aiomqtt.Will(presence_topic(will_for), encode(presence_doc(False, device=will_for, ts=connected_at)),
                        qos=1, retain=True)
    client = make_client(parse_broker_url(url, **tls), identifier=device, protocol="3.1.1", will=will)
    try:
        async with client:
            await client.publish(state_topic(device), encode(state_doc(
                device=device, agent_version="0.1.0", groups=["field"], runtimes={"onnx": "1.32.0"},
                models={"digits": ModelReport(version=version, sha256="ab" * 32, runtime="onnx", status="active")})),
                qos=1, retain=True)
            await client.publish(presence_topic(device), encode(presence_doc(True, device=device)), qos=1, retain=True)
            print("ready", connected_at, flush=True)
            await asyncio.sleep(3600)
    except aiomqtt.MqttError as e:
        print("refused", e, flush=True)

asyncio.run(main())
"""


class DeviceProcess:
    """A device agent stand-in in its own process: connects with a last will, publishes retained
    state and presence, then waits to be killed."""

    def __init__(self, url: str, device: str, version: str = "1.0.0", will_for: str = "-",
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        args = [sys.executable, "-c", DEVICE, url, device, version, will_for, *map(str, tls or ())]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def devices() -> Iterator[list[DeviceProcess]]:
    started: list[DeviceProcess] = []
    yield started
    for d in started:
        d.kill()


def status(broker: Broker, *args: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(fleet, ["status", "--broker", broker.url, "--json", "--quiet", "0.2", *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def wait_until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_killed_device_shows_offline_through_its_last_will(broker: Broker, devices: list[DeviceProcess]) -> None:
    devices += [DeviceProcess(broker.url, "pi-1", "1.1.0"), DeviceProcess(broker.url, "pi-2", "1.0.0")]
    assert all(d.line.startswith("ready") for d in devices)
    out = status(broker)
    assert {r["device"]: (r["version"], r["online"]) for r in out["rows"]} == {
        "pi-1": ("1.1.0", True), "pi-2": ("1.0.0", True)}
    assert out["versions"] == {"digits": {"1.1.0": 1, "1.0.0": 1}}

    devices[1].kill()  # SIGKILL: no DISCONNECT, the broker sees the socket close and sends the will
    connected_at = devices[1].line.split()[1]

    def offline() -> bool:
        rows = {r["device"]: r for r in status(broker)["rows"]}
        return rows["pi-2"]["online"] is False

    wait_until(offline)
    out = status(broker)
    rows = {r["device"]: r for r in out["rows"]}
    assert (out["online"], out["offline"]) == (1, 1) and rows["pi-1"]["online"] is True
    assert rows["pi-2"]["version"] == "1.0.0"  # the retained state is still there
    assert rows["pi-2"]["last_seen"] >= connected_at


def test_cli_json_group_filter_and_table(broker: Broker) -> None:
    async def publish() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="sim",
                                  protocol=aiomqtt.ProtocolVersion.V311) as c:
            for dev, groups, version in (("a1", ("canary",), "1.1.0"), ("a2", (), "1.0.0"),
                                         ("a3", ("canary",), "1.0.0")):
                await c.publish(state_topic(dev), state(dev, groups=groups, digits=active(version)), qos=1,
                                retain=True)
                await c.publish(presence_topic(dev), encode(presence_doc(dev != "a3", device=dev)), qos=1,
                                retain=True)
            await c.publish(state_topic("a4"), b"{broken", qos=1, retain=True)

    asyncio.run(publish())
    out = status(broker)
    assert out["devices"] == 3 and out["malformed"] == 1 and out["collected"]["malformed_by_kind"] == {"state": 1}
    assert set(out) >= {"rows", "failures", "versions", "statuses", "online", "offline", "unknown", "collected"}
    canary = status(broker, "--group", "canary")
    assert [r["device"] for r in canary["rows"]] == ["a1", "a3"]
    assert (canary["online"], canary["offline"]) == (1, 1)
    assert canary["versions"] == {"digits": {"1.1.0": 1, "1.0.0": 1}}
    assert status(broker, "--model", "nothing")["rows"] == []

    table = CliRunner().invoke(fleet, ["status", "--broker", broker.url, "--quiet", "0.2"], catch_exceptions=False,
                               env={"COLUMNS": "160"})
    assert table.exit_code == 0
    assert "a1" in table.output and "online 2, offline 1, unknown 0" in table.output
    assert "digits: 1.1.0 x1, 1.0.0 x2  [active 3]" in table.output and "1 malformed message(s) skipped" in table.output


def test_telemetry_wait_collects_one_round(broker: Broker) -> None:
    async def main() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="sim",
                                  protocol=aiomqtt.ProtocolVersion.V311) as c:
            await c.publish(state_topic("t1"), state("t1", digits=active("1.0.0")), qos=1, retain=True)
            await c.publish(presence_topic("t1"), encode(presence_doc(True, device="t1")), qos=1, retain=True)
            task = asyncio.ensure_future(collect(parse_broker_url(broker.url),
                                                 CollectLimits(wait=5, quiet=0.2, telemetry_wait=5)))
            await asyncio.sleep(0.5)
            await c.publish(telemetry_topic("t1"), telemetry("t1", digits=ModelStats(version="1.0.0",
                                                                                  inferences=42)), qos=1)
            got = await task
        assert got.total_s < 3  # stopped when every online device had reported
        [row] = summarize(got.snapshot.states, got.snapshot.presences, got.snapshot.telemetry).rows
        assert row.inferences == 42

    asyncio.run(main())


def test_unreachable_broker_is_a_link_error() -> None:
    from agent.cliutil import EXIT_LINK
    from tests.mosquitto import free_port

    proc = subprocess.run(
        [sys.executable, "-c", "from agent.cliutil import run_cli; from packager.fleet_cli import fleet; "
         "run_cli(fleet, 'edgeship fleet')", "status", "--broker", f"mqtt://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == EXIT_LINK and proc.stderr.startswith("error: broker mqtt://127.0.0.1:")


# --- the shipped ACL, with TLS identities -----------------------------------------


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[Broker, TlsFiles]]:
    pki = make_pki(tmp_path / "pki", devices=["device-1", "device-2"])
    b = start_broker(tmp_path / "mosquitto", tls=pki, acl=ACL)
    try:
        yield b, pki
    finally:
        b.stop()


def test_acl_presence_and_will_under_certificate_identities(secure: tuple[Broker, TlsFiles],
                                                            devices: list[DeviceProcess]) -> None:
    b, pki = secure

    def files(name: str) -> tuple[Path, Path, Path]:
        return pki.ca_cert, pki.client(name).cert, pki.client(name).key

    devices.append(DeviceProcess(b.url, "device-2", "1.0.0", tls=files("device-2")))
    assert devices[-1].line.startswith("ready")
    # device-1's certificate, with a last will that claims device-2 went offline
    devices.append(DeviceProcess(b.url, "device-1", "1.1.0", will_for="device-2", tls=files("device-1")))
    forger = devices[-1]
    assert forger.line.startswith("ready")  # Mosquitto 2.0.11 accepts the CONNECT; the will is checked when sent

    fleet_tls = files("edgeship-fleet")

    async def look() -> dict[str, bool]:
        got = await collect(parse_broker_url(b.url, ca=fleet_tls[0], cert=fleet_tls[1], key=fleet_tls[2]),
                            CollectLimits(wait=5, quiet=0.3))
        return {d: p.online for d, p in got.snapshot.presences.items()}

    assert asyncio.run(look()) == {"device-1": True, "device-2": True}
    forger.kill()
    # Mosquitto handles the will when it handles the closed connection (it logs it just before)
    wait_until(lambda: "Client device-1 closed its connection" in b.log_text())
    assert asyncio.run(look()) == {"device-1": True, "device-2": True}  # the forged will went nowhere
    devices[0].kill()  # device-2 really goes away: its own will is allowed
    wait_until(lambda: asyncio.run(look()).get("device-2") is False)


# --- scale ------------------------------------------------------------------------------


def test_status_of_2000_devices(broker: Broker) -> None:
    n, publishers = 2000, 4

    async def simulate(k: int) -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"sim-{k}",
                                  protocol=aiomqtt.ProtocolVersion.V311, max_inflight_messages=64) as c:
            c.pending_calls_threshold = 1 << 20
            sends = []
            for i in range(k, n, publishers):
                dev = f"dev{i:05d}"
                report = active("1.1.0" if i % 3 else "1.0.0", "rolled_back" if i % 97 == 0 else "active")
                sends.append(c.publish(state_topic(dev), state(dev, groups=("canary",) if i % 10 == 0 else (),
                                                               digits=report), qos=1, retain=True))
                sends.append(c.publish(presence_topic(dev), encode(presence_doc(i % 7 != 0, device=dev)), qos=1,
                                       retain=True))
            await asyncio.gather(*sends)

    async def setup() -> None:
        await asyncio.gather(*(simulate(k) for k in range(publishers)))

    t = time.monotonic()
    asyncio.run(setup())
    t_publish = time.monotonic() - t

    t = time.monotonic()
    got = asyncio.run(collect(parse_broker_url(broker.url), CollectLimits(wait=30, quiet=0.3)))
    t_collect = time.monotonic() - t
    t = time.monotonic()
    view = summarize(got.snapshot.states, got.snapshot.presences, got.snapshot.telemetry)
    t_summary = time.monotonic() - t
    assert view.devices == n and got.snapshot.messages == 2 * n
    assert view.offline == len(range(0, n, 7)) and view.online == n - view.offline
    assert view.versions == {"digits": {"1.1.0": n - len(range(0, n, 3)), "1.0.0": len(range(0, n, 3))}}
    assert len(view.failures) == len(range(0, n, 97))

    t = time.monotonic()
    table = CliRunner().invoke(fleet, ["status", "--broker", broker.url], catch_exceptions=False,
                               env={"COLUMNS": "160"})
    t_table = time.monotonic() - t
    t = time.monotonic()
    canary = status(broker, "--group", "canary")
    t_json = time.monotonic() - t
    assert table.exit_code == 0 and canary["devices"] == n // 10
    print(f"\n{n} devices: publish {t_publish:.2f} s; collect {t_collect:.2f} s (retained flood "
          f"{got.retained_s - 0.3:.2f} s + 0.3 s quiet); summarize {t_summary * 1000:.0f} ms; "
          f"CLI table {t_table:.2f} s; CLI --json --group {t_json:.2f} s")
