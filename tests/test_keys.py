"""Key generation and loading, with real key files of every kind a user might hand us."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.errors import KeyLoadError, UsageError
from agent.keys import TrustedKey, key_id, load_public_key, public_key_from_pem
from packager.keys import SigningKey, generate_keypair, load_private_key

PASSPHRASE = b"correct horse battery staple"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _write_private(path: Path, key: object, password: bytes | None = None) -> Path:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return path


def _write_public(path: Path, key: object) -> Path:
    path.write_bytes(key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture()
def umask0():  # type: ignore[no-untyped-def]
    """Run with umask 0 so the file modes seen are exactly the modes the files were created with."""
    old = os.umask(0)
    yield
    os.umask(old)


# --- generate -------------------------------------------------------------------


def test_generate_writes_a_0600_private_key_and_reports_its_key_id(tmp_path: Path, umask0: None) -> None:
    gen = generate_keypair(tmp_path, name="release")
    assert gen.private_path == tmp_path / "release.key"
    assert gen.public_path == tmp_path / "release.pub"
    assert _mode(gen.private_path) == 0o600
    assert _mode(gen.public_path) == 0o644
    assert not gen.encrypted
    trusted = load_public_key(gen.public_path)
    assert gen.key_id == trusted.key_id == key_id(trusted.public_key)
    assert gen.public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert gen.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.key", "release.pub"]  # no temp files left
    signing = load_private_key(gen.private_path, passphrase=None)
    assert signing.key_id == gen.key_id
    assert isinstance(signing.private_key.curve, ec.SECP256R1)


def test_passphrase_round_trip(tmp_path: Path) -> None:
    gen = generate_keypair(tmp_path, passphrase=PASSPHRASE)
    assert gen.encrypted
    assert b"ENCRYPTED PRIVATE KEY" in gen.private_path.read_bytes()
    assert load_private_key(gen.private_path, passphrase=PASSPHRASE).key_id == gen.key_id


def test_wrong_passphrase(tmp_path: Path) -> None:
    gen = generate_keypair(tmp_path, passphrase=PASSPHRASE)
    with pytest.raises(KeyLoadError, match="wrong passphrase for") as exc:
        load_private_key(gen.private_path, passphrase=b"hunter2")
    assert "hunter2" not in str(exc.value) and PASSPHRASE.decode() not in str(exc.value)


def test_missing_passphrase_for_an_encrypted_key(tmp_path: Path) -> None:
    gen = generate_keypair(tmp_path, passphrase=PASSPHRASE)
    with pytest.raises(KeyLoadError, match="is encrypted: pass --passphrase-env"):
        load_private_key(gen.private_path, passphrase=None)


def test_passphrase_for_an_unencrypted_key_is_ignored(tmp_path: Path) -> None:
    gen = generate_keypair(tmp_path)
    assert load_private_key(gen.private_path, passphrase=PASSPHRASE).key_id == gen.key_id


def test_refuses_to_overwrite_without_force_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "release.pub").write_bytes(b"keep me")
    with pytest.raises(UsageError, match=r"release\.pub already exists; pass --force"):
        generate_keypair(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.pub"]
    assert (tmp_path / "release.pub").read_bytes() == b"keep me"


def test_refusal_names_both_existing_files(tmp_path: Path) -> None:
    first = generate_keypair(tmp_path)
    with pytest.raises(UsageError, match=r"release\.key and .*release\.pub already exist"):
        generate_keypair(tmp_path)
    assert load_public_key(first.public_path).key_id == first.key_id


def test_force_overwrites(tmp_path: Path, umask0: None) -> None:
    first = generate_keypair(tmp_path)
    second = generate_keypair(tmp_path, force=True)
    assert second.key_id != first.key_id
    assert load_public_key(second.public_path).key_id == second.key_id
    assert load_private_key(second.private_path, passphrase=None).key_id == second.key_id
    assert _mode(second.private_path) == 0o600


def test_failure_midway_removes_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace
    calls = []

    def flaky_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(UsageError, match="cannot write the key pair .*No space left"):
        generate_keypair(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".."])
def test_invalid_key_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="invalid key name"):
        generate_keypair(tmp_path, name=name)


def test_missing_output_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        generate_keypair(tmp_path / "nope")


# --- load: wrong files ------------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError, match=r"public key .*nope\.pub not found"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(KeyLoadError, match=r"private key .*nope\.key not found"):
        load_private_key(tmp_path / "nope.key", passphrase=None)


def test_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "key.pem"
    junk.write_bytes(b"\x30\x82\x01\x0a garbage")
    with pytest.raises(KeyLoadError, match="key.pem is not a PEM file"):
        load_public_key(junk)
    with pytest.raises(KeyLoadError, match="key.pem is not a PEM file"):
        load_private_key(junk, passphrase=None)


def test_corrupt_pem(tmp_path: Path) -> None:
    bad = tmp_path / "key.pem"
    bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyLoadError, match="key.pem is not a valid PEM public key"):
        load_public_key(bad)


def test_ed25519_key_rejected(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(KeyLoadError, match="key.pem is an Ed25519 key; edgeship needs ECDSA P-256"):
        load_public_key(_write_public(tmp_path / "key.pem", key))
    with pytest.raises(KeyLoadError, match="key.key is an Ed25519 key; edgeship needs ECDSA P-256"):
        load_private_key(_write_private(tmp_path / "key.key", key), passphrase=None)


def test_rsa_key_rejected(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeyLoadError, match="key.pem is an RSA-2048 key; edgeship needs ECDSA P-256"):
        load_public_key(_write_public(tmp_path / "key.pem", key))
    with pytest.raises(KeyLoadError, match="key.key is an RSA-2048 key"):
        load_private_key(_write_private(tmp_path / "key.key", key), passphrase=None)


def test_p384_key_rejected(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(KeyLoadError, match="is an ECDSA P-384 key; edgeship needs ECDSA P-256"):
        load_public_key(_write_public(tmp_path / "key.pem", key))
    with pytest.raises(KeyLoadError, match="is an ECDSA P-384 key"):
        load_private_key(_write_private(tmp_path / "key.key", key), passphrase=None)


def test_private_key_given_where_a_public_key_belongs(tmp_path: Path) -> None:
    gen = generate_keypair(tmp_path)
    with pytest.raises(KeyLoadError, match=r"release\.key is a private key; give the public key"):
        load_public_key(gen.private_path)


def test_public_key_given_where_a_private_key_belongs(tmp_path: Path) -> None:
    gen = generate_keypair(tmp_path)
    with pytest.raises(KeyLoadError, match=r"release\.pub is a public key; signing needs the private key"):
        load_private_key(gen.public_path, passphrase=None)


def test_traditional_ec_pem_loads(tmp_path: Path) -> None:
    """``openssl ecparam -genkey`` writes 'BEGIN EC PRIVATE KEY' (SEC1); accept it too."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "sec1.key"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    assert load_private_key(path, passphrase=None).key_id == key_id(key.public_key())


# --- the key objects ---------------------------------------------------------------


def test_key_id_is_sha256_of_the_spki_pem(tmp_path: Path) -> None:
    import hashlib

    gen = generate_keypair(tmp_path)
    assert gen.key_id == hashlib.sha256(gen.public_path.read_bytes()).hexdigest()
    assert public_key_from_pem(gen.public_path.read_bytes(), source="x").key_id == gen.key_id


def test_key_objects_validate_themselves() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not the id"):
        TrustedKey(key_id="0" * 64, public_key=p256.public_key())
    with pytest.raises(ValueError, match="P-384"):
        TrustedKey.of(ec.generate_private_key(ec.SECP384R1()).public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not the id"):
        SigningKey(key_id="0" * 64, private_key=p256)


def test_signing_key_repr_hides_the_key() -> None:
    key = SigningKey.of(ec.generate_private_key(ec.SECP256R1()))
    assert "private_key" not in repr(key)
    assert key.key_id in repr(key)
