"""``edgeship serve``: the MQTT update server (asyncio, aiomqtt).

One :class:`Server` answers the edgeship/v1 requests of every device from one repository
directory (see :mod:`packager.server_handler` for what a reply holds) and keeps three things
going next to that:

* **requests**: on MQTT 5 it subscribes the shared subscription
  ``$share/edgeship/edgeship/v1/req/+``, so N servers on one broker share the load and any
  of them may stop; on MQTT 3.1.1 (amqtt refuses MQTT 5) the plain ``edgeship/v1/req/+``.
  ``protocol="auto"`` tries 5 and falls back to 3.1.1 when the broker refuses the MQTT 5
  CONNECT. Each request is answered as paho reads it, on the event loop (target files stay
  open, blocks are read from the page cache straight into the reply frame), and the reply goes
  to the asking device's own ``resp`` topic at QoS 1, at most ``max_concurrent`` replies held
  in memory at once; the device id comes from the topic, never the payload.
* **the hint**: on every connect, and whenever metadata/timestamp.json gets a new version
  (checked every ``hint_interval``), a retained ``{"v":1,"timestamp_version":N}`` goes to
  ``edgeship/v1/hint``.
* **re-signing**: if ``REPO/keys/online`` exists, every ``resign_interval``
  :func:`packager.repo.refresh_online` re-signs timestamp/snapshot when they come within
  ``resign_margin`` of expiry. A failure is logged and the server keeps serving.

The first connection failing is a :class:`~agent.errors.LinkError`; once connected, a lost
broker is retried forever with exponential backoff and jitter, until ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import functools
import logging
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError

from agent.aio import cancel_and_wait
from agent.errors import LinkError, UsageError
from agent.mqtt import BrokerSettings, Protocol, lean_writes, make_client, on_published, paho_of, route
from agent.protocol import (
    HINT_TOPIC,
    REQ_FILTER,
    SHARED_REQ_FILTER,
    Hint,
    ProtocolError,
    device_from_topic,
    encode_hint,
    resp_topic,
)
from packager.repo import refresh_online, timestamp_version
from packager.server_handler import RequestHandler, ServerLimits, ServerStats

__all__ = ["RequestHandler", "Server", "ServerLimits", "ServerStats", "serve"]

log = logging.getLogger(__name__)

ProtocolChoice = Literal["auto", "5", "3.1.1"]
REPLY_QOS = 1
"""Replies go out at QoS 1: a reply is out (its ``max_concurrent`` slot free) when the broker
acknowledges it. Measured with bench/transfer.py (64 MiB, 16 x 256 KiB in flight, 2 cores), QoS 0
replies were no faster end to end: the device sends no PUBACKs, but Mosquitto used about twice
the CPU; QoS 0 requests to the server (``SUBSCRIBE_QOS``) did not help either."""
HINT_QOS = 1
SUBSCRIBE_QOS = 1
_UNSUPPORTED_PROTOCOL = (1, 0x84)  # MQTT 3.1.1 CONNACK code / MQTT 5 reason code


class Server:
    """The update server for one repository directory and one broker."""

    def __init__(self, repo_dir: Path, settings: BrokerSettings, *, protocol: ProtocolChoice = "auto",
                 limits: ServerLimits | None = None) -> None:
        if protocol not in ("auto", "5", "3.1.1"):
            raise UsageError(f"unknown MQTT protocol {protocol!r}: use auto, 5 or 3.1.1")
        self.repo_dir = Path(repo_dir)
        self.settings = settings
        self.protocol: ProtocolChoice = protocol
        self.limits = limits or ServerLimits()
        self.stats = ServerStats()
        self.handler = RequestHandler(self.repo_dir, self.limits, self.stats)
        self.client_id = f"edgeship-server-{secrets.token_hex(6)}"
        self.protocol_in_use: Protocol | None = None
        self.hint_version: int | None = None
        """The timestamp version last published as the hint."""
        self._ready_called = False
        self._ts_key: tuple[int, int, int] | None = None
        self._ts_version: int | None = None
        self._ts_problem: str | None = None

    # --- lifecycle -----------------------------------------------------------

    async def run(self, *, stop: asyncio.Event | None = None, ready: Callable[[], object] | None = None) -> None:
        """Serve until ``stop`` is set. ``ready()`` is called once, after the first subscription
        and hint. Raises LinkError if the very first connection fails."""
        if not self.repo_dir.is_dir():
            raise UsageError(f"repository directory {self.repo_dir} not found")
        if not (self.repo_dir / "metadata").is_dir():
            raise UsageError(f"{self.repo_dir} is not an edgeship repository (no metadata/ directory)")
        stop = stop or asyncio.Event()
        keep_freed_memory()
        if self._online_keys.is_dir():  # fresh metadata before the first hint goes out
            await self._resign_once()
        resign = asyncio.create_task(self._resign_loop(), name="edgeship-resign")
        try:
            await self._connections(stop, ready)
        finally:
            await cancel_and_wait((resign,))
            self.handler.close()
            log.info("server stopped: %s", self.stats.summary())

    async def _connections(self, stop: asyncio.Event, ready: Callable[[], object] | None) -> None:
        proto: Protocol = "3.1.1" if self.protocol == "3.1.1" else "5"
        connected_once = False
        attempt = 0
        while not stop.is_set():
            client = make_client(self.settings, identifier=self.client_id, protocol=proto)
            try:
                async with client:
                    if not connected_once:
                        log.info("serving %s on %s as %s (MQTT %s)", self.repo_dir, self.settings.url,
                                 self.client_id, proto)
                    else:
                        self.stats.add("reconnects")
                        log.info("reconnected to %s", self.settings.url)
                    connected_once = True
                    self.protocol_in_use = proto
                    await self._session(client, proto, stop, ready)
                    attempt = 0
            except aiomqtt.MqttError as e:
                if not connected_once:
                    if self.protocol == "auto" and proto == "5" and _refuses_protocol(e):
                        log.info("broker %s refused MQTT 5; falling back to MQTT 3.1.1", self.settings.url)
                        proto = "3.1.1"
                        continue
                    raise LinkError(f"cannot connect to broker {self.settings.url}: {e}") from None
                delay = min(self.limits.reconnect_max, self.limits.reconnect_min * 2 ** min(attempt, 30))
                delay *= random.uniform(0.5, 1.0)
                attempt += 1
                log.warning("broker connection lost (%s); reconnecting in %.1f s", _why(e), delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, client: aiomqtt.Client, proto: Protocol, stop: asyncio.Event,
                       ready: Callable[[], object] | None) -> None:
        """One connection: subscribe, announce, answer until stop (returns) or link loss (raises)."""
        topic_filter = SHARED_REQ_FILTER if proto == "5" else REQ_FILTER
        responder = _Responder(client, self.handler, self.stats, limit=self.limits.max_concurrent)
        await client.subscribe(topic_filter, qos=SUBSCRIBE_QOS)
        log.debug("subscribed %s", topic_filter)
        await self._publish_hint(client, force=True)
        if ready is not None and not self._ready_called:
            self._ready_called = True
            ready()
        stopper = asyncio.create_task(stop.wait(), name="edgeship-stop")
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._read(client), name="edgeship-read"),
            asyncio.create_task(self._hint_loop(client), name="edgeship-hint"),
            stopper,
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error  # the link is gone, and with it the replies not yet out
        await self._drain(client, topic_filter, responder)

    async def _drain(self, client: aiomqtt.Client, topic_filter: str, responder: _Responder) -> None:
        """On stop: leave the share group first (new requests go to the other servers); what
        already arrived is answered as it arrives; give the replies ``shutdown_grace`` seconds to
        get out."""
        try:
            await client.unsubscribe(topic_filter, timeout=self.limits.shutdown_grace)
        except aiomqtt.MqttError as e:
            log.debug("unsubscribe on stop failed: %s", e)
        deadline = time.monotonic() + self.limits.shutdown_grace
        while responder.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if responder.busy:
            log.warning("stopping with replies unsent")

    async def _read(self, client: aiomqtt.Client) -> None:
        """Requests never reach aiomqtt's queue (see :class:`_Responder`); this only notices a lost
        link, which ends the iteration with an MqttError."""
        async for message in client.messages:
            log.debug("dropping unexpected message on %s", message.topic)
            self.stats.add("dropped")

    # --- the hint ------------------------------------------------------------

    async def _hint_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.limits.hint_interval)
            await self._publish_hint(client, force=False)

    async def _publish_hint(self, client: aiomqtt.Client, *, force: bool) -> None:
        version = await asyncio.to_thread(self._current_version)
        if version is None or (version == self.hint_version and not force):
            return
        await client.publish(HINT_TOPIC, encode_hint(Hint(timestamp_version=version)), qos=HINT_QOS, retain=True)
        self.stats.add("hints_published")
        if version != self.hint_version:
            log.info("hint: timestamp version %d", version)
        self.hint_version = version

    def _current_version(self) -> int | None:
        """The timestamp version, re-read only when the file changed (inode, size, mtime)."""
        path = self.repo_dir / "metadata" / "timestamp.json"
        try:
            st = os.stat(path)
        except OSError as e:
            self._note_problem(f"no hint: cannot stat {path}: {e.strerror}")
            self._ts_key, self._ts_version = None, None
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._ts_key:
            return self._ts_version
        try:
            version = timestamp_version(self.repo_dir)
        except Exception as e:  # noqa: BLE001 - whatever the reader raises, keep serving
            self._note_problem(f"no hint: cannot read the timestamp version: {e}")
            return None
        self._ts_key, self._ts_version, self._ts_problem = key, version, None
        return version

    def _note_problem(self, problem: str) -> None:
        if problem != self._ts_problem:
            log.warning("%s", problem)
            self._ts_problem = problem

    # --- re-signing ----------------------------------------------------------

    @property
    def _online_keys(self) -> Path:
        return self.repo_dir / "keys" / "online"

    async def _resign_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.resign_interval)
            if self._online_keys.is_dir():
                await self._resign_once()
            else:
                log.debug("no %s: not re-signing", self._online_keys)

    async def _resign_once(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        margin = dt.timedelta(seconds=self.limits.resign_margin)
        call = functools.partial(refresh_online, self.repo_dir, now=now, margin=margin)
        try:
            changed = await asyncio.to_thread(call)
        except Exception as e:  # noqa: BLE001 - a failed re-sign is logged; serving goes on
            log.warning("re-signing timestamp/snapshot failed: %s", e)
            return
        if changed:
            self.stats.add("resigns")
            log.debug("re-signed timestamp/snapshot (they expired within %s)", margin)


def keep_freed_memory() -> None:
    """Let glibc's allocator keep freed memory for reuse instead of handing it back to the kernel.

    Every reply is a few buffers of 256 KiB-1 MiB (the frame, then paho's packet and its send
    slice); by default glibc maps and unmaps such buffers, or trims them off the heap, so each
    reply page-faults its memory in anew: measured, 40% of the server's CPU per bundle. The cost
    is a heap that stays at its high-water mark (about ``max_concurrent`` replies). No-op off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 4 * 1024 * 1024)
    mallopt(m_trim_threshold, 64 * 1024 * 1024)


class _Responder:
    """Answers requests as paho reads them, on the event loop thread: no task, future or thread
    hop per request. Requests arrive through a paho topic callback (they never reach aiomqtt's
    queue) and replies go out through paho directly, not through aiomqtt's per-call futures.

    Reading inline suits a repository in the page cache (a rollout serves the same bundle to
    every device); a cold read stalls the loop for its duration. At most ``limit`` replies are
    held in memory (published, not yet out: acknowledged at QoS 1, written at QoS 0); requests
    past it wait, as their small payloads, and are answered as replies get out."""

    def __init__(self, client: aiomqtt.Client, handler: RequestHandler, stats: ServerStats, *, limit: int) -> None:
        self._paho = paho_of(client)
        lean_writes(self._paho)  # a reply is copied into paho's packet once, not twice more; PUBACKs share sends
        self._handler = handler
        self._stats = stats
        self._limit = limit
        self._out: set[int] = set()
        """mids of replies published and not yet out."""
        self._waiting: deque[tuple[str, bytes]] = deque()
        route(client, REQ_FILTER, self._on_request)
        on_published(client, self._on_published)

    @property
    def busy(self) -> bool:
        return bool(self._out or self._waiting)

    def _on_request(self, topic: bytes, body: memoryview | bytes, retain: bool) -> None:
        try:
            device = device_from_topic(topic.decode(), "req")
        except (ProtocolError, UnicodeDecodeError) as e:
            log.debug("dropping a message on a request topic: %s", e)
            self._stats.add("dropped")
            return
        if retain:  # a stale request kept by the broker: its device is not waiting
            log.debug("dropping retained request from %s", device)
            self._stats.add("dropped")
            return
        payload = bytes(body)  # a request is small; the handler and the waiting queue take bytes
        if len(self._out) >= self._limit:
            self._waiting.append((device, payload))
        else:
            self._answer(device, payload)

    def _on_published(self, mid: int) -> None:
        self._out.discard(mid)
        while self._waiting and len(self._out) < self._limit:
            self._answer(*self._waiting.popleft())

    def _answer(self, device: str, payload: bytes) -> None:
        try:
            reply = self._handler.handle(device, payload)
            if reply is None:
                return
            info = self._paho.publish(resp_topic(device), reply, qos=REPLY_QOS)
        except Exception:  # noqa: BLE001 - a bug in answering one message must not stop the server
            self._stats.add("reply_failures")
            log.exception("internal error answering a request from %s", device)
            return
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self._stats.add("reply_failures")
            log.debug("reply to %s not sent: %s", device, paho.error_string(info.rc))
            return
        self._stats.add("replies_sent")
        if not info.is_published():
            self._out.add(info.mid)


def _why(err: BaseException) -> str:
    """aiomqtt's message plus its cause ("Disconnected during message iteration: [code:7] ...")."""
    cause = err.__cause__
    return f"{err}: {cause}" if cause is not None and str(cause) not in str(err) else str(err)


def _refuses_protocol(err: Exception) -> bool:
    rc = getattr(err, "rc", None)
    value = getattr(rc, "value", rc)
    return isinstance(err, MqttConnectError) and value in _UNSUPPORTED_PROTOCOL


async def serve(repo_dir: Path, settings: BrokerSettings, *, protocol: ProtocolChoice = "auto",
                limits: ServerLimits | None = None, stop: asyncio.Event | None = None,
                ready: Callable[[], object] | None = None) -> ServerStats:
    """Run one server until ``stop`` is set; returns its counters."""
    server = Server(repo_dir, settings, protocol=protocol, limits=limits)
    await server.run(stop=stop, ready=ready)
    return server.stats
