"""Sign a statement into a Sigstore bundle (model-signing v1.0, private-key mode).

The output has the field order and compact layout model-signing 1.x writes, and
no insignificant whitespace: every byte of the file is meaningful, so changing
any one of them makes verification fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Collection

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.fsutil import sha256_file
from agent.errors import UsageError
from agent.manifest import SIGNATURE_NAME
from agent.signing import BUNDLE_MEDIA_TYPE, PAYLOAD_TYPE, build_statement, pae, shard_statement
from packager.keys import SigningKey

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sign_statement(statement: bytes, key: SigningKey) -> bytes:
    """Wrap ``statement`` in a DSSE envelope signed with ``key``; return the bundle JSON bytes."""
    sig = key.private_key.sign(pae(PAYLOAD_TYPE, statement), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key.key_id}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(statement).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode("ascii"), "keyid": ""}],
        },
    }
    log.debug("signed a %d-byte statement with key %s", len(statement), key.key_id)
    return json.dumps(bundle, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def hash_directory(payload_dir: Path, *, exclude: Collection[str] = (SIGNATURE_NAME,)) -> dict[str, str]:
    """SHA-256 of every regular file under ``payload_dir``: relative POSIX name -> hex.

    Names in ``exclude`` (and anything under them) are skipped. Symlinks and special
    files are refused (:class:`UsageError`): the statement says ``allow_symlinks: false``.
    """
    if not payload_dir.is_dir():
        raise UsageError(f"{payload_dir} is not a directory")
    digests: dict[str, str] = {}
    for root, dirs, files in os.walk(payload_dir, onerror=_walk_error, followlinks=False):
        dirs.sort()
        for entry in sorted(dirs + files):
            path = Path(root, entry)
            rel = path.relative_to(payload_dir).as_posix()
            if any(rel == x or rel.startswith(x + "/") for x in exclude):
                if entry in dirs:
                    dirs.remove(entry)
                continue
            try:
                mode = path.lstat().st_mode
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror}") from None
            if stat.S_ISLNK(mode):
                raise UsageError(f"{path} is a symbolic link; edgeship signs regular files only")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise UsageError(f"{path} is not a regular file")
            digests[rel] = _sha256_file(path)
    return digests


def sign_directory(
    payload_dir: Path, key: SigningKey, *, subject_name: str, signature_name: str = SIGNATURE_NAME
) -> bytes:
    """Hash every file in ``payload_dir`` (except ``signature_name``), sign, return the signature bytes.

    Nothing is written; the caller stores the result as ``payload_dir / signature_name``.
    """
    resources = hash_directory(payload_dir, exclude=(signature_name,))
    if not resources:
        raise UsageError(f"{payload_dir} holds no files to sign")
    statement = build_statement(subject_name=subject_name, resources=resources, ignore_paths=(signature_name,))
    log.info("signing %d files in %s with key %s", len(resources), payload_dir, key.key_id)
    return sign_statement(statement, key)


def shard_digests(path: Path, shard_size: int) -> tuple[int, list[str]]:
    """The file's length and the SHA-256 (hex) of each consecutive ``shard_size`` slice."""
    digests: list[str] = []
    length = 0
    try:
        with open(path, "rb") as fh:
            while shard := fh.read(shard_size):
                digests.append(hashlib.sha256(shard).hexdigest())
                length += len(shard)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return length, digests


def sign_transfer(bundle: Path, key: SigningKey, *, subject_name: str, shard_size: int) -> bytes:
    """The transfer signature of the bundle file ``bundle``: its shard digests, signed (see
    docs/bundle-format.md). Nothing is written; the caller stores it next to the bundle."""
    length, digests = shard_digests(bundle, shard_size)
    if not length:
        raise UsageError(f"{bundle} is empty")
    statement = shard_statement(subject_name=subject_name, shard_size=shard_size, length=length, digests=digests)
    log.info("signing the %d blocks of %s with key %s", len(digests), bundle.name, key.key_id)
    return sign_statement(statement, key)


def _walk_error(exc: OSError) -> None:
    """os.walk skips unreadable directories by default; a statement must never silently miss files."""
    raise UsageError(f"cannot read {exc.filename}: {exc.strerror}")


def _sha256_file(path: Path) -> str:
    try:
        return sha256_file(path, chunk=_CHUNK)[1]
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
