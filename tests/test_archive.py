"""The bundle archive: round trip, determinism, and every hostile input we can craft.

Hostile archives are built byte by byte here (tar headers, PAX records, gzip
streams) so each test states exactly what the attacker sends.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import struct
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import archive
from agent.archive import Member, extract_archive, read_member_bytes, scan_archive, write_archive
from agent.config import GiB, KiB, MiB, BundleLimits
from agent.errors import ArchiveError, LimitExceeded, UsageError

LIMITS = BundleLimits()
END = bytes(1024)


# --- helpers ---------------------------------------------------------------


class OneWayReader(io.RawIOBase):
    """A source that can only be read forward, counting what was read; seeking fails the test."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b: Any) -> int:
        n = self._data.readinto(b)
        self.bytes_read += n
        return n

    def seek(self, *args: Any) -> int:
        raise AssertionError("the archive reader must not seek")

    def tell(self) -> int:
        raise AssertionError("the archive reader must not tell")


class ZeroStream(io.RawIOBase):
    """``prefix`` then ``total`` bytes of a repeated compressed block: a gzip bomb never held in memory."""

    def __init__(self, head: bytes, block: bytes, count: int, tail: bytes) -> None:
        self._parts = [head, *([block] * count), tail]
        self._index = 0
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._index < len(self._parts) and self._pos >= len(self._parts[self._index]):
            self._index += 1
            self._pos = 0
        if self._index == len(self._parts):
            return 0
        part = self._parts[self._index]
        n = min(len(b), len(part) - self._pos)
        b[:n] = part[self._pos : self._pos + n]
        self._pos += n
        self.bytes_read += n
        return n


def binary(reader: io.RawIOBase) -> BinaryIO:
    return cast(BinaryIO, reader)


def bomb(prefix: bytes, total: int) -> ZeroStream:
    """A valid gzip stream of ``prefix`` followed by zeros up to ``total`` bytes (~1000:1)."""
    chunk = bytes(MiB)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = c.compress(prefix) + c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) == block  # steady state: blocks repeat
    count = (total - len(prefix)) // MiB - 1
    crc = zlib.crc32(prefix)
    for _ in range(count + 1):
        crc = zlib.crc32(chunk, crc)
    size = len(prefix) + (count + 1) * MiB
    tail = b"\x03\x00" + struct.pack("<II", crc, size & 0xFFFFFFFF)  # empty final block + trailer
    return ZeroStream(head, block, count, tail)


def header(
    name: bytes | str,
    size: int = 0,
    typeflag: bytes = b"0",
    *,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    size_field: bytes | None = None,
    fix_checksum: bool = True,
) -> bytes:
    """One raw tar header block."""
    raw = name.encode() if isinstance(name, str) else name
    b = bytearray(512)
    b[0 : len(raw)] = raw
    b[100:108] = b"0000644\0"
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = size_field if size_field is not None else b"%011o\0" % size
    b[136:148] = b"00000000000\0"
    b[148:156] = b" " * 8
    b[156:157] = typeflag
    b[157 : 157 + len(linkname)] = linkname
    b[257:265] = magic
    b[345 : 345 + len(prefix)] = prefix
    if fix_checksum:
        b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes | str, data: bytes = b"x", typeflag: bytes = b"0", **kw: Any) -> bytes:
    return header(name, len(data), typeflag, **kw) + pad(data)


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return header("././@PaxHeader", len(body), b"x") + pad(body)


def gz(tar: bytes) -> bytes:
    return gzip.compress(tar, mtime=0)


def extract(data: bytes, dest: Path, limits: BundleLimits = LIMITS) -> dict[str, Member]:
    members = extract_archive(binary(OneWayReader(data)), dest, limits)
    scanned, _ = scan_archive(binary(OneWayReader(data)), limits, max_keep_bytes=1)  # the in-place path agrees
    assert scanned == members
    return members


def reject(data: bytes, dest: Path, exc: type[Exception], phrase: str, limits: BundleLimits = LIMITS) -> None:
    with pytest.raises(exc, match=phrase):
        scan_archive(binary(OneWayReader(data)), limits, max_keep_bytes=1)
    with pytest.raises(exc, match=phrase):
        extract(data, dest, limits)
    assert list(dest.iterdir()) == [], "a failed extraction must leave dest_dir empty"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def make_files(tmp_path: Path, contents: dict[str, bytes]) -> list[tuple[str, Path]]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    files = []
    for name, data in contents.items():
        (src / name).write_bytes(data)
        files.append((name, src / name))
    return files


def bundle_bytes(tmp_path: Path, contents: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    write_archive(make_files(tmp_path, contents), out)
    return out.getvalue()


CONTENTS = {
    "manifest.json": b'{"format": 1}\n',
    "model.sig": b"sig",
    "model.onnx": os.urandom(70_000),
    "model.onnx.data": b"",
    "labels.txt": b"cat\ndog\n",
    "selftest.npz": bytes(5000),
}


# --- round trip and determinism ----------------------------------------------


def test_round_trip(tmp_path: Path, dest: Path) -> None:
    data = bundle_bytes(tmp_path, CONTENTS)
    members = extract(data, dest)
    assert list(members) == list(CONTENTS)
    for name, content in CONTENTS.items():
        assert (dest / name).read_bytes() == content
        assert members[name] == Member(name=name, size=len(content), sha256=hashlib.sha256(content).hexdigest())
        assert (dest / name).stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert sorted(p.name for p in dest.iterdir()) == sorted(CONTENTS)


@pytest.mark.parametrize("chunk", [1, 511, 4096, 1 << 20])
def test_large_members_stream_through_in_any_read_size(tmp_path: Path, chunk: int) -> None:
    """Members of megabytes, compressible and not, scan to the same digests whatever the reader
    hands back per call (the bulk path passes zlib's output on as it comes)."""
    rng = __import__("random").Random(7)
    contents = {"a.bin": rng.randbytes(3 * MiB + 17), "b.txt": b"edgeship " * (400 * KiB), "c.bin": b""}
    data = bundle_bytes(tmp_path, contents)

    class Dribble(io.RawIOBase):  # at most ``chunk`` bytes per read, like a socket or a growing file
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:  # type: ignore[override]
            n = chunk if n < 0 else min(n, chunk)
            out = data[self.pos:self.pos + n]
            self.pos += len(out)
            return out

    members, kept = scan_archive(binary(Dribble()), LIMITS, keep=("b.txt",), max_keep_bytes=8 * MiB)
    assert {n: (m.size, m.sha256) for n, m in members.items()} == {
        n: (len(c), hashlib.sha256(c).hexdigest()) for n, c in contents.items()}
    assert kept == {"b.txt": contents["b.txt"]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writes_are_deterministic(tmp_path: Path) -> None:
    first = bundle_bytes(tmp_path, CONTENTS)
    (tmp_path / "src" / "model.sig").touch()  # a different mtime must not matter
    os.chmod(tmp_path / "src" / "labels.txt", 0o600)  # nor a different mode
    with open(tmp_path / "named.edge", "w+b") as fh:  # nor the output file's name
        write_archive(make_files(tmp_path, CONTENTS), fh)
        fh.seek(0)
        second = fh.read()
    assert first == second
    assert first[:4] == b"\x1f\x8b\x08\x00", "gzip header: deflate, no flags (no file name)"
    assert first[4:8] == b"\0\0\0\0", "gzip header mtime must be 0"
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == list(CONTENTS)
    for info in infos:
        assert (info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime) == (0o644, 0, 0, "", "", 0)
        assert info.isreg()


def test_long_names_round_trip_through_pax(tmp_path: Path, dest: Path) -> None:
    long_name = "m" * 120 + ".onnx.xx"
    assert len(long_name) == 128
    data = bundle_bytes(tmp_path, {long_name: b"weights"})
    assert extract(data, dest)[long_name].size == 7
    assert (dest / long_name).read_bytes() == b"weights"


def test_empty_archive_and_empty_member(tmp_path: Path, dest: Path) -> None:
    assert extract(gz(END), dest) == {}
    assert extract(gz(member("empty", b"") + END), dest)["empty"].size == 0


@pytest.mark.parametrize(
    ("name", "phrase"),
    [("../evil", r"'\.\.'"), ("a/b", "subpaths"), (".hidden", "not allowed"), ("", "empty")],
)
def test_writer_rejects_names_the_reader_would(tmp_path: Path, name: str, phrase: str) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(ArchiveError, match=phrase):
        write_archive([(name, f)], io.BytesIO())


def test_writer_rejects_duplicates_and_missing_files(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(ArchiveError, match="duplicate"):
        write_archive([("a.txt", f), ("A.TXT", f)], io.BytesIO())
    with pytest.raises(UsageError, match="cannot read"):
        write_archive([("a.txt", tmp_path / "missing")], io.BytesIO())
    with pytest.raises(UsageError, match="not a regular file"):
        write_archive([("a.txt", tmp_path)], io.BytesIO())


def test_member_validates_itself() -> None:
    with pytest.raises(ArchiveError, match="sha256"):
        Member(name="a", size=1, sha256="xyz")
    with pytest.raises(ArchiveError, match="size"):
        Member(name="a", size=-1, sha256="0" * 64)
    with pytest.raises(ArchiveError, match="'..'"):
        Member(name="..", size=1, sha256="0" * 64)


# --- read_member_bytes ---------------------------------------------------------


def test_read_member_bytes(tmp_path: Path) -> None:
    data = bundle_bytes(tmp_path, CONTENTS)

    def read(name: str, max_bytes: int = 100) -> bytes | None:
        return read_member_bytes(binary(OneWayReader(data)), name, LIMITS, max_bytes=max_bytes)

    assert read("manifest.json") == CONTENTS["manifest.json"]
    assert read("labels.txt") == CONTENTS["labels.txt"]
    assert read("model.onnx.data") == b""
    assert read("nope.txt") is None
    with pytest.raises(LimitExceeded, match="'model.onnx': 70000 bytes is larger than 1000"):
        read("model.onnx", max_bytes=1000)


def test_read_member_bytes_applies_the_same_checks() -> None:
    hostile = gz(member("../evil") + member("manifest.json", b"{}") + END)
    with pytest.raises(ArchiveError, match=r"'\.\.'"):
        read_member_bytes(binary(OneWayReader(hostile)), "manifest.json", LIMITS, max_bytes=100)
    with pytest.raises(ArchiveError, match="not gzip"):
        read_member_bytes(binary(OneWayReader(b"{}")), "manifest.json", LIMITS, max_bytes=100)


# --- hostile names --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "exc", "phrase"),
    [
        (member("../evil"), ArchiveError, r"'\.\.' path components"),
        (member(".."), ArchiveError, r"'\.\.' path components"),
        (member("/abs"), ArchiveError, "absolute paths"),
        (member("C:evil"), ArchiveError, "absolute paths"),
        (member("a/b"), ArchiveError, "subpaths"),
        (member("./a"), ArchiveError, "subpaths"),
        (member("a\\b"), ArchiveError, "subpaths"),
        (member("b", prefix=b"dir"), ArchiveError, "subpaths"),
        (member(".hidden"), ArchiveError, "name not allowed"),
        (member("-rf"), ArchiveError, "name not allowed"),
        (member("a b"), ArchiveError, "name not allowed"),
        (member(""), ArchiveError, "name is empty"),
        (member("modèl.onnx"), ArchiveError, "name not allowed"),
        (member(b"\xff.bin"), ArchiveError, "not valid UTF-8"),
        (member("a" * 100), None, None),
        (pax({"path": "a" * 129}) + member("a" * 100), ArchiveError, "name not allowed"),
        (pax({"path": "a" * 300}) + member("a" * 100), LimitExceeded, "max_name_bytes"),
        (pax({"path": "modèl.onnx"}) + member("mod"), ArchiveError, "name not allowed"),
        (member(b"a\0../evil"), ArchiveError, "garbage after the end of the name"),
    ],
)
def test_hostile_names(dest: Path, raw: bytes, exc: type[Exception] | None, phrase: str | None) -> None:
    data = gz(raw + END)
    if exc is None:
        assert list(extract(data, dest)) == ["a" * 100]
    else:
        reject(data, dest, exc, phrase or "")


def test_names_from_tarfile_are_checked_too(tmp_path: Path, dest: Path) -> None:
    for i, name in enumerate(["../evil", "/abs", "dir/x", "modèl.onnx"]):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(ArchiveError, match=f"member {name!r}"):
            extract(buf.getvalue(), dest)
        assert list(dest.iterdir()) == []


def test_pax_path_cannot_smuggle_dotdot(dest: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("ok.txt")
        info.size = 1
        info.pax_headers = {"path": "../x"}
        tar.addfile(info, io.BytesIO(b"x"))
    reject(buf.getvalue(), dest, ArchiveError, r"member '\.\./x': '\.\.' path components")
    assert not (dest.parent / "x").exists()


def test_pax_path_must_agree_with_the_header_name(dest: Path) -> None:
    reject(gz(pax({"path": "model.onnx"}) + member("labels.txt") + END), dest, ArchiveError, "disagrees")


def test_pax_size_is_honoured(dest: Path) -> None:
    data = gz(pax({"path": "a.bin", "size": "3", "mtime": "0.5"}) + header("a.bin", 0) + pad(b"abc") + END)
    assert extract(data, dest)["a.bin"].size == 3
    assert (dest / "a.bin").read_bytes() == b"abc"


@pytest.mark.parametrize(
    ("records", "phrase"),
    [
        ({"linkpath": "/etc/passwd"}, "linkpath"),
        ({"GNU.sparse.map": "0,1"}, "GNU sparse"),
        ({"hdrcharset": "BINARY"}, "unsupported PAX key 'hdrcharset'"),
        ({"size": "-1"}, "invalid PAX size"),
        ({"size": "1e9"}, "invalid PAX size"),
    ],
)
def test_unneeded_pax_keys_are_rejected(dest: Path, records: dict[str, str], phrase: str) -> None:
    reject(gz(pax(records) + member("a.bin") + END), dest, ArchiveError, phrase)


def test_malformed_pax_headers(dest: Path) -> None:
    body = b"99 path=x\n"  # length points past the data
    bad_len = header("././@PaxHeader", len(body), b"x") + pad(body)
    reject(gz(bad_len + member("x") + END), dest, ArchiveError, "malformed PAX record")
    dup = header("././@PaxHeader", 20, b"x") + pad(b"10 path=x\n10 path=x\n")
    reject(gz(dup + member("x") + END), dest, ArchiveError, "duplicate PAX key")
    reject(gz(pax({"path": "x"}) + pax({"path": "x"}) + member("x") + END), dest, ArchiveError, "two PAX headers")
    reject(gz(pax({"path": "x"}) + END), dest, ArchiveError, "not followed by a member")
    big = header("././@PaxHeader", 5 * KiB, b"x") + bytes(5 * KiB)
    reject(gz(big + member("x") + END), dest, LimitExceeded, "PAX header of 5120 bytes")


def test_pax_parsing_is_linear() -> None:
    """CVE-2024-6232 (tarfile ReDoS): crafted PAX headers must not take quadratic time."""
    body = b"4096 " + b"0" * 4090 + b"\n"
    start = time.monotonic()
    with pytest.raises(ArchiveError, match="malformed PAX"):
        archive._parse_pax(body, "here")
    assert time.monotonic() - start < 0.1


# --- hostile entry types and headers ------------------------------------------------


def _tarfile_entry(kind: bytes, **attrs: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(attrs.pop("name", "entry"))
        info.type = kind
        for key, value in attrs.items():
            setattr(info, key, value)
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "attrs", "phrase"),
    [
        (tarfile.SYMTYPE, {"linkname": "/etc/passwd"}, "symbolic links are not allowed"),
        (tarfile.LNKTYPE, {"linkname": "model.onnx"}, "hard links are not allowed"),
        (tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}, "character devices are not allowed"),
        (tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}, "block devices are not allowed"),
        (tarfile.FIFOTYPE, {}, "FIFOs are not allowed"),
        (tarfile.DIRTYPE, {"name": "models"}, "directories are not allowed"),
        (tarfile.CONTTYPE, {}, "contiguous files are not allowed"),
    ],
)
def test_non_regular_entries_are_rejected(dest: Path, kind: bytes, attrs: dict[str, Any], phrase: str) -> None:
    reject(_tarfile_entry(kind, **attrs), dest, ArchiveError, phrase)


@pytest.mark.parametrize(
    ("typeflag", "phrase"),
    [(b"L", "GNU long names"), (b"K", "GNU long link"), (b"S", "GNU sparse"), (b"g", "PAX global headers"),
     (b"Z", "entry type b'Z' is not allowed")],
)
def test_extension_entry_types_are_rejected(dest: Path, typeflag: bytes, phrase: str) -> None:
    reject(gz(member("././@LongLink", b"x" * 200, typeflag) + member("x") + END), dest, ArchiveError, phrase)


def test_gnu_longname_archive_is_rejected(dest: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("g" * 120)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    reject(buf.getvalue(), dest, ArchiveError, "GNU tar format is not allowed")


def test_regular_file_with_link_target(dest: Path) -> None:
    reject(gz(member("a.txt", linkname=b"/etc/passwd") + END), dest, ArchiveError, "must not have a link target")


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (header("a", size_field=b"\x80" + bytes(7) + struct.pack(">I", 5)), "base-256 number in the size"),
        (header("a", size_field=b"\xff" * 12), "base-256 number in the size"),  # -1
        (header("a", size_field=b"-0000000001\0"), "invalid octal number in the size"),
        (header("a", size_field=b"0000000009\0\0"), "invalid octal number in the size"),
        (header("a", 1, fix_checksum=False), "checksum mismatch"),
        (header("a", 1, magic=b"\0" * 8), "not a POSIX ustar header"),
        (header("a", 1, magic=b"ustar  \0"), "GNU tar format"),
    ],
)
def test_malformed_headers(dest: Path, raw: bytes, phrase: str) -> None:
    reject(gz(raw + pad(b"hello") + END), dest, ArchiveError, phrase)


def test_flipped_header_byte_breaks_the_checksum(dest: Path) -> None:
    raw = bytearray(member("a.txt", b"hello"))
    raw[0] = ord("b")
    reject(gz(bytes(raw) + END), dest, ArchiveError, "checksum mismatch")


def test_non_zero_padding_is_rejected(dest: Path) -> None:
    raw = header("a.txt", 5) + b"hello" + b"HIDDEN" + bytes(512 - 11)
    reject(gz(raw + END), dest, ArchiveError, "non-zero padding")


def test_duplicate_entries(dest: Path) -> None:
    reject(gz(member("a.txt") + member("a.txt") + END), dest, ArchiveError, "'a.txt': duplicate name")
    reject(gz(member("a.txt") + member("A.txt") + END), dest, ArchiveError, "'A.txt': duplicate name")


# --- limits and bombs -----------------------------------------------------------------


def test_too_many_members(dest: Path) -> None:
    limits = BundleLimits(max_members=3)
    assert len(extract(gz(b"".join(member(f"m{i}") for i in range(3)) + END), dest, limits)) == 3
    for p in list(dest.iterdir()):
        p.unlink()
    reject(gz(b"".join(member(f"m{i}") for i in range(4)) + END), dest, LimitExceeded, r"max_members \(3\)", limits)


def test_oversized_member_is_rejected_by_its_header(dest: Path) -> None:
    # The header claims 1 GiB and the data is absent: the limit fires before any data is read.
    data = gz(header("model.onnx", GiB))
    reject(data, dest, LimitExceeded, r"'model.onnx': header says 1073741824 bytes, above max_member_bytes",
           BundleLimits(max_member_bytes=10 * MiB))


def test_total_unpacked_size(dest: Path) -> None:
    data = gz(b"".join(member(f"m{i}", bytes(4 * KiB)) for i in range(3)) + END)
    reject(data, dest, LimitExceeded, r"'m2': members add up to 12288 bytes, above max_unpacked_bytes",
           BundleLimits(max_unpacked_bytes=10 * KiB))


def test_bomb_member_stops_at_its_header(dest: Path) -> None:
    """1 GiB of zeros (~1 MB compressed) declared as one member: refused after one header block."""
    src = bomb(header("model.onnx", GiB - 512), GiB)
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match="above max_unpacked_bytes"):
        extract_archive(binary(src), dest, BundleLimits(max_unpacked_bytes=10 * MiB))
    assert time.monotonic() - start < 1
    assert src.bytes_read <= 64 * KiB, "read only the first chunk of compressed input"
    assert list(dest.iterdir()) == []


def test_bomb_after_the_end_marker_stops_while_streaming(dest: Path) -> None:
    """A legal 8 MiB member, then ~1 GiB of zero 'padding': stopped at the padding cap, member removed."""
    first = header("model.onnx", 8 * MiB)
    src = bomb(first, GiB)
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match="bytes of padding after the end-of-archive marker"):
        extract_archive(binary(src), dest, BundleLimits(max_unpacked_bytes=10 * MiB))
    assert time.monotonic() - start < 2
    # 8 MiB of member plus 64 KiB of padding is ~8 KB compressed; allow one read chunk of slack.
    assert src.bytes_read <= 20 * KiB + 64 * KiB
    assert list(dest.iterdir()) == [], "the extracted member was removed"


def test_decompressed_bytes_are_counted_as_they_come() -> None:
    """The gzip layer itself refuses to inflate past its cap, whatever the tar layer asks for."""
    src = bomb(b"", GiB)
    stream = archive._GzipStream(binary(src), max_raw=GiB, max_out=10 * MiB)
    with pytest.raises(LimitExceeded, match="decompresses to more than 10485760 bytes"):
        while stream.read(MiB):
            pass
    assert stream.out_bytes <= 10 * MiB + archive._INFLATE_CHUNK
    assert src.bytes_read <= 2 * 64 * KiB


def test_gzip_of_zeros_is_an_empty_archive_with_too_much_padding(dest: Path) -> None:
    src = bomb(b"", GiB)
    with pytest.raises(LimitExceeded, match="padding after the end-of-archive marker"):
        extract_archive(binary(src), dest, LIMITS)
    assert src.bytes_read <= 2 * 64 * KiB


def test_compressed_size_cap(tmp_path: Path, dest: Path) -> None:
    data = bundle_bytes(tmp_path, {"noise.bin": os.urandom(5000)})
    limits = BundleLimits(max_bundle_bytes=1000)
    src = OneWayReader(data)
    with pytest.raises(LimitExceeded, match=r"max_bundle_bytes \(1000"):
        extract_archive(binary(src), dest, limits)
    assert src.bytes_read == 1001
    assert list(dest.iterdir()) == []


# --- truncation, trailing data, framing -----------------------------------------------------


def test_truncated_archive(tmp_path: Path, dest: Path) -> None:
    data = bundle_bytes(tmp_path, CONTENTS)
    for cut in (len(data) // 2, len(data) - 4, 20):
        reject(data[:cut], dest, ArchiveError, "truncated bundle: the gzip stream ends early")


def test_truncated_member(dest: Path) -> None:
    tar = member("a.txt", b"hello") + member("model.onnx", bytes(3000))
    reject(gz(tar[: 1024 + 512 + 1000]), dest, ArchiveError,
           "'model.onnx' is truncated: its header says 3000 bytes, the archive holds 1000")


def test_missing_or_incomplete_end_marker(dest: Path) -> None:
    reject(gz(member("a.txt")), dest, ArchiveError, "end-of-archive marker is missing")
    reject(gz(member("a.txt") + bytes(512)), dest, ArchiveError, "end-of-archive marker is incomplete")
    reject(gz(member("a.txt") + b"\0" * 100), dest, ArchiveError, "incomplete tar header")
    reject(gz(b""), dest, ArchiveError, "end-of-archive marker is missing")


def test_trailing_garbage_after_gzip(tmp_path: Path, dest: Path) -> None:
    data = bundle_bytes(tmp_path, {"a.txt": b"hello"})
    reject(data + b"garbage", dest, ArchiveError, "trailing data after the gzip stream")
    reject(data + b"\0", dest, ArchiveError, "trailing data after the gzip stream")


def test_concatenated_gzip_members_are_rejected(tmp_path: Path, dest: Path) -> None:
    data = bundle_bytes(tmp_path, {"a.txt": b"hello"})
    reject(data + gz(member("evil.txt") + END), dest, ArchiveError, "only one gzip member")


def test_trailing_garbage_after_tar_end(dest: Path) -> None:
    reject(gz(member("a.txt") + END + b"junk"), dest, ArchiveError, "data after the tar end-of-archive marker")


def test_member_after_end_marker_is_rejected(dest: Path) -> None:
    """Decision: a member hidden after the end-of-archive marker is rejected, not ignored."""
    data = gz(member("a.txt") + END + member("hidden.txt", b"surprise") + END)
    reject(data, dest, ArchiveError, "members hidden after it are rejected")
    data = gz(member("a.txt") + bytes(512) + member("hidden.txt", b"surprise") + END)
    reject(data, dest, ArchiveError, "members hidden after it are rejected")


def test_end_padding_up_to_the_cap_is_fine(dest: Path) -> None:
    assert list(extract(gz(member("a.txt") + END + bytes(archive.MAX_END_PADDING - 512)), dest)) == ["a.txt"]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x1f", b"PK\x03\x04 zip file", b"\x1f\x8c" + bytes(30), member("a.txt") + END, b'{"format": 1}'],
    ids=["empty", "one-byte", "zip", "near-magic", "plain-tar", "json"],
)
def test_not_gzip(dest: Path, data: bytes) -> None:
    reject(data, dest, ArchiveError, r"not an edgeship bundle \(not gzip\)")


def test_corrupt_gzip(tmp_path: Path, dest: Path) -> None:
    data = bytearray(bundle_bytes(tmp_path, {"a.txt": b"hello" * 100}))
    bad_block = bytearray(data)
    bad_block[10] |= 0x06  # deflate block type 3: invalid
    reject(bytes(bad_block), dest, ArchiveError, "corrupt gzip stream: .*invalid block type")
    bad_crc = bytearray(data)
    bad_crc[-8] ^= 0xFF
    reject(bytes(bad_crc), dest, ArchiveError, "corrupt gzip stream: .*incorrect data check")
    bad_len = bytearray(data)
    bad_len[-1] ^= 0xFF
    reject(bytes(bad_len), dest, ArchiveError, "corrupt gzip stream: .*incorrect length check")
    bad_method = bytearray(data)
    bad_method[2] = 7
    reject(bytes(bad_method), dest, ArchiveError, "corrupt gzip stream")


def gzip_with_header(tar: bytes, flags: int, fields: bytes) -> bytes:
    """``tar`` gzipped by hand, with header ``flags`` and the optional ``fields`` after the fixed part."""
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(tar) + c.flush()
    fixed = b"\x1f\x8b\x08" + bytes([flags]) + bytes(4) + b"\x00\xff"
    return fixed + fields + body + struct.pack("<II", zlib.crc32(tar), len(tar))


def test_gzip_header_optional_fields_are_read(dest: Path) -> None:
    """Extra field, file name, comment and header CRC (what other gzip writers add) are skipped
    correctly, so the deflate data is found after them."""
    tar = member("a.txt", b"hello") + END
    extra = struct.pack("<H", 6) + b"AB\x02\x00xy"
    name, comment = b"a.tar\0", b"made by hand\0"
    no_hcrc = gzip_with_header(tar, 4 | 8 | 16, extra + name + comment)
    header = no_hcrc[:10 + len(extra + name + comment)]
    hcrc = struct.pack("<H", zlib.crc32(bytes([*header[:3], header[3] | 2, *header[4:]])) & 0xFFFF)
    with_hcrc = gzip_with_header(tar, 2 | 4 | 8 | 16, extra + name + comment + hcrc)
    want = {"a.txt": Member(name="a.txt", size=5, sha256=hashlib.sha256(b"hello").hexdigest())}
    for data in (no_hcrc, with_hcrc, gzip.compress(tar, mtime=0)):
        assert extract(data, dest) == want
        for p in dest.iterdir():
            p.unlink()
        for n in (1, 3):  # header fields and trailer split across reads
            for crc in (True, False):
                assert scan_archive(binary(Dribble(data, n)), LIMITS, max_keep_bytes=1, gzip_crc=crc)[0] == want
    bad_hcrc = bytearray(with_hcrc)
    bad_hcrc[len(header)] ^= 0xFF
    reject(bytes(bad_hcrc), dest, ArchiveError, "incorrect header check")


def test_gzip_header_rules(dest: Path) -> None:
    tar = member("a.txt") + END
    reject(gzip_with_header(tar, 0x20, b""), dest, ArchiveError, "reserved header flags")
    reject(gzip_with_header(tar, 8, b"x" * (8 * KiB) + b"\0"), dest, LimitExceeded, "gzip header is longer")
    reject(gzip_with_header(tar, 4, struct.pack("<H", 8 * KiB) + bytes(8 * KiB)), dest, LimitExceeded,
           "gzip header is longer")
    for cut in (5, 11, 14):  # inside the fixed header, the extra length, the file name
        reject(gzip_with_header(tar, 4 | 8, struct.pack("<H", 1) + b"E" + b"name\0")[:cut], dest, ArchiveError,
               "the gzip stream ends early")


def test_gzip_crc_can_be_skipped_for_bytes_already_checked(tmp_path: Path, dest: Path) -> None:
    """scan_archive(gzip_crc=False) - for bytes each checked against a signed hash already - does
    not compute the CRC-32; the trailer's length is still checked, and everything else."""
    data = bundle_bytes(tmp_path, {"a.txt": b"hello" * 100})
    bad_crc = bytearray(data)
    bad_crc[-8] ^= 0xFF
    with pytest.raises(ArchiveError, match="incorrect data check"):
        scan_archive(binary(OneWayReader(bytes(bad_crc))), LIMITS, max_keep_bytes=1)
    members, _ = scan_archive(binary(OneWayReader(bytes(bad_crc))), LIMITS, max_keep_bytes=1, gzip_crc=False)
    assert members["a.txt"].sha256 == hashlib.sha256(b"hello" * 100).hexdigest()
    bad_len = bytearray(data)
    bad_len[-1] ^= 0xFF
    with pytest.raises(ArchiveError, match="incorrect length check"):
        scan_archive(binary(OneWayReader(bytes(bad_len))), LIMITS, max_keep_bytes=1, gzip_crc=False)
    with pytest.raises(ArchiveError, match="trailing data"):
        scan_archive(binary(OneWayReader(bytes(bad_crc) + b"x")), LIMITS, max_keep_bytes=1, gzip_crc=False)


# --- dest_dir and clean-up -----------------------------------------------------------------


def test_dest_dir_must_exist_and_be_empty(tmp_path: Path, dest: Path) -> None:
    data = gz(member("a.txt") + END)
    (dest / "old").write_bytes(b"keep me")
    with pytest.raises(UsageError, match="is not empty"):
        extract(data, dest)
    assert (dest / "old").read_bytes() == b"keep me"
    with pytest.raises(UsageError, match="does not exist"):
        extract(data, tmp_path / "missing")
    with pytest.raises(UsageError, match="not a directory"):
        extract(data, dest / "old")


def test_failure_after_good_members_removes_them(dest: Path) -> None:
    data = gz(member("a.txt", b"a" * 2000) + member("b.txt") + member("link", typeflag=b"2", linkname=b"/etc/passwd")
              + END)
    reject(data, dest, ArchiveError, "'link': symbolic links")


# --- fuzzing -----------------------------------------------------------------------------------

_VALID_TAR = (
    pax({"path": "p" * 110}) + member("p" * 100, b"long name")
    + member("manifest.json", b'{"a": 1}') + member("model.onnx", bytes(700)) + END
)
_VALID_GZ = gz(_VALID_TAR)
_FUZZ_LIMITS = BundleLimits(max_members=8, max_unpacked_bytes=64 * KiB, max_bundle_bytes=64 * KiB)


class Dribble(OneWayReader):
    """A one-way source that hands out at most ``n`` bytes per read."""

    def __init__(self, data: bytes, n: int) -> None:
        super().__init__(data)
        self._n = n

    def readinto(self, b: Any) -> int:
        return super().readinto(memoryview(b)[:self._n])


def _check_extraction(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        dest = Path(root) / "dest"
        dest.mkdir()
        members: dict[str, Member] | None = None
        refused: ArchiveError | None = None
        try:
            members = extract_archive(binary(OneWayReader(data)), dest, _FUZZ_LIMITS)
        except ArchiveError as e:  # LimitExceeded is a subclass
            refused = e
            assert list(dest.iterdir()) == []
        else:
            assert sorted(p.name for p in dest.iterdir()) == sorted(members)
            for name, m in members.items():
                assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == m.sha256
        assert [p.name for p in Path(root).iterdir()] == ["dest"], "nothing may land outside dest_dir"
    # The device's path, without the CRC-32, read 7 bytes at a time: it accepts what extraction
    # accepts, with the same members, and refuses the rest, unless only a CRC was wrong.
    try:
        scanned, _ = scan_archive(binary(Dribble(data, 7)), _FUZZ_LIMITS, max_keep_bytes=1, gzip_crc=False)
    except ArchiveError:
        assert members is None, "refused without the CRC-32 what extraction with it accepted"
        return
    assert scanned == members or re.search(r"incorrect (data|header) check", str(refused)), refused


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(base)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)


@_FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_extraction(data)


@_FUZZ
@given(st.binary(max_size=64))
def test_fuzz_arbitrary_gzipped_bytes(data: bytes) -> None:
    _check_extraction(gz(data))


@_FUZZ
@given(_edits, st.none() | st.integers(0, len(_VALID_GZ)))
def test_fuzz_mutated_archive(edits: list[tuple[int, int]], cut: int | None) -> None:
    _check_extraction(_mutate(_VALID_GZ, edits, cut))


def _fix_checksums(tar: bytes) -> bytes:
    """Recompute the checksum of every block that looks like a header, so mutations reach deeper checks."""
    out = bytearray(tar)
    for off in range(0, len(out) - 511, 512):
        if out[off + 257 : off + 262] == b"ustar":
            out[off + 148 : off + 156] = b" " * 8
            out[off + 148 : off + 156] = b"%06o\0 " % sum(out[off : off + 512])
    return bytes(out)


@_FUZZ
@given(_edits, st.none() | st.integers(0, len(_VALID_TAR)))
def test_fuzz_mutated_tar_inside_valid_gzip(edits: list[tuple[int, int]], cut: int | None) -> None:
    _check_extraction(gz(_mutate(_VALID_TAR, edits, cut)))


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(0, 511), st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_headers_with_valid_checksums(edits: list[tuple[int, int, int]]) -> None:
    headers = [0, 1024, 2048, 3072]  # the PAX header, its member, manifest.json, model.onnx
    tar = bytearray(_VALID_TAR)
    for which, pos, value in edits:
        tar[headers[which] + pos] = value
    _check_extraction(gz(_fix_checksums(bytes(tar))))


def test_fuzz_baseline_is_valid() -> None:
    with tempfile.TemporaryDirectory() as root:
        assert len(extract_archive(binary(OneWayReader(_VALID_GZ)), Path(root), _FUZZ_LIMITS)) == 3
