"""The repository directory on disk: layout, lock, atomic writes, ``repo.json``, loading the signed chain.

Everything here is plumbing for :mod:`packager.repo`; it decides nothing about trust beyond
refusing a repository whose own metadata does not verify against its own root.

::

    REPO/
      repo.json            edgeship repo config (format 1)
      metadata/            what the server serves (consistent snapshots: N.root.json, N.targets.json, ...)
      targets/             target files as <dir>/<sha256>.<basename>
      keys/offline/        root-*.key, targets-*.key
      keys/online/         snapshot.key, timestamp.key
      keys/retired/        replaced keys (moved here by rotate)
      .lock                flock held by every writer
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from agent.errors import BadData, UsageError
from agent.fsutil import fsync_dir, write_atomic

log = logging.getLogger(__name__)

CONFIG_FORMAT = 1
Role = Literal["root", "targets", "snapshot", "timestamp"]
ROLES: tuple[Role, ...] = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES: tuple[Role, ...] = ("root", "targets")
MAX_KEYS_PER_ROLE = 16
ONLINE_ROLES: tuple[Role, ...] = ("snapshot", "timestamp")


class RepoCorrupt(BadData):
    """The repository on disk is malformed or its metadata does not verify against its own root."""


class VersionConflict(BadData):
    """The same model name and version is already published with different bytes."""


@dataclass(frozen=True, kw_only=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def __post_init__(self) -> None:
        for role in ROLES:
            value = getattr(self, role)
            if not isinstance(value, timedelta) or value < timedelta(minutes=1):
                raise UsageError(f"{role} expiry must be at least one minute, got {value}")

    def of(self, role: Role) -> timedelta:
        value: timedelta = getattr(self, role)
        return value

    def to_seconds(self) -> dict[str, int]:
        return {role: int(self.of(role).total_seconds()) for role in ROLES}

    @classmethod
    def from_seconds(cls, d: Mapping[str, Any]) -> Expiry:
        return cls(**{role: timedelta(seconds=int(d[role])) for role in ROLES})


@dataclass(frozen=True, kw_only=True)
class RepoConfig:
    """``repo.json``: expiry per role, thresholds and key ids per role (root.json stays the authority)."""

    expiry: Expiry = Expiry()
    thresholds: Mapping[str, int] = field(default_factory=dict)
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {"format": CONFIG_FORMAT, "expiry_seconds": self.expiry.to_seconds(),
               "thresholds": dict(self.thresholds), "keys": {r: list(k) for r, k in self.keys.items()}}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> RepoConfig:
        try:
            doc = json.loads(data)
            if doc.get("format") != CONFIG_FORMAT:
                raise RepoCorrupt(f"{source}: unknown repo config format {doc.get('format')!r}")
            return cls(expiry=Expiry.from_seconds(doc["expiry_seconds"]),
                       thresholds={r: int(doc["thresholds"][r]) for r in ROLES},
                       keys={r: tuple(str(k) for k in doc["keys"][r]) for r in ROLES})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RepoCorrupt(f"{source}: malformed repo config ({type(e).__name__})") from None

    @classmethod
    def of_root(cls, root: Root, expiry: Expiry) -> RepoConfig:
        return cls(expiry=expiry, thresholds={r: root.roles[r].threshold for r in ROLES},
                   keys={r: tuple(root.roles[r].keyids) for r in ROLES})


@dataclass(frozen=True)
class Layout:
    """Paths inside one repository directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "repo.json"

    @property
    def metadata(self) -> Path:
        return self.path / "metadata"

    @property
    def targets(self) -> Path:
        return self.path / "targets"

    @property
    def keys_offline(self) -> Path:
        return self.path / "keys" / "offline"

    @property
    def keys_online(self) -> Path:
        return self.path / "keys" / "online"

    @property
    def keys_retired(self) -> Path:
        return self.path / "keys" / "retired"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def trust_anchor(self) -> Path:
        return self.metadata / "1.root.json"

    def target_file(self, target_path: str, sha256: str) -> Path:
        dirname, _, basename = target_path.rpartition("/")
        return self.targets / dirname / f"{sha256}.{basename}"

    def require(self) -> Layout:
        """This layout, if ``path`` holds a repository; :class:`UsageError` otherwise."""
        if not self.config.is_file() or not self.metadata.is_dir():
            raise UsageError(f"{self.path} is not an edgeship repository (no repo.json); create one with 'repo init'")
        return self


# --- locking and atomic files ---------------------------------------------------------------


@contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Hold the repository's exclusive flock (blocks until it is free).

    Each call opens its own file description, so threads of one process exclude each other too.
    """
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        log.debug("locked %s", layout.lock)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def temp_path(directory: Path, hint: str) -> Path:
    return directory / f".{hint}.{secrets.token_hex(6)}.tmp"


def move_atomic(src: Path, dest: Path) -> None:
    """Rename ``src`` (already fsynced) to ``dest`` on the same filesystem, creating its directory."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    fsync_dir(dest.parent)
    if src.parent != dest.parent:
        fsync_dir(src.parent)


# --- config and metadata --------------------------------------------------------------------


def load_config(layout: Layout) -> RepoConfig:
    return RepoConfig.from_json(layout.config.read_bytes(), source=str(layout.config))


def save_config(layout: Layout, config: RepoConfig) -> None:
    write_atomic(layout.config, config.to_json())


def read_metadata(layout: Layout, filename: str) -> Metadata[Any]:
    path = layout.metadata / filename
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RepoCorrupt(f"{path} is missing") from None
    try:
        return Metadata.from_bytes(data)
    except DeserializationError as e:
        raise RepoCorrupt(f"{path}: not valid TUF metadata ({type(e).__name__})") from None


@dataclass
class Chain:
    """The current signed state: newest root and the timestamp -> snapshot -> targets it points at."""

    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]

    def get(self, role: Role) -> Metadata[Any]:
        md: Metadata[Any] = getattr(self, role)
        return md


def load_chain(layout: Layout) -> Chain:
    """Read the current metadata and check every role is signed as the repository's own root demands."""
    root = read_metadata(layout, "root.json")
    timestamp = read_metadata(layout, "timestamp.json")
    snapshot = read_metadata(layout, f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    targets = read_metadata(layout, f"{snapshot.signed.meta['targets.json'].version}.targets.json")
    chain = Chain(root=root, timestamp=timestamp, snapshot=snapshot, targets=targets)
    for role in ROLES:
        md = chain.get(role)
        if md.signed.type != role:
            raise RepoCorrupt(f"{role} metadata has type {md.signed.type!r}")
        try:
            root.verify_delegate(role, md)
        except UnsignedMetadataError:
            raise RepoCorrupt(f"the repository's {role} metadata v{md.signed.version} does not verify "
                              "against its own root") from None
    return chain


def utc(now: datetime) -> datetime:
    """``now`` as an aware UTC datetime; a naive one is a programming error."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(timezone.utc)


def expires_within(signed: Root | Targets | Snapshot | Timestamp, now: datetime, margin: timedelta) -> bool:
    """True when ``signed`` expires at or before ``now + margin``."""
    return signed.expires - now <= margin


def rfc3339(t: datetime) -> str:
    return utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")
