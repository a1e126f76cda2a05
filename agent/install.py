"""Install a staged bundle: fit, disk space, verified extraction, golden self-test, then the switch.

Everything before :meth:`agent.store.Store.switch` happens in a hidden
directory (``releases/.<sha>.<random>``) that nothing refers to, so a failure
or a power cut there leaves the old model serving, and the next start removes
the leftovers. A failing check raises, and nothing the device serves changes:

* :class:`~agent.errors.IncompatibleBundle` - runtime missing or too old, wrong device class;
* :class:`~agent.errors.SelfTestFailed` - outputs out of tolerance, NaN/Inf, or tensors not as declared;
* :class:`~agent.errors.StorageError` - not enough disk space, or a write failed (disk full).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import failpoint
from agent.bundle import open_bundle, parse_manifest, verify_file
from agent.config import BundleLimits
from agent.errors import DigestMismatch, StorageError
from agent.fsutil import fsync_dir
from agent.keys import TrustedKey
from agent.manifest import MANIFEST_NAME, Manifest
from agent.preflight import check_fit, selftest_bundle
from agent.select import DeviceFacts
from agent.store import Held, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Release:
    """An installed release: a verified, self-tested directory."""

    version: str
    sha256: str
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def load_release(store: Store, held: Held) -> Release:
    """An installed release from its directory (written and fsynced before any state named it)."""
    path = store.release_dir(held.sha256)
    manifest = parse_manifest((path / MANIFEST_NAME).read_bytes(), BundleLimits())
    return Release(version=held.version, sha256=held.sha256, path=path, manifest=manifest)


def prepare(store: Store, staged: Held, *, trusted_keys: Sequence[TrustedKey], facts: DeviceFacts,
            reserve_bytes: int, threads: int = 1) -> Release:
    """Verify, check and self-test the staged bundle into ``releases/<sha256>``. Blocking."""
    bundle = store.bundle_path(staged.sha256)
    final = store.release_dir(staged.sha256)
    # The file's SHA-256 is the one TUF signed (checked below), so the gzip CRC-32 is skipped here
    # as when the download was verified: the device never refuses at install for the CRC what it
    # staged. The member digests are checked here whatever the download skipped (a bundle with a
    # transfer signature is staged without them).
    checked = verify_file(bundle, trusted_keys=trusted_keys, gzip_crc=False)
    if checked.sha256 != staged.sha256:
        raise DigestMismatch(f"staged bundle {bundle.name} changed on disk (sha256 {(checked.sha256 or '')[:12]})")
    manifest = checked.manifest
    check_fit(manifest, machine=facts.machine, runtimes=facts.runtimes, accelerators=facts.accelerators)
    if final.is_dir():  # installed before (e.g. a crash after the rename, before the switch)
        return Release(version=staged.version, sha256=staged.sha256, path=final, manifest=manifest)
    need = sum(m.size for m in checked.members.values()) + reserve_bytes
    free = shutil.disk_usage(store.releases).free
    if free < need:
        raise StorageError(f"not enough disk space to install {manifest.name} {manifest.version}: "
                           f"needs {need} bytes (with the {reserve_bytes}-byte reserve), {free} free")
    tmp = store.releases / f".{staged.sha256[:16]}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        vb = open_bundle(bundle, tmp, trusted_keys=trusted_keys, gzip_crc=False)
        failpoint.hit("install.extracted")
        result = selftest_bundle(vb, threads=threads, fit_checked=True)
        log.info("%s %s self-test passed on %s: %d case(s), max abs error %.3g", manifest.name, manifest.version,
                 result["backend"], result["cases"], result["max_abs_error"])
        os.replace(tmp, final)
        fsync_dir(store.releases)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else e.strerror
        raise StorageError(f"cannot install {manifest.name} {manifest.version}: {what}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Release(version=staged.version, sha256=staged.sha256, path=final, manifest=manifest)
