"""The workstation's TUF repository: create it, publish bundles, rotate keys, keep it fresh.

Built on python-tuf's Metadata API with consistent snapshots (see :mod:`packager.repo_store` for
the directory layout). Every function takes ``now`` (aware UTC) and every writer holds the
repository's flock, re-reads the current state under it, and writes atomically
(:func:`packager.repo_chain.commit`). Keys come from files: offline roles (root, targets) from
``keys_dir`` (default ``REPO/keys/offline``), online roles (snapshot, timestamp) from
``REPO/keys/online``.

A device's trust anchor is ``metadata/1.root.json``; ``metadata/root.json`` is always the newest
root (also fine for new devices).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from agent import safejson
from agent.errors import JsonError, UsageError
from agent.fsutil import fsync_dir
from agent.keys import TrustedKey, load_public_key
from packager import repo_keys
from packager.repo_chain import (
    RELEASE_KEYS_TARGET,
    Start,
    chain_from,
    commit,
    encode_release_keys,
    release_keys_of,
    release_keys_target,
    role_keys,
    sign_root,
)
from packager.repo_keys import KeyFile
from packager.repo_publish import BLOCK_SIZE, PublishResult, check_groups, publish_locked, stored_transfer_signer
from packager.repo_rotate import RotateResult, refresh_offline, rotate
from packager.repo_store import (
    MAX_KEYS_PER_ROLE,
    OFFLINE_ROLES,
    ROLES,
    Chain,
    Expiry,
    Layout,
    RepoConfig,
    RepoCorrupt,
    Role,
    VersionConflict,
    expires_within,
    load_chain,
    load_config,
    locked,
    read_metadata,
    rfc3339,
    save_config,
    utc,
    write_atomic,
)

log = logging.getLogger(__name__)

__all__ = [
    "BLOCK_SIZE", "RELEASE_KEYS_TARGET", "Expiry", "RepoCorrupt", "VersionConflict", "RepoInfo",
    "PublishResult", "RoleStatus", "TargetStatus", "RepoStatus", "RotateResult", "ReleaseKeysResult", "init_repo",
    "publish", "status", "rotate", "release_keys_add", "release_keys_remove", "refresh_online", "refresh_offline",
    "timestamp_version",
]


@dataclass(frozen=True, kw_only=True)
class RepoInfo:
    path: Path
    trust_anchor: Path
    """``metadata/1.root.json``: what a device must be provisioned with."""
    root_version: int
    offline_keys: Path
    online_keys: Path
    key_ids: Mapping[str, tuple[str, ...]]
    thresholds: Mapping[str, int]
    release_key_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RoleStatus:
    role: Role
    version: int
    expires: str
    seconds_left: int
    expired: bool
    threshold: int
    key_ids: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class TargetStatus:
    path: str
    kind: str
    name: str | None
    version: str | None
    groups: tuple[str, ...]
    length: int
    sha256: str
    published: str | None
    transfer_signer: str | None = None
    """Key id of the bundle's transfer signature, if it was published with one."""


@dataclass(frozen=True, kw_only=True)
class RepoStatus:
    path: Path
    trust_anchor: Path
    roles: tuple[RoleStatus, ...]
    targets: tuple[TargetStatus, ...]
    release_key_ids: tuple[str, ...]

    def role(self, name: Role) -> RoleStatus:
        return next(r for r in self.roles if r.role == name)


@dataclass(frozen=True, kw_only=True)
class ReleaseKeysResult:
    changed: bool
    message: str
    key_ids: tuple[str, ...]
    targets_version: int


# --- helpers ---------------------------------------------------------------------------------


def _info(layout: Layout) -> RepoInfo:
    chain = load_chain(layout)
    root = chain.root.signed
    return RepoInfo(path=layout.path, trust_anchor=layout.trust_anchor, root_version=root.version,
                    offline_keys=layout.keys_offline, online_keys=layout.keys_online,
                    key_ids={r: tuple(root.roles[r].keyids) for r in ROLES},
                    thresholds={r: root.roles[r].threshold for r in ROLES},
                    release_key_ids=tuple(k.key_id for k in release_keys_of(layout, chain)))


# --- init ------------------------------------------------------------------------------------


def init_repo(path: Path, *, release_keys: Sequence[Path], root_threshold: int = 1, root_keys: int = 1,
              expiry: Expiry | None = None, now: datetime) -> RepoInfo:
    """Create a repository in ``path`` (absent or an empty directory): keys, root v1, targets v1 holding the
    release keys, snapshot and timestamp. It is built in a sibling temp directory and renamed into place."""
    now = utc(now)
    expiry = expiry or Expiry()
    if not release_keys:
        raise UsageError("a repository needs at least one release key (--release-key PUB)")
    if not 1 <= root_threshold <= root_keys <= MAX_KEYS_PER_ROLE:
        raise UsageError(f"need 1 <= root threshold ({root_threshold}) <= root keys ({root_keys}) "
                         f"<= {MAX_KEYS_PER_ROLE}")
    trusted = list({k.key_id: k for k in (load_public_key(p) for p in release_keys)}.values())
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} exists and is not an empty directory; refusing to create a repository there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.init-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o755)
    try:
        _build(Layout(tmp), trusted, root_threshold=root_threshold, root_keys=root_keys, expiry=expiry, now=now)
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("created repository %s (root threshold %d of %d)", path, root_threshold, root_keys)
    return _info(Layout(path))


def _build(layout: Layout, trusted: list[TrustedKey], *, root_threshold: int, root_keys: int, expiry: Expiry,
           now: datetime) -> None:
    layout.metadata.mkdir()
    layout.targets.mkdir()
    keys: dict[Role, list[KeyFile]] = {
        "root": [repo_keys.generate(layout.keys_offline, "root") for _ in range(root_keys)],
        "targets": [repo_keys.generate(layout.keys_offline, "targets")],
        "snapshot": [repo_keys.rename(repo_keys.generate(layout.keys_online, "snapshot"), "snapshot.key")],
        "timestamp": [repo_keys.rename(repo_keys.generate(layout.keys_online, "timestamp"), "timestamp.key")],
    }
    root = Metadata(Root(expires=now + expiry.root, consistent_snapshot=True))
    for role, kfs in keys.items():
        for kf in kfs:
            root.signed.add_key(kf.signer.public_key, role)
    root.signed.roles["root"].threshold = root_threshold
    root_data = sign_root(root, previous=None, keys=keys["root"])
    rk = encode_release_keys(trusted)
    rk_target = release_keys_target(rk)
    stored = layout.target_file(RELEASE_KEYS_TARGET, rk_target.hashes["sha256"])
    stored.parent.mkdir(parents=True)
    write_atomic(stored, rk)
    chain = Chain(root=root, timestamp=Metadata(Timestamp(expires=now + expiry.timestamp)),
                  snapshot=Metadata(Snapshot(expires=now + expiry.snapshot)),
                  targets=Metadata(Targets(expires=now + expiry.targets, targets={RELEASE_KEYS_TARGET: rk_target})))
    commit(layout, chain, start="targets", keys=keys, expiry=expiry, now=now, new_root=(1, root_data),
           bump_versions=False)
    save_config(layout, RepoConfig.of_root(root.signed, expiry))
    layout.lock.touch(mode=0o644)


# --- publish ---------------------------------------------------------------------------------


def publish(path: Path, bundle: Path, *, groups: Sequence[str] = (), keys_dir: Path | None = None,
            now: datetime) -> PublishResult:
    """Publish a bundle signed by a current release key as ``<name>/<name>-<version>.edge``.

    The same name and version with other bytes is a :class:`VersionConflict`; the same bytes again
    change nothing (``changed=False``, no version bumps).
    """
    now = utc(now)
    layout = Layout(path).require()
    wanted = check_groups(groups)
    with locked(layout):
        cfg = load_config(layout)
        chain = load_chain(layout)
        keys = role_keys(chain.root.signed, ("targets", "snapshot", "timestamp"), layout, keys_dir)
        return publish_locked(layout, chain, bundle, groups=wanted, trusted=release_keys_of(layout, chain),
                              commit=lambda: commit(layout, chain, start="targets", keys=keys, expiry=cfg.expiry,
                                                    now=now),
                              now=now)


# --- status ----------------------------------------------------------------------------------


def status(path: Path, now: datetime) -> RepoStatus:
    """Each role's version and expiry, the published targets and the release key ids."""
    now = utc(now)
    layout = Layout(path).require()
    chain = load_chain(layout)
    root = chain.root.signed
    roles = []
    for role in ROLES:
        signed = chain.get(role).signed
        left = int((signed.expires - now).total_seconds())
        roles.append(RoleStatus(role=role, version=signed.version, expires=rfc3339(signed.expires), seconds_left=left,
                                expired=signed.is_expired(now), threshold=root.roles[role].threshold,
                                key_ids=tuple(root.roles[role].keyids)))
    targets = []
    for tpath, tf in sorted(chain.targets.signed.targets.items()):
        meta: dict[str, Any] = (tf.unrecognized_fields.get("custom") or {}).get("edgeship") or {}
        targets.append(TargetStatus(path=tpath, kind=str(meta.get("kind", "unknown")), name=meta.get("name"),
                                    version=meta.get("version"), groups=tuple(meta.get("groups") or ()),
                                    length=tf.length, sha256=tf.hashes["sha256"], published=meta.get("published"),
                                    transfer_signer=stored_transfer_signer(meta)))
    return RepoStatus(path=layout.path, trust_anchor=layout.trust_anchor, roles=tuple(roles), targets=tuple(targets),
                      release_key_ids=tuple(k.key_id for k in release_keys_of(layout, chain)))


# --- release keys ----------------------------------------------------------------------------


def _edit_release_keys(path: Path, edit: Callable[[list[TrustedKey]], tuple[list[TrustedKey], str]], *,
                       keys_dir: Path | None, now: datetime) -> ReleaseKeysResult:
    now = utc(now)
    layout = Layout(path).require()
    with locked(layout):
        cfg = load_config(layout)
        chain = load_chain(layout)
        current = release_keys_of(layout, chain)
        new, message = edit(current)
        ids = tuple(k.key_id for k in new)
        if ids == tuple(k.key_id for k in current):
            return ReleaseKeysResult(changed=False, message=message, key_ids=ids,
                                     targets_version=chain.targets.signed.version)
        keys = role_keys(chain.root.signed, ("targets", "snapshot", "timestamp"), layout, keys_dir)
        data = encode_release_keys(new)
        tf = release_keys_target(data)
        write_atomic(layout.target_file(RELEASE_KEYS_TARGET, tf.hashes["sha256"]), data)
        chain.targets.signed.targets[RELEASE_KEYS_TARGET] = tf
        commit(layout, chain, start="targets", keys=keys, expiry=cfg.expiry, now=now)
        log.info("%s; targets is now v%d", message, chain.targets.signed.version)
        return ReleaseKeysResult(changed=True, message=message, key_ids=ids,
                                 targets_version=chain.targets.signed.version)


def release_keys_add(path: Path, pub: Path, *, keys_dir: Path | None = None, now: datetime) -> ReleaseKeysResult:
    """Trust bundles signed by the ECDSA P-256 public key in ``pub`` (a targets re-sign)."""
    key = load_public_key(pub)

    def edit(current: list[TrustedKey]) -> tuple[list[TrustedKey], str]:
        if any(k.key_id == key.key_id for k in current):
            return current, f"release key {key.key_id} is already trusted; nothing changed"
        return [*current, key], f"added release key {key.key_id}"

    return _edit_release_keys(path, edit, keys_dir=keys_dir, now=now)


def release_keys_remove(path: Path, key_id: str, *, keys_dir: Path | None = None,
                        now: datetime) -> ReleaseKeysResult:
    """Stop trusting a release key, named by its id or a unique prefix of at least 8 characters."""

    def edit(current: list[TrustedKey]) -> tuple[list[TrustedKey], str]:
        hits = [k for k in current if k.key_id == key_id or (len(key_id) >= 8 and k.key_id.startswith(key_id))]
        if len(hits) != 1:
            raise UsageError(f"release key {key_id!r} " + ("is ambiguous" if hits else "is not in the repository"))
        if len(current) == 1:
            raise UsageError(f"refusing to remove {hits[0].key_id}: it is the last release key "
                             "(add its replacement first)")
        return [k for k in current if k is not hits[0]], f"removed release key {hits[0].key_id}"

    return _edit_release_keys(path, edit, keys_dir=keys_dir, now=now)


# --- keeping it fresh ------------------------------------------------------------------------


def _online_due(layout: Layout, now: datetime, margin: timedelta) -> tuple[bool, bool]:
    """(snapshot due, timestamp due), read without the lock (files are replaced atomically)."""
    ts = read_metadata(layout, "timestamp.json")
    snap = read_metadata(layout, f"{ts.signed.snapshot_meta.version}.snapshot.json")
    return expires_within(snap.signed, now, margin), expires_within(ts.signed, now, margin)


def refresh_online(path: Path, *, now: datetime, margin: timedelta) -> bool:
    """Re-sign the timestamp (and the snapshot, if it expires within ``margin``) when it expires within
    ``margin``, with the keys in ``keys/online`` only. True if anything was written.

    Safe to run from several servers at once: the decision is taken again under the lock.
    """
    now = utc(now)
    if margin < timedelta(0):
        raise UsageError("the re-sign margin cannot be negative")
    layout = Layout(path).require()
    if not any(_online_due(layout, now, margin)):
        log.debug("timestamp and snapshot are fresh for more than %s; nothing to do", margin)
        return False
    with locked(layout):
        cfg = load_config(layout)
        chain = load_chain(layout)
        snap_due = expires_within(chain.snapshot.signed, now, margin)
        ts_due = expires_within(chain.timestamp.signed, now, margin)
        if not (snap_due or ts_due):
            log.debug("another writer re-signed while we waited for the lock")
            return False
        start: Start = "snapshot" if snap_due else "timestamp"
        keys = role_keys(chain.root.signed, chain_from(start), layout, None)
        commit(layout, chain, start=start, keys=keys, expiry=cfg.expiry, now=now)
        log.info("re-signed %s: timestamp is now v%d", "snapshot and timestamp" if snap_due else "timestamp",
                 chain.timestamp.signed.version)
        for role in OFFLINE_ROLES:
            if expires_within(chain.get(role).signed, now, margin):
                log.warning("%s metadata expires at %s: re-sign it with the offline keys ('repo resign --offline')",
                            role, rfc3339(chain.get(role).signed.expires))
        return True


def timestamp_version(path: Path, *, max_bytes: int = 1024 * 1024) -> int:
    """The current timestamp version (cheap: one bounded JSON read, no verification; the server's
    hint reads it on every change of the file)."""
    ts = Layout(path).metadata / "timestamp.json"
    try:
        with open(ts, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise UsageError(f"{ts} not found: is {path} an edgeship repository?") from None
    except OSError as e:
        raise UsageError(f"cannot read {ts}: {e.strerror}") from None
    try:
        obj = safejson.loads(data, max_bytes=max_bytes, max_depth=16, what=str(ts))
    except JsonError as e:
        raise RepoCorrupt(f"{ts} is not valid timestamp metadata: {e}") from None
    signed = obj.get("signed") if isinstance(obj, dict) else None
    version = signed.get("version") if isinstance(signed, dict) else None
    if type(version) is not int or not 0 < version < 1 << 62:
        raise RepoCorrupt(f"{ts} has no valid signed.version")
    return version
