"""Signing keys on the workstation: generate an ECDSA P-256 key pair, load a private key.

The private key is PKCS#8 PEM, encrypted with the passphrase when one is given,
and is created with mode 0600 (never widened, never chmod-ed afterwards). The
public key is PEM SubjectPublicKeyInfo; its id is :func:`agent.keys.key_id`.
Messages name files, never passphrases or key bytes.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from agent.fsutil import fsync_dir, read_local_file
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedKeyType
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import KeyLoadError, UsageError
from agent.keys import describe_key, is_p256, key_id

log = logging.getLogger(__name__)

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


@dataclass(frozen=True, kw_only=True)
class GeneratedKey:
    """Where :func:`generate_keypair` wrote the pair, and the key id."""

    private_path: Path
    public_path: Path
    key_id: str
    encrypted: bool


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    """An ECDSA P-256 private key with its key id. The key never appears in ``repr``."""

    key_id: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not is_p256(self.private_key) or not isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"SigningKey needs an ECDSA P-256 private key, got {describe_key(self.private_key)}")
        if self.key_id != key_id(self.private_key.public_key()):
            raise ValueError("SigningKey.key_id is not the id of the key's public half")

    @classmethod
    def of(cls, private_key: ec.EllipticCurvePrivateKey) -> SigningKey:
        return cls(key_id=key_id(private_key.public_key()), private_key=private_key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()


# --- generate -------------------------------------------------------------


def generate_keypair(
    out_dir: Path, *, name: str = "release", passphrase: bytes | None = None, force: bool = False
) -> GeneratedKey:
    """Create ``NAME.key`` (0600) and ``NAME.pub`` in ``out_dir``.

    Without ``force`` neither file may exist (both are checked before anything is
    written). Each file is written atomically; if anything fails, whatever this
    call wrote is removed (with ``force``, a file already replaced is not brought
    back). Raises :class:`UsageError`.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UsageError(f"invalid key name {name!r}: use a plain file name without a suffix")
    if passphrase is not None and not passphrase:
        raise UsageError("the passphrase is empty")
    if not out_dir.is_dir():
        raise UsageError(f"output directory {out_dir} does not exist")
    private_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    targets = (private_path, public_path)
    if not force:
        existing = [str(p) for p in targets if p.exists() or p.is_symlink()]
        if existing:
            raise UsageError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                             "pass --force to overwrite")
    for p in targets:
        if p.is_dir() and not p.is_symlink():
            raise UsageError(f"{p} is a directory")

    private_key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = key_id(private_key.public_key())

    temps: list[Path] = []
    published: list[Path] = []
    try:
        temps.append(_write_temp(out_dir, private_pem, mode=0o600))
        temps.append(_write_temp(out_dir, public_pem, mode=0o644))
        for tmp, final in zip(temps, targets):
            os.replace(tmp, final)
            published.append(final)
        fsync_dir(out_dir)
    except BaseException as exc:
        for p in (*temps, *published):
            p.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write the key pair to {out_dir}: {exc.strerror or exc}") from None
        raise
    log.info("generated key %s: %s, %s", kid, private_path, public_path)
    return GeneratedKey(private_path=private_path, public_path=public_path, key_id=kid, encrypted=bool(passphrase))


def _write_temp(directory: Path, data: bytes, *, mode: int) -> Path:
    """Write ``data`` to a new hidden file in ``directory``, created with ``mode``, and fsync it."""
    path = directory / f".edgeship-key-{secrets.token_hex(8)}.tmp"
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path




# --- load -----------------------------------------------------------------


def load_private_key(path: Path, *, passphrase: bytes | None) -> SigningKey:
    """Read a PEM private key and check it is ECDSA P-256. Raises :class:`KeyLoadError`.

    A passphrase given for an unencrypted key is ignored (with a warning).
    """
    data = read_local_file(path, what="private key", error=KeyLoadError)

    if b"-----BEGIN " not in data:
        raise KeyLoadError(f"{path} is not a PEM file")
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        raise KeyLoadError(f"{path} is an OpenSSH key; edgeship needs a PEM (PKCS#8) ECDSA P-256 private key")
    if b"PRIVATE KEY-----" not in data:
        what = "a public key" if b"-----BEGIN PUBLIC KEY-----" in data else "not a private key"
        raise KeyLoadError(f"{path} is {what}; signing needs the private key (the {PRIVATE_SUFFIX} file)")

    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    if encrypted and passphrase is None:
        raise KeyLoadError(f"{path} is encrypted: pass --passphrase-env")
    if not encrypted and passphrase is not None:
        log.warning("%s is not encrypted; ignoring the passphrase", path)
    try:
        private_key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except TypeError:
        # cryptography disagrees with our reading of the PEM headers about encryption.
        raise KeyLoadError(f"{path} is encrypted: pass --passphrase-env") from None
    except ValueError:
        if encrypted:
            raise KeyLoadError(f"wrong passphrase for {path}") from None
        raise KeyLoadError(f"{path} is not a valid PEM private key") from None
    except UnsupportedKeyType:
        raise KeyLoadError(f"{path} holds a key of a type this system cannot read") from None
    if not is_p256(private_key) or not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise KeyLoadError(f"{path} is {describe_key(private_key)}; edgeship needs ECDSA P-256")
    key = SigningKey.of(private_key)
    log.debug("loaded signing key %s from %s", key.key_id, path)
    return key
