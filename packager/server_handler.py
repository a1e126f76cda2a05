"""Answer one edgeship/v1 request from the files of a repository directory (no MQTT here).

:class:`RequestHandler` turns a request payload and the device id taken from its topic into
an encoded reply, reading only ``REPO/metadata/<name>`` and ``REPO/targets/<path>``:

* ``meta``: the whole metadata file, or an explicit ``not_found`` so that a device asking for
  root N+1 learns at once that there is none, instead of waiting for a timeout;
* ``block``: bytes ``[offset, min(offset + length, size))`` of a target file, with ``total``
  = its size; ``offset`` must lie inside the file.

Files are opened one path component at a time below the directory with ``O_NOFOLLOW``: a
symlink anywhere under ``metadata/`` or ``targets/`` is refused, as is anything that is not a
regular file (a FIFO, a device), so nothing outside the repository can be served whatever
was planted inside it. Target files stay open between block requests (a device asks for the
same file hundreds of times in a row), each used only while its path still names that file.
A request too malformed to carry a usable id gets no reply at all.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent import safejson
from agent.errors import JsonError
from agent.protocol import (
    MAX_BLOCK,
    MAX_REQUEST_BYTES,
    BlockRequest,
    MetaRequest,
    ProtocolError,
    Reply,
    Status,
    _check_id,  # the one definition of a valid request id
    check_device_id,
    decode_request,
    encode_reply,
    encode_reply_head,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)

Op = Literal["meta", "block", "invalid"]


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """Every limit and period of the update server, in bytes and seconds."""

    max_meta_bytes: int = 2 * MiB - 8 * 1024
    """Largest metadata file served; a larger one is answered with ``error`` (and logged).
    A reply is one MQTT packet: past the broker's ``max_packet_size`` (2 MiB in
    examples/mosquitto) the broker disconnects the server instead, so this stays below it."""
    max_block: int = MAX_BLOCK
    """Largest block length a request may ask for (at most the protocol's 1 MiB)."""
    max_concurrent: int = 16
    """Replies held in memory at once, across all devices (published, not yet acknowledged by the
    broker); requests past it wait, as their small payloads, until one is out."""
    open_targets: int = 32
    """Target files kept open between block requests."""
    resign_margin: float = 12 * 3600.0
    """Re-sign timestamp/snapshot when they expire within this many seconds."""
    resign_interval: float = 60.0
    """How often to check whether the online roles need re-signing."""
    hint_interval: float = 1.0
    """How often to look at metadata/timestamp.json for a new version to announce."""
    reconnect_min: float = 0.5
    """First delay before reconnecting after the broker connection is lost."""
    reconnect_max: float = 30.0
    """Cap of the exponential reconnect delay (each delay is jittered)."""
    shutdown_grace: float = 2.0
    """On stop, how long in-flight replies may take before they are cancelled."""

    def __post_init__(self) -> None:
        if not 0 < self.max_meta_bytes <= 64 * MiB:
            raise ValueError(f"max_meta_bytes {self.max_meta_bytes} out of range 1..{64 * MiB}")
        if not 0 < self.max_block <= MAX_BLOCK:
            raise ValueError(f"max_block {self.max_block} out of range 1..{MAX_BLOCK}")
        if not 0 < self.max_concurrent <= 1024:
            raise ValueError(f"max_concurrent {self.max_concurrent} out of range 1..1024")
        if not 0 < self.open_targets <= 1024:
            raise ValueError(f"open_targets {self.open_targets} out of range 1..1024")
        for name in ("resign_margin", "resign_interval", "hint_interval", "reconnect_min",
                     "reconnect_max", "shutdown_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be below reconnect_min")


@dataclass
class ServerStats:
    """Counters of one server (thread-safe: requests are read in worker threads)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(op, status) -> count of replies produced; op is meta, block or invalid."""
    dropped: int = 0
    """Messages that got no reply (no usable id, bad topic, retained request)."""
    bytes_served: int = 0
    """Body bytes of ok replies (metadata and blocks)."""
    replies_sent: int = 0
    reply_failures: int = 0
    hints_published: int = 0
    resigns: int = 0
    reconnects: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_reply(self, op: Op, status: Status, body_bytes: int) -> None:
        with self._lock:
            self.requests[(op, status)] += 1
            self.bytes_served += body_bytes

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def total(self, *, op: str | None = None, status: str | None = None) -> int:
        with self._lock:
            return sum(n for (o, s), n in self.requests.items()
                       if (op is None or o == op) and (status is None or s == status))

    def summary(self) -> str:
        with self._lock:
            answered = sum(self.requests.values())
            return (f"{answered} requests answered ({self.replies_sent} replies sent, {self.reply_failures} failed), "
                    f"{self.bytes_served} bytes served, {self.dropped} dropped, {self.hints_published} hints, "
                    f"{self.resigns} re-signs, {self.reconnects} reconnects")


class _Refused(Exception):
    """The request is valid but cannot be answered with data: carries the reply status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestHandler:
    """Reads replies from ``repo_dir``; safe to call from several threads at once (the server calls
    it from its event loop thread only)."""

    def __init__(self, repo_dir: Path, limits: ServerLimits | None = None,
                 stats: ServerStats | None = None) -> None:
        self.repo_dir = Path(repo_dir)
        self.limits = limits or ServerLimits()
        self.stats = stats or ServerStats()
        self._targets = _OpenTargets(self.repo_dir / "targets", self.limits.open_targets,
                                     lambda parts: self._open(self.repo_dir / "targets", parts, what="target"))

    def close(self) -> None:
        """Close the target files kept open between requests."""
        self._targets.close()

    # --- entry point ------------------------------------------------------

    def handle(self, device: str, payload: bytes) -> bytes | bytearray | None:
        """The encoded reply to ``payload`` from ``device`` (taken from the topic), or None when
        there is no one to answer (invalid device id, no usable request id)."""
        try:
            check_device_id(device)
        except ProtocolError as e:
            log.debug("dropping request: %s", e)
            self.stats.add("dropped")
            return None
        try:
            req = decode_request(payload)
        except ProtocolError as e:
            return self._reject(device, payload, e)
        frame: bytes | bytearray
        try:
            frame, body_bytes = self._meta(req) if isinstance(req, MetaRequest) else self._block(req)
        except _Refused as e:
            frame, body_bytes = self._refusal(device, req, e.status, str(e)), 0
        except OSError as e:
            log.warning("cannot read %s for %s: %s", _describe(req), device, e)
            frame, body_bytes = self._refusal(device, req, "error", "the server could not read the file"), 0
        else:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s -> ok, %d bytes", device, _describe(req), body_bytes)
            self.stats.count_reply(req.op, "ok", body_bytes)
        return frame

    def _refusal(self, device: str, req: MetaRequest | BlockRequest, status: Status, message: str) -> bytes:
        log.debug("%s: %s -> %s: %s", device, _describe(req), status, message)
        self.stats.count_reply(req.op, status, 0)
        return encode_reply(Reply(id=req.id, status=status, message=message))

    def _reject(self, device: str, payload: bytes, err: ProtocolError) -> bytes | None:
        """A request that failed to decode: answer bad_request if it has a usable id."""
        obj: object = None
        if len(payload) <= MAX_REQUEST_BYTES:
            try:
                obj = safejson.loads(payload, max_bytes=MAX_REQUEST_BYTES, max_depth=4)
            except JsonError:
                obj = None
        req_id = obj.get("id") if isinstance(obj, dict) else None
        try:
            req_id = _check_id(req_id)
        except ProtocolError:
            log.debug("dropping request from %s without a usable id: %s", device, err)
            self.stats.add("dropped")
            return None
        raw_op = obj.get("op") if isinstance(obj, dict) else None
        op: Op = raw_op if raw_op in ("meta", "block") else "invalid"
        message = " ".join(str(err).split())
        log.debug("%s: bad request %s: %s", device, req_id, message)
        self.stats.count_reply(op, "bad_request", 0)
        return encode_reply(Reply(id=req_id, status="bad_request", message=message))

    # --- the two operations -----------------------------------------------

    def _meta(self, req: MetaRequest) -> tuple[bytearray, int]:
        fd = self._open(self.repo_dir / "metadata", [req.name], what="metadata")
        try:
            size = os.fstat(fd).st_size
            limit = self.limits.max_meta_bytes
            if size > limit:
                log.warning("metadata/%s is %d bytes, over the %d-byte limit: not served",
                            req.name, size, limit)
                raise _Refused("error", f"{req.name} is over the server's metadata size limit")
            frame = _read_frame(fd, encode_reply_head(id=req.id, status="ok", length=size), size, 0)
            if len(os.pread(fd, 1, size)):  # grew while read: a writer did not replace it atomically
                raise _Refused("error", f"{req.name} changed while being read; retry")
        finally:
            os.close(fd)
        return frame, size

    def _block(self, req: BlockRequest) -> tuple[bytearray, int]:
        """The reply frame, its body read from the file straight behind the header."""
        if req.length > self.limits.max_block:
            raise _Refused("bad_request",
                           f"block length {req.length} is over this server's limit of {self.limits.max_block}")
        with self._targets.lock:
            fd, size = self._targets.get(req.path)
            if req.offset >= size:
                raise _Refused("bad_request", f"offset {req.offset} is past the end of {req.path} ({size} bytes)")
            n = min(req.length, size - req.offset)
            head = encode_reply_head(id=req.id, status="ok", length=n, offset=req.offset, total=size)
            return _read_frame(fd, head, n, req.offset), n

    def _open(self, base: Path, parts: list[str], *, what: str) -> int:
        """Open base/parts[0]/.../parts[-1] as a regular file, refusing symlinks and special
        files at every step below ``base``; raises _Refused(not_found) or OSError."""
        name = "/".join(parts)
        try:
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            log.warning("%s directory %s is missing", what, base)
            raise _Refused("not_found", f"no such {what}: {name}") from None
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    fd = os.open(part, _OPEN_FLAGS if last else _DIR_FLAGS, dir_fd=dfd)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if e.errno != errno.ENOENT and _is_symlink(part, dfd):
                        log.warning("refusing to serve %s %s: %s is a symlink", what, name, part)
                    raise _Refused("not_found", f"no such {what}: {name}") from None
                os.close(dfd)
                dfd = fd
            mode = os.fstat(dfd).st_mode
            if not stat.S_ISREG(mode):
                log.warning("refusing to serve %s %s: not a regular file", what, name)
                raise _Refused("not_found", f"no such {what}: {name}")
            fd, dfd = dfd, -1
            return fd
        finally:
            if dfd >= 0:
                os.close(dfd)


class _OpenTargets:
    """Target files kept open between block requests (a device asks for the same file hundreds of
    times in a row), at most ``capacity``, the least recently used closed first.

    A kept descriptor is used only while its path still names the same file (device and inode of
    a stat of the path that does not follow a final symlink): a target replaced or removed since is
    opened again through the safe opener, which refuses symlinks and special files. Callers hold
    ``lock`` while they use a descriptor, so another thread cannot close it under them."""

    def __init__(self, base: Path, capacity: int, opener: Callable[[list[str]], int]) -> None:
        self.lock = threading.Lock()
        self._base = str(base)
        self._capacity = capacity
        self._opener = opener
        self._open: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        """path -> (fd, st_dev, st_ino), least recently used first."""

    def get(self, path: str) -> tuple[int, int]:
        """(descriptor, size) of the target file ``path``; raises what the opener raises."""
        kept = self._open.get(path)
        if kept is not None:
            try:
                st = os.stat(os.path.join(self._base, path), follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == kept[1:]:
                self._open.move_to_end(path)
                return kept[0], st.st_size
            os.close(self._open.pop(path)[0])
        fd = self._opener(path.split("/"))
        st = os.fstat(fd)
        self._open[path] = (fd, st.st_dev, st.st_ino)
        while len(self._open) > self._capacity:
            os.close(self._open.popitem(last=False)[1][0])
        return fd, st.st_size

    def close(self) -> None:
        with self.lock:
            while self._open:
                os.close(self._open.popitem()[1][0])


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _read_frame(fd: int, head: bytes, n: int, offset: int) -> bytearray:
    """``head`` followed by ``n`` bytes of ``fd`` from ``offset``, read in place (no second copy)."""
    frame = bytearray(len(head) + n)
    frame[:len(head)] = head
    body = memoryview(frame)[len(head):]
    got = 0
    while got < n:
        chunk = os.preadv(fd, [body[got:]], offset + got)
        if not chunk:  # truncated under us: a writer did not replace the file atomically
            raise _Refused("error", "the file changed while being read; retry")
        got += chunk
    return frame


def _describe(req: MetaRequest | BlockRequest) -> str:
    if isinstance(req, MetaRequest):
        return f"meta {req.name}"
    return f"block {req.path}@{req.offset}+{req.length}"
