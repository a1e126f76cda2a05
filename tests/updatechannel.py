"""Harness for update-channel tests: a repository, a real server, a hostile server, agents.

Everything runs against a real Mosquitto (tests.mosquitto) inside one asyncio
loop per test. :class:`EvilServer` answers device requests with the real
request handler and then lets a test tamper with the replies: it is the
broker-level attacker (anyone who can publish on a device's reply topic).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiomqtt

from agent.daemon import Agent
from agent.mqtt import BrokerSettings, make_client, parse_broker_url
from agent.protocol import REQ_FILTER, BlockRequest, MetaRequest, ProtocolError, decode_request, device_from_topic, resp_topic
from agent.settings import AgentConfig, parse_config
from packager.repo import init_repo, publish
from packager.server import Server
from packager.server_handler import RequestHandler, ServerLimits

FAST_SERVER = ServerLimits(hint_interval=0.1, resign_interval=3600, reconnect_min=0.1, reconnect_max=0.5)


def now() -> datetime:
    return datetime.now(timezone.utc)


def make_repo(path: Path, release_key: Path, bundle: Path) -> Path:
    """A fresh TUF repository at ``path`` trusting ``release_key`` (a public key file), ``bundle`` published."""
    init_repo(path, release_keys=[release_key], now=now())
    publish(path, bundle, now=now())
    return path


def agent_config(broker_url: str, state: Path, root: Path, *, device: str = "dev1", models: tuple[str, ...] = ("mlp",),
                 limits: dict[str, Any] | None = None, **top: Any) -> AgentConfig:
    raw: dict[str, Any] = {
        "device_id": device, "state_dir": str(state), "root": str(root), "models": list(models),
        "refresh_interval": 30, "reconnect_min": 0.1, "reconnect_max": 0.5,
        "broker": {"url": broker_url},
        "limits": {"request_timeout": 2, "request_retries": 3, **(limits or {})},
        "serve": {"port": 0},
        **top,
    }
    return parse_config(raw, base=state.parent)


def trusted_snapshot(state: Path) -> dict[str, str]:
    """Hashes of everything the device trusts or has staged: must not change on a refused attack."""
    out = {}
    for sub in ("tuf/trusted-root.json", "tuf/cache", "models", "bundles"):
        p = state / sub
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.exists() else []
        for f in files:
            out[str(f.relative_to(state))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def held_state(state: Path) -> dict[str, Any]:
    """What the device holds: bundle files, and per model what is staged, accepted and refused.

    (Not ``last_error``: reporting an attack is expected.)"""
    from agent.store import Store

    store = Store(state)
    out: dict[str, Any] = {f"bundles/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(store.bundles.glob("*.edge"))}
    for p in sorted(store.models.glob("*.json")):
        m = store.load(p.stem)
        out[f"models/{p.stem}"] = (m.staged, m.seen, m.refused)
    return out


@contextlib.asynccontextmanager
async def running_server(repo: Path, broker: str | BrokerSettings, *, protocol: str = "auto",
                         limits: ServerLimits = FAST_SERVER) -> AsyncIterator[Server]:
    settings = parse_broker_url(broker) if isinstance(broker, str) else broker
    server = Server(repo, settings, protocol=protocol, limits=limits)  # type: ignore[arg-type]
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.ensure_future(server.run(stop=stop, ready=ready.set))
    try:
        await asyncio.wait_for(_first(ready.wait(), task), 10)
        yield server
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


async def _first(wait: Any, task: asyncio.Future[Any]) -> None:
    waiter = asyncio.ensure_future(wait)
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise RuntimeError("server stopped before it was ready")


Tamper = Callable[[str, "MetaRequest | BlockRequest", bytes], "list[tuple[str, bytes]]"]


@dataclass
class EvilServer:
    """Answers with the real handler, then ``tamper(device, request, reply) -> [(topic, payload)]``."""

    repo: Path
    settings: BrokerSettings
    tamper: Tamper | None = None
    delay: float = 0.0
    """Seconds to wait before answering each block request (a slow link)."""
    reply_delay: Callable[[MetaRequest | BlockRequest], float] | None = None
    """Per-request delay, to make replies overtake each other."""
    requests: list[tuple[str, MetaRequest | BlockRequest]] = field(default_factory=list)
    answered: list[MetaRequest | BlockRequest] = field(default_factory=list)
    """Requests in the order their replies were published."""

    def block_offsets(self, device: str | None = None) -> Counter[int]:
        return Counter(r.offset for d, r in self.requests if isinstance(r, BlockRequest) and device in (None, d))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EvilServer]:
        handler = RequestHandler(self.repo, ServerLimits())
        client = make_client(self.settings, identifier="edgeship-server-evil", protocol="3.1.1")
        async with client:
            await client.subscribe(REQ_FILTER, qos=1)

            async def answer(topic: str, payload: bytes) -> None:
                try:
                    device = device_from_topic(topic, "req")
                    req = decode_request(payload)
                except ProtocolError:
                    return
                self.requests.append((device, req))
                if self.delay and isinstance(req, BlockRequest):
                    await asyncio.sleep(self.delay)
                if self.reply_delay is not None:
                    await asyncio.sleep(self.reply_delay(req))
                reply = handler.handle(device, payload)
                if reply is None:
                    return
                out = [(resp_topic(device), reply)] if self.tamper is None else self.tamper(device, req, reply)
                for t, p in out:
                    await client.publish(t, p, qos=1)
                self.answered.append(req)

            async def loop() -> None:
                tasks = set()
                async for msg in client.messages:
                    t = asyncio.ensure_future(answer(str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

            reader = asyncio.ensure_future(loop())
            try:
                yield self
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)


async def publish_raw(settings: BrokerSettings, topic: str, payload: bytes, *, retain: bool = False) -> None:
    async with make_client(settings, identifier=f"edgeship-server-raw-{time.monotonic_ns() % 10**9}",
                           protocol="3.1.1") as c:
        await c.publish(topic, payload, qos=1, retain=retain)


async def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_agent(config: AgentConfig, events: list[dict[str, Any]] | None = None) -> AsyncIterator[Agent]:
    agent = Agent(config, on_event=(events.append if events is not None else None))
    stop = asyncio.Event()
    task = asyncio.ensure_future(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait((task,), timeout=10)
        if not task.done():
            raise AssertionError(f"the agent did not stop within 10 s of being asked to:\n{_stacks()}")
        task.result()  # an agent that died early re-raises its error here


def _stacks() -> str:
    """Every task's and thread's stack, to show where an agent that does not stop is waiting."""
    import io
    import sys
    import traceback

    out = io.StringIO()
    for t in asyncio.all_tasks():
        out.write(f"--- task {t.get_name()} {t.get_coro()!r}\n")
        t.print_stack(file=out)
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {ident}\n{''.join(traceback.format_stack(frame))}")
    return out.getvalue()


__all__ = ["Agent", "EvilServer", "aiomqtt", "agent_config", "held_state", "now", "publish_raw", "running_agent",
           "running_server", "trusted_snapshot", "wait_for"]
