"""Byte compatibility with the reference implementation, PyPI ``model-signing`` 1.1.1.

Both directions: what we sign verifies with upstream (and upstream rejects it
once tampered with); what upstream signs verifies here. Upstream resolves
ignored paths relative to the model directory, so the signature file is given
by its name inside the directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

model_signing = pytest.importorskip("model_signing")

from model_signing import hashing, signing, verifying  # noqa: E402

from agent.errors import DigestMismatch, SignatureError  # noqa: E402
from agent.keys import load_public_key  # noqa: E402
from agent.manifest import SIGNATURE_NAME  # noqa: E402
from agent.signing import build_statement, check_resources, transfer_subject, verify_signature  # noqa: E402
from packager.keys import GeneratedKey, generate_keypair, load_private_key  # noqa: E402
from packager.signer import sign_directory, sign_transfer  # noqa: E402

LIMITS = {"max_bytes": 1 << 20, "max_depth": 32}


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> GeneratedKey:
    return generate_keypair(tmp_path_factory.mktemp("keys"), name="release")


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    """Names chosen so component order ("x/b" < "x-b") differs from string order."""
    d = tmp_path / "mymodel"
    (d / "x" / "deep").mkdir(parents=True)
    (d / "manifest.json").write_bytes(b'{"name": "mymodel"}')
    (d / "model.onnx").write_bytes(b"\x08\x07" * 5000)
    (d / "x" / "b").write_bytes(b"inner")
    (d / "x" / "deep" / "c.bin").write_bytes(b"deeper")
    (d / "x-b").write_bytes(b"dash")
    (d / "a.txt").write_bytes(b"")
    return d


def _upstream_hashing() -> hashing.Config:
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])


def _upstream_verify(model: Path, public_key: Path) -> None:
    verifying.Config().set_hashing_config(_upstream_hashing()).use_elliptic_key_verifier(
        public_key=public_key
    ).verify(model, model / SIGNATURE_NAME)


def _hash_files(model: Path) -> dict[str, str]:
    """The test's own hashing, independent of packager.signer."""
    return {
        p.relative_to(model).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in model.rglob("*")
        if p.is_file() and p.name != SIGNATURE_NAME
    }


def _statement(sig: bytes) -> dict:  # type: ignore[type-arg]
    return json.loads(base64.b64decode(json.loads(sig)["dsseEnvelope"]["payload"]))


# --- ours -> upstream ------------------------------------------------------------


def test_our_signature_verifies_with_model_signing(model: Path, keypair: GeneratedKey) -> None:
    key = load_private_key(keypair.private_path, passphrase=None)
    (model / SIGNATURE_NAME).write_bytes(sign_directory(model, key, subject_name="mymodel"))
    _upstream_verify(model, keypair.public_path)
    # upstream can also take the hashing configuration from our statement alone
    verifying.Config().use_elliptic_key_verifier(public_key=keypair.public_path).verify(model, model / SIGNATURE_NAME)


@pytest.mark.parametrize("tamper", ["change", "add", "remove", "statement"])
def test_model_signing_rejects_our_signature_after_tampering(model: Path, keypair: GeneratedKey, tamper: str) -> None:
    key = load_private_key(keypair.private_path, passphrase=None)
    sig = sign_directory(model, key, subject_name="mymodel")
    if tamper == "change":
        (model / "x" / "b").write_bytes(b"inneR")
    elif tamper == "add":
        (model / "x" / "new").write_bytes(b"new")
    elif tamper == "remove":
        (model / "x-b").unlink()
    else:
        doc = json.loads(sig)
        statement = _statement(sig)
        statement["predicate"]["resources"][0]["digest"] = "0" * 64
        doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        sig = json.dumps(doc).encode()
    (model / SIGNATURE_NAME).write_bytes(sig)
    with pytest.raises((ValueError, InvalidSignature)):
        _upstream_verify(model, keypair.public_path)


# --- upstream -> ours ------------------------------------------------------------


def _upstream_sign(model: Path, keypair: GeneratedKey) -> bytes:
    signing.Config().set_hashing_config(_upstream_hashing()).use_elliptic_key_signer(
        private_key=keypair.private_path
    ).sign(model, model / SIGNATURE_NAME)
    return (model / SIGNATURE_NAME).read_bytes()


def test_model_signing_signature_verifies_here(model: Path, keypair: GeneratedKey) -> None:
    sig = _upstream_sign(model, keypair)
    trusted = load_public_key(keypair.public_path)
    statement = verify_signature(sig, [trusted], **LIMITS)
    assert statement.signer_key_id == keypair.key_id  # upstream's key hint is our key id
    assert statement.subject_name == "mymodel"  # upstream names the subject after the directory
    check_resources(statement, _hash_files(model))


def test_model_signing_signature_detects_tampering_here(model: Path, keypair: GeneratedKey) -> None:
    sig = _upstream_sign(model, keypair)
    (model / "x" / "deep" / "c.bin").write_bytes(b"deepeR")
    statement = verify_signature(sig, [load_public_key(keypair.public_path)], **LIMITS)
    with pytest.raises(DigestMismatch, match="file 'x/deep/c.bin' does not match its signed digest"):
        check_resources(statement, _hash_files(model))


def test_model_signing_signature_without_hint_verifies_here(model: Path, keypair: GeneratedKey) -> None:
    """Signatures from model-signing < 1.0 carry no key hint; every trusted key is tried."""
    doc = json.loads(_upstream_sign(model, keypair))
    doc["verificationMaterial"]["publicKey"] = {}
    other = load_public_key(generate_keypair(model.parent, name="other").public_path)
    statement = verify_signature(json.dumps(doc).encode(), [other, load_public_key(keypair.public_path)], **LIMITS)
    assert statement.signer_key_id == keypair.key_id


def test_edited_model_signing_signature_is_rejected_here(model: Path, keypair: GeneratedKey) -> None:
    doc = json.loads(_upstream_sign(model, keypair))
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["subject"][0]["name"] = "renamed"
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(SignatureError, match=f"does not verify with key {keypair.key_id}"):
        verify_signature(json.dumps(doc).encode(), [load_public_key(keypair.public_path)], **LIMITS)


def test_same_resources_order_and_root_digest_as_model_signing(model: Path, keypair: GeneratedKey) -> None:
    theirs = _statement(_upstream_sign(model, keypair))
    ours = json.loads(build_statement(subject_name="mymodel", resources=_hash_files(model)))
    assert [r["name"] for r in ours["predicate"]["resources"]] == [r["name"] for r in theirs["predicate"]["resources"]]
    assert ours["predicate"]["resources"] == [
        {k: r[k] for k in ("name", "algorithm", "digest")} for r in theirs["predicate"]["resources"]
    ]
    assert ours["subject"] == theirs["subject"]
    assert [r["name"] for r in ours["predicate"]["resources"]].index("x/b") < [
        r["name"] for r in ours["predicate"]["resources"]].index("x-b")


# --- transfer signatures (shard serialization) ------------------------------------


def test_our_transfer_signature_verifies_with_model_signing_shards_and_catches_a_changed_block(
        tmp_path: Path, keypair: GeneratedKey) -> None:
    """A transfer signature is model-signing's ``shards`` serialization of the bundle as a one-file
    model: upstream verifies it against the file, and refuses it once one byte of one shard changed."""
    bundle = tmp_path / "m-1.0.0.edge"
    bundle.write_bytes(bytes(range(256)) * 2500)  # 640000 bytes: two whole shards and a short one
    sidecar = tmp_path / "m-1.0.0.edge.sig"
    key = load_private_key(keypair.private_path, passphrase=None)
    sidecar.write_bytes(sign_transfer(bundle, key, subject_name=transfer_subject("m", "1.0.0"), shard_size=262144))
    upstream = verifying.Config().use_elliptic_key_verifier(public_key=keypair.public_path).set_hashing_config(
        hashing.Config().use_shard_serialization(shard_size=262144))
    upstream.verify(bundle, sidecar)
    names = [r["name"] for r in _statement(sidecar.read_bytes())["predicate"]["resources"]]
    assert names == [".:0:262144", ".:262144:524288", ".:524288:640000"]
    data = bytearray(bundle.read_bytes())
    data[300000] ^= 1
    bundle.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"\.:262144:524288"):
        upstream.verify(bundle, sidecar)
