"""The signature format: round trip and every way a signature or the signed files can be wrong.

Real keys and real files; a small forge (``_bundle``) builds signature files with
knobs (media type, payload type, hint, extra signatures, curve) so each case
changes exactly one thing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import (
    BadData,
    DigestMismatch,
    JsonError,
    SignatureError,
    UnknownFormat,
    UnsupportedAlgorithm,
    UntrustedSigner,
)
from agent.keys import TrustedKey
from agent.manifest import SIGNATURE_NAME
from agent.signing import (
    BUNDLE_MEDIA_TYPE,
    PAYLOAD_TYPE,
    TransferSignature,
    VerifiedStatement,
    build_statement,
    check_resources,
    pae,
    read_transfer_signature,
    read_unverified,
    shard_statement,
    verify_signature,
    verify_transfer_signature,
)
from packager.keys import SigningKey
from packager.signer import hash_directory, sign_directory, sign_statement

LIMITS = {"max_bytes": 1 << 20, "max_depth": 32}


@functools.lru_cache(maxsize=None)
def _key(label: str) -> SigningKey:
    """One P-256 key per label for the whole module (hypothesis needs module-level state)."""
    return SigningKey.of(ec.generate_private_key(ec.SECP256R1()))


def _trusted(label: str) -> TrustedKey:
    return TrustedKey.of(_key(label).public_key)


RELEASE = "release"
OTHER = "other"


def _verify(sig: bytes, *labels: str) -> VerifiedStatement:
    return verify_signature(sig, [_trusted(lb) for lb in (labels or (RELEASE,))], **LIMITS)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bundle(
    statement: bytes,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    hint: str | None,
    media_type: str = BUNDLE_MEDIA_TYPE,
    payload_type: str = PAYLOAD_TYPE,
    extra_signatures: int = 0,
) -> bytes:
    """Forge a signature file with knobs; the DSSE signature itself is always genuine."""
    algo = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[private_key.curve.key_size]
    sig = base64.b64encode(private_key.sign(pae(payload_type, statement), ec.ECDSA(algo))).decode()
    public_key: dict[str, Any] = {} if hint is None else {"hint": hint}
    doc = {
        "mediaType": media_type,
        "verificationMaterial": {"publicKey": public_key, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(statement).decode(),
            "payloadType": payload_type,
            "signatures": [{"sig": sig, "keyid": ""}] * (1 + extra_signatures),
        },
    }
    return json.dumps(doc).encode()


def _resign(sig: bytes, edit: Callable[[dict[str, Any]], None], label: str = RELEASE) -> bytes:
    """Decode the statement in ``sig``, apply ``edit``, and sign the result with a trusted key."""
    doc = json.loads(sig)
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    edit(statement)
    key = _key(label)
    return sign_statement(json.dumps(statement).encode(), key)


def _edit_bundle(sig: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(sig)
    edit(doc)
    return json.dumps(doc).encode()


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    d = tmp_path / "payload"
    (d / "sub").mkdir(parents=True)
    (d / "manifest.json").write_bytes(b'{"name": "mlp"}')
    (d / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (d / "labels.txt").write_bytes(b"cat\ndog\n")
    (d / "sub" / "extra.bin").write_bytes(b"\x00" * 17)
    return d


@pytest.fixture()
def signed(payload: Path) -> bytes:
    sig = sign_directory(payload, _key(RELEASE), subject_name="mlp")
    (payload / SIGNATURE_NAME).write_bytes(sig)
    return sig


def _check_dir(sig: bytes, payload: Path) -> None:
    check_resources(_verify(sig), hash_directory(payload))


# --- the happy path ---------------------------------------------------------


def test_round_trip(payload: Path, signed: bytes) -> None:
    statement = _verify(signed)
    assert statement.signer_key_id == _key(RELEASE).key_id
    assert statement.subject_name == "mlp"
    assert statement.predicate_type == "https://model_signing/signature/v1.0"
    assert dict(statement.resources) == {
        "labels.txt": _digest(b"cat\ndog\n"),
        "manifest.json": _digest(b'{"name": "mlp"}'),
        "model.onnx": _digest(bytes(range(256)) * 40),
        "sub/extra.bin": _digest(b"\x00" * 17),
    }
    check_resources(statement, hash_directory(payload))  # the signature file itself is excluded


def test_signature_file_has_the_model_signing_layout(signed: bytes) -> None:
    doc = json.loads(signed)
    assert list(doc) == ["mediaType", "verificationMaterial", "dsseEnvelope"]
    assert doc["verificationMaterial"] == {"publicKey": {"hint": _key(RELEASE).key_id}, "tlogEntries": []}
    assert list(doc["dsseEnvelope"]) == ["payload", "payloadType", "signatures"]
    assert doc["dsseEnvelope"]["signatures"][0]["keyid"] == ""
    assert b" " not in signed and b"\n" not in signed  # every byte is significant
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["serialization"] == {
        "method": "files", "allow_symlinks": False, "hash_type": "sha256", "ignore_paths": [SIGNATURE_NAME],
    }


def test_pae_matches_dsse_v1() -> None:
    assert pae("application/vnd.in-toto+json", b"{}") == b"DSSEv1 28 application/vnd.in-toto+json 2 {}"
    assert pae("t", b"") == b"DSSEv1 1 t 0 "


def test_build_statement_is_canonical_and_sorted_by_path_components() -> None:
    d = {n: _digest(n.encode()) for n in ("x-b", "x/b", "a", "x/a/c")}
    one = build_statement(subject_name="m", resources=d)
    two = build_statement(subject_name="m", resources=dict(reversed(list(d.items()))))
    assert one == two
    statement = json.loads(one)
    # model-signing sorts PurePosixPath keys: component-wise, so "x/b" precedes "x-b".
    assert [r["name"] for r in statement["predicate"]["resources"]] == ["a", "x/a/c", "x/b", "x-b"]
    root = hashlib.sha256(b"".join(bytes.fromhex(d[n]) for n in ["a", "x/a/c", "x/b", "x-b"])).hexdigest()
    assert statement["subject"] == [{"name": "m", "digest": {"sha256": root}}]


@pytest.mark.parametrize("name", ["/abs", "a/../b", "./a", "a//b", ""])
def test_build_statement_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="resource name"):
        build_statement(subject_name="m", resources={name: "0" * 64})


def test_signature_without_hint_is_tried_with_every_trusted_key(payload: Path) -> None:
    """model-signing before 1.0 wrote no key hint."""
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    sig = _bundle(statement, _key(RELEASE).private_key, hint=None)
    assert _verify(sig, OTHER, RELEASE).signer_key_id == _key(RELEASE).key_id
    with pytest.raises(UntrustedSigner, match="any of the 1 trusted keys"):
        _verify(sig, OTHER)


def test_read_unverified_does_not_check_the_signature(signed: bytes) -> None:
    forged = _edit_bundle(signed, lambda d: d["dsseEnvelope"]["signatures"][0].update(sig="MAYCAQECAQE="))
    statement = read_unverified(forged, **LIMITS)
    assert statement.signer_key_id == _key(RELEASE).key_id
    assert "model.onnx" in statement.resources


# --- the files do not match -------------------------------------------------


def test_changed_byte_in_a_resource(payload: Path, signed: bytes) -> None:
    data = bytearray((payload / "model.onnx").read_bytes())
    data[1000] ^= 0x01
    (payload / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="file 'model.onnx' does not match its signed digest"):
        _check_dir(signed, payload)


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_truncated_or_extended_file(payload: Path, signed: bytes, change: str) -> None:
    f = payload / "labels.txt"
    f.write_bytes(f.read_bytes()[:-1] if change == "truncate" else f.read_bytes() + b"\n")
    with pytest.raises(DigestMismatch, match="file 'labels.txt' does not match its signed digest"):
        _check_dir(signed, payload)


def test_file_not_listed(payload: Path, signed: bytes) -> None:
    (payload / "sub" / "payload.so").write_bytes(b"\x7fELF")
    with pytest.raises(DigestMismatch, match="file 'sub/payload.so' is not covered by the signature"):
        _check_dir(signed, payload)


def test_listed_file_missing(payload: Path, signed: bytes) -> None:
    (payload / "labels.txt").unlink()
    with pytest.raises(DigestMismatch, match="signed file 'labels.txt' is missing"):
        _check_dir(signed, payload)


def test_renamed_file_names_both(payload: Path, signed: bytes) -> None:
    (payload / "labels.txt").rename(payload / "labels2.txt")
    with pytest.raises(DigestMismatch) as exc:
        _check_dir(signed, payload)
    msg = str(exc.value)
    assert "file 'labels2.txt' is not covered by the signature" in msg
    assert "signed file 'labels.txt' is missing" in msg
    assert "renamed?" in msg


def test_signature_of_another_bundle(payload: Path, signed: bytes, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_bytes(b'{"name": "other"}')
    (other / "model.onnx").write_bytes(b"another model")
    other_sig = sign_directory(other, _key(RELEASE), subject_name="other")
    statement = _verify(other_sig)  # a perfectly valid signature...
    with pytest.raises(DigestMismatch, match="file 'manifest.json' does not match its signed digest"):
        check_resources(statement, hash_directory(payload))  # ...for other files


def test_many_problems_are_capped(tmp_path: Path) -> None:
    resources = {f"f{i:02d}": _digest(b"%d" % i) for i in range(15)}
    statement = _verify(sign_statement(build_statement(subject_name="m", resources=resources), _key(RELEASE)))
    with pytest.raises(DigestMismatch, match="and 5 more"):
        check_resources(statement, {})


# --- the signature does not verify --------------------------------------------


def test_edited_statement(signed: bytes) -> None:
    def edit(doc: dict[str, Any]) -> None:
        statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
        statement["predicate"]["resources"][0]["digest"] = "0" * 64
        doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()

    with pytest.raises(SignatureError, match=f"signature does not verify with key {_key(RELEASE).key_id}"):
        _verify(_edit_bundle(signed, edit))


def test_corrupted_signature_bytes(signed: bytes) -> None:
    def edit(doc: dict[str, Any]) -> None:
        raw = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
        raw[-5] ^= 0x40  # inside s
        doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(SignatureError, match="signature does not verify with key"):
        _verify(_edit_bundle(signed, edit))


def test_signature_that_is_not_der(signed: bytes) -> None:
    bad = _edit_bundle(signed, lambda d: d["dsseEnvelope"]["signatures"][0].update(
        sig=base64.b64encode(b"\x01" * 64).decode()))
    with pytest.raises(SignatureError, match="not a DER-encoded ECDSA signature"):
        _verify(bad)


def test_signer_not_trusted(signed: bytes) -> None:
    with pytest.raises(UntrustedSigner, match=f"signed by key {_key(RELEASE).key_id}, which is not trusted"):
        _verify(signed, OTHER)


def test_hint_names_a_trusted_key_that_did_not_sign(payload: Path) -> None:
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    sig = _bundle(statement, _key(OTHER).private_key, hint=_key(RELEASE).key_id)
    with pytest.raises(SignatureError, match=f"does not verify with key {_key(RELEASE).key_id}"):
        _verify(sig)


def test_no_trusted_keys(signed: bytes) -> None:
    with pytest.raises(UntrustedSigner, match="no trusted keys"):
        verify_signature(signed, [], **LIMITS)


def test_two_signatures(payload: Path) -> None:
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    sig = _bundle(statement, _key(RELEASE).private_key, hint=_key(RELEASE).key_id, extra_signatures=1)
    with pytest.raises(SignatureError, match="has 2 signatures; expected exactly one"):
        _verify(sig)


@pytest.mark.parametrize(
    ("value", "phrase"),
    [("not base64!", "not valid base64"), ("QUJD\nREVG", "not valid base64"), ("QUI=", None)],
)
def test_signature_base64_is_strict(signed: bytes, value: str, phrase: str | None) -> None:
    bad = _edit_bundle(signed, lambda d: d["dsseEnvelope"]["signatures"][0].update(sig=value))
    with pytest.raises(SignatureError, match=phrase or "signature"):
        _verify(bad)


def test_non_canonical_base64_is_rejected(payload: Path) -> None:
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    statement += b" " * ((1 - len(statement)) % 3)  # len % 3 == 1: base64 ends in "==" with 4 unused bits
    sig = _bundle(statement, _key(RELEASE).private_key, hint=_key(RELEASE).key_id)
    _verify(sig)
    encoded = json.loads(sig)["dsseEnvelope"]["payload"]
    assert encoded.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(encoded[-3])
    twin = encoded[:-3] + alphabet[last ^ 0b1111] + "=="  # flip only the unused low bits
    assert base64.b64decode(twin) == statement  # a lenient decoder sees the same bytes
    bad = _edit_bundle(sig, lambda d: d["dsseEnvelope"].update(payload=twin))
    with pytest.raises(SignatureError, match="dsseEnvelope.payload is not canonical base64"):
        _verify(bad)


# --- inconsistent statements (validly signed) ---------------------------------


def test_subject_digest_not_matching_resources(signed: bytes) -> None:
    def edit(s: dict[str, Any]) -> None:
        s["predicate"]["resources"][0]["digest"] = "0" * 64

    with pytest.raises(SignatureError, match="subject digest does not match the listed resources"):
        _verify(_resign(signed, edit))


def test_resource_listed_twice(signed: bytes) -> None:
    def edit(s: dict[str, Any]) -> None:
        res = s["predicate"]["resources"]
        res.append(dict(res[0]))
        h = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in res)).hexdigest()
        s["subject"][0]["digest"]["sha256"] = h

    with pytest.raises(SignatureError, match="statement lists resource 'labels.txt' twice"):
        _verify(_resign(signed, edit))


def test_resource_name_escaping_the_bundle(signed: bytes) -> None:
    def edit(s: dict[str, Any]) -> None:
        s["predicate"]["resources"][0]["name"] = "../etc/passwd"

    with pytest.raises(SignatureError, match="invalid resource name '../etc/passwd'"):
        _verify(_resign(signed, edit))


def test_extra_predicate_fields_are_ignored_as_model_signing_v1_requires(signed: bytes) -> None:
    statement = _verify(_resign(signed, lambda s: s["predicate"].update(model_card={"x": 1})))
    assert "model.onnx" in statement.resources


# --- formats we do not know ---------------------------------------------------


def test_unknown_predicate_type(signed: bytes) -> None:
    bad = _resign(signed, lambda s: s.update(predicateType="https://model_signing/signature/v2.0"))
    with pytest.raises(UnknownFormat, match="unknown predicate type 'https://model_signing/signature/v2.0'"):
        _verify(bad)


def test_old_digests_predicate_is_unknown(signed: bytes) -> None:
    bad = _resign(signed, lambda s: s.update(predicateType="https://model_signing/Digests/v0.1"))
    with pytest.raises(UnknownFormat, match="unknown predicate type"):
        _verify(bad)


def test_unknown_statement_type(signed: bytes) -> None:
    bad = _resign(signed, lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"))
    with pytest.raises(UnknownFormat, match="unknown statement type"):
        _verify(bad)


def test_unknown_media_type(payload: Path) -> None:
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    sig = _bundle(statement, _key(RELEASE).private_key, hint=_key(RELEASE).key_id,
                  media_type="application/vnd.dev.sigstore.bundle.v0.4+json")
    with pytest.raises(UnknownFormat, match="unknown signature bundle media type"):
        _verify(sig)


def test_unknown_payload_type(payload: Path) -> None:
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    sig = _bundle(statement, _key(RELEASE).private_key, hint=_key(RELEASE).key_id, payload_type="text/plain")
    with pytest.raises(UnknownFormat, match="unknown DSSE payload type 'text/plain'"):
        _verify(sig)


def test_shard_serialization_is_unknown(signed: bytes) -> None:
    bad = _resign(signed, lambda s: s["predicate"]["serialization"].update(method="shards", shard_size=10))
    with pytest.raises(UnknownFormat, match="serialization method 'shards'"):
        _verify(bad)


def test_certificate_signatures_are_unknown(signed: bytes) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["verificationMaterial"] = {"certificate": {"rawBytes": "AAAA"}, "tlogEntries": []}

    with pytest.raises(UnknownFormat, match="only public-key signatures"):
        _verify(_edit_bundle(signed, edit))


# --- algorithms we do not accept ------------------------------------------------


def test_hash_type_sha512(signed: bytes) -> None:
    bad = _resign(signed, lambda s: s["predicate"]["serialization"].update(hash_type="sha512"))
    with pytest.raises(UnsupportedAlgorithm, match="hashed with 'sha512'; edgeship needs sha256"):
        _verify(bad)


def test_resource_algorithm_blake3(signed: bytes) -> None:
    bad = _resign(signed, lambda s: s["predicate"]["resources"][1].update(algorithm="blake3"))
    with pytest.raises(UnsupportedAlgorithm, match="uses hash algorithm 'blake3'"):
        _verify(bad)


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP521R1()], ids=["P-384", "P-521"])
def test_larger_curve_key(payload: Path, curve: ec.EllipticCurve) -> None:
    statement = build_statement(subject_name="mlp", resources=hash_directory(payload))
    # even a hint naming a trusted key does not get past the algorithm check
    sig = _bundle(statement, ec.generate_private_key(curve), hint=_key(RELEASE).key_id)
    with pytest.raises(UnsupportedAlgorithm, match="edgeship accepts only ECDSA P-256"):
        _verify(sig)


# --- malformed documents ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "phrase"),
    [
        (b'{"mediaType": ', JsonError, "invalid JSON"),
        (b"\xff\xfe{}", JsonError, "invalid UTF-8"),
        (b'{"mediaType": NaN}', JsonError, "NaN"),
        (b'{"a": 1, "a": 2}', JsonError, "duplicate key 'a'"),
        (b"[" * 40 + b"]" * 40, JsonError, "nested"),
        (b" " * ((1 << 20) + 1), JsonError, "limit"),
        (b"[]", SignatureError, "must be a JSON object"),
        (b"{}", SignatureError, "has no 'mediaType' field"),
    ],
)
def test_malformed_json(data: bytes, error: type[Exception], phrase: str) -> None:
    with pytest.raises(error, match=phrase):
        _verify(data)


def test_unknown_bundle_field(signed: bytes) -> None:
    bad = _edit_bundle(signed, lambda d: d.update(extra=1))
    with pytest.raises(SignatureError, match=r"unknown field\(s\) \['extra'\]"):
        _verify(bad)


def test_sign_directory_refuses_symlinks(payload: Path) -> None:
    from agent.errors import UsageError

    (payload / "link").symlink_to(payload / "labels.txt")
    with pytest.raises(UsageError, match="symbolic link"):
        sign_directory(payload, _key(RELEASE), subject_name="mlp")


# --- properties -------------------------------------------------------------------

_component = st.text(alphabet="abcxyz019._-", min_size=1, max_size=8).filter(lambda c: c not in (".", ".."))
_names = st.lists(_component, min_size=1, max_size=3).map("/".join)
_digests = st.binary(min_size=32, max_size=32).map(bytes.hex)


def _prefix_free(names: list[str]) -> bool:
    """A file cannot also be a directory: no name may be a path prefix of another."""
    return not any(b.startswith(a + "/") for a in names for b in names)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_names, _digests, min_size=1, max_size=12).filter(lambda d: _prefix_free(list(d))))
def test_property_resource_maps_round_trip(resources: dict[str, str]) -> None:
    statement = build_statement(subject_name="m", resources=resources)
    verified = _verify(sign_statement(statement, _key(RELEASE)))
    assert dict(verified.resources) == resources
    check_resources(verified, resources)


@functools.lru_cache(maxsize=None)
def _fixed_signature() -> bytes:
    resources = {"manifest.json": _digest(b"m"), "model.onnx": _digest(b"o"), "sub/x": _digest(b"x")}
    return sign_statement(build_statement(subject_name="m", resources=resources), _key(RELEASE))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_any_flipped_byte_is_rejected(data: st.DataObject) -> None:
    sig = bytearray(_fixed_signature())
    index = data.draw(st.integers(0, len(sig) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    sig[index] ^= mask
    with pytest.raises(BadData):
        _verify(bytes(sig))


# --- transfer signatures ----------------------------------------------------------


def _transfer(data: bytes, label: str = RELEASE, shard: int = 4096) -> tuple[TransferSignature, list[str]]:
    digests = [hashlib.sha256(data[i:i + shard]).hexdigest() for i in range(0, len(data), shard)]
    statement = shard_statement(subject_name="m-1.0.0.edge", shard_size=shard, length=len(data), digests=digests)
    sig, payload = read_transfer_signature(sign_statement(statement, _key(label)), **LIMITS)
    assert payload == statement
    return sig, digests


def test_a_transfer_signature_verifies_against_the_digests_it_was_made_for() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: 2 whole shards and a short one
    sig, digests = _transfer(data)
    kw = {"subject_name": "m-1.0.0.edge", "shard_size": 4096, "length": len(data)}
    assert verify_transfer_signature(sig, [_trusted(OTHER), _trusted(RELEASE)], digests=digests, **kw) == \
        _key(RELEASE).key_id
    assert TransferSignature.from_json(json.loads(json.dumps(sig.to_json()))) == sig
    changed = list(digests)
    changed[1] = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(SignatureError, match="does not cover these 3 blocks"):
        verify_transfer_signature(sig, [_trusted(RELEASE)], digests=changed, **kw)
    with pytest.raises(SignatureError, match="does not cover"):
        verify_transfer_signature(sig, [_trusted(RELEASE)], digests=digests, **{**kw, "subject_name": "m-1.0.1.edge"})
    with pytest.raises(SignatureError, match="3 shard digests for 10240 bytes in shards of 8192"):
        verify_transfer_signature(sig, [_trusted(RELEASE)], digests=digests, **{**kw, "shard_size": 8192})
    with pytest.raises(UntrustedSigner, match="transfer signature signed by key .* not trusted"):
        verify_transfer_signature(sig, [_trusted(OTHER)], digests=digests, **kw)


@pytest.mark.parametrize("field, value, match", [
    ("keyid", "ABC", "not 64 lower-case hex"),
    ("sig", "not base64!", "not valid base64"),
    ("sig", base64.b64encode(b"\x30\x02\x02\x00").decode(), "not a DER-encoded ECDSA signature"),
    ("extra", "x", "unknown field"),
])
def test_a_malformed_transfer_signature_field_is_a_signature_error(field: str, value: str, match: str) -> None:
    sig, _ = _transfer(b"x" * 5000)
    with pytest.raises(SignatureError, match=match):
        TransferSignature.from_json({**sig.to_json(), field: value})
    with pytest.raises(SignatureError, match="must be a JSON object"):
        TransferSignature.from_json(["keyid", "sig"])
