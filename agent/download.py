"""Resumable, pipelined bundle download, every block checked against what TUF signed.

The repository signs, for each bundle, the SHA-256 of every ``block_size``
slice (see docs/protocol.md). Blocks are requested ``blocks_in_flight`` at a
time; each reply is written in place into ``<sha256>.part`` as the channel
delivers it (no task, future or thread hop per block: per-message Python work
is what limits throughput) and remembered in ``<sha256>.record.json``. After
a reconnect or a restart the record says which blocks are already here; they
are hashed again (a power cut may have lost a write the record claimed, and a
block may not have been checked yet) and only the missing ones are asked for.

Who hashes the blocks: without a :class:`Progress`, the event loop, before it
writes each one. With one, a :class:`GrowingReader` in another thread (the
bundle verifier's) hashes each block as it reads it, before any byte of it
reaches the verifier, so that the event loop only moves bytes; the download
ends when the reader has checked every block, or with the first block that
does not match.

What the reader has checked leaves the page cache at the next flush of the record (after its
fsync, with ``posix_fadvise(DONTNEED)``): a bundle is written once and read once more at install,
so keeping it cached would only push out what the device is running, and the cache stays a few MiB
instead of growing by the whole bundle. On the development VM that growth was also slow: in 42
alternating deliveries of 64 MiB each way, ``pwrite`` cost 12-42 ms of CPU with the drops, while
without them 9 of 42 cost 77-214 ms (those deliveries took 245-414 ms instead of 169-248 ms).

Bad data (a block that does not match, a reply that does not answer the
request, more bytes than the bundle could need) ends the download with a
:class:`~agent.errors.BadData`; a failed link (timeouts past the retries, the
connection gone, the overall deadline) with a :class:`~agent.errors.LinkError`,
and the next attempt resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import failpoint, safejson
from agent.channel import Channel, ChannelClosed
from agent.config import UpdateLimits
from agent.errors import BlockRejected, DownloadTimeout, JsonError, LimitExceeded, LinkError, StorageError
from agent.fsutil import write_atomic
from agent.protocol import MAX_BLOCK, BlockRequest, Reply

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
FLUSH_BYTES = 8 * 1024 * 1024
"""Bytes written between two flushes of the record (and fsyncs of the part file) at most."""


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
    narrowed: int = 0
    """Requests the server refused as too long (its ``--block-limit`` under ``request_bytes``),
    each asked again as requests of half as many blocks."""


class Progress:
    """A download shared with the thread that reads (and checks) the file while the rest arrives.

    The download marks blocks as they are written; :class:`GrowingReader` waits until the bytes
    it wants are inside the written prefix, hashes each block against TUF, and reports back
    (:meth:`checked`, :meth:`failed`). ``abort()`` wakes every reader."""

    def __init__(self, target: BlockedTarget) -> None:
        self.target = target
        self._have = bytearray(target.blocks)
        self._cond = threading.Condition()
        self._next = 0
        self.whole = 0
        """Bytes from the start that are written."""
        self.aborted = False
        self.checked_blocks = 0
        """Blocks from the start that the reader has checked."""
        self._listener: tuple[asyncio.AbstractEventLoop, Callable[[], None],
                              Callable[[BaseException], None]] | None = None

    def listen(self, loop: asyncio.AbstractEventLoop, on_all_checked: Callable[[], None],
               on_failed: Callable[[BaseException], None]) -> None:
        """The download's side: both are called on ``loop``."""
        self._listener = (loop, on_all_checked, on_failed)

    def checked(self, first: int, count: int) -> None:
        """The reader's side: blocks ``first..first+count`` (the next ones) match their hashes."""
        self.checked_blocks = first + count
        if self.checked_blocks == self.target.blocks and self._listener is not None:
            self._post(self._listener[1])

    def failed(self, error: BaseException) -> None:
        """The reader's side: it stopped (a block did not match, or the bundle is bad)."""
        if self._listener is not None:
            self._post(self._listener[2], error)

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        assert self._listener is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._listener[0].call_soon_threadsafe(fn, *args)

    def mark(self, first: int, count: int) -> None:
        with self._cond:
            for i in range(first, first + count):
                self._have[i] = 1
            while self._next < self.target.blocks and self._have[self._next]:
                self._next += 1
            self.whole = min(self._next * self.target.block_size, self.target.length)
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
    """A file-like reader of ``path`` that waits for each byte range to be downloaded and checks
    every block against TUF before returning any byte of it. Reads sequentially, from one thread."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self._path = path
        self._progress = progress
        self._target = progress.target
        self._pos = 0
        self._checked = 0
        """Bytes from the start whose blocks matched (always a whole number of blocks, or all)."""
        self._buf = b""
        """Checked bytes not returned yet: ``[pos, checked)``."""
        self._fd: int | None = None

    def read(self, n: int = -1) -> bytes:
        end = self._target.length if n < 0 else min(self._pos + n, self._target.length)
        if end <= self._pos:
            return b""
        if end > self._checked:  # whole blocks, so that each is checked before any byte of it is used
            self._check_to(min(self._target.length, -(-end // self._target.block_size) * self._target.block_size))
        take = end - self._pos
        data, self._buf = (self._buf, b"") if take == len(self._buf) else (self._buf[:take], self._buf[take:])
        self._pos = end
        return data

    def _check_to(self, end: int) -> None:
        """Read ``[checked, end)`` once it is written, check its blocks, and add it to the buffer."""
        t, start = self._target, self._checked
        self._progress.wait_for(end)
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        data = os.pread(self._fd, end - start, start)
        if len(data) != end - start:
            raise StorageError(f"{self._path} is shorter than the {end} bytes written to it")
        view = memoryview(data)
        first, last = start // t.block_size, (end - 1) // t.block_size
        for index in range(first, last + 1):
            b_off, b_size = t.span(index)
            if not _check_block(t, index, view[b_off - start:b_off - start + b_size]):
                if index > first:  # the ones before it are good: kept for the next attempt
                    self._progress.checked(first, index - first)
                error = BlockRejected(f"{t.path}: block {index} does not match its signed hash "
                                      "(altered in transit, or from another bundle)")
                self._progress.failed(error)
                raise error
        self._checked = end
        self._buf = self._buf + data if self._buf else data
        self._progress.checked(first, last + 1 - first)

    def drain(self) -> None:
        """Check what the verifier did not need to read (normally nothing), so that the download can end."""
        while self.read(self._target.block_size):
            pass

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
        self._lock = threading.Lock()
        """Blocks are added on the event loop; flushes run in a worker thread."""

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

    def add(self, first: int, count: int = 1) -> None:
        with self._lock:
            self.done.update(range(first, first + count))
            self._dirty = True

    def flush(self, part_fd: int) -> None:
        """Persist the blocks done so far. Runs in a thread while blocks are added: the snapshot
        is taken (and the record marked clean) first, so a block added meanwhile leaves it dirty
        for the next flush instead of being lost from the record."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            done = sorted(self.done)  # each of these was written before it was added
        try:
            os.fsync(part_fd)  # the blocks first, then the record that vouches for them
            t = self.target
            write_atomic(self.path, safejson.dumps({"format": RECORD_FORMAT, "path": t.path, "sha256": t.sha256,
                                                    "length": t.length, "block_size": t.block_size, "done": done}))
        except BaseException:
            with self._lock:
                self._dirty = True
            raise


def _check_block(target: BlockedTarget, index: int, data: bytes | memoryview) -> bool:
    return hashlib.sha256(data).hexdigest() == target.block_sha256[index]


def _check_and_write(target: BlockedTarget, fd: int, first: int, count: int, offset: int,
                     body: bytes | memoryview) -> int | None:
    """Check blocks ``first..first+count`` in ``body``; write them only if all match. Returns the bad index."""
    view = memoryview(body)
    for index in range(first, first + count):
        b_off, b_size = target.span(index)
        if not _check_block(target, index, view[b_off - offset:b_off - offset + b_size]):
            return index
    os.pwrite(fd, body, offset)
    return None


def _uncache(fd: int, start: int, end: int) -> None:
    """Let the kernel drop ``[start, end)`` of ``fd`` from the page cache. Pages still dirty stay
    (the kernel starts writing them out), so this never loses a byte; where the call does not exist
    or the filesystem keeps its pages (tmpfs) nothing changes."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None or end <= start:
        return
    try:
        fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        log.debug("posix_fadvise: %s", e)


def _reserve(fd: int, length: int) -> None:
    """Allocate the part file's disk space up front: a full disk fails here, before any block is
    fetched, rather than at a write halfway through; and writing into allocated space costs the
    filesystem less (ext4 here: about 30% less CPU in pwrite for 64 MiB in 256 KiB blocks).
    Filesystems that cannot (or platforms without posix_fallocate) just write as before."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, length)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StorageError(f"no space on the device for a {length}-byte download") from None
        log.debug("posix_fallocate: %s", e)  # EOPNOTSUPP, EINVAL: written as blocks arrive


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

    With ``progress``, blocks are announced as they are written, and a :class:`GrowingReader`
    (reading in another thread while the rest arrives) checks them: the download ends when it
    has checked the last block, or with the error it reports (:meth:`Progress.failed`)."""
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
        _reserve(fd, target.length)
        _resume(target, fd, record, stats, progress)
        try:
            await _Blocks(channel, target, fd, record, limits, stats, progress).fetch()
        except BaseException:
            record.flush(fd)  # what arrived is kept: the next attempt resumes from it
            raise
        # Every block matched the hash TUF signed for it, so the file is whole (the caller checks
        # the file's own SHA-256 in the same pass that verifies the bundle). It must be on disk
        # before it is staged; the record that would resume it is not needed any more.
        os.fsync(fd)
    finally:
        os.close(fd)
    record.path.unlink(missing_ok=True)
    return part


def _resume(target: BlockedTarget, fd: int, record: _Record, stats: DownloadStats, progress: Progress | None) -> None:
    """Take over the blocks the record vouches for that still hash right."""
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


def _spans(target: BlockedTarget, done: set[int], per_request: int) -> list[tuple[int, int]]:
    """Runs of consecutive missing blocks, cut into requests of up to ``per_request`` blocks."""
    spans: list[tuple[int, int]] = []
    for i in range(target.blocks):
        if i in done:
            continue
        if spans and spans[-1][0] + spans[-1][1] == i and spans[-1][1] < per_request:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans


class _Blocks:
    """The block requests of one download, ``blocks_in_flight`` at a time, driven by the channel's
    callbacks: each reply is checked against its request, written (its blocks hashed first, unless
    a reader does that) and followed by the next request as it is delivered, with no task, future
    or thread hop per block. The first bad reply or block, or a request unanswered after its
    retries, ends it."""

    def __init__(self, channel: Channel, target: BlockedTarget, fd: int, record: _Record, limits: UpdateLimits,
                 stats: DownloadStats, progress: Progress | None) -> None:
        self._channel = channel
        self._target = target
        self._fd = fd
        self._record = record
        self._limits = limits
        self._stats = stats
        self._progress = progress
        """With one, a GrowingReader checks the blocks (the event loop only writes them)."""
        self._per_request = max(1, limits.request_bytes // target.block_size)
        """Blocks per request: ``request_bytes``, or fewer once the server refused that many."""
        self._todo = deque(_spans(target, record.done, self._per_request))
        self._asked: set[str] = set()
        """Ids of the requests in flight."""
        self._received_cap = int(target.length * limits.max_received_ratio) + MAX_BLOCK
        self._bytes_at_start = channel.stats.bytes_in
        self._last_flush = time.monotonic()
        self._flushed_bytes = stats.bytes_fetched
        self._flushing: asyncio.Future[None] | None = None
        self._uncached = 0
        """Bytes from the start of the part file let go from the page cache: checked by the reader
        and written before the fsync of a flush."""
        self._done: asyncio.Future[None] | None = None

    async def fetch(self) -> None:
        """Every missing block, checked and written; raises what ended the download early.

        The deadline is a timer, not ``asyncio.wait_for``: no inner task, so cancelling the caller
        cancels this (3.11's wait_for can swallow a cancellation that races a finished inner task)."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self._progress is not None:
            self._progress.listen(loop, self._finish_if_complete, self._finish)
        deadline = loop.call_later(self._limits.download_deadline, self._finish, DownloadTimeout(
            f"{self._target.path}: download did not finish within {self._limits.download_deadline:g} s"))
        try:
            for _ in range(self._limits.blocks_in_flight):
                self._ask_next()
            self._finish_if_complete()
            await self._done
        finally:
            deadline.cancel()
            for req_id in self._asked:
                self._channel.cancel(req_id)
            await self._flush_finished()

    async def _flush_finished(self) -> None:
        """Wait for a background record flush to end, however often the caller is cancelled: the
        caller flushes and closes the part file next, and the flush is fsyncing it."""
        flushing, cancelled = self._flushing, False
        while flushing is not None and not flushing.done():
            try:
                await asyncio.wait((flushing,))  # unlike gather, never cancels what it waits for
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _ask_next(self) -> None:
        if self._todo:
            first, count = self._todo.popleft()
            if count > self._per_request:
                self._todo.appendleft((first + self._per_request, count - self._per_request))
                count = self._per_request
            self._ask(first, count, 1)

    def _ask(self, first: int, count: int, attempt: int) -> None:
        t = self._target
        offset = first * t.block_size
        req = BlockRequest(id=Channel.new_id(), path=t.url_path, offset=offset,
                           length=min(t.length, (first + count) * t.block_size) - offset)
        self._stats.requests += 1
        self._asked.add(req.id)
        self._channel.submit(req, timeout=self._limits.request_timeout,
                             on_reply=lambda reply: self._on_reply(req, first, count, attempt, reply),
                             on_error=lambda err: self._on_error(req, first, count, attempt, err))

    def _on_reply(self, req: BlockRequest, first: int, count: int, attempt: int, reply: Reply) -> None:
        self._asked.discard(req.id)
        if self._finished:
            return
        if reply.status == "error":
            self._retry(first, count, attempt, LinkError(f"server error for {self._target.path} at "
                                                         f"{req.offset}: {reply.message}"))
            return
        if reply.status == "bad_request" and count > 1:
            self._narrow(req, first, count, reply.message)
            return
        try:
            self._check_reply(req, reply)
            self._ask_next()  # keep the window full while this block is written
            self._write(first, count, req.offset, reply.body)
        except Exception as e:  # noqa: BLE001 - ends the download (BadData, or an OSError writing)
            self._finish(e)
            return
        self._finish_if_complete()

    def _on_error(self, req: BlockRequest, first: int, count: int, attempt: int, err: LinkError) -> None:
        self._asked.discard(req.id)
        if self._finished:
            return
        if isinstance(err, ChannelClosed):
            self._finish(err)
        else:
            log.debug("block at %d of %s: %s (attempt %d)", req.offset, self._target.path, err, attempt)
            self._retry(first, count, attempt, err)

    def _narrow(self, req: BlockRequest, first: int, count: int, message: str) -> None:
        """The server refused a request of several blocks (its block limit is lower than this
        device's ``request_bytes``): ask for them again, and for the rest, half as many at a time.
        A refusal of a single block still ends the download. A forged refusal costs only more,
        smaller requests: every block is still checked against TUF."""
        if count // 2 < self._per_request:
            self._per_request = count // 2
            log.info("%s: the server refused a %d-byte request (%s); asking for %d bytes at a time",
                     self._target.path, req.length, message, self._per_request * self._target.block_size)
        self._stats.narrowed += 1
        self._todo.appendleft((first, count))
        self._ask_next()

    def _retry(self, first: int, count: int, attempt: int, err: LinkError) -> None:
        if attempt >= self._limits.request_retries:
            self._finish(LinkError(f"{self._target.path}: no answer for the block at {first * self._target.block_size} "
                                   f"after {self._limits.request_retries} attempts: {err}"))
            return
        self._stats.retries += 1
        self._ask(first, count, attempt + 1)

    def _check_reply(self, req: BlockRequest, reply: Reply) -> None:
        """Does ``reply`` answer ``req``, within the bytes this download may receive? Raises BadData."""
        t = self._target
        if self._channel.stats.bytes_in - self._bytes_at_start > self._received_cap:
            raise LimitExceeded(f"{t.path}: received over {self._received_cap} bytes for a "
                                f"{t.length}-byte bundle; abandoning the download")
        if reply.status != "ok":
            raise BlockRejected(f"{t.path}: server answered {reply.status} for the block at {req.offset}: "
                                f"{reply.message}")
        if reply.offset != req.offset or reply.total != t.length or len(reply.body) != req.length:
            raise BlockRejected(
                f"{t.path}: reply does not answer the request (asked {req.length} bytes at {req.offset} of "
                f"{t.length}; got {len(reply.body)} at {reply.offset} of {reply.total})")

    def _write(self, first: int, count: int, offset: int, body: bytes | memoryview) -> None:
        """Write and record blocks ``first..first+count``. Without a reader, check them against
        TUF first (raises BlockRejected); with one, the reader checks them."""
        t = self._target
        if self._progress is None:
            bad = _check_and_write(t, self._fd, first, count, offset, body)
            if bad is not None:
                raise BlockRejected(f"{t.path}: block {bad} does not match its signed hash "
                                    "(altered in transit, or from another bundle)")
        else:
            os.pwrite(self._fd, body, offset)
        self._record.add(first, count)  # a hint: _resume hashes every recorded block again
        failpoint.hit("download.block")
        if self._progress is not None:
            self._progress.mark(first, count)
        self._stats.blocks_fetched += count
        self._stats.bytes_fetched += len(body)
        self._stats.fetched_offsets.append(offset)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        """Persist the record every ``record_flush_interval`` or every ``FLUSH_BYTES`` written,
        whichever comes first, off the event loop (it fsyncs). Flushing by bytes too keeps the disk
        writing while blocks arrive, so the fsync before staging has only the tail left to do."""
        now = time.monotonic()
        if self._flushing is not None or (now - self._last_flush < self._limits.record_flush_interval
                                          and self._stats.bytes_fetched - self._flushed_bytes < FLUSH_BYTES):
            return
        self._last_flush = now
        self._flushed_bytes = self._stats.bytes_fetched
        start = self._uncached
        if self._progress is not None:  # what it has checked was written before this flush's fsync
            t = self._target
            self._uncached = max(start, min(self._progress.checked_blocks * t.block_size, t.length))
        self._flushing = asyncio.get_running_loop().run_in_executor(None, self._flush, start, self._uncached)
        self._flushing.add_done_callback(self._flushed)

    def _flush(self, uncache_from: int, uncache_to: int) -> None:
        """In a worker thread: persist the record (fsyncing the part file first), then let the
        checked part of the file leave the page cache: nothing reads it again before the install."""
        self._record.flush(self._fd)
        _uncache(self._fd, uncache_from, uncache_to)

    def _flushed(self, fut: asyncio.Future[None]) -> None:
        self._flushing = None
        if not fut.cancelled() and fut.exception() is not None:
            self._finish(fut.exception())

    def _finish_if_complete(self) -> None:
        if not self._todo and not self._asked and (
                self._progress is None or self._progress.checked_blocks >= self._target.blocks):
            self._finish(None)

    @property
    def _finished(self) -> bool:
        return self._done is None or self._done.done()

    def _finish(self, error: BaseException | None) -> None:
        if self._finished:
            return
        assert self._done is not None
        if error is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(error)
