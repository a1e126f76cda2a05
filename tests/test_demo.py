"""`edgeship demo` end to end, as a user runs it: a subprocess that starts its own broker (amqtt),
server and agents, or uses a real Mosquitto with --broker; then nothing it started may be left.

Each run checks the exit code, the narrative (stderr with --json) and the --json summary, that
every process the demo started is gone and that its temporary directory was removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


from tests.conftest import ROOT
from tests.mosquitto import start_broker

RUN_TIMEOUT = 120
DEVICES = ["demo-1", "demo-2", "demo-3"]
ALL_STEPS = ["broker", "keys", "repository", "build-v1", "publish-v1", "server", "agents", "install-v1", "predict-v1",
             "build-v2", "publish-v2", "rollout-v2", "predict-v2", "fleet", "cleanup"]


def demo_command() -> list[str]:
    """`edgeship demo` (through packager.demo_cli until the command is registered in packager.cli)."""
    from packager.cli import cli

    module = "packager.cli" if "demo" in cli.commands else "packager.demo_cli"
    return [sys.executable, "-m", module, "demo"]


def run_demo(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None, str]:
    proc = subprocess.run([*demo_command(), "--json", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env={**os.environ, **(env or {})})
    try:
        summary = json.loads(proc.stdout)
    except ValueError:
        summary = None
    return proc.returncode, summary, proc.stderr


def _cmdlines() -> dict[int, str]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def assert_nothing_left(summary: dict[str, Any]) -> None:
    """Every child gone (a reused pid would not be running the demo's launcher), nothing running from
    the demo's directory, and the directory removed."""
    workdir = summary["workdir"]
    children = summary["children"]
    assert children["left_running"] == [] and children["killed"] == []
    deadline = time.monotonic() + 5
    while True:
        procs = _cmdlines()
        left = [c for c in children["started"] if "PR_SET_PDEATHSIG" in procs.get(c["pid"], "")]
        left += [{"pid": pid, "cmd": cmd[:200]} for pid, cmd in procs.items() if workdir in cmd]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == []
    assert children["workdir_removed"] is True
    assert not Path(workdir).exists()


def steps(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in summary["steps"]}


def assert_whole_story(summary: dict[str, Any], stderr: str) -> None:
    assert summary["ok"] is True and summary["failed_step"] is None, stderr
    assert summary["versions"] == {"v1": "1.0.0", "v2": "1.1.0"}
    by = steps(summary)
    assert list(by) == ALL_STEPS
    assert all(s["ok"] is True and not s["skipped"] for s in by.values())

    v1, v2 = by["build-v1"]["detail"], by["build-v2"]["detail"]
    assert (v1["version"], v2["version"]) == ("1.0.0", "1.1.0")
    assert v1["sha256"] != v2["sha256"]
    for b in (v1, v2):  # the accuracy gate's numbers
        assert b["accuracy_drop_pp"] <= b["max_accuracy_drop_pp"] and b["eval_samples"] == 397
        assert b["accuracy"] > 0.9
    assert by["publish-v2"]["detail"]["timestamp_version"] > by["publish-v1"]["detail"]["timestamp_version"]
    assert by["publish-v1"]["detail"]["transfer_signer"] == v1["signer"]  # devices hash each block once

    install, rollout = by["install-v1"]["detail"], by["rollout-v2"]["detail"]
    assert sorted(install["devices"]) == sorted(rollout["devices"]) == DEVICES
    assert all(d["version"] == "1.0.0" and d["status"] == "active" for d in install["devices"].values())
    assert all(d == {**d, "version": "1.1.0", "previous": "1.0.0", "status": "active"}
               for d in rollout["devices"].values())

    for name, version in (("predict-v1", "1.0.0"), ("predict-v2", "1.1.0")):
        p = by[name]["detail"]
        assert p["version"] == version and p["samples"] == 60 and p["accuracy"] >= 0.8
        assert all(d["versions"] == [version] and d["samples"] == 20 for d in p["devices"].values())

    fleet = by["fleet"]["detail"]
    assert fleet["devices"] == 3 and fleet["online"] == 3 and fleet["failures"] == 0
    assert fleet["versions"] == {"digits": {"1.1.0": 3}} and fleet["statuses"] == {"digits": {"active": 3}}
    assert all(r["inferences"] >= 40 for r in fleet["rows"])

    for line in ("Every device moved to digits 1.1.0", "Fleet status from the broker: 3/3 online",
                 "predictions answered by digits 1.1.0", "demo passed"):
        assert line in stderr, line


def test_demo_with_the_embedded_broker() -> None:
    rc, summary, stderr = run_demo()
    assert rc == 0, stderr[-3000:]
    assert summary is not None
    assert_whole_story(summary, stderr)
    assert summary["broker"]["kind"] == "amqtt" and summary["broker"]["url"].startswith("mqtt://127.0.0.1:")
    assert steps(summary)["build-v1"]["detail"]["quantize"] == "auto"
    assert "--quantize auto" in stderr and "chosen:" in stderr  # the gate's report table was shown
    assert [c["name"] for c in summary["children"]["started"]] == ["broker", "server", "agent-demo-1",
                                                                   "agent-demo-2", "agent-demo-3"]
    assert summary["children"]["stopped"] == ["agent-demo-1", "agent-demo-2", "agent-demo-3", "server", "broker"]
    assert_nothing_left(summary)


def _retained(url: str) -> list[str]:
    """Topics of the retained device documents on the broker."""
    from agent.mqtt import make_client, parse_broker_url

    async def main() -> list[str]:
        got: list[str] = []
        async with make_client(parse_broker_url(url), identifier="test-demo-reader", protocol="3.1.1") as c:
            await c.subscribe([("edgeship/v1/state/+", 0), ("edgeship/v1/presence/+", 0)])

            async def read() -> None:
                async for m in c.messages:
                    got.append(str(m.topic))

            try:
                await asyncio.wait_for(read(), 1.0)
            except asyncio.TimeoutError:
                pass
        return got

    return asyncio.run(main())


def test_demo_against_mosquitto(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "mosquitto")
    try:
        rc, summary, stderr = run_demo("--broker", broker.url, "--quantize", "none")
        assert rc == 0, stderr[-3000:]
        assert summary is not None
        assert_whole_story(summary, stderr)
        assert summary["broker"] == {**summary["broker"], "kind": "external", "url": broker.url}
        assert [c["name"] for c in summary["children"]["started"]] == ["server", "agent-demo-1", "agent-demo-2",
                                                                       "agent-demo-3"]
        assert summary["children"]["stopped"] == ["agent-demo-1", "agent-demo-2", "agent-demo-3", "server"]
        assert_nothing_left(summary)
        assert broker.running  # the demo stops only what it started
        assert summary["children"]["retained_cleared"] == 6
        assert _retained(broker.url) == []  # and leaves no device documents behind
    finally:
        broker.stop()


def test_a_failed_step_is_named_and_everything_is_still_stopped() -> None:
    # every agent SIGKILLs itself just before switching to 1.0.0: while the demo waits for the agents'
    # inference APIs or, usually, while it waits for them to install 1.0.0
    rc, summary, stderr = run_demo("--quantize", "none", env={"EDGESHIP_FAILPOINTS": "switch.before"})
    assert rc == 1, stderr[-3000:]
    assert summary is not None and summary["ok"] is False
    failed = summary["failed_step"]
    assert failed in ("agents", "install-v1")
    assert "agent-demo-" in summary["error"] and "was killed by SIGKILL" in summary["error"]
    assert stderr.strip().splitlines()[-1].startswith(f"error: step '{failed}' failed: agent-demo-")
    by = steps(summary)
    at = ALL_STEPS.index(failed)
    assert all(by[n]["ok"] for n in ALL_STEPS[:at]) and by[failed]["ok"] is False
    assert all(by[n]["skipped"] for n in ALL_STEPS[at + 1:-1])
    assert by["cleanup"]["ok"] is True
    assert f"demo failed at step '{failed}'" in stderr
    assert "last lines of agent-demo-" in stderr  # what the agent said before it died
    assert {"server", "broker"} <= set(summary["children"]["stopped"])  # (agents that died are not "stopped")
    assert_nothing_left(summary)


def test_usage_errors_start_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([*demo_command(), "--examples", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} lacks digits.onnx")
    proc = subprocess.run([*demo_command(), "--broker", "http://127.0.0.1:1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "must start with mqtt://" in proc.stderr


def test_a_child_that_ignores_sigterm_is_killed_and_its_last_lines_are_kept(tmp_path: Path) -> None:
    """What a child that had to be SIGKILLed last wrote (an agent's thread stacks) is kept for the
    demo to show, before the demo's directory is removed."""
    from packager.demo_procs import Children

    (tmp_path / "stubborn.py").write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                          "print('waiting in stubborn', flush=True)\ntime.sleep(60)\n")
    children = Children(tmp_path / "logs")
    child = children.start("stubborn", "stubborn", [], env={"PYTHONPATH": str(tmp_path)})
    deadline = time.monotonic() + 30
    while "waiting in stubborn" not in child.tail() and time.monotonic() < deadline:
        assert child.alive, child.tail()
        time.sleep(0.05)
    report = children.stop_all(timeout=0.5)
    assert report.killed == ("stubborn",) and report.stopped == () and not child.alive
    assert report.killed_tails["stubborn"].splitlines()[-1] == "waiting in stubborn"
