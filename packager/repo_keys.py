"""TUF role keys on disk: Ed25519, unencrypted PKCS#8 PEM, mode 0600, one file per key.

Files are named ``<role>-<keyid[:16]>.key`` (online keys end up as ``snapshot.key`` and
``timestamp.key``). A key file counts for a role only if its key id is one the current root
lists for that role, so a leftover from an interrupted rotation is ignored, never used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedKeyType
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Root

from agent.errors import KeyLoadError, UsageError
from agent.fsutil import read_local_file
from agent.keys import describe_key
from packager.repo_store import Role, move_atomic, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyFile:
    """A role key loaded from (or written to) ``path``."""

    path: Path
    role: Role
    signer: CryptoSigner

    @property
    def keyid(self) -> str:
        return str(self.signer.public_key.keyid)


def _mkdir_private(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def generate(directory: Path, role: Role) -> KeyFile:
    """Create a new Ed25519 key for ``role`` as ``directory/<role>-<keyid16>.key`` (0600)."""
    signer = CryptoSigner.generate_ed25519()
    _mkdir_private(directory)
    path = directory / f"{role}-{signer.public_key.keyid[:16]}.key"
    if path.exists():
        raise UsageError(f"{path} already exists")
    write_atomic(path, signer.private_bytes, mode=0o600)
    log.info("generated %s key %s in %s", role, signer.public_key.keyid[:16], path)
    return KeyFile(path, role, signer)


def load(path: Path, role: Role) -> KeyFile:
    data = read_local_file(path, what=f"{role} key", error=KeyLoadError)
    try:
        private = load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedKeyType):
        raise KeyLoadError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyLoadError(f"{path} is {describe_key(private)}; TUF role keys are Ed25519")
    public = SSlibKey.from_crypto(private.public_key(), scheme="ed25519")
    return KeyFile(path, role, CryptoSigner(private, public))


def find(directory: Path, role: Role, keyids: Sequence[str]) -> list[KeyFile]:
    """The key files for ``role`` in ``directory`` whose ids are in ``keyids`` (one per id)."""
    if not directory.is_dir():
        return []
    names = sorted(p for p in directory.glob("*.key") if p.name == f"{role}.key" or p.name.startswith(f"{role}-"))
    found: dict[str, KeyFile] = {}
    for path in names:
        kf = load(path, role)
        if kf.keyid in keyids and kf.keyid not in found:
            found[kf.keyid] = kf
        else:
            log.debug("ignoring %s: key %s is not a current %s key", path, kf.keyid[:16], role)
    return list(found.values())


def signers_for(root: Root, role: Role, directory: Path) -> list[KeyFile]:
    """Enough current keys of ``role`` from ``directory`` to meet its threshold, or :class:`KeyLoadError`."""
    spec = root.roles[role]
    found = find(directory, role, spec.keyids)
    if len(found) < spec.threshold:
        raise KeyLoadError(f"signing {role} metadata needs {spec.threshold} of its {len(spec.keyids)} key(s); "
                           f"found {len(found)} in {directory} (pass --keys DIR where they are kept)")
    log.debug("using %d %s key(s) from %s", len(found), role, directory)
    return found


def retire(kf: KeyFile, retired_dir: Path) -> Path:
    """Move a replaced key file to ``retired_dir`` (kept, never deleted: the operator decides)."""
    _mkdir_private(retired_dir)
    dest = retired_dir / f"{kf.role}-{kf.keyid[:16]}.key"
    move_atomic(kf.path, dest)
    log.info("retired %s key %s to %s", kf.role, kf.keyid[:16], dest)
    return dest


def rename(kf: KeyFile, name: str) -> KeyFile:
    """Give a key file its final name in the same directory."""
    dest = kf.path.parent / name
    move_atomic(kf.path, dest)
    return KeyFile(dest, kf.role, kf.signer)
