"""Request/response over MQTT: one :class:`Channel` per device connection.

The channel publishes a request on the device's own request topic and hands
the reply with the same random id, from the device's own reply topic, to
whoever asked. It knows nothing about MQTT beyond an injected ``publish``
coroutine (and, optionally, a ``send`` function that publishes without
waiting), so the pure logic is testable with an in-memory fake and the real
adapter (aiomqtt, or paho under it) plugs in unchanged.

Two ways to ask: ``await request(...)`` for one reply, or ``submit(...)``
with callbacks, which the block download uses to keep many requests in flight
without a task or a future per request.

A reply that is malformed, answers no pending request (an unknown id: a reply
meant for another device, a late duplicate, a forgery) or comes twice is
dropped and counted; it never completes someone else's request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.errors import LinkError
from agent.protocol import BlockRequest, MetaRequest, ProtocolError, Reply, decode_reply, encode_request, req_topic

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
Send = Callable[[str, bytes], None]
"""Publish without waiting for the broker; raises LinkError if the connection cannot take it."""
OnReply = Callable[[Reply], None]
OnError = Callable[[LinkError], None]


class RequestTimeout(LinkError):
    """No reply arrived in time."""


class ChannelClosed(LinkError):
    """The connection under the channel went away with requests pending, or before a request."""


@dataclass
class ChannelStats:
    requests: int = 0
    replies: int = 0
    timeouts: int = 0
    malformed: int = 0
    unmatched: int = 0
    """Replies whose id matched no pending request (foreign, late or duplicated)."""
    bytes_in: int = 0


_EARLY = 2 * time.get_clock_info("monotonic").resolution + 0.001
"""Seconds a timer may fire before its time (asyncio runs a handle up to the clock's resolution
early: 15.6 ms on Windows) and still count as on time, so an expiry does not re-arm in a loop."""


class _Pending:
    __slots__ = ("on_reply", "on_error", "timer", "seq")

    def __init__(self, on_reply: OnReply, on_error: OnError, timer: asyncio.TimerHandle, seq: int) -> None:
        self.on_reply, self.on_error, self.timer, self.seq = on_reply, on_error, timer, seq


class Channel:
    def __init__(self, device: str, publish: Publish, *, max_body: int, send: Send | None = None) -> None:
        self.device = device
        self._topic = req_topic(device)
        self._publish = publish
        self._send = send
        self._max_body = max_body
        self._pending: dict[str, _Pending] = {}
        self._last_answer = -math.inf
        """Loop time of the last reply that answered a pending request."""
        self._answered = -1
        """Place (``stats.requests`` when it was sent) of the latest-sent request answered so far."""
        self._closed: str | None = None
        """Why :meth:`close` was called: from then on every request fails at once, unsent."""
        self.stats = ChannelStats()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(12)

    def deliver(self, payload: bytes | memoryview) -> None:
        """Feed one message that arrived on this device's reply topic."""
        self.stats.bytes_in += len(payload)
        now = asyncio.get_running_loop().time()
        try:
            reply = decode_reply(payload, max_body=self._max_body)
        except ProtocolError as e:
            self.stats.malformed += 1
            log.debug("dropped malformed reply: %s", e)
            return
        pending = self._pending.pop(reply.id, None)
        if pending is None:
            self.stats.unmatched += 1
            log.debug("dropped reply %s: no pending request has that id", reply.id)
            return
        pending.timer.cancel()
        self._last_answer = now
        self._answered = max(self._answered, pending.seq)
        self.stats.replies += 1
        pending.on_reply(reply)

    async def request(self, req: MetaRequest | BlockRequest, *, timeout: float) -> Reply:
        """Publish ``req`` and wait for its reply (RequestTimeout, ChannelClosed)."""
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def on_reply(reply: Reply) -> None:
            if not fut.done():
                fut.set_result(reply)

        def on_error(err: LinkError) -> None:
            if not fut.done():
                fut.set_exception(err)

        if self._closed is not None:
            raise ChannelClosed(self._closed)
        self._expect(req, timeout, on_reply, on_error)
        try:
            await self._publish(self._topic, encode_request(req))
            return await fut
        finally:
            self.cancel(req.id)

    def submit(self, req: MetaRequest | BlockRequest, *, timeout: float, on_reply: OnReply, on_error: OnError) -> None:
        """Publish ``req`` without waiting. Exactly one callback runs, once: ``on_reply`` from
        :meth:`deliver`, or ``on_error`` (RequestTimeout after ``timeout`` seconds, ChannelClosed).
        Neither may raise: they run inside whoever feeds the channel."""
        if self._closed is not None:
            asyncio.get_running_loop().call_soon(on_error, ChannelClosed(self._closed))
            return
        self._expect(req, timeout, on_reply, on_error)
        payload = encode_request(req)
        if self._send is not None:
            try:
                self._send(self._topic, payload)
            except LinkError as e:
                self._fail(req.id, e)
            return
        task = asyncio.ensure_future(self._publish(self._topic, payload))
        task.add_done_callback(lambda t: self._published(req.id, t))

    def cancel(self, req_id: str) -> None:
        """Forget a pending request: its reply, if one comes, is dropped as unmatched."""
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            pending.timer.cancel()

    def close(self, reason: str = "connection lost") -> None:
        """Fail every pending request, and every later one at once (the session under the channel
        ended: a request sent on it now could only wait for its timeout, or for the PUBACK of a
        publish that the disconnect cut off)."""
        self._closed = self._closed or reason
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.timer.cancel()
            p.on_error(ChannelClosed(reason))

    def _expect(self, req: MetaRequest | BlockRequest, timeout: float, on_reply: OnReply, on_error: OnError) -> None:
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, req, timeout)
        self._pending[req.id] = _Pending(on_reply, on_error, timer, self.stats.requests)
        self.stats.requests += 1

    def _expire(self, req: MetaRequest | BlockRequest, timeout: float) -> None:
        """``timeout`` seconds since ``req`` went out, with no reply.

        If a request sent after ``req`` was answered, ``req``'s reply is lost (or the server that
        took it died): ask again now. If only requests sent before it were answered meanwhile, the
        link works and ``req`` is queued behind their replies (a link slower than the requests in
        flight): it waits until ``timeout`` seconds pass with no answer at all, or until a later
        request is answered. Only replies that match a pending request count, so a flood of
        replies with made-up ids does not keep it waiting; the broker sees the ids and could
        answer to keep it waiting, but a broker can withhold replies anyway: the download's
        deadline bounds both."""
        pending = self._pending.get(req.id)
        if pending is None:
            return
        loop = asyncio.get_running_loop()
        overtaken = self._answered > pending.seq
        if not overtaken and loop.time() + _EARLY < self._last_answer + timeout:
            pending.timer = loop.call_at(self._last_answer + timeout, self._expire, req, timeout)
            return
        self.stats.timeouts += 1
        self._fail(req.id, RequestTimeout(f"no reply to {req.op} request within {timeout:g} s" +
                                          (", while later requests were answered" if overtaken else "")))

    def _published(self, req_id: str, task: asyncio.Future[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._fail(req_id, error if isinstance(error, LinkError) else
                       ChannelClosed(f"request not published: {error!r}"))

    def _fail(self, req_id: str, err: LinkError) -> None:
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            pending.timer.cancel()
            pending.on_error(err)
