"""``edgeship demo``: the whole story on one machine, every claim checked.

An MQTT broker (the embedded amqtt on 127.0.0.1, or ``--broker URL``), a release key and a TUF
repository in a temporary directory, the digits model built with quantization behind the
accuracy gate and published, ``edgeship serve``, and N ``edgeship-agent run`` processes with
their own state directories. The devices install 1.0.0; 1.1.0 is built and published and every
device moves to it; predictions go through each device's inference API; the fleet view is read
from the broker. Then everything the demo started is stopped and the directory removed.

:class:`Demo` runs the steps in order; the first one whose check fails ends the run (the rest
are skipped) and is named in the :class:`DemoResult`. Cleanup always runs. Output goes through
a :class:`Narrator` (the CLI's is rich); nothing here prints.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.errors import EdgeshipError, LinkError
from agent.mqtt import BrokerSettings, parse_broker_url
from packager.demo_config import DemoConfig, DemoResult, StepResult
from packager.demo_devices import MODEL, Device
from packager.demo_narrator import Narrator, StepLine
from packager.demo_procs import (
    Child,
    ChildExited,
    Children,
    DemoFailed,
    StepTimeout,
    StopReport,
    free_port,
    interrupts_deferred,
    wait_until,
)
from packager.demo_release import build_release, publish_release
from packager.demo_rollout import predict_all, wait_version
from packager.repo_store import Layout

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGESHIP_DEMO_BROKER_PASSWORD"
"""How a password in ``--broker mqtt://user:password@host`` reaches the server and the agents (never argv)."""


class Demo:
    STEPS: tuple[tuple[str, str], ...] = (
        ("broker", "MQTT broker"),
        ("keys", "release signing key"),
        ("repository", "TUF repository"),
        ("build-v1", "build v1 with quantization behind the accuracy gate"),
        ("publish-v1", "publish v1"),
        ("server", "update server"),
        ("agents", "device agents"),
        ("install-v1", "devices install v1"),
        ("predict-v1", "predictions on v1"),
        ("build-v2", "build v2"),
        ("publish-v2", "publish v2"),
        ("rollout-v2", "every device moves to v2"),
        ("predict-v2", "predictions on v2"),
        ("fleet", "fleet status"),
        ("cleanup", "stop everything the demo started"),
    )

    def __init__(self, config: DemoConfig, narrator: Narrator) -> None:
        self.cfg = config
        self.say = narrator
        with np.load(config.examples / "eval.npz") as data:
            self.eval_x, self.eval_y = data["x"], data["labels"]
        self.run_id = secrets.token_hex(3)
        self.group = f"demo-{self.run_id}"
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeship-demo-"))
        self.children = Children(self.workdir / "logs")
        self.devices = [Device(device_id=f"demo-{i + 1}", home=self.workdir / "devices" / f"demo-{i + 1}")
                        for i in range(config.devices)]
        self.broker_child: Child | None = None
        self.server_child: Child | None = None
        self.agent_children: list[Child] = []
        self.broker: BrokerSettings | None = None
        self.broker_url = ""
        """The broker's URL without credentials (shown, and given to the children)."""
        self.child_env: dict[str, str] = {}
        self.repo = self.workdir / "repo"
        self.keys = self.workdir / "keys"
        self.release_key, self.release_pub = self.keys / "release.key", self.keys / "release.pub"
        self.bundles: dict[str, Path] = {}
        self.timestamp = 0
        self.result = DemoResult(steps=[StepResult(name=n, title=t) for n, t in self.STEPS],
                                 workdir=str(self.workdir), kept=config.keep,
                                 versions={"v1": config.v1, "v2": config.v2})

    # --- running ---------------------------------------------------------------------------

    def run(self) -> DemoResult:
        """Every step in order until one fails, then the cleanup step, which always runs (also on
        Ctrl-C, re-raised after it)."""
        start = time.monotonic()
        *steps, cleanup = self.result.steps
        try:
            for step in steps:
                if not self._run_step(step):
                    break
        finally:
            with interrupts_deferred():
                self._run_step(cleanup)
            self.result.seconds = time.monotonic() - start
        return self.result

    def _run_step(self, step: StepResult) -> bool:
        fn: Callable[[StepLine, StepResult], str] = getattr(self, "_" + step.name.replace("-", "_"))
        number = self.result.steps.index(step) + 1
        t0 = time.monotonic()
        try:
            with self.say.step(number, len(self.result.steps), step.title) as line:
                try:
                    title = fn(line, step)
                except DemoFailed as e:
                    self.say.note(e.reason)
                    raise
                except StepTimeout as e:
                    self.say.note(f"{step.title}: {e}")
                    raise DemoFailed(step.name, f"{step.title}: {e}") from None
                except (ChildExited, EdgeshipError) as e:
                    self.say.note(str(e))
                    raise DemoFailed(step.name, str(e)) from None
                except KeyboardInterrupt:
                    self.say.note("interrupted: stopping everything the demo started")
                    raise
                finally:
                    step.seconds = time.monotonic() - t0
                line.retitle(title)
        except DemoFailed as e:
            step.ok, step.error = False, e.reason
            log.debug("step %s failed after %.1f s: %s; skipping the rest", step.name, step.seconds, e.reason)
            self._show_logs(step.name)
            return False
        step.ok = True
        return True

    def _show_logs(self, step: str) -> None:
        """The log tail of the processes a failed step depended on: those that died, else all of them."""
        if step in ("keys", "repository", "build-v1", "publish-v1", "build-v2", "publish-v2", "cleanup"):
            return
        wanted = [c for c in {"broker": [self.broker_child], "server": [self.broker_child, self.server_child]}.get(
            step, [self.server_child, *self.agent_children]) if c is not None]
        dead = [c for c in wanted if not c.alive]
        for child in dead or wanted:
            self._show_tail(child.log_path.name, child.tail(12 if dead else 6))

    def _show_tail(self, log_name: str, tail: str) -> None:
        if tail:
            lines = "\n".join(f"    {t}" for t in tail.splitlines())
            self.say.event(f"last lines of {log_name}:\n{lines}")

    def _cleanup(self, line: StepLine, step: StepResult) -> str:
        line.status("stopping the agents, then the server, then the broker")
        order = {"agent": 0, "server": 1, "broker": 2}
        report: StopReport = self.children.stop_all(timeout=self.cfg.timeouts.stop,
                                                    order=lambda c: order[c.name.split("-")[0]])
        cleared = 0
        if self.cfg.broker_url is not None and self.broker is not None and self.agent_children:
            line.status(f"clearing the demo devices' retained messages on {self.broker_url}")
            try:
                from packager.demo_mqtt import clear_retained

                cleared = clear_retained(self.broker, [d.device_id for d in self.devices])
            except LinkError as e:  # best effort: the broker may be gone
                self.say.note(f"could not clear the retained messages on {self.broker_url}: {e}")
        if not self.cfg.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        step.detail = {
            "started": [{"name": c.name, "pid": c.pid} for c in self.children.started],
            "stopped": list(report.stopped), "killed": list(report.killed), "left_running": list(report.left_running),
            "retained_cleared": cleared, "workdir_removed": not self.workdir.exists(),
        }
        self.result.children = step.detail
        if report.killed:
            self.say.note(f"did not stop on SIGTERM, killed: {', '.join(report.killed)}")
            for name, tail in report.killed_tails.items():
                self._show_tail(f"{name}.log", tail)
        if cleared:
            self.say.note(f"cleared {cleared} retained state/presence messages of the demo devices")
        if report.left_running:
            raise DemoFailed(step.name, f"still running: {', '.join(report.left_running)}")
        if self.cfg.keep:
            self.say.note(f"kept {self.workdir} (logs in {self.children.log_dir.relative_to(self.workdir)}/)")
        elif self.workdir.exists():
            raise DemoFailed(step.name, f"could not remove {self.workdir}")
        n = len(self.children.started)
        return (f"Stopped {n} process{'es' if n != 1 else ''}" if n else "Nothing was running") + \
            ("" if self.cfg.keep else f"; removed {self.workdir}")

    # --- the steps (each returns the line shown with its ✓) --------------------------------------

    def _broker(self, line: StepLine, step: StepResult) -> str:
        from packager.demo_mqtt import wait_broker

        if self.cfg.broker_url is not None:
            self.broker = parse_broker_url(self.cfg.broker_url)
            self.broker_url = self.broker.url  # credentials, if any, go to the children through the environment
            if self.broker.password is not None:
                self.child_env[PASSWORD_ENV] = self.broker.password
            line.status(f"connecting to {self.broker_url}")
            took = wait_broker(self.broker, timeout=self.cfg.timeouts.broker, retry=False)
            step.detail = {"kind": "external", "url": self.broker_url, "connect_s": round(took, 3)}
            self.result.broker = dict(step.detail)
            return f"Using the broker at {self.broker_url}"
        import amqtt

        port = free_port()
        self.broker_url = f"mqtt://127.0.0.1:{port}"
        self.broker = parse_broker_url(self.broker_url)
        line.status(f"starting amqtt on 127.0.0.1:{port}")
        self.broker_child = self.children.start("broker", "packager.demo_broker", ["--port", str(port)])
        took = wait_broker(self.broker, timeout=self.cfg.timeouts.broker, alive=self.broker_child.check)
        version = getattr(amqtt, "__version__", "?")
        step.detail = {"kind": "amqtt", "version": version, "url": self.broker_url, "pid": self.broker_child.pid,
                       "ready_s": round(took, 3)}
        self.result.broker = dict(step.detail)
        self.say.note("MQTT 3.1.1 only: the server falls back from 5, the agents speak 3.1.1")
        return f"Embedded MQTT broker (amqtt {version}) accepting clients on {self.broker_url}"

    def _keys(self, line: StepLine, step: StepResult) -> str:
        from packager.keys import generate_keypair

        self.keys.mkdir(parents=True)
        gen = generate_keypair(self.keys, name="release")
        if (gen.public_path, gen.private_path) != (self.release_pub, self.release_key):
            raise DemoFailed(step.name, f"the key pair was written to {gen.public_path}, {gen.private_path}")
        step.detail = {"key_id": gen.key_id}
        return f"Release signing key (ECDSA P-256): {gen.key_id[:16]}…"

    def _repository(self, line: StepLine, step: StepResult) -> str:
        from datetime import datetime, timezone

        from packager.repo import init_repo

        info = init_repo(self.repo, release_keys=[self.release_pub], now=datetime.now(timezone.utc))
        if not info.trust_anchor.is_file() or info.root_version != 1:
            raise DemoFailed(step.name, "the repository has no version-1 root to give devices")
        step.detail = {"root_version": info.root_version, "trust_anchor": str(info.trust_anchor),
                       "release_keys": list(info.release_key_ids)}
        self.say.note(f"devices trust {info.trust_anchor.relative_to(self.workdir)}; online keys sign timestamp "
                      "and snapshot, offline keys root and targets")
        return "TUF repository: root, targets, snapshot and timestamp signed; the release key is a signed target"

    def _build(self, line: StepLine, step: StepResult, version: str, quantize: str) -> str:
        path, out = build_release(examples=self.cfg.examples, workdir=self.workdir, key=self.release_key,
                                  version=version, quantize=quantize, line=line, say=self.say, step=step.name)
        self.bundles[version] = path
        step.detail = out.detail
        return out.title

    def _build_v1(self, line: StepLine, step: StepResult) -> str:
        return self._build(line, step, self.cfg.v1, self.cfg.quantize)

    def _build_v2(self, line: StepLine, step: StepResult) -> str:
        return self._build(line, step, self.cfg.v2, self.cfg.quantize_v2)

    def _publish(self, step: StepResult, version: str) -> str:
        self.timestamp, out = publish_release(self.repo, self.bundles[version], version=version, step=step.name)
        step.detail = out.detail
        return out.title

    def _publish_v1(self, line: StepLine, step: StepResult) -> str:
        return self._publish(step, self.cfg.v1)

    def _publish_v2(self, line: StepLine, step: StepResult) -> str:
        return self._publish(step, self.cfg.v2)

    def _server(self, line: StepLine, step: StepResult) -> str:
        from packager.demo_mqtt import wait_hint

        assert self.broker is not None
        self.server_child = self.children.start("server", "packager.cli", [
            "serve", "--repo", str(self.repo), "--broker", self.broker_url, "--protocol", "auto", *self._credentials()],
            env=self.child_env)
        line.status(f"waiting for edgeship serve to announce timestamp v{self.timestamp}")
        seen = wait_hint(self.broker, self.timestamp, timeout=self.cfg.timeouts.server, alive=self.server_child.check)
        step.detail = {"pid": self.server_child.pid, "hint_timestamp_version": seen}
        self.say.note(f"the retained hint on edgeship/v1/hint says timestamp v{seen}: devices refresh at once")
        return f"Update server (edgeship serve) answering on {self.broker_url}"

    def _credentials(self) -> list[str]:
        args = []
        if self.broker is not None and self.broker.username is not None:
            args += ["--username", self.broker.username]
        if PASSWORD_ENV in self.child_env:
            args += ["--password-env", PASSWORD_ENV]
        return args

    def _agents(self, line: StepLine, step: StepResult) -> str:
        root = Layout(self.repo).trust_anchor
        for d in self.devices:
            d.write_config(broker_url=self.broker_url, root=root, groups=[self.group], tuning=self.cfg.tuning,
                           username=self.broker.username if self.broker else None,
                           password_env=PASSWORD_ENV if PASSWORD_ENV in self.child_env else None)
            self.agent_children.append(self.children.start(f"agent-{d.device_id}", "agent.cli",
                                                           ["run", "--config", str(d.config)], env=self.child_env))
        urls: dict[str, str] = {}

        def all_serving() -> bool | None:
            for d in self.devices:
                if d.device_id not in urls and (u := d.api_url()) is not None:
                    urls[d.device_id] = u
                    self.say.event(f"{d.device_id}: inference API on {u}")
            line.status(f"agents serving: {len(urls)}/{len(self.devices)}")
            return True if len(urls) == len(self.devices) else None

        try:
            wait_until(all_serving, timeout=self.cfg.timeouts.agents, watch=self.agent_children, interval=0.1)
        except StepTimeout:
            late = [d.device_id for d in self.devices if d.device_id not in urls]
            raise DemoFailed(step.name, f"{', '.join(late)} did not start an inference API within "
                                        f"{self.cfg.timeouts.agents:g} s") from None
        step.detail = {d.device_id: {"pid": c.pid, "api": urls[d.device_id], "state_dir": str(d.state_dir)}
                       for d, c in zip(self.devices, self.agent_children)}
        self.say.note(f"each has its own process, state directory and agent.toml (group {self.group}; "
                      f"watch window {self.cfg.tuning.watch_inferences} inferences or "
                      f"{self.cfg.tuning.watch_seconds:g} s)")
        return f"{len(self.devices)} device agents running: {', '.join(d.device_id for d in self.devices)}"

    def _wait_version(self, line: StepLine, step: StepResult, version: str, previous: str | None,
                      timeout: float) -> float:
        step.detail = wait_version(self.devices, version=version, previous=previous, timeout=timeout,
                                   status_timeout=2 * self.cfg.timeouts.request, watch=self.agent_children,
                                   line=line, say=self.say, step=step.name, env=self.child_env)
        return float(step.detail["slowest_s"])

    def _install_v1(self, line: StepLine, step: StepResult) -> str:
        slowest = self._wait_version(line, step, self.cfg.v1, None, self.cfg.timeouts.install)
        return f"Every device verified, installed and committed {MODEL} {self.cfg.v1} (slowest {slowest:.1f} s)"

    def _rollout_v2(self, line: StepLine, step: StepResult) -> str:
        slowest = self._wait_version(line, step, self.cfg.v2, self.cfg.v1, self.cfg.timeouts.rollout)
        return (f"Every device moved to {MODEL} {self.cfg.v2} ({self.cfg.v1} kept for rollback; "
                f"slowest {slowest:.1f} s after publishing)")

    def _predict(self, line: StepLine, step: StepResult, version: str) -> str:
        step.detail = predict_all(self.devices, self.eval_x, self.eval_y, version=version, samples=self.cfg.samples,
                                  min_accuracy=self.cfg.min_accuracy, timeout=self.cfg.timeouts.request,
                                  line=line, say=self.say, step=step.name)
        d = step.detail
        return (f"{d['samples']} predictions answered by {MODEL} {version}: {d['correct']}/{d['samples']} correct "
                f"({d['accuracy']:.0%})")

    def _predict_v1(self, line: StepLine, step: StepResult) -> str:
        return self._predict(line, step, self.cfg.v1)

    def _predict_v2(self, line: StepLine, step: StepResult) -> str:
        return self._predict(line, step, self.cfg.v2)

    def _fleet(self, line: StepLine, step: StepResult) -> str:
        from packager.demo_fleet import check_fleet

        assert self.broker is not None
        line.status("collecting retained state, presence and telemetry")
        view, seconds = check_fleet(self.broker, group=self.group, devices=[d.device_id for d in self.devices],
                                    version=self.cfg.v2, min_inferences=2 * self.cfg.samples,
                                    timeout=self.cfg.timeouts.fleet, say=self.say,
                                    step=step.name)
        step.detail = {"devices": view.devices, "online": view.online, "versions": view.versions,
                       "statuses": view.statuses, "failures": len(view.failures), "collect_s": round(seconds, 3),
                       "rows": [{"device": r.device, "version": r.version, "status": r.status, "online": r.online,
                                 "inferences": r.inferences} for r in view.rows]}
        return (f"Fleet status from the broker: {view.online}/{view.devices} online, "
                f"{MODEL} {self.cfg.v2} x{view.versions[MODEL][self.cfg.v2]}, all active")
