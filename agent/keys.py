"""Trusted public keys: loading them, naming them, and the key id.

edgeship signs with ECDSA P-256 only. A key's id is the SHA-256 (hex) of its PEM
``SubjectPublicKeyInfo`` encoding - the same value OpenSSF ``model-signing``
writes as the key hint in a signature, so one id names a key everywhere.

Only the loaders touch files; :func:`public_key_from_pem` and :func:`key_id`
are pure.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedKeyType
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from agent.fsutil import read_local_file
from agent.errors import KeyLoadError

log = logging.getLogger(__name__)

CURVE_NAME = "secp256r1"
"""The only curve edgeship signs and verifies with (NIST P-256)."""

_PEM_BEGIN = b"-----BEGIN "
_PRIVATE_MARKERS = (b"PRIVATE KEY-----",)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 hex of the key's PEM SubjectPublicKeyInfo bytes (model-signing's key hint)."""
    pem = public_key.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return hashlib.sha256(pem).hexdigest()


def describe_key(key: Any) -> str:
    """A short human description of a public or private key object, e.g. ``"an Ed25519 key"``."""
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        curve = key.curve.name
        return f"an ECDSA {names.get(curve, curve)} key" + ("" if curve in names else " (unusual curve)")
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey)):
        return "an Ed25519 key"
    if isinstance(key, (ed448.Ed448PublicKey, ed448.Ed448PrivateKey)):
        return "an Ed448 key"
    if isinstance(key, (dsa.DSAPublicKey, dsa.DSAPrivateKey)):
        return "a DSA key"
    if isinstance(key, (x25519.X25519PublicKey, x25519.X25519PrivateKey, x448.X448PublicKey, x448.X448PrivateKey)):
        return "an X25519/X448 key-agreement key"
    return f"a {type(key).__name__} key"


def is_p256(key: Any) -> bool:
    """True for an EC P-256 public or private key."""
    return isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) and key.curve.name == CURVE_NAME


@dataclass(frozen=True)
class TrustedKey:
    """A public key whose signatures this device accepts, with its key id.

    Construction checks that the key is ECDSA P-256 and that ``key_id`` is its id;
    a mismatch is a programming error (``ValueError``), since the loaders below
    already reject wrong keys with :class:`KeyLoadError`.
    """

    key_id: str
    public_key: ec.EllipticCurvePublicKey

    def __post_init__(self) -> None:
        if not is_p256(self.public_key) or not isinstance(self.public_key, ec.EllipticCurvePublicKey):
            raise ValueError(f"TrustedKey needs an ECDSA P-256 public key, got {describe_key(self.public_key)}")
        if self.key_id != key_id(self.public_key):
            raise ValueError(f"TrustedKey.key_id {self.key_id!r} is not the id of the given public key")

    @classmethod
    def of(cls, public_key: ec.EllipticCurvePublicKey) -> TrustedKey:
        """A trusted key with its id computed."""
        return cls(key_id=key_id(public_key), public_key=public_key)


def public_key_from_pem(data: bytes, *, source: str) -> TrustedKey:
    """Parse a PEM public key; ``source`` names it in error messages (usually the file name).

    Raises :class:`KeyLoadError` when the data is not PEM, is a private key, or is
    not an ECDSA P-256 public key (the message says what it is).
    """
    if _PEM_BEGIN not in data:
        raise KeyLoadError(f"{source} is not a PEM file (expected '-----BEGIN PUBLIC KEY-----')")
    if any(marker in data for marker in _PRIVATE_MARKERS):
        raise KeyLoadError(f"{source} is a private key; give the public key (the .pub file) instead")
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise KeyLoadError(f"{source} is an X.509 certificate; give the PEM public key instead")
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        # cryptography's message can quote the input; keep it out of ours.
        log.debug("load_pem_public_key(%s) failed: %s", source, type(exc).__name__)
        raise KeyLoadError(f"{source} is not a valid PEM public key") from None
    except UnsupportedKeyType as exc:
        log.debug("load_pem_public_key(%s) failed: %s", source, type(exc).__name__)
        raise KeyLoadError(f"{source} holds a public key of a type this system cannot read") from None
    if not is_p256(public_key) or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise KeyLoadError(f"{source} is {describe_key(public_key)}; edgeship needs ECDSA P-256")
    trusted = TrustedKey.of(public_key)
    log.debug("loaded trusted key %s from %s", trusted.key_id, source)
    return trusted


def load_public_key(path: Path) -> TrustedKey:
    """Read and parse a PEM public key file. Raises :class:`KeyLoadError`."""
    data = read_local_file(path, what="public key", error=KeyLoadError)
    return public_key_from_pem(data, source=str(path))
