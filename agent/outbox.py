"""A disk-backed, bounded, ordered queue of MQTT messages waiting to be published.

Telemetry and events always go through the outbox; :func:`agent.telemetry.drain` publishes what
is pending, in order, and removes each record only after the broker acknowledged
its QoS 1 publish. So a device that is offline (or restarts, or is killed) keeps
what it produced, up to ``max_bytes``; past that the oldest records are dropped
and counted (``dropped`` is persisted and reported in telemetry).

Layout of the directory::

    <first id, 20 digits>.seg   records, appended; a new segment every ``segment_bytes``
    meta.json                   {"format": 1, "acked": N, "dropped": D}: every record with
                                id <= N is gone (published or dropped); replaced atomically
    .lock                       flock: one process per outbox

A record is ``magic(2) crc32(4) id(8) topic_len(2) payload_len(4) topic payload``;
the CRC covers everything after itself. Reading stops at the first record that is
short, has a bad CRC or a non-increasing id: the torn tail of the last segment is
truncated away, so a kill -9 in the middle of an append costs that record only.

Durability, chosen for telemetry rates: each append is one ``write(2)`` to an
``O_APPEND`` descriptor (in the page cache once ``append`` returns, so it survives
kill -9 of the agent); ``fsync`` runs at most every ``sync_interval`` seconds, on
:meth:`Outbox.sync` and on :meth:`Outbox.close` (a power cut can lose the last
``sync_interval`` seconds). Acks and drops are written to ``meta.json`` (temp file +
``os.replace``) at most every ``meta_interval`` seconds, on :meth:`Outbox.flush` (the
end of every :func:`agent.telemetry.drain`) and with each sync; a segment is deleted only after the meta
file says its records are done. A crash loses at most that much acking: those records
are sent again (delivery is at least once; readers drop duplicates by ``(device, seq)``),
and a drop not yet recorded is undone together with its count, never half of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.errors import JsonError, UsageError
from agent.fsutil import fsync_dir, write_atomic

log = logging.getLogger(__name__)

META_FORMAT = 1
MAGIC = b"\xe5\x0b"
_HEAD = struct.Struct(">2sIQHI")  # magic, crc32, id, topic length, payload length
_SEG_RE = re.compile(r"([0-9]{20})\.seg")
MAX_TOPIC = 1024
MIN_SEGMENT = 4096


@dataclass(frozen=True, kw_only=True)
class Record:
    id: int
    topic: str
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes this record takes on disk (counted against ``max_bytes``)."""
        return _HEAD.size + len(self.topic.encode("utf-8")) + len(self.payload)


def encode_record(rec: Record) -> bytes:
    topic = rec.topic.encode("utf-8")
    rest = struct.pack(">QHI", rec.id, len(topic), len(rec.payload)) + topic + rec.payload
    return MAGIC + struct.pack(">I", zlib.crc32(rest)) + rest


def decode_records(data: bytes, *, after: int = 0) -> tuple[list[Record], int]:
    """Records in ``data`` in order, and the length of the valid prefix. Stops at the first
    torn or corrupt record, or at an id not greater than the one before (or than ``after``)."""
    out: list[Record] = []
    pos, last = 0, after
    while pos + _HEAD.size <= len(data):
        magic, crc, rid, tlen, plen = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + tlen + plen
        if magic != MAGIC or end > len(data) or rid <= last:
            break
        if zlib.crc32(data[pos + 6:end]) != crc:
            break
        start = pos + _HEAD.size
        try:
            topic = data[start:start + tlen].decode("utf-8")
        except UnicodeDecodeError:
            break
        out.append(Record(id=rid, topic=topic, payload=bytes(data[start + tlen:end])))
        pos, last = end, rid
    return out, pos


class Outbox:
    """See the module docstring. Not thread-safe: one event loop (or one thread) uses it."""

    def __init__(self, directory: Path, max_bytes: int, *, sync_interval: float = 5.0,
                 meta_interval: float = 1.0, segment_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < MIN_SEGMENT:
            raise UsageError(f"outbox: max_bytes must be at least {MIN_SEGMENT}, got {max_bytes}")
        if sync_interval < 0:
            raise UsageError("outbox: sync_interval must not be negative")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT, segment_bytes or max_bytes // 8)
        self.sync_interval = sync_interval
        self._clock = clock
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.directory / ".lock")
        self._pending: deque[Record] = deque()
        self._segments: list[tuple[int, Path]] = []  # (first id, path), oldest first
        self._size = 0
        self._acked = 0
        self._dropped = 0
        self._fd: int | None = None
        self._active_bytes = 0
        self._unsynced = False
        self._last_sync = clock()
        self.meta_interval = meta_interval
        self._meta_dirty = False
        self._last_meta = clock()
        try:
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # --- properties -------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Records dropped so far because the outbox was full (persisted across restarts)."""
        return self._dropped

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def size_bytes(self) -> int:
        """On-disk bytes of the pending records (kept at most ``max_bytes``)."""
        return self._size

    @property
    def next_id(self) -> int:
        """The id the next :meth:`append` returns (ids only grow, across restarts too)."""
        return self._next_id

    # --- queue operations -------------------------------------------------

    def append(self, topic: str, payload: bytes) -> int:
        """Queue a message; returns its record id. Drops the oldest records to stay under
        ``max_bytes`` (a single record larger than that is dropped itself)."""
        if self._lock_fd < 0:
            raise RuntimeError("outbox is closed")
        if not 0 < len(topic.encode("utf-8")) <= MAX_TOPIC:
            raise ValueError(f"outbox: topic of {len(topic)} characters")
        rec = Record(id=self._next_id, topic=topic, payload=bytes(payload))
        self._next_id += 1
        if rec.size > self.max_bytes:
            log.warning("outbox: dropped a %d-byte record for %s (over the %d-byte bound)",
                        rec.size, topic, self.max_bytes)
            self._drop_through(rec.id, 1)
            return rec.id
        dropped = 0
        while self._pending and self._size + rec.size > self.max_bytes:
            old = self._pending.popleft()
            self._size -= old.size
            dropped += 1
        if dropped:
            log.debug("outbox full: dropped the %d oldest record(s)", dropped)
            self._drop_through(self._pending[0].id - 1 if self._pending else rec.id - 1, dropped)
        self._write(rec)
        self._pending.append(rec)
        self._size += rec.size
        if self._clock() - self._last_sync >= self.sync_interval:
            self.sync()
        return rec.id

    def peek(self, n: int) -> list[Record]:
        """The ``n`` oldest pending records, oldest first (they stay queued until acked)."""
        return [self._pending[i] for i in range(min(n, len(self._pending)))]

    def ack(self, record_ids: Iterable[int]) -> None:
        """Remove records whose publish the broker acknowledged. Unknown ids (already acked
        or dropped) are ignored."""
        ids = set(record_ids)
        if not ids or not self._pending:
            return
        removed = 0
        while self._pending and self._pending[0].id in ids:  # the usual case: in order
            ids.discard(self._pending[0].id)
            self._size -= self._pending.popleft().size
            removed += 1
        if ids and self._pending and min(ids) <= self._pending[-1].id:
            keep = deque(r for r in self._pending if r.id not in ids)
            self._size = sum(r.size for r in keep)
            removed += len(self._pending) - len(keep)
            self._pending = keep
        if removed:
            self._acked = self._pending[0].id - 1 if self._pending else self._next_id - 1
            self._meta_changed()

    def flush(self) -> None:
        """Write what was acked or dropped to ``meta.json`` now (no fsync) and remove the
        segments that are done. :func:`agent.telemetry.drain` calls it when it stops."""
        if self._meta_dirty:
            self._save_meta(fsync=False)
        self._prune()

    def sync(self) -> None:
        """fsync the active segment and the meta file."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
        self._unsynced = False
        self._save_meta(fsync=True)
        self._prune()
        self._last_sync = self._clock()

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        try:
            self.sync()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- internals --------------------------------------------------------

    def _drop_through(self, last_id: int, count: int) -> None:
        self._dropped += count
        self._acked = max(self._acked, last_id)
        self._meta_changed()

    def _meta_changed(self) -> None:
        # Rewriting meta.json costs ~0.1-0.6 ms (a rename); at most every meta_interval then.
        self._meta_dirty = True
        if self._clock() - self._last_meta >= self.meta_interval:
            self.flush()

    def _write(self, rec: Record) -> None:
        if self._fd is None or self._active_bytes >= self.segment_bytes:
            self._open_segment(rec.id)
        assert self._fd is not None
        data = encode_record(rec)
        written = os.write(self._fd, data)
        if written != len(data):  # a regular file on a full disk
            raise OSError(f"outbox: short write ({written} of {len(data)} bytes)")
        self._active_bytes += written
        self._unsynced = True

    def _open_segment(self, first_id: int) -> None:
        if self._fd is not None:
            if self._unsynced:
                os.fsync(self._fd)
            os.close(self._fd)
        path = self.directory / f"{first_id:020d}.seg"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._active_bytes = os.fstat(self._fd).st_size
        self._segments.append((first_id, path))
        fsync_dir(self.directory)

    def _prune(self) -> None:
        """Delete segments whose records are all acked or dropped (after meta.json says so)."""
        while self._segments:
            first, path = self._segments[0]
            nxt = self._segments[1][0] if len(self._segments) > 1 else self._next_id
            if nxt - 1 > self._acked:
                break
            if len(self._segments) == 1 and self._fd is not None:
                os.close(self._fd)
                self._fd = None
            path.unlink(missing_ok=True)
            self._segments.pop(0)
            log.debug("outbox: removed segment %s (every record acked or dropped)", path.name)

    def _save_meta(self, *, fsync: bool) -> None:
        data = json.dumps({"format": META_FORMAT, "acked": self._acked, "dropped": self._dropped}).encode()
        self._meta_dirty = False
        self._last_meta = self._clock()
        if fsync:
            write_atomic(self.directory / "meta.json", data, mode=0o600)
            return
        tmp = self.directory / ".meta.json.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self.directory / "meta.json")

    def _load(self) -> None:
        (self.directory / ".meta.json.tmp").unlink(missing_ok=True)
        self._acked, self._dropped = _read_meta(self.directory / "meta.json")
        last = 0
        names = sorted(p for p in self.directory.iterdir() if _SEG_RE.fullmatch(p.name))
        for i, path in enumerate(names):
            data = path.read_bytes()
            records, valid = decode_records(data, after=last)
            if valid < len(data):
                if i == len(names) - 1:
                    log.warning("outbox: %s ends with %d bytes of a torn record; truncated",
                                path.name, len(data) - valid)
                    with open(path, "r+b") as fh:
                        fh.truncate(valid)
                else:
                    log.warning("outbox: %s has %d unreadable bytes after record %d; skipped",
                                path.name, len(data) - valid, last)
            if records:
                last = records[-1].id
            self._segments.append((int(path.name[:20]), path))
            for rec in records:
                if rec.id > self._acked:
                    self._pending.append(rec)
                    self._size += rec.size
        self._next_id = max(last, self._acked) + 1
        if self._pending:
            self._acked = self._pending[0].id - 1
        else:
            self._acked = self._next_id - 1
        self._prune()
        if self._segments:
            _first, path = self._segments[-1]
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            self._active_bytes = os.fstat(self._fd).st_size
        dropped = 0
        while self._size > self.max_bytes:  # the bound was lowered since the last run
            self._size -= self._pending.popleft().size
            dropped += 1
        if dropped:
            self._drop_through(self._pending[0].id - 1 if self._pending else self._next_id - 1, dropped)
            self.flush()
        log.debug("outbox %s: %d pending (%d bytes), %d dropped so far, next id %d",
                  self.directory, len(self._pending), self._size, self._dropped, self._next_id)


def _read_meta(path: Path) -> tuple[int, int]:
    try:
        obj = json.loads(path.read_bytes())
        if not isinstance(obj, dict) or obj.get("format") != META_FORMAT:
            raise JsonError("not a format-1 outbox meta file")
        acked, dropped = obj["acked"], obj["dropped"]
        if type(acked) is not int or type(dropped) is not int or acked < 0 or dropped < 0:
            raise JsonError("acked and dropped must be non-negative integers")
        return acked, dropped
    except FileNotFoundError:
        return 0, 0
    except (ValueError, KeyError, JsonError) as e:
        log.warning("outbox: ignoring unreadable %s (%s): pending records may be sent again", path, e)
        return 0, 0


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"outbox {path.parent} is in use by another process") from None
    return fd
