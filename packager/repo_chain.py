"""Re-signing the chain targets -> snapshot -> timestamp (and root), and the release-keys document.

:func:`commit` is the only writer of metadata files. It writes in the order a client reads
backwards: targets, snapshot, root, timestamp - a new file is unreferenced until the
timestamp that points at it is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from cryptography.hazmat.primitives import serialization
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, TargetFile

from agent.errors import BadData
from agent.keys import TrustedKey
from agent.trust import parse_release_keys as agent_release_keys
from packager import repo_keys
from packager.repo_keys import KeyFile
from packager.repo_store import ONLINE_ROLES, Chain, Expiry, Layout, RepoCorrupt, Role, write_atomic

log = logging.getLogger(__name__)

RELEASE_KEYS_TARGET = "edgeship/release-keys.json"
RELEASE_KEYS_FORMAT = 1
Start = Literal["targets", "snapshot", "timestamp"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bump(md: Metadata[Any], lifetime: timedelta, now: datetime) -> None:
    md.signed.version += 1
    md.signed.expires = now + lifetime


def sign(md: Metadata[Any], keys: Sequence[KeyFile]) -> bytes:
    """Replace ``md``'s signatures with one by each key and return the bytes to store."""
    md.signatures.clear()
    for k in keys:
        md.sign(k.signer, append=True)
    return md.to_bytes()


def metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": sha256_hex(data)})


def commit(layout: Layout, chain: Chain, *, start: Start, keys: Mapping[Role, Sequence[KeyFile]], expiry: Expiry,
           now: datetime, new_root: tuple[int, bytes] | None = None, bump_versions: bool = True) -> None:
    """Bump (unless ``bump_versions`` is false), sign and write ``start`` and every role after it in the chain.

    ``new_root``, when given, is ``(N, bytes)`` of a new root, already signed (:func:`sign_root`),
    written as ``N.root.json`` and ``root.json`` just before the timestamp.
    """
    files: list[tuple[str, bytes]] = []
    written: MetaFile | None = None  # the role signed just before this one
    for role in chain_from(start):
        md = chain.get(role)
        if bump_versions:
            bump(md, expiry.of(role), now)
        if written is not None and role == "snapshot":
            md.signed.meta["targets.json"] = written
        elif written is not None and role == "timestamp":
            md.signed.snapshot_meta = written
        if role == "timestamp" and new_root is not None:
            files += [(f"{new_root[0]}.root.json", new_root[1]), ("root.json", new_root[1])]
        data = sign(md, keys[role])
        files.append(("timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json", data))
        written = metafile(md.signed.version, data)
    for name, data in files:
        write_atomic(layout.metadata / name, data)
    log.debug("wrote %s", ", ".join(name for name, _ in files))


def sign_root(root: Metadata[Root], *, previous: Root | None, keys: Sequence[KeyFile]) -> bytes:
    """Sign ``root`` with every key in ``keys``, then check it is trusted as a client would check it."""
    data = sign(root, keys)
    try:
        for trusted in (previous, root.signed):
            if trusted is not None:
                trusted.verify_delegate("root", root.signed_bytes, root.signatures)
    except UnsignedMetadataError as e:
        raise RepoCorrupt(f"new root v{root.signed.version} would not verify: {e}") from None
    return data


def chain_from(start: Start) -> tuple[Role, ...]:
    """The roles :func:`commit` re-signs for ``start``."""
    order: tuple[Role, ...] = ("targets", "snapshot", "timestamp")
    return order[order.index(start):]


def role_keys(root: Root, roles: Sequence[Role], layout: Layout, keys_dir: Path | None) -> dict[Role, list[KeyFile]]:
    """Enough keys of each role: offline ones from ``keys_dir`` (default ``keys/offline``), online ones
    from ``keys/online``."""
    out: dict[Role, list[KeyFile]] = {}
    for role in roles:
        directory = layout.keys_online if role in ONLINE_ROLES else (keys_dir or layout.keys_offline)
        out[role] = repo_keys.signers_for(root, role, directory)
    return out


# --- the release-keys document ---------------------------------------------------------------


def encode_release_keys(keys: Sequence[TrustedKey]) -> bytes:
    """``{"format": 1, "keys": [{"key_id", "pem"}]}`` as UTF-8 JSON (deterministic for the same keys)."""
    entries = [{"key_id": k.key_id,
                "pem": k.public_key.public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")}
               for k in keys]
    return (json.dumps({"format": RELEASE_KEYS_FORMAT, "keys": entries}, indent=2) + "\n").encode("utf-8")


def parse_release_keys(data: bytes) -> list[TrustedKey]:
    """The keys of a release-keys document, read as a device reads it; :class:`RepoCorrupt` if it is malformed."""
    try:
        return list(agent_release_keys(data))
    except BadData as e:
        raise RepoCorrupt(str(e)) from None


def release_keys_of(layout: Layout, chain: Chain) -> list[TrustedKey]:
    """The release keys the current targets metadata signs for (checked against its hash)."""
    tf = chain.targets.signed.targets.get(RELEASE_KEYS_TARGET)
    if tf is None:
        raise RepoCorrupt(f"targets metadata has no {RELEASE_KEYS_TARGET} target")
    stored = layout.target_file(tf.path, tf.hashes["sha256"])
    try:
        data = stored.read_bytes()
        tf.verify_length_and_hashes(data)
    except FileNotFoundError:
        raise RepoCorrupt(f"{stored} is missing") from None
    except LengthOrHashMismatchError:
        raise RepoCorrupt(f"{stored} does not match the signed targets metadata") from None
    return parse_release_keys(data)


def release_keys_target(data: bytes) -> TargetFile:
    """The target entry for a release-keys document."""
    return TargetFile(length=len(data), hashes={"sha256": sha256_hex(data)}, path=RELEASE_KEYS_TARGET,
                      unrecognized_fields={"custom": {"edgeship": {"kind": "release-keys"}}})
