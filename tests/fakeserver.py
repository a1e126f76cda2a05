"""An in-memory block server with knobs, for the channel and the downloader.

It answers requests published on a :class:`agent.channel.Channel` by calling
``channel.deliver`` - no broker, no sockets - and can misbehave the ways a
hostile broker can: corrupt, substitute, drop, duplicate, reorder, truncate,
flood.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

from agent.channel import Channel
from agent.download import BlockedTarget
from agent.protocol import BlockRequest, MetaRequest, Reply, decode_request, encode_reply


def blocked_target(data: bytes, *, block_size: int = 4096, path: str = "m/m-1.0.0.edge") -> BlockedTarget:
    sha = hashlib.sha256(data).hexdigest()
    blocks = tuple(hashlib.sha256(data[i:i + block_size]).hexdigest() for i in range(0, len(data), block_size))
    assert len(blocks) == math.ceil(len(data) / block_size)
    d, _, b = path.rpartition("/")
    return BlockedTarget(path=path, url_path=f"{d}/{sha}.{b}", length=len(data), sha256=sha,
                         block_size=block_size, block_sha256=blocks)


@dataclass
class FakeServer:
    files: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, bytes] = field(default_factory=dict)
    corrupt_offsets: set[int] = field(default_factory=set)
    substitute: bytes | None = None
    """Serve blocks from these bytes instead (a block from another bundle)."""
    drop_first: set[int] = field(default_factory=set)
    """Offsets whose first request goes unanswered (a lost message)."""
    drop_always: set[int] = field(default_factory=set)
    """Offsets never answered."""
    max_length: int | None = None
    """Longest block request answered; longer ones get bad_request (a server's --block-limit)."""
    duplicate: bool = False
    reorder: bool = False
    truncate: bool = False
    flood: int = 0
    """Extra unsolicited replies (with random ids) sent per request."""
    wrong_offset: bool = False
    silent_after: int | None = None
    """Answer only this many requests, then nothing (a stalled stream)."""
    tamper: Callable[[bytes], bytes] | None = None
    delay: float = 0.0
    """Seconds before each reply is delivered (a paced link)."""
    link_interval: float = 0.0
    """Seconds each reply takes on the device's link: replies arrive one after another, each
    queued behind those before it (a slow link, its bandwidth shared by the requests in flight)."""
    _link_free: float = 0.0
    requests: list[BlockRequest | MetaRequest] = field(default_factory=list)
    _held: list[bytes] = field(default_factory=list)

    def attach(self, device: str = "dev1", *, max_body: int = 1 << 20) -> Channel:
        self.channel = Channel(device, self._publish, max_body=max_body)
        return self.channel

    async def _publish(self, topic: str, payload: bytes) -> None:
        req = decode_request(payload)
        self.requests.append(req)
        if self.silent_after is not None and len(self.requests) > self.silent_after:
            return
        replies = self._answer(req)
        loop = asyncio.get_running_loop()
        for r in replies:
            if self.reorder:
                self._held.append(r)
                if len(self._held) >= 2:
                    held, self._held = self._held[::-1], []
                    for h in held:
                        loop.call_soon(self.channel.deliver, h)
                else:
                    loop.call_later(0.05, self._flush_held)
            elif self.link_interval:
                self._link_free = max(self._link_free, loop.time()) + self.link_interval
                loop.call_at(self._link_free, self.channel.deliver, r)
            elif self.delay:
                loop.call_later(self.delay, self.channel.deliver, r)
            else:
                loop.call_soon(self.channel.deliver, r)
        for i in range(self.flood):
            loop.call_soon(self.channel.deliver, encode_reply(Reply(id=f"{i:016x}", status="ok", body=b"x" * 60000)))

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for h in held:
            self.channel.deliver(h)

    def block_requests(self) -> list[BlockRequest]:
        return [r for r in self.requests if isinstance(r, BlockRequest)]

    def _answer(self, req: BlockRequest | MetaRequest) -> list[bytes]:
        if isinstance(req, MetaRequest):
            if req.name not in self.meta:
                return [encode_reply(Reply(id=req.id, status="not_found", message="no such metadata"))]
            return [encode_reply(Reply(id=req.id, status="ok", body=self.meta[req.name]))]
        if req.offset in self.drop_first:
            self.drop_first.discard(req.offset)
            return []
        if req.offset in self.drop_always:
            return []
        if self.max_length is not None and req.length > self.max_length:
            return [encode_reply(Reply(id=req.id, status="bad_request",
                                       message=f"block length {req.length} is over this server's limit"))]
        data = self.files.get(req.path)
        if data is None:
            return [encode_reply(Reply(id=req.id, status="not_found", message="no such target"))]
        source = self.substitute if self.substitute is not None else data
        body = source[req.offset:req.offset + req.length]
        if req.offset in self.corrupt_offsets:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if self.truncate:
            body = body[: len(body) // 2]
        offset = req.offset + (4096 if self.wrong_offset else 0)
        out = encode_reply(Reply(id=req.id, status="ok", body=body, offset=offset, total=len(data)))
        if self.tamper is not None:
            out = self.tamper(out)
        return [out, out] if self.duplicate else [out]
