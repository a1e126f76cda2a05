"""Verification of whole bundles: every tampering case is refused with the specific error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.bundle import open_bundle
from agent.errors import (
    ArchiveError,
    DigestMismatch,
    ManifestError,
    SignatureError,
    UnknownFormat,
    UntrustedSigner,
    UsageError,
)
from agent.manifest import MANIFEST_NAME, SIGNATURE_NAME
from tests.conftest import KeyPair, archive_order, build, repack, resign, unpack


def _verify(bundle: Path, dest: Path, key: KeyPair):  # type: ignore[no-untyped-def]
    """Verify both ways: extracted, and in place (verify_file); they must agree on every input."""
    from agent.bundle import verify_file
    from agent.errors import EdgeshipError

    in_place: EdgeshipError | None = None
    checked = None
    try:
        checked = verify_file(bundle, trusted_keys=[key.trusted()])
    except EdgeshipError as e:
        in_place = e
    dest.mkdir(exist_ok=True)
    try:
        vb = open_bundle(bundle, dest, trusted_keys=[key.trusted()])
    except EdgeshipError as e:
        assert type(in_place) is type(e), f"verify_file raised {in_place!r}, open_bundle {e!r}"
        raise
    assert in_place is None and checked is not None and checked.manifest == vb.manifest
    return vb


def test_intact_bundle_verifies(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    vb = _verify(mlp_bundle, tmp_path / "x", release_key)
    assert vb.manifest.name == "mlp" and vb.manifest.version == "1.0.0"
    assert vb.signer == release_key.key_id
    assert vb.model_path.read_bytes()[:2]  # extracted and present
    assert set(vb.members) == {SIGNATURE_NAME, *vb.manifest.payload_files()}


def test_verification_failure_leaves_dest_empty(mlp_bundle: Path, other_key: KeyPair, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(UntrustedSigner):
        _verify(mlp_bundle, dest, other_key)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    "case",
    ["changed-byte", "truncated", "extended", "unlisted-file", "missing-file", "renamed-file", "edited-manifest"],
)
def test_tampered_payload_is_refused(case: str, mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    files = unpack(mlp_bundle, tmp_path / "u")
    model = files["model.onnx"]
    data = model.read_bytes()
    expect: tuple[type[Exception], str]
    if case == "changed-byte":
        model.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
        expect = (DigestMismatch, "model.onnx")
    elif case == "truncated":
        model.write_bytes(data[:-1])
        expect = (DigestMismatch, "model.onnx")
    elif case == "extended":
        model.write_bytes(data + b"\0")
        expect = (DigestMismatch, "model.onnx")
    elif case == "unlisted-file":
        extra = tmp_path / "u" / "extra.bin"
        extra.write_bytes(b"not signed")
        files["extra.bin"] = extra
        expect = (DigestMismatch, "extra.bin")
    elif case == "missing-file":
        del files["selftest.npz"]
        expect = (DigestMismatch, "selftest.npz")
    elif case == "renamed-file":
        files["model2.onnx"] = files.pop("model.onnx")
        expect = (DigestMismatch, "model2.onnx")
    else:
        doc = json.loads(files[MANIFEST_NAME].read_bytes())
        doc["version"] = "9.9.9"
        files[MANIFEST_NAME].write_text(json.dumps(doc))
        expect = (DigestMismatch, MANIFEST_NAME)
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(expect[0], match=expect[1].replace(".", r"\.")):
        _verify(bad, tmp_path / "v", release_key)


def test_edited_statement_is_refused(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    import base64

    files = unpack(mlp_bundle, tmp_path / "u")
    sig = json.loads(files[SIGNATURE_NAME].read_bytes())
    stmt = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    stmt["predicate"]["resources"][0]["digest"] = "0" * 64
    sig["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    files[SIGNATURE_NAME].write_text(json.dumps(sig))
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(SignatureError):
        _verify(bad, tmp_path / "v", release_key)


def test_corrupted_signature_is_refused(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    import base64

    files = unpack(mlp_bundle, tmp_path / "u")
    sig = json.loads(files[SIGNATURE_NAME].read_bytes())
    raw = bytearray(base64.b64decode(sig["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[-3] ^= 0xFF
    sig["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    files[SIGNATURE_NAME].write_text(json.dumps(sig))
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(SignatureError):
        _verify(bad, tmp_path / "v", release_key)


def test_signature_of_another_bundle_is_refused(
    mlp_bundle: Path, mlp_onnx: Path, release_key: KeyPair, tmp_path: Path
) -> None:
    other = build(mlp_onnx, release_key, tmp_path / "mlp-1.0.1.edge", version="1.0.1")
    files = unpack(mlp_bundle, tmp_path / "a")
    files_b = unpack(other.path, tmp_path / "b")
    files[SIGNATURE_NAME] = files_b[SIGNATURE_NAME]
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(DigestMismatch, match="manifest"):
        _verify(bad, tmp_path / "v", release_key)


def test_untrusted_signer_is_refused(mlp_bundle: Path, other_key: KeyPair, release_key: KeyPair, tmp_path: Path) -> None:
    with pytest.raises(UntrustedSigner, match=release_key.key_id[:16]):
        _verify(mlp_bundle, tmp_path / "v", other_key)


def test_resigned_by_untrusted_key_is_refused(
    mlp_bundle: Path, release_key: KeyPair, other_key: KeyPair, tmp_path: Path
) -> None:
    files = unpack(mlp_bundle, tmp_path / "u")
    resign(files, tmp_path / "u", other_key)
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(UntrustedSigner):
        _verify(bad, tmp_path / "v", release_key)


def test_unknown_format_version_is_refused(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    files = unpack(mlp_bundle, tmp_path / "u")
    doc = json.loads(files[MANIFEST_NAME].read_bytes())
    doc["format"] = 2
    files[MANIFEST_NAME].write_text(json.dumps(doc))
    resign(files, tmp_path / "u", release_key)  # properly signed: only the format is wrong
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(UnknownFormat, match="format version 2"):
        _verify(bad, tmp_path / "v", release_key)


def test_signed_manifest_naming_missing_file_is_refused(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    files = unpack(mlp_bundle, tmp_path / "u")
    doc = json.loads(files[MANIFEST_NAME].read_bytes())
    doc["labels"] = "labels.txt"
    files[MANIFEST_NAME].write_text(json.dumps(doc))
    resign(files, tmp_path / "u", release_key)
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(ManifestError, match="labels.txt"):
        _verify(bad, tmp_path / "v", release_key)


def test_subject_name_must_match_manifest(mlp_bundle: Path, release_key: KeyPair, tmp_path: Path) -> None:
    files = unpack(mlp_bundle, tmp_path / "u")
    resign(files, tmp_path / "u", release_key, subject="detector")
    bad = repack(archive_order(files), tmp_path / "bad.edge")
    with pytest.raises(ManifestError, match="detector"):
        _verify(bad, tmp_path / "v", release_key)


def test_not_a_bundle(tmp_path: Path, release_key: KeyPair) -> None:
    junk = tmp_path / "junk.edge"
    junk.write_bytes(b"hello, I am not a bundle" * 10)
    with pytest.raises(ArchiveError, match="gzip"):
        _verify(junk, tmp_path / "v", release_key)
    with pytest.raises(UsageError, match="not found"):
        _verify(tmp_path / "missing.edge", tmp_path / "v2", release_key)


def test_a_wrong_gzip_crc_is_refused_unless_a_signed_hash_covers_the_file(mlp_bundle: Path, release_key: KeyPair,
                                                                          tmp_path: Path) -> None:
    """The device skips the gzip CRC-32 both when it verifies a download and when it installs it
    (every byte matched TUF's hashes): it never stages what it would refuse at install. Anywhere
    else (publish, inspect, a local verify) the CRC-32 is checked."""
    from agent.bundle import verify_file
    from agent.errors import ArchiveError

    data = bytearray(mlp_bundle.read_bytes())
    data[-8] ^= 0xFF  # the trailer's CRC-32
    bad = tmp_path / "bad.edge"
    bad.write_bytes(bytes(data))
    keys = [release_key.trusted()]
    with pytest.raises(ArchiveError, match="incorrect data check"):
        verify_file(bad, trusted_keys=keys)
    (tmp_path / "a").mkdir()
    with pytest.raises(ArchiveError, match="incorrect data check"):
        open_bundle(bad, tmp_path / "a", trusted_keys=keys)
    assert list((tmp_path / "a").iterdir()) == []
    checked = verify_file(bad, trusted_keys=keys, gzip_crc=False)
    (tmp_path / "b").mkdir()
    opened = open_bundle(bad, tmp_path / "b", trusted_keys=keys, gzip_crc=False)
    assert checked.members == opened.members and opened.manifest.version == "1.0.0"
