"""Resumable, pipelined bundle download, every block checked against what TUF signed.

The repository signs, for each bundle, the SHA-256 of every ``block_size``
slice (see docs/protocol.md). Blocks are requested a few at a time, checked
on arrival, written in place into ``<sha256>.part`` and remembered in
``<sha256>.record.json``. After a reconnect or a restart the record says which
blocks are already here; they are hashed again (a power cut may have lost a
write the record claimed) and only the missing ones are asked for.

Bad data (a block that does not match, a reply that does not answer the
request, more bytes than the bundle could need) ends the download with a
:class:`~agent.errors.BadData`; a failed link (timeouts past the retries, the
connection gone, the overall deadline) with a :class:`~agent.errors.LinkError`,
and the next attempt resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import safejson
from agent.channel import Channel, ChannelClosed, RequestTimeout
from agent.config import UpdateLimits
from agent.errors import BlockRejected, DownloadTimeout, JsonError, LimitExceeded, LinkError
from agent.fsutil import write_atomic
from agent.protocol import MAX_BLOCK, BlockRequest

log = logging.getLogger(__name__)

RECORD_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class BlockedTarget:
    """A target as TUF signed it, with its per-block hashes."""

    path: str
    """The TUF target path, e.g. ``digits/digits-1.2.0.edge``."""
    url_path: str
    """What to ask the server for (hash-prefixed under consistent snapshots)."""
    length: int
    sha256: str
    block_size: int
    block_sha256: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 4096 <= self.block_size <= MAX_BLOCK:
            raise BlockRejected(f"{self.path}: block size {self.block_size} is outside 4 KiB..1 MiB")
        if self.length <= 0:
            raise BlockRejected(f"{self.path}: length {self.length} is not positive")
        if len(self.block_sha256) != math.ceil(self.length / self.block_size):
            raise BlockRejected(f"{self.path}: {len(self.block_sha256)} block hashes for {self.length} bytes")
        if len(self.sha256) != 64 or any(len(h) != 64 for h in self.block_sha256):
            raise BlockRejected(f"{self.path}: malformed hashes")

    @property
    def blocks(self) -> int:
        return len(self.block_sha256)

    def span(self, index: int) -> tuple[int, int]:
        offset = index * self.block_size
        return offset, min(self.block_size, self.length - offset)


@dataclass
class DownloadStats:
    blocks_total: int = 0
    blocks_resumed: int = 0
    """Blocks found already present (and re-verified) when the download started."""
    blocks_fetched: int = 0
    requests: int = 0
    retries: int = 0
    bytes_fetched: int = 0
    fetched_offsets: list[int] = field(default_factory=list)


class Progress:
    """Which prefix of the file is whole, shared with a thread that reads it while the rest arrives.

    The download marks blocks as they are checked and written; :class:`GrowingReader` blocks
    until the bytes it wants are inside the whole prefix. ``abort()`` wakes every reader."""

    def __init__(self, target: BlockedTarget) -> None:
        self._target = target
        self._have = bytearray(target.blocks)
        self._cond = threading.Condition()
        self._next = 0
        self.whole = 0
        """Bytes from the start that are checked and written."""
        self.aborted = False

    def mark(self, first: int, count: int) -> None:
        with self._cond:
            for i in range(first, first + count):
                self._have[i] = 1
            while self._next < self._target.blocks and self._have[self._next]:
                self._next += 1
            self.whole = min(self._next * self._target.block_size, self._target.length)
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()

    def wait_for(self, end: int) -> None:
        with self._cond:
            while self.whole < end and not self.aborted:
                self._cond.wait()
            if self.aborted:
                raise DownloadAborted("the download stopped before this part of the file arrived")


class DownloadAborted(LinkError):
    """A reader of a file being downloaded was woken because the download stopped."""


class GrowingReader:
    """A file-like reader of ``path`` that waits for each byte range to be downloaded and checked."""

    def __init__(self, path: Path, progress: Progress, length: int) -> None:
        self._path = path
        self._progress = progress
        self._length = length
        self._pos = 0
        self._fd: int | None = None

    def read(self, n: int = -1) -> bytes:
        end = self._length if n < 0 else min(self._pos + n, self._length)
        if end <= self._pos:
            return b""
        self._progress.wait_for(end)
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        data = os.pread(self._fd, end - self._pos, self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Record:
    """Which blocks of ``<sha>.part`` are here; persisted atomically, lazily."""

    def __init__(self, path: Path, target: BlockedTarget) -> None:
        self.path = path
        self.target = target
        self.done: set[int] = set()
        self._dirty = False

    def load(self) -> set[int]:
        try:
            obj = safejson.loads(self.path.read_bytes(), max_bytes=4 << 20, max_depth=4)
        except (OSError, JsonError) as e:
            if self.path.exists():
                log.warning("ignoring unreadable download record %s: %s", self.path, e)
            return set()
        t = self.target
        if not (isinstance(obj, dict) and obj.get("format") == RECORD_FORMAT and obj.get("sha256") == t.sha256
                and obj.get("length") == t.length and obj.get("block_size") == t.block_size
                and isinstance(obj.get("done"), list)):
            log.warning("ignoring download record %s: it describes another download", self.path)
            return set()
        return {i for i in obj["done"] if type(i) is int and 0 <= i < t.blocks}

    def add(self, index: int) -> None:
        self.done.add(index)
        self._dirty = True

    def flush(self, part_fd: int) -> None:
        if not self._dirty:
            return
        os.fsync(part_fd)  # the blocks first, then the record that vouches for them
        t = self.target
        data = safejson.dumps({"format": RECORD_FORMAT, "path": t.path, "sha256": t.sha256, "length": t.length,
                               "block_size": t.block_size, "done": sorted(self.done)})
        write_atomic(self.path, data)
        self._dirty = False


def _check_block(target: BlockedTarget, index: int, data: bytes | memoryview) -> bool:
    return hashlib.sha256(data).hexdigest() == target.block_sha256[index]


def _check_and_write(target: BlockedTarget, fd: int, first: int, count: int, offset: int,
                     body: bytes) -> int | None:
    """Check blocks ``first..first+count`` in ``body``; write them only if all match. Returns the bad index."""
    view = memoryview(body)
    for index in range(first, first + count):
        b_off, b_size = target.span(index)
        if not _check_block(target, index, view[b_off - offset:b_off - offset + b_size]):
            return index
    os.pwrite(fd, body, offset)
    return None


def part_path(workdir: Path, target: BlockedTarget) -> Path:
    return workdir / f"{target.sha256}.part"


def record_path(workdir: Path, target: BlockedTarget) -> Path:
    return workdir / f"{target.sha256}.record.json"


def discard(workdir: Path, target: BlockedTarget) -> None:
    for p in (part_path(workdir, target), record_path(workdir, target)):
        p.unlink(missing_ok=True)


async def download(
    channel: Channel,
    target: BlockedTarget,
    workdir: Path,
    limits: UpdateLimits,
    *,
    stats: DownloadStats | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch ``target`` into ``workdir/<sha256>.part`` and return that path, whole and verified.

    With ``progress``, blocks are announced as they are written, so a :class:`GrowingReader`
    can verify the bundle while it arrives."""
    if target.length > limits.max_bundle_bytes:
        raise LimitExceeded(f"{target.path} is {target.length} bytes, over this device's "
                            f"{limits.max_bundle_bytes}-byte bundle limit")
    stats = stats if stats is not None else DownloadStats()
    workdir.mkdir(parents=True, exist_ok=True)
    part = part_path(workdir, target)
    record = _Record(record_path(workdir, target), target)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, target.length)
        for index in sorted(record.load()):
            offset, size = target.span(index)
            if _check_block(target, index, os.pread(fd, size, offset)):
                record.done.add(index)
            else:
                log.info("block %d of %s did not survive (re-fetching it)", index, target.path)
        stats.blocks_total = target.blocks
        stats.blocks_resumed = len(record.done)
        if progress is not None:
            for index in record.done:
                progress.mark(index, 1)
        if record.done:
            log.info("resuming %s: %d of %d blocks already here", target.path, len(record.done), target.blocks)
        try:
            await asyncio.wait_for(_fetch_missing(channel, target, fd, record, limits, stats, progress),
                                   limits.download_deadline)
        except asyncio.TimeoutError:
            raise DownloadTimeout(f"{target.path}: download did not finish within "
                                  f"{limits.download_deadline:g} s") from None
        finally:
            record.flush(fd)
    finally:
        os.close(fd)
    # Every block matched the hash TUF signed for it, so the file is whole; the caller checks the file's
    # own SHA-256 in the same pass that verifies the bundle.
    record.path.unlink(missing_ok=True)
    return part


async def _fetch_missing(channel: Channel, target: BlockedTarget, fd: int, record: _Record,
                         limits: UpdateLimits, stats: DownloadStats, progress: Progress | None) -> None:
    per_request = max(1, limits.request_bytes // target.block_size)
    missing = [i for i in range(target.blocks) if i not in record.done]
    # Group runs of consecutive missing blocks into requests of up to `per_request` blocks.
    spans: list[tuple[int, int]] = []
    for i in missing:
        if spans and spans[-1][0] + spans[-1][1] == i and spans[-1][1] < per_request:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for s in spans:
        queue.put_nowait(s)
    received_cap = int(target.length * limits.max_received_ratio) + MAX_BLOCK
    bytes_at_start = channel.stats.bytes_in
    last_flush = time.monotonic()

    async def worker() -> None:
        nonlocal last_flush
        while True:
            try:
                first, count = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            offset = first * target.block_size
            end = min(target.length, (first + count) * target.block_size)
            body = await _request_span(channel, target, offset, end - offset, limits, stats)
            if channel.stats.bytes_in - bytes_at_start > received_cap:
                raise LimitExceeded(f"{target.path}: received over {received_cap} bytes for a "
                                    f"{target.length}-byte bundle; abandoning the download")
            # hashing and writing release the GIL: keep them off the event loop
            bad = await asyncio.to_thread(_check_and_write, target, fd, first, count, offset, body)
            if bad is not None:
                raise BlockRejected(f"{target.path}: block {bad} does not match its signed hash "
                                    "(altered in transit, or from another bundle)")
            for k in range(count):
                record.add(first + k)
            if progress is not None:
                progress.mark(first, count)
            stats.blocks_fetched += count
            stats.bytes_fetched += len(body)
            stats.fetched_offsets.append(offset)
            now = time.monotonic()
            if now - last_flush >= limits.record_flush_interval:
                last_flush = now
                await asyncio.to_thread(record.flush, fd)  # fsync: keep it off the event loop

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limits.blocks_in_flight, len(spans)) or 0)]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _request_span(channel: Channel, target: BlockedTarget, offset: int, length: int,
                        limits: UpdateLimits, stats: DownloadStats) -> bytes:
    last: LinkError | None = None
    for attempt in range(limits.request_retries):
        if attempt:
            stats.retries += 1
        stats.requests += 1
        req = BlockRequest(id=Channel.new_id(), path=target.url_path, offset=offset, length=length)
        try:
            reply = await channel.request(req, timeout=limits.request_timeout)
        except ChannelClosed:
            raise
        except RequestTimeout as e:
            last = e
            log.debug("block at %d of %s timed out (attempt %d)", offset, target.path, attempt + 1)
            continue
        if reply.status == "error":
            last = LinkError(f"server error for {target.path} at {offset}: {reply.message}")
            continue
        if reply.status != "ok":
            raise BlockRejected(f"{target.path}: server answered {reply.status} for the block at {offset}: "
                                f"{reply.message}")
        if reply.offset != offset or reply.total != target.length or len(reply.body) != length:
            raise BlockRejected(
                f"{target.path}: reply does not answer the request (asked {length} bytes at {offset} of "
                f"{target.length}; got {len(reply.body)} at {reply.offset} of {reply.total})")
        return reply.body
    assert last is not None
    raise LinkError(f"{target.path}: no answer for the block at {offset} after {limits.request_retries} "
                    f"attempts: {last}")
