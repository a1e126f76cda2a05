"""What a device tells the fleet: retained state and presence, events, periodic telemetry.

Glue between the agent (store, model host) and agent.telemetry / agent.outbox:

* the **state** document (retained) is rebuilt from the store and republished
  whenever a model's status changes, and on every connect;
* **presence** is retained ``online: true`` on connect; the MQTT last will sets
  ``online: false`` if the device vanishes, a clean stop publishes it itself;
* **events** and **telemetry** go through the disk outbox, so what is produced
  offline is delivered on reconnect (bounded; drops are counted and reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.aio import cancel_and_wait
from agent.outbox import Outbox
from agent.protocol import presence_topic, state_topic
from agent.settings import AgentConfig
from agent.store import Store
from agent.telemetry import STEPS, ModelReport, ModelStats, ProcessSampler, Reporter, encode, presence_doc, publish_loop, rfc3339, state_doc

log = logging.getLogger(__name__)

STATE_STEPS = frozenset({"staged", "installed", "watching", "committed", "rolled_back", "refused", "error"})


class DeviceReporting:
    def __init__(self, config: AgentConfig, store: Store, host: Any, runtimes: Mapping[str, str | None]) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.runtimes = dict(runtimes)
        self.sampler = ProcessSampler(config.state_dir)
        self._outbox: Outbox | None = None
        self._reporter: Reporter | None = None
        self._state_changed = asyncio.Event()

    # --- the outbox lives from open() to close() (one process at a time) -------

    def open(self) -> None:
        if self._outbox is None:
            self._outbox = Outbox(self.config.state_dir / "outbox", self.config.telemetry.buffer_bytes,
                                  sync_interval=self.config.telemetry.sync_interval)
            self._reporter = Reporter(device=self.config.device_id, outbox=self._outbox, sampler=self.sampler)

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = self._reporter = None

    @property
    def outbox(self) -> Outbox:
        self.open()
        assert self._outbox is not None
        return self._outbox

    @property
    def reporter(self) -> Reporter:
        self.open()
        assert self._reporter is not None
        return self._reporter

    # --- documents ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        models = {}
        for name in self.config.models:
            st = self.store.load(name)
            a = st.active
            models[name] = ModelReport(
                version=a.version if a else None, sha256=a.sha256 if a else None,
                runtime=self._runtime_of(name), status=st.status,
                previous=st.previous.version if st.previous else None,
                staged=st.staged.version if st.staged else None, last_error=st.last_error,
                updated=a.at if a else None)
        return state_doc(device=self.config.device_id, agent_version=__version__, groups=list(self.config.groups),
                         runtimes=self.runtimes, models=models)

    def _runtime_of(self, model: str) -> str | None:
        try:
            return str(self.host.info(model).runtime)
        except Exception:  # noqa: BLE001 - not serving: no runtime to report
            return None

    def model_stats(self) -> dict[str, ModelStats]:
        out = {}
        for name in self.config.models:
            try:
                s = self.host.stats(name)
            except Exception:  # noqa: BLE001 - a model not serving has no statistics
                continue
            out[name] = ModelStats(version=s.version, inferences=s.inferences, errors=s.errors + s.nonfinite,
                                   p50_ms=s.p50_ms, p95_ms=s.p95_ms, p99_ms=s.p99_ms)
        return out

    def will(self) -> Any:
        import aiomqtt

        doc = presence_doc(False, device=self.config.device_id, ts=rfc3339())
        return aiomqtt.Will(presence_topic(self.config.device_id), encode(doc), qos=1, retain=True)

    # --- hooks ----------------------------------------------------------------

    def event(self, step: str, fields: Mapping[str, Any]) -> None:
        """Queue an update step for the fleet; republish the state when a model's status may have changed."""
        model = fields.get("model")
        if step in STEPS and isinstance(model, str):
            detail = str(fields.get("detail") or fields.get("message") or fields.get("error") or "")
            self.reporter.event(model=model, version=fields.get("version"), step=step,  # type: ignore[arg-type]
                                detail=detail)
        if step in STATE_STEPS:
            self._state_changed.set()

    async def connected(self, client: Any) -> None:
        """Right after a connect: presence online, then the current state (both retained)."""
        dev = self.config.device_id
        await client.publish(presence_topic(dev), encode(presence_doc(True, device=dev)), qos=1, retain=True)
        await self._publish_state(client)

    async def _publish_state(self, client: Any) -> None:
        self._state_changed.clear()
        await client.publish(state_topic(self.config.device_id), encode(self.state()), qos=1, retain=True)

    async def session(self, client: Any) -> None:
        """While connected: drain the outbox and republish the state on changes. Raises when the link fails."""
        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1, timeout=10)

        import aiomqtt

        async def states() -> None:
            while True:
                await self._state_changed.wait()
                await self._publish_state(client)

        tasks = [asyncio.ensure_future(publish_loop(self.outbox, publish, self.reporter.wake, batch=self.config.telemetry.batch,
                                                    link_errors=(aiomqtt.MqttError, asyncio.TimeoutError))),
                 asyncio.ensure_future(states())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            await cancel_and_wait(tasks)

    async def going_offline(self, client: Any) -> None:
        """A clean stop: the will is not sent on a normal disconnect, so say it ourselves."""
        dev = self.config.device_id
        with contextlib.suppress(Exception):
            await client.publish(presence_topic(dev), encode(presence_doc(False, device=dev)), qos=1, retain=True,
                                 timeout=2)

    async def run(self, stop: asyncio.Event) -> None:
        """Queue telemetry every interval, online or not."""
        await self.reporter.run(self.model_stats, self.config.telemetry.interval, stop)

