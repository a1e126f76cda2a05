"""Small durable-filesystem helpers shared by both sides."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives power loss.

    A no-op where directories cannot be opened (Windows).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so a power cut leaves the old file or the new one, never a mix:
    a fsynced temp file in the same directory, ``os.replace``, then a directory fsync."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            h.update(data)
            size += len(data)
    return size, h.hexdigest()


def read_local_file(path: Path, *, what: str, error: type[Exception]) -> bytes:
    """Read a small local file the user named; every failure becomes one ``error`` naming ``what``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
