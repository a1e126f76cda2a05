"""Key ceremonies that need the offline root keys: rotating a role's keys, re-signing root and targets.

TUF's rule for a new root N+1: it must be signed by a threshold of root N's root keys *and* a
threshold of its own. A client holding root N (down to ``1.root.json``) walks the chain one
version at a time, so every root version stays in ``metadata/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, Root

from agent.errors import UsageError
from packager import repo_keys
from packager.repo_chain import Start, bump, chain_from, commit, role_keys, sign_root
from packager.repo_keys import KeyFile
from packager.repo_store import (
    MAX_KEYS_PER_ROLE,
    OFFLINE_ROLES,
    ONLINE_ROLES,
    ROLES,
    Layout,
    RepoConfig,
    Role,
    expires_within,
    load_chain,
    load_config,
    locked,
    save_config,
    utc,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RotateResult:
    role: Role
    old_key_ids: tuple[str, ...]
    new_key_ids: tuple[str, ...]
    threshold: int
    root_version: int
    new_key_files: tuple[Path, ...]
    retired_key_files: tuple[Path, ...]


def _retired_dir(layout: Layout, kf: KeyFile) -> Path:
    if kf.path.parent.resolve() in (layout.keys_offline.resolve(), layout.keys_online.resolve()):
        return layout.keys_retired
    return kf.path.parent / "retired"


def rotate(path: Path, role: Role, *, keys_dir: Path | None = None, now: datetime, threshold: int | None = None,
           count: int | None = None) -> RotateResult:
    """Replace every key of ``role`` with ``count`` new ones (default: as many as now) and write root N+1,
    signed by the old root keys and, for a root rotation, by the new ones too. The role's metadata
    and everything after it in the chain is re-signed; the old key files move to ``keys/retired``."""
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    now = utc(now)
    layout = Layout(path).require()
    with locked(layout):
        cfg = load_config(layout)
        chain = load_chain(layout)
        old_root = chain.root.signed
        spec = old_root.roles[role]
        n = len(spec.keyids) if count is None else count
        t = spec.threshold if threshold is None else threshold
        if not 1 <= t <= n <= MAX_KEYS_PER_ROLE:
            raise UsageError(f"need 1 <= threshold ({t}) <= number of keys ({n}) <= {MAX_KEYS_PER_ROLE}")
        online = role in ONLINE_ROLES
        key_dir = layout.keys_online if online else (keys_dir or layout.keys_offline)
        root_keys = repo_keys.signers_for(old_root, "root", keys_dir or layout.keys_offline)
        start: Start = "timestamp" if role == "root" else role
        keys = role_keys(old_root, [r for r in chain_from(start) if r != role], layout, keys_dir)
        old_files = repo_keys.find(key_dir, role, spec.keyids)

        new_files = [repo_keys.generate(key_dir, role) for _ in range(n)]
        try:
            new_root: Metadata[Root] = Metadata.from_bytes(chain.root.to_bytes())
            for kid in list(spec.keyids):
                new_root.signed.revoke_key(kid, role)
            for kf in new_files:
                new_root.signed.add_key(kf.signer.public_key, role)
            new_root.signed.roles[role].threshold = t
            bump(new_root, cfg.expiry.root, now)
            root_data = sign_root(new_root, previous=old_root,
                                  keys=root_keys + (new_files if role == "root" else []))
        except BaseException:
            for kf in new_files:
                kf.path.unlink(missing_ok=True)
            raise
        if role != "root":
            keys[role] = new_files
        chain.root = new_root
        commit(layout, chain, start=start, keys=keys, expiry=cfg.expiry, now=now,
               new_root=(new_root.signed.version, root_data))
        save_config(layout, RepoConfig.of_root(new_root.signed, cfg.expiry))
        retired = tuple(repo_keys.retire(kf, _retired_dir(layout, kf)) for kf in old_files)
        if online and n == 1:
            new_files = [repo_keys.rename(new_files[0], f"{role}.key")]
    log.info("rotated %s keys: root is now v%d", role, new_root.signed.version)
    return RotateResult(role=role, old_key_ids=tuple(spec.keyids), new_key_ids=tuple(kf.keyid for kf in new_files),
                        threshold=t, root_version=new_root.signed.version,
                        new_key_files=tuple(kf.path for kf in new_files), retired_key_files=retired)


def refresh_offline(path: Path, *, keys_dir: Path | None = None, now: datetime, margin: timedelta) -> list[Role]:
    """Re-sign root (as version N+1) and/or targets when they expire within ``margin``; needs the offline keys.
    Returns the roles re-signed (snapshot and timestamp follow a targets re-sign)."""
    now = utc(now)
    if margin < timedelta(0):
        raise UsageError("the re-sign margin cannot be negative")
    layout = Layout(path).require()
    with locked(layout):
        cfg = load_config(layout)
        chain = load_chain(layout)
        done: list[Role] = [r for r in OFFLINE_ROLES if expires_within(chain.get(r).signed, now, margin)]
        if not done:
            return done
        start: Start = "targets" if "targets" in done else "timestamp"
        keys = role_keys(chain.root.signed, chain_from(start), layout, keys_dir)
        new_root = None
        if "root" in done:
            root_keys = repo_keys.signers_for(chain.root.signed, "root", keys_dir or layout.keys_offline)
            previous = chain.root.signed
            chain.root = Metadata.from_bytes(chain.root.to_bytes())
            bump(chain.root, cfg.expiry.root, now)
            new_root = (chain.root.signed.version, sign_root(chain.root, previous=previous, keys=root_keys))
        commit(layout, chain, start=start, keys=keys, expiry=cfg.expiry, now=now, new_root=new_root)
        log.info("re-signed %s", ", ".join(done))
        return done


