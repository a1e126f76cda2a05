"""Small durable-filesystem helpers shared by both sides."""

from __future__ import annotations

import os
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
