"""Publishing one bundle into the repository (called by :func:`packager.repo.publish` under the lock).

The bundle is first copied into the repository (hashing it, block by block, on the way), and it is
that copy which is verified and published: the bytes checked are the bytes served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from tuf.api.metadata import TargetFile

from agent.bundle import verify_file
from agent.config import BundleLimits
from agent.errors import BadData, LimitExceeded, SignatureError, UsageError
from agent.keys import TrustedKey
from agent.manifest import Manifest
from agent.signing import (
    TransferSignature,
    read_transfer_signature,
    shard_statement,
    transfer_subject,
    verify_transfer_signature,
)
from packager.repo_store import Chain, Layout, VersionConflict, move_atomic, rfc3339, temp_path

log = logging.getLogger(__name__)

BLOCK_SIZE = 262144
"""Bytes per entry of a bundle target's ``block_sha256`` list (the last block may be shorter)."""
_GROUP = re.compile(r"^[a-z0-9._-]{1,64}\Z")


@dataclass(frozen=True, kw_only=True)
class PublishResult:
    changed: bool
    """False when the same bytes were already published (nothing was written)."""
    message: str
    target_path: str
    stored_path: Path
    name: str
    version: str
    length: int
    sha256: str
    groups: tuple[str, ...]
    signer: str
    transfer_signer: str | None
    """Key id of the bundle's transfer signature, None when it was published without one."""
    targets_version: int
    timestamp_version: int


@dataclass(frozen=True, kw_only=True)
class Incoming:
    path: Path
    length: int
    sha256: str
    blocks: tuple[str, ...]


def check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated group names; :class:`UsageError` for a name outside ``[a-z0-9._-]{1,64}``."""
    for g in groups:
        if not isinstance(g, str) or not _GROUP.match(g):
            raise UsageError(f"invalid group name {g!r}: use 1-64 of a-z 0-9 . _ -")
    return tuple(sorted(set(groups)))


def copy_hashed(src: Path, directory: Path, *, limits: BundleLimits) -> Incoming:
    """Copy ``src`` to a fsynced temp file in ``directory``, computing its SHA-256 and per-block SHA-256."""
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        raise UsageError(f"bundle not found: {src}") from None
    if not src.is_file():
        raise UsageError(f"{src} is not a file")
    if size > limits.max_bundle_bytes:
        raise LimitExceeded(f"{src.name}: {size} bytes exceeds the bundle size limit of {limits.max_bundle_bytes}")
    tmp = temp_path(directory, "incoming")
    whole = hashlib.sha256()
    blocks: list[str] = []
    length = 0
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644)
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            while block := fin.read(BLOCK_SIZE):
                whole.update(block)
                blocks.append(hashlib.sha256(block).hexdigest())
                length += len(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Incoming(path=tmp, length=length, sha256=whole.hexdigest(), blocks=tuple(blocks))


def transfer_signature_path(bundle: Path) -> Path:
    """Where ``edgeship build`` writes a bundle's transfer signature: ``NAME-VERSION.edge.sig``."""
    return bundle.with_name(bundle.name + ".sig")


def check_transfer_signature(sidecar: Path, manifest: Manifest, incoming: Incoming, trusted: Sequence[TrustedKey],
                             signer: str) -> TransferSignature | None:
    """The bundle's transfer signature, checked against its blocks and ``signer`` (the key that signed
    the bundle, a release key); None if absent. Bad input is a :class:`BadData` naming the file."""
    expected = shard_statement(subject_name=transfer_subject(manifest.name, manifest.version), shard_size=BLOCK_SIZE,
                               length=incoming.length, digests=incoming.blocks)
    try:
        data = sidecar.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read transfer signature {sidecar}: {e.strerror}") from None
    try:
        sig, payload = read_transfer_signature(data, max_bytes=2 * len(expected) + 4096, max_depth=16)
    except BadData as e:
        raise type(e)(f"transfer signature {sidecar}: {e}") from None
    if payload != expected:
        n = len(incoming.blocks)
        raise BadData(f"transfer signature {sidecar} signs other bytes than this bundle's {n} "
                      f"block{'s' if n != 1 else ''} of {BLOCK_SIZE} bytes (another build, or not written by "
                      "edgeship build)")
    try:
        verify_transfer_signature(sig, trusted, subject_name=transfer_subject(manifest.name, manifest.version),
                                  shard_size=BLOCK_SIZE, length=incoming.length, digests=incoming.blocks)
    except BadData as e:
        raise type(e)(f"{sidecar}: {e}") from None
    if sig.key_id != signer:
        raise SignatureError(f"{sidecar}: transfer signature by key {sig.key_id[:16]}..., the bundle by "
                              f"{signer[:16]}...: edgeship build signs both with one key")
    return sig


def stored_transfer_signer(meta: dict[str, Any]) -> str | None:
    """The key id of the transfer signature in a bundle target's ``custom.edgeship`` fields, if any."""
    sig = meta.get("transfer_signature")
    keyid = sig.get("keyid") if isinstance(sig, dict) else None
    return keyid if isinstance(keyid, str) else None


def bundle_custom(manifest: Manifest, groups: Sequence[str], incoming: Incoming, now: datetime,
                  transfer: TransferSignature | None = None) -> dict[str, Any]:
    """The ``custom`` field of a bundle target (see the repository spec)."""
    extra = {"transfer_signature": transfer.to_json()} if transfer is not None else {}
    return {"edgeship": {
        "kind": "bundle",
        "name": manifest.name,
        "version": manifest.version,
        "runtime": {"name": manifest.runtime.name, "min_version": manifest.runtime.min_version},
        "device_class": {"arch": manifest.device_class.arch, "accelerator": manifest.device_class.accelerator},
        "groups": list(groups),
        "published": rfc3339(now),
        "block_size": BLOCK_SIZE,
        "block_sha256": list(incoming.blocks),
        **extra,
    }}


def publish_locked(layout: Layout, chain: Chain, bundle: Path, *, groups: tuple[str, ...],
                   trusted: Sequence[TrustedKey], commit: Callable[[], None], now: datetime,
                   limits: BundleLimits = BundleLimits()) -> PublishResult:
    """Verify ``bundle`` against ``trusted`` and add it to ``chain.targets``; ``commit`` re-signs the chain."""
    incoming = copy_hashed(bundle, layout.targets, limits=limits)
    try:
        # One streaming pass, nothing unpacked: the file's own hashes came from copy_hashed.
        checked = verify_file(incoming.path, trusted_keys=trusted, limits=limits, file_sha256=False)
        manifest, signer = checked.manifest, checked.statement.signer_key_id
        target_path = f"{manifest.name}/{manifest.name}-{manifest.version}.edge"
        stored = layout.target_file(target_path, incoming.sha256)

        def result(changed: bool, message: str, published_groups: tuple[str, ...],
                   transfer_signer: str | None) -> PublishResult:
            log.info("%s", message)
            return PublishResult(changed=changed, message=message, target_path=target_path, stored_path=stored,
                                 name=manifest.name, version=manifest.version, length=incoming.length,
                                 sha256=incoming.sha256, groups=published_groups, signer=signer,
                                 transfer_signer=transfer_signer,
                                 targets_version=chain.targets.signed.version,
                                 timestamp_version=chain.timestamp.signed.version)

        existing = chain.targets.signed.targets.get(target_path)
        if existing is not None:
            if existing.hashes.get("sha256") != incoming.sha256 or existing.length != incoming.length:
                raise VersionConflict(
                    f"{manifest.name} {manifest.version} is already published with different bytes "
                    f"(sha256 {existing.hashes.get('sha256', '?')[:16]}..., this bundle {incoming.sha256[:16]}...); "
                    "a released version never changes: build a new version")
            old_meta = (existing.custom or {}).get("edgeship", {})
            old_groups = tuple(old_meta.get("groups", ()))
            message = f"{manifest.name} {manifest.version} is already published with these bytes; nothing changed"
            if old_groups != groups:
                message += f" (its groups stay {', '.join(old_groups) or 'all devices'})"
            return result(False, message, old_groups, stored_transfer_signer(old_meta))
        transfer = check_transfer_signature(transfer_signature_path(bundle), manifest, incoming, trusted, signer)
        if not stored.exists():
            move_atomic(incoming.path, stored)
        chain.targets.signed.targets[target_path] = TargetFile(
            length=incoming.length, hashes={"sha256": incoming.sha256}, path=target_path,
            unrecognized_fields={"custom": bundle_custom(manifest, groups, incoming, now, transfer)})
        commit()
        message = (f"published {manifest.name} {manifest.version} for {', '.join(groups) or 'all devices'}: "
                   f"targets v{chain.targets.signed.version}, timestamp v{chain.timestamp.signed.version}")
        return result(True, message, groups, transfer.key_id if transfer is not None else None)
    finally:
        incoming.path.unlink(missing_ok=True)
