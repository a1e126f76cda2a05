"""Request/response over MQTT: one :class:`Channel` per device connection.

The channel publishes a request on the device's own request topic and waits
for the reply with the same random id on the device's own reply topic. It
knows nothing about MQTT beyond an injected ``publish`` coroutine, so the pure
logic is testable with an in-memory fake and the real adapter (aiomqtt) plugs in
unchanged.

A reply that is malformed, answers no pending request (an unknown id: a reply
meant for another device, a late duplicate, a forgery) or comes twice is
dropped and counted; it never completes someone else's request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.errors import LinkError
from agent.protocol import BlockRequest, MetaRequest, ProtocolError, Reply, decode_reply, encode_request, req_topic

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


class RequestTimeout(LinkError):
    """No reply arrived in time."""


class ChannelClosed(LinkError):
    """The connection under the channel went away with requests pending."""


@dataclass
class ChannelStats:
    requests: int = 0
    replies: int = 0
    timeouts: int = 0
    malformed: int = 0
    unmatched: int = 0
    """Replies whose id matched no pending request (foreign, late or duplicated)."""
    bytes_in: int = 0


class Channel:
    def __init__(self, device: str, publish: Publish, *, max_body: int) -> None:
        self.device = device
        self._topic = req_topic(device)
        self._publish = publish
        self._max_body = max_body
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self.stats = ChannelStats()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(12)

    def deliver(self, payload: bytes) -> None:
        """Feed one message that arrived on this device's reply topic."""
        self.stats.bytes_in += len(payload)
        try:
            reply = decode_reply(payload, max_body=self._max_body)
        except ProtocolError as e:
            self.stats.malformed += 1
            log.debug("dropped malformed reply: %s", e)
            return
        fut = self._pending.pop(reply.id, None)
        if fut is None or fut.done():
            self.stats.unmatched += 1
            log.debug("dropped reply %s: no pending request has that id", reply.id)
            return
        self.stats.replies += 1
        fut.set_result(reply)

    async def request(self, req: MetaRequest | BlockRequest, *, timeout: float) -> Reply:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = fut
        self.stats.requests += 1
        try:
            await self._publish(self._topic, encode_request(req))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            raise RequestTimeout(f"no reply to {req.op} request within {timeout:g} s") from None
        finally:
            self._pending.pop(req.id, None)

    def close(self, reason: str = "connection lost") -> None:
        """Fail every pending request (the connection dropped)."""
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(reason))
