"""The bundle archive: a gzip-compressed POSIX tar holding a flat set of regular files.

Writing uses :mod:`tarfile` (PAX format, deterministic metadata). Reading does
NOT use :mod:`tarfile`: a bundle may be hostile, and tarfile in stream mode
silently treats a corrupt or truncated header after the first member as the end
of the archive, ignores members hidden after the end-of-archive marker, accepts
GNU/base-256/sparse extensions, and has had PAX-parsing CVEs (ReDoS, infinite
loops) that depend on the device's Python patch level. Instead a small strict
reader accepts exactly the subset :func:`write_archive` produces:

* one gzip member (deflate; no reserved header flags; optional header fields
  read, 4 KiB of header at most), nothing after it; the trailer's
  length always checked, its CRC-32 unless the caller checked every byte against
  a signed hash already; every compressed and decompressed byte is counted as it
  streams, so a bomb is stopped at the limit, not after;
* POSIX ustar headers (magic ``ustar\\0`` ``00``) with a valid checksum and
  plain octal numbers (no base-256, so no negative or huge sizes);
* regular files only; a PAX ``x`` header may carry ``path`` and ``size`` (which
  are honoured, then validated like any other name/size) and harmless
  timestamps/ids (ignored); every other PAX key, PAX global headers, GNU long
  names, sparse files, links, devices, FIFOs and directories are rejected;
* the end-of-archive marker (two zero blocks) is required; only zero padding
  (at most :data:`MAX_END_PADDING` bytes) may follow it. A member hidden after
  the marker is *rejected*, not ignored, so that no reader can see a different
  file set than this one.

Nothing seeks: the source is read once, front to back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass
from gzip import GzipFile
from agent.fsutil import fsync_dir
from pathlib import Path
from typing import BinaryIO, Collection, Sequence

from agent.config import BundleLimits, KiB, MiB
from agent.errors import ArchiveError, LimitExceeded, UsageError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
"""Every member name, written or read. Bundles are flat: no ``/`` ever."""

MAX_PAX_BYTES = 4 * KiB
"""Largest PAX extended header accepted (ours hold one name of <= 128 chars)."""
MAX_END_PADDING = 64 * KiB
"""Most zero bytes accepted after the end-of-archive marker (tar pads to 10 KiB records)."""

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ_CHUNK = 256 * KiB
"""Compressed bytes read from the source at a time (about what one zlib call may produce, so
little input is left over for zlib to copy into ``unconsumed_tail``)."""
_INFLATE_CHUNK = 256 * KiB
"""Most bytes one zlib call may produce: the bomb brake."""
_DATA_CHUNK = 1 * MiB
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_HEADER = 10
"""The fixed part of a gzip header: magic, method, flags, mtime, extra flags, OS."""
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 2, 4, 8, 16
_MAX_GZIP_HEADER = 4 * KiB
"""Longest gzip header accepted, optional fields included (write_archive's has none: 10 bytes)."""

_REJECTED_TYPES = {
    b"1": "hard links",
    b"2": "symbolic links",
    b"3": "character devices",
    b"4": "block devices",
    b"5": "directories",
    b"6": "FIFOs",
    b"7": "contiguous files",
    b"g": "PAX global headers",
    b"L": "GNU long names",
    b"K": "GNU long link names",
    b"S": "GNU sparse files",
    b"M": "GNU multi-volume entries",
    b"V": "volume labels",
}
_PAX_IGNORED = frozenset({"mtime", "atime", "ctime", "uid", "gid", "uname", "gname"})
"""PAX keys carrying metadata that is never applied, so harmless to skip."""


@dataclass(frozen=True, kw_only=True)
class Member:
    """One extracted file: its name, size and SHA-256 (lower-case hex; None when it was not hashed)."""

    name: str
    size: int
    sha256: str | None

    def __post_init__(self) -> None:
        check_member_name(self.name)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ArchiveError(f"member {self.name!r}: invalid size {self.size!r}")
        if self.sha256 is not None and (not isinstance(self.sha256, str)
                                        or not re.fullmatch(r"[0-9a-f]{64}", self.sha256)):
            raise ArchiveError(f"member {self.name!r}: invalid sha256 {self.sha256!r}")


def check_member_name(name: str, *, max_name_bytes: int | None = None) -> str:
    """Return ``name`` if it is an allowed member name, else raise naming the rule it breaks.

    Never sanitizes: a name is accepted as is or rejected.
    """
    if not isinstance(name, str) or name == "":
        raise ArchiveError("member name is empty")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"member {name!r}: absolute paths are not allowed")
    if ".." in re.split(r"[/\\]", name):
        raise ArchiveError(f"member {name!r}: '..' path components are not allowed")
    if "/" in name or "\\" in name:
        raise ArchiveError(f"member {name!r}: subpaths ('/' or '\\') are not allowed, bundles are flat")
    if max_name_bytes is not None and len(name.encode("utf-8", "surrogatepass")) > max_name_bytes:
        raise LimitExceeded(f"member {name[:64]!r}...: name longer than max_name_bytes ({max_name_bytes})")
    if not NAME_PATTERN.match(name):
        raise ArchiveError(
            f"member {name!r}: name not allowed (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    return name


# --- writing ---------------------------------------------------------------


def write_archive(files: Sequence[tuple[str, Path]], out: BinaryIO) -> None:
    """Write ``files`` (member name, source path) to ``out`` as a deterministic ``.tar.gz``.

    Same inputs give identical bytes: members in the given order, mode 0644,
    uid/gid 0, no user/group names, mtime 0, PAX format, gzip header without
    a file name and with mtime 0, compression level 6. ``out`` is not closed.
    """
    seen: set[str] = set()
    for name, _ in files:
        check_member_name(name)
        if name.casefold() in seen:
            raise ArchiveError(f"member {name!r}: duplicate name")
        seen.add(name.casefold())
    with GzipFile(filename="", mode="wb", compresslevel=6, fileobj=out, mtime=0) as gz:
        with tarfile.TarFile(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, path in files:
                try:
                    if not stat.S_ISREG(os.stat(path).st_mode):  # before open(): a FIFO would block
                        raise UsageError(f"{path} is not a regular file")
                    fh = open(path, "rb")
                except OSError as e:
                    raise UsageError(f"cannot read {path}: {e.strerror}") from None
                with fh:
                    st = os.fstat(fh.fileno())
                    info = tarfile.TarInfo(name)
                    info.size = st.st_size
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    info.type = tarfile.REGTYPE
                    tar.addfile(info, fh)
                log.debug("archived %s (%d bytes)", name, st.st_size)


# --- reading: the gzip layer ----------------------------------------------


class _GzipStream:
    """Inflate one gzip member from ``src`` on demand, counting bytes in and out.

    Raises as soon as more than ``max_raw`` compressed or ``max_out``
    decompressed bytes have passed; zlib never produces more than
    ``_INFLATE_CHUNK`` bytes per call, so a bomb cannot overshoot by more.

    The gzip header and trailer (RFC 1952) are read here and zlib inflates the raw deflate data
    between them, so that the trailer's CRC-32 is checked only with ``check_crc``. Its length
    field is always checked. Skip the CRC only when every byte was already checked against a
    signed hash (the agent's download, block by block against TUF): it would repeat that check,
    at a quarter of the cost of a SHA-256 pass, and proves nothing against an attacker, who can
    recompute it.
    """

    def __init__(self, src: BinaryIO, *, max_raw: int, max_out: int, check_crc: bool = True) -> None:
        self._src = src
        self._max_raw = max_raw
        self._max_out = max_out
        self._inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
        self._crc: int | None = 0 if check_crc else None
        self._buf = bytearray()
        self.raw_bytes = 0
        self.out_bytes = 0
        self._after_trailer: bytes | None = None
        """What followed the trailer in the last read (None until the trailer is checked)."""
        self._pending = self._read_src()
        self._read_header()

    def _read_src(self) -> bytes:
        data = self._src.read(min(_READ_CHUNK, self._max_raw - self.raw_bytes + 1)) or b""
        self.raw_bytes += len(data)
        if self.raw_bytes > self._max_raw:
            raise LimitExceeded(f"bundle is larger than max_bundle_bytes ({self._max_raw} compressed bytes)")
        return bytes(data)

    def _have(self, n: int) -> bool:
        """Are there ``n`` bytes pending, reading more as needed?"""
        while len(self._pending) < n and (more := self._read_src()):
            self._pending += more
        return len(self._pending) >= n

    def _read_header(self) -> None:
        if not (self._have(len(_GZIP_MAGIC)) and self._pending.startswith(_GZIP_MAGIC)):
            raise ArchiveError("not an edgeship bundle (not gzip)")
        if not self._have(_GZIP_HEADER):
            raise ArchiveError("truncated bundle: the gzip stream ends early")
        method, flags = self._pending[2], self._pending[3]
        if method != 8:
            raise ArchiveError(f"corrupt gzip stream: compression method {method} is not deflate")
        if flags & 0xE0:
            raise ArchiveError("corrupt gzip stream: reserved header flags are set")
        end = _GZIP_HEADER
        if flags & _FEXTRA:
            if not self._have(end + 2):
                raise ArchiveError("truncated bundle: the gzip stream ends early")
            end += 2 + int.from_bytes(self._pending[end:end + 2], "little")
        for flag in (_FNAME, _FCOMMENT):  # zero-terminated strings
            if flags & flag:
                while (zero := self._pending.find(b"\0", end, _MAX_GZIP_HEADER)) < 0:
                    if len(self._pending) >= _MAX_GZIP_HEADER:
                        raise LimitExceeded(f"gzip header is longer than {_MAX_GZIP_HEADER} bytes")
                    if not self._have(len(self._pending) + 1):
                        raise ArchiveError("truncated bundle: the gzip stream ends early")
                end = zero + 1
        if flags & _FHCRC:
            end += 2
        if end > _MAX_GZIP_HEADER:
            raise LimitExceeded(f"gzip header is longer than {_MAX_GZIP_HEADER} bytes")
        if not self._have(end):
            raise ArchiveError("truncated bundle: the gzip stream ends early")
        if flags & _FHCRC and self._crc is not None:
            if int.from_bytes(self._pending[end - 2:end], "little") != zlib.crc32(self._pending[:end - 2]) & 0xFFFF:
                raise ArchiveError("corrupt gzip stream: incorrect header check")
        self._pending = self._pending[end:]

    def _inflate(self, max_length: int) -> bytes:
        """One zlib step: at most ``max_length`` bytes (b"" when it only consumed input)."""
        if not self._pending:
            self._pending = self._read_src()
            if not self._pending:
                raise ArchiveError("truncated bundle: the gzip stream ends early")
        try:
            out = self._inflater.decompress(self._pending, max_length)
        except zlib.error as e:
            raise ArchiveError(f"corrupt gzip stream: {e}") from None
        self._pending = self._inflater.unconsumed_tail
        self.out_bytes += len(out)
        if self.out_bytes > self._max_out:
            raise LimitExceeded(
                f"bundle decompresses to more than {self._max_out} bytes (max_unpacked_bytes plus tar overhead)"
            )
        if self._crc is not None:
            self._crc = zlib.crc32(out, self._crc)
        if self._inflater.eof:
            self._read_trailer()
        return out

    def _read_trailer(self) -> None:
        """CRC-32 (with ``check_crc``) and length of what was inflated, little-endian."""
        self._pending = self._inflater.unused_data
        if not self._have(8):
            raise ArchiveError("truncated bundle: the gzip stream ends early")
        crc, size = int.from_bytes(self._pending[:4], "little"), int.from_bytes(self._pending[4:8], "little")
        if self._crc is not None and crc != self._crc:
            raise ArchiveError("corrupt gzip stream: incorrect data check")
        if size != self.out_bytes & 0xFFFFFFFF:
            raise ArchiveError("corrupt gzip stream: incorrect length check")
        self._after_trailer, self._pending = self._pending[8:], b""

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._inflater.eof:
            self._buf += self._inflate(_INFLATE_CHUNK)

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            out = view[:n].tobytes()
        del self._buf[:n]
        return out

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; fewer only at the end of the gzip member."""
        self._fill(n)
        return self._take(n)

    def read_some(self, n: int) -> bytes:
        """Between 1 and ``n`` decompressed bytes; b"" only at the end of the gzip member.

        The bulk path: what zlib produces is handed over as it is, with no copy into the buffer."""
        if self._buf:
            return self._take(n)
        while not self._inflater.eof:
            if out := self._inflate(min(n, _INFLATE_CHUNK)):
                return out
        return b""

    def finish(self) -> None:
        """Check that the gzip member ended and nothing follows it."""
        self._fill(1)
        if self._buf or not self._inflater.eof:
            raise ArchiveError("data after the end of the tar archive")
        if self._after_trailer or self._read_src():
            raise ArchiveError("trailing data after the gzip stream (only one gzip member is allowed)")


# --- reading: the tar layer ------------------------------------------------


@dataclass(frozen=True)
class _Header:
    name: str
    size: int


def _octal(field: bytes, what: str, where: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise ArchiveError(f"{where}: base-256 number in the {what} field is not allowed")
    digits = field.strip(b" \0")
    if not digits:
        return 0
    if not all(0x30 <= c <= 0x37 for c in digits):
        raise ArchiveError(f"{where}: invalid octal number in the {what} field")
    return int(digits, 8)


def _cstring(field: bytes, what: str, where: str) -> bytes:
    end = field.find(b"\0")
    if end < 0:
        return field
    if field[end:].strip(b"\0"):
        raise ArchiveError(f"{where}: garbage after the end of the {what} field")
    return field[:end]


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    """Parse PAX records ``"<len> <key>=<value>\\n"`` linearly (no regex backtracking)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ArchiveError(f"{where}: malformed PAX record")
        end = pos + int(digits)
        if end > len(data) or end - 1 <= space or data[end - 1] != 0x0A:
            raise ArchiveError(f"{where}: malformed PAX record length")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        try:
            key_s, value_s = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise ArchiveError(f"{where}: PAX record is not valid UTF-8") from None
        if not eq or not key_s:
            raise ArchiveError(f"{where}: malformed PAX record")
        if key_s in records:
            raise ArchiveError(f"{where}: duplicate PAX key {key_s!r}")
        if key_s == "linkpath":
            raise ArchiveError(f"{where}: PAX linkpath (a link target) is not allowed")
        if key_s.startswith("GNU.sparse"):
            raise ArchiveError(f"{where}: GNU sparse files are not allowed")
        if key_s not in ("path", "size") and key_s not in _PAX_IGNORED:
            raise ArchiveError(f"{where}: unsupported PAX key {key_s!r}")
        if key_s == "size" and not (value.isdigit() and len(value) <= 20):
            raise ArchiveError(f"{where}: invalid PAX size {value_s[:32]!r}")
        records[key_s] = value_s
        pos = end
    return records


class _TarReader:
    """Walk the tar stream one entry at a time; every rule is checked before data is used."""

    def __init__(self, gz: _GzipStream, limits: BundleLimits) -> None:
        self._gz = gz
        self._limits = limits
        self._offset = 0
        self._seen: set[str] = set()
        self._count = 0
        self._total = 0
        self._current: _Header | None = None
        self._remaining = 0

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._gz.read(n)
        if len(data) != n:
            raise ArchiveError(f"truncated bundle: {what} ends early")
        self._offset += n
        return data

    def _skip_padding(self, size: int, what: str) -> None:
        pad = -size % _BLOCK
        if pad and self._read_exact(pad, f"padding of {what}").strip(b"\0"):
            raise ArchiveError(f"{what}: non-zero padding after its data")

    def read(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes of the current member's data; b"" when it is all read."""
        if self._current is None:
            raise RuntimeError("_TarReader.read() called outside a member")
        n = min(n, self._remaining)
        if n == 0:
            return b""
        data = self._gz.read_some(n)
        if not data:
            got = self._current.size - self._remaining
            raise ArchiveError(
                f"member {self._current.name!r} is truncated: its header says {self._current.size} bytes, "
                f"the archive holds {got}"
            )
        self._remaining -= len(data)
        self._offset += len(data)
        return data

    def read_all(self) -> bytes:
        """The rest of the current member's data."""
        parts = []
        while chunk := self.read(_DATA_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def _finish_member(self) -> None:
        if self._current is None:
            return
        while self._remaining:
            self.read(_DATA_CHUNK)
        self._skip_padding(self._current.size, f"member {self._current.name!r}")
        self._current = None

    def next(self) -> _Header | None:
        """The next member's header, or None after the end-of-archive marker and a clean end."""
        self._finish_member()
        pax: dict[str, str] | None = None
        while True:
            offset = self._offset
            block = self._gz.read(_BLOCK)
            if not block:
                raise ArchiveError("truncated bundle: the tar end-of-archive marker is missing")
            if len(block) != _BLOCK:
                raise ArchiveError(f"truncated bundle: incomplete tar header at offset {offset}")
            self._offset += _BLOCK
            if block == _ZERO_BLOCK:
                if pax is not None:
                    raise ArchiveError("a PAX header is not followed by a member")
                self._check_end()
                return None
            where = f"tar header at offset {offset}"
            checksum = _octal(block[148:156], "checksum", where)
            if checksum != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
                raise ArchiveError(f"{where}: header checksum mismatch")
            if block[257:265] == b"ustar  \0":
                raise ArchiveError(f"{where}: GNU tar format is not allowed (only POSIX ustar/PAX)")
            if block[257:265] != b"ustar\x0000":
                raise ArchiveError(f"{where}: not a POSIX ustar header")
            raw_name = _cstring(block[0:100], "name", where)
            prefix = _cstring(block[345:500], "prefix", where)
            if prefix:
                raw_name = prefix + b"/" + raw_name
            for what, lo, hi in (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("mtime", 136, 148),
                                 ("devmajor", 329, 337), ("devminor", 337, 345)):
                _octal(block[lo:hi], what, where)
            size = _octal(block[124:136], "size", where)
            typeflag = block[156:157]
            if typeflag == b"x":
                if pax is not None:
                    raise ArchiveError(f"{where}: two PAX headers in a row")
                if size > MAX_PAX_BYTES:
                    raise LimitExceeded(f"{where}: PAX header of {size} bytes is larger than {MAX_PAX_BYTES}")
                pax = _parse_pax(self._read_exact(size, "PAX header"), where)
                self._skip_padding(size, "PAX header")
                continue
            shown = pax["path"] if pax and "path" in pax else raw_name.decode("utf-8", "replace")
            if typeflag in _REJECTED_TYPES:
                raise ArchiveError(f"member {shown!r}: {_REJECTED_TYPES[typeflag]} are not allowed, only regular files")
            if typeflag not in (b"0", b"\0"):
                raise ArchiveError(f"member {shown!r}: entry type {typeflag!r} is not allowed, only regular files")
            if block[157:257].strip(b"\0"):
                raise ArchiveError(f"member {shown!r}: a regular file must not have a link target")
            return self._start_member(raw_name, size, pax or {}, where)

    def _start_member(self, raw_name: bytes, size: int, pax: dict[str, str], where: str) -> _Header:
        limits = self._limits
        self._count += 1
        if self._count > limits.max_members:
            raise LimitExceeded(f"{where}: more than max_members ({limits.max_members}) members")
        if "path" in pax:
            name = pax["path"]
            check_member_name(name, max_name_bytes=limits.max_name_bytes)
            if not name.encode("utf-8").startswith(raw_name):
                raise ArchiveError(f"member {name!r}: PAX path disagrees with the tar header name {raw_name!r}")
        else:
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise ArchiveError(f"{where}: member name {raw_name!r} is not valid UTF-8") from None
            check_member_name(name, max_name_bytes=limits.max_name_bytes)
        if "size" in pax:
            size = int(pax["size"])
        key = name.casefold()
        if key in self._seen:
            raise ArchiveError(f"member {name!r}: duplicate name (names must be unique, ignoring case)")
        self._seen.add(key)
        if size > limits.max_member_bytes:
            raise LimitExceeded(
                f"member {name!r}: header says {size} bytes, above max_member_bytes ({limits.max_member_bytes})"
            )
        self._total += size
        if self._total > limits.max_unpacked_bytes:
            raise LimitExceeded(
                f"member {name!r}: members add up to {self._total} bytes, above max_unpacked_bytes "
                f"({limits.max_unpacked_bytes})"
            )
        self._current = _Header(name, size)
        self._remaining = size
        return self._current

    def _check_end(self) -> None:
        """After the first zero block: only zero padding, at least one more block, then the end."""
        tail = 0
        while chunk := self._gz.read(_READ_CHUNK):
            if chunk.strip(b"\0"):
                raise ArchiveError("data after the tar end-of-archive marker (members hidden after it are rejected)")
            tail += len(chunk)
            if tail > MAX_END_PADDING:
                raise LimitExceeded(f"more than {MAX_END_PADDING} bytes of padding after the end-of-archive marker")
        if tail < _BLOCK:
            raise ArchiveError("truncated bundle: the tar end-of-archive marker is incomplete")
        self._gz.finish()


def _open_stream(src: BinaryIO, limits: BundleLimits, *, check_crc: bool = True) -> _TarReader:
    overhead = (limits.max_members + 1) * (3 * _BLOCK + MAX_PAX_BYTES) + MAX_END_PADDING + 2 * _BLOCK
    gz = _GzipStream(src, max_raw=limits.max_bundle_bytes, max_out=limits.max_unpacked_bytes + overhead,
                     check_crc=check_crc)
    return _TarReader(gz, limits)


# --- reading: the public API -----------------------------------------------


def _check_empty_dir(dest_dir: Path) -> None:
    try:
        with os.scandir(dest_dir) as entries:
            if next(entries, None) is not None:
                raise UsageError(f"destination directory {dest_dir} is not empty")
    except FileNotFoundError:
        raise UsageError(f"destination directory {dest_dir} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"destination {dest_dir} is not a directory") from None




def extract_archive(src: BinaryIO, dest_dir: Path, limits: BundleLimits, *, gzip_crc: bool = True) -> dict[str, Member]:
    """Stream-extract the bundle archive ``src`` into the existing, empty ``dest_dir``.

    ``src`` is read once, front to back (it need not be seekable). Each member
    is created with ``O_EXCL | O_NOFOLLOW`` (mode 0644), hashed while written,
    and fsynced. Anything hostile or over a limit raises :class:`ArchiveError`
    or :class:`LimitExceeded` naming the member and the rule; a member hidden
    after the end-of-archive marker is rejected. On any error every file
    created here is removed before the exception propagates. OS errors while
    writing (disk full) propagate as :class:`OSError` after the same clean-up.

    ``gzip_crc=False`` skips the gzip CRC-32 (see :class:`_GzipStream`): only for a file whose
    every byte was checked against a signed hash. Returns the members by name, in archive order.
    """
    _check_empty_dir(dest_dir)
    created: list[Path] = []
    members: dict[str, Member] = {}
    try:
        tar = _open_stream(src, limits, check_crc=gzip_crc)
        while (header := tar.next()) is not None:
            path = dest_dir / header.name
            fd = os.open(path, _OPEN_FLAGS, 0o644)
            created.append(path)
            digest = hashlib.sha256()
            with open(fd, "wb", closefd=True) as fh:
                while chunk := tar.read(_DATA_CHUNK):
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            members[header.name] = Member(name=header.name, size=header.size, sha256=digest.hexdigest())
            log.debug("extracted %s (%d bytes)", header.name, header.size)
        fsync_dir(dest_dir)
    except BaseException:
        for path in created:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.debug("extraction into %s failed; removed %d partial files", dest_dir, len(created))
        raise
    log.debug("extracted %d members into %s", len(members), dest_dir)
    return members


def scan_archive(src: BinaryIO, limits: BundleLimits, *, keep: Collection[str] = (),
                 max_keep_bytes: int, gzip_crc: bool = True,
                 hash_members: bool = True) -> tuple[dict[str, Member], dict[str, bytes]]:
    """Check and hash every member of the archive ``src`` without writing anything.

    The same rules as :func:`extract_archive` apply, end of archive and trailing
    data included. The bytes of the members named in ``keep`` (small ones: the
    manifest, the signature; at most ``max_keep_bytes`` each) are returned too.
    ``gzip_crc=False`` skips the gzip CRC-32 (see :class:`_GzipStream`): only for
    bytes already checked against a signed hash. ``hash_members=False`` leaves every
    member's ``sha256`` None: only for bytes a release key signed as a whole (a transfer
    signature), whose member digests could only repeat that check.
    """
    tar = _open_stream(src, limits, check_crc=gzip_crc)
    members: dict[str, Member] = {}
    kept: dict[str, bytes] = {}
    while (header := tar.next()) is not None:
        keeping = header.name in keep
        if keeping and header.size > max_keep_bytes:
            raise LimitExceeded(f"member {header.name!r}: {header.size} bytes is larger than {max_keep_bytes}")
        digest = hashlib.sha256() if hash_members else None
        parts: list[bytes] = []
        while chunk := tar.read(_DATA_CHUNK):
            if digest is not None:
                digest.update(chunk)
            if keeping:
                parts.append(chunk)
        members[header.name] = Member(name=header.name, size=header.size,
                                      sha256=digest.hexdigest() if digest is not None else None)
        if keeping:
            kept[header.name] = b"".join(parts)
    log.debug("scanned %d members", len(members))
    return members, kept


def read_member_bytes(src: BinaryIO, name: str, limits: BundleLimits, *, max_bytes: int) -> bytes | None:
    """Read one small member (e.g. the manifest) from the archive stream ``src`` without touching disk.

    Every entry up to and including ``name`` passes the same checks as in
    :func:`extract_archive`; reading stops once ``name`` is found, so entries
    after it are not examined (this is for display, e.g. ``inspect``, never a
    verification). Returns None if the archive, fully checked, has no such
    member; raises :class:`LimitExceeded` if it is larger than ``max_bytes``.
    """
    tar = _open_stream(src, limits)
    while (header := tar.next()) is not None:
        if header.name != name:
            continue
        if header.size > max_bytes:
            raise LimitExceeded(f"member {name!r}: {header.size} bytes is larger than {max_bytes}")
        data = tar.read_all()
        log.debug("read member %s (%d bytes)", name, len(data))
        return data
    log.debug("archive has no member %s", name)
    return None


__all__ = ["Member", "NAME_PATTERN", "check_member_name", "write_archive", "extract_archive", "read_member_bytes",
           "scan_archive"]
