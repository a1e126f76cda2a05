"""The signature format: OpenSSF model-signing v1.0, private-key mode, ECDSA P-256.

A signature file is a Sigstore bundle (JSON) holding one DSSE envelope whose
payload is an in-toto statement::

    {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
     "verificationMaterial": {"publicKey": {"hint": KEY_ID}, "tlogEntries": []},
     "dsseEnvelope": {"payload": b64(STATEMENT), "payloadType": "application/vnd.in-toto+json",
                      "signatures": [{"sig": b64(DER ECDSA-SHA256 over PAE), "keyid": ""}]}}

The statement lists every signed file with its SHA-256 in the predicate
(``resources``); its single subject carries SHA-256 over the concatenated raw
resource digests, in the order listed. The files are listed sorted by path
components, which is the order ``model-signing`` uses, so the bytes we produce
verify with ``model-signing`` 1.x and theirs verify here.

Everything here is a pure function over bytes and keys; nothing reads files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, NoReturn, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent import safejson
from agent.errors import (
    DigestMismatch,
    SignatureError,
    UnknownFormat,
    UnsupportedAlgorithm,
    UntrustedSigner,
)
from agent.keys import TrustedKey
from agent.manifest import SIGNATURE_NAME

log = logging.getLogger(__name__)

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SERIALIZATION_METHOD = "files"
HASH_TYPE = "sha256"

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_MAX_LISTED_PROBLEMS = 10


# --- building -------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes that are actually signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def resource_order(name: str) -> tuple[str, ...]:
    """Sort key for resource names: by path components, as model-signing sorts its manifest.

    This differs from plain string order: ``a/b`` sorts before ``a-b``.
    """
    return tuple(name.split("/"))


def build_statement(
    *,
    subject_name: str,
    resources: Mapping[str, str],
    ignore_paths: Sequence[str] = (SIGNATURE_NAME,),
) -> bytes:
    """The canonical in-toto statement (JSON bytes) signing ``resources`` (name -> sha256 hex).

    Names are relative POSIX paths. Output is deterministic: sorted keys, no
    insignificant whitespace, resources in model-signing order. Invalid input is
    a programming error (``ValueError``).
    """
    if not isinstance(subject_name, str) or not subject_name:
        raise ValueError("subject_name must be a non-empty string")
    if not resources:
        raise ValueError("a statement needs at least one resource")
    for name, digest in resources.items():
        problem = _name_problem(name)
        if problem:
            raise ValueError(f"resource name {name!r}: {problem}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise ValueError(f"resource {name!r}: digest must be 64 lower-case hex characters")
    if isinstance(ignore_paths, str) or not all(isinstance(p, str) and p for p in ignore_paths):
        raise ValueError("ignore_paths must be a sequence of non-empty strings")

    names = sorted(resources, key=resource_order)
    serialization: dict[str, Any] = {"method": SERIALIZATION_METHOD, "allow_symlinks": False, "hash_type": HASH_TYPE}
    if ignore_paths:  # model-signing omits the field when nothing is ignored
        serialization["ignore_paths"] = list(ignore_paths)
    return _statement_bytes(subject_name, serialization,
                            [{"name": n, "algorithm": HASH_TYPE, "digest": resources[n]} for n in names])


def shard_statement(*, subject_name: str, shard_size: int, length: int, digests: Sequence[str]) -> bytes:
    """The canonical in-toto statement signing one file as model-signing's ``shards`` method does.

    ``digests`` are the SHA-256 (hex) of the file's consecutive ``shard_size`` slices (the last one
    may be shorter). The resources are named as model-signing names the shards of a model that is a
    single file (``.:START:END``), so ``model_signing verify`` with shard serialization checks the
    file against it. The bytes are canonical (sorted keys, no insignificant whitespace): a verifier
    that knows the digests rebuilds them instead of receiving them. Invalid input is a ``ValueError``.
    """
    if not isinstance(subject_name, str) or not subject_name:
        raise ValueError("subject_name must be a non-empty string")
    if type(shard_size) is not int or shard_size <= 0 or type(length) is not int or length <= 0:
        raise ValueError("shard_size and length must be positive integers")
    if len(digests) != -(-length // shard_size):
        raise ValueError(f"{len(digests)} shard digests for {length} bytes in shards of {shard_size}")
    if not all(isinstance(d, str) and _HEX64.match(d) for d in digests):
        raise ValueError("shard digests must be 64 lower-case hex characters")
    algorithm = f"{HASH_TYPE}-sharded-{shard_size}"
    resources = [{"name": f".:{start}:{min(start + shard_size, length)}", "algorithm": algorithm, "digest": d}
                 for start, d in zip(range(0, length, shard_size), digests)]
    return _statement_bytes(subject_name, {"method": "shards", "allow_symlinks": False, "hash_type": HASH_TYPE,
                                           "shard_size": shard_size}, resources)


def _statement_bytes(subject_name: str, serialization: dict[str, Any], resources: list[dict[str, str]]) -> bytes:
    """A model-signing v1.0 statement, canonical: sorted keys, no insignificant whitespace. The
    subject's digest is the SHA-256 of the resources' raw digests, in the order listed."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": _root_digest(r["digest"] for r in resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"serialization": serialization, "resources": resources},
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _root_digest(hex_digests: Any) -> str:
    h = hashlib.sha256()
    for d in hex_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def _name_problem(name: Any) -> str | None:
    """Why ``name`` is not a canonical relative POSIX path, or None."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if name.startswith("/"):
        return "must be relative"
    if "\x00" in name:
        return "contains a NUL character"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "must not contain empty, '.' or '..' components"
    return None


# --- verifying ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VerifiedStatement:
    """What a signature says, once its signature has verified with a trusted key."""

    signer_key_id: str
    subject_name: str
    resources: Mapping[str, str]
    """Signed file name -> sha256 hex (read-only)."""
    predicate_type: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))


@dataclass(frozen=True, kw_only=True)
class _Envelope:
    hint: str
    payload_type: str
    payload: bytes
    sig: bytes


def verify_signature(
    signature: bytes, trusted_keys: Sequence[TrustedKey], *, max_bytes: int, max_depth: int
) -> VerifiedStatement:
    """Verify a signature file's bytes against the trusted keys and return its statement.

    The key named by the bundle's hint is tried; with no hint (signatures from
    model-signing before 1.0) every trusted key is tried. The statement is parsed
    only after its signature verified.

    Raises :class:`JsonError` (bad JSON), :class:`UnknownFormat` (media, payload,
    statement or predicate type), :class:`UnsupportedAlgorithm` (not sha256, not
    P-256), :class:`UntrustedSigner` (no trusted key made it) or
    :class:`SignatureError` (malformed, does not verify, inconsistent).
    """
    env = _parse_bundle(signature, max_bytes=max_bytes, max_depth=max_depth)
    signer = _verify_envelope(env, trusted_keys)
    return _parse_statement(env.payload, signer_key_id=signer, max_bytes=max_bytes, max_depth=max_depth)


def read_unverified(signature: bytes, *, max_bytes: int, max_depth: int) -> VerifiedStatement:
    """Parse a signature file WITHOUT checking its signature, for inspection only.

    ``signer_key_id`` is the unauthenticated key hint (may be empty). Nothing in
    the result is trusted; use :func:`verify_signature` to make decisions.
    """
    env = _parse_bundle(signature, max_bytes=max_bytes, max_depth=max_depth)
    log.debug("reading statement without verifying its signature (hint %r)", env.hint)
    return _parse_statement(env.payload, signer_key_id=env.hint, max_bytes=max_bytes, max_depth=max_depth)


def _verify_envelope(env: _Envelope, trusted_keys: Sequence[TrustedKey]) -> str:
    """Check the envelope's signature; return the id of the key that made it."""
    by_id = {k.key_id: k for k in trusted_keys}
    if not by_id:
        raise UntrustedSigner("no trusted keys given: cannot verify the signature")
    message = pae(env.payload_type, env.payload)
    if env.hint:
        key = by_id.get(env.hint)
        if key is None:
            raise UntrustedSigner(f"signed by key {env.hint}, which is not trusted")
        candidates = [key]
    else:
        log.info("signature has no key hint (older model-signing format); trying %d trusted keys", len(by_id))
        candidates = list(by_id.values())
    for key in candidates:
        try:
            key.public_key.verify(env.sig, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            log.debug("signature does not verify with key %s", key.key_id)
            continue
        log.debug("signature verifies with key %s", key.key_id)
        return key.key_id
    if env.hint:
        raise SignatureError(f"signature does not verify with key {env.hint}")
    raise UntrustedSigner(f"signature does not verify with any of the {len(by_id)} trusted keys")


def _parse_bundle(data: bytes, *, max_bytes: int, max_depth: int) -> _Envelope:
    """Strictly parse the Sigstore bundle around the DSSE envelope (nothing verified yet)."""
    doc = safejson.loads(data, max_bytes=max_bytes, max_depth=max_depth, what="signature file")
    bundle = _obj(doc, "signature bundle")
    media_type = _field(bundle, "mediaType", str, "signature bundle")
    if media_type != BUNDLE_MEDIA_TYPE:
        raise UnknownFormat(f"unknown signature bundle media type {media_type!r} (expected {BUNDLE_MEDIA_TYPE!r})")
    if "messageSignature" in bundle:
        raise UnknownFormat("signature bundle holds a message signature; edgeship reads only DSSE envelopes")
    _only(bundle, {"mediaType", "verificationMaterial", "dsseEnvelope"}, "signature bundle")

    material = _field(bundle, "verificationMaterial", dict, "signature bundle")
    for kind in ("certificate", "x509CertificateChain"):
        if kind in material:
            raise UnknownFormat(
                f"signature uses verification material {kind!r}; edgeship accepts only public-key signatures"
            )
    _only(material, {"publicKey", "tlogEntries"}, "verificationMaterial")
    public_key = _field(material, "publicKey", dict, "verificationMaterial")
    # model-signing before 1.0 wrote rawBytes/keyDetails and no hint; those are never trusted, only tolerated.
    _only(public_key, {"hint", "rawBytes", "keyDetails"}, "verificationMaterial.publicKey")
    hint = public_key.get("hint")
    if hint is None:  # absent, or null as model-signing's reader normalizes it
        hint = ""
    if not isinstance(hint, str):
        _malformed("verificationMaterial.publicKey.hint must be a string")
    if hint and not _HEX64.match(hint):
        _malformed(f"key hint {hint[:80]!r} is not a key id (64 lower-case hex characters)")
    tlog = material.get("tlogEntries", [])
    if not isinstance(tlog, list):
        _malformed("verificationMaterial.tlogEntries must be a list")
    if tlog:
        raise UnknownFormat("signature carries transparency-log entries; edgeship reads only private-key signatures")

    envelope = _field(bundle, "dsseEnvelope", dict, "signature bundle")
    _only(envelope, {"payload", "payloadType", "signatures"}, "dsseEnvelope")
    payload_type = _field(envelope, "payloadType", str, "dsseEnvelope")
    if payload_type != PAYLOAD_TYPE:
        raise UnknownFormat(f"unknown DSSE payload type {payload_type!r} (expected {PAYLOAD_TYPE!r})")
    payload = _b64(_field(envelope, "payload", str, "dsseEnvelope"), "dsseEnvelope.payload")
    signatures = _field(envelope, "signatures", list, "dsseEnvelope")
    if len(signatures) != 1:
        _malformed(f"DSSE envelope has {len(signatures)} signatures; expected exactly one")
    entry = _obj(signatures[0], "dsseEnvelope.signatures[0]")
    _only(entry, {"sig", "keyid"}, "dsseEnvelope.signatures[0]")
    if not isinstance(entry.get("keyid", ""), str):
        _malformed("dsseEnvelope.signatures[0].keyid must be a string")
    sig = _b64(_field(entry, "sig", str, "dsseEnvelope.signatures[0]"), "dsseEnvelope.signatures[0].sig")
    _check_ecdsa_p256_shape(sig)
    return _Envelope(hint=hint, payload_type=payload_type, payload=payload, sig=sig)


def _check_ecdsa_p256_shape(sig: bytes) -> None:
    """Reject early a signature that cannot be ECDSA P-256, saying what it looks like."""
    try:
        r, s = decode_dss_signature(sig)
    except ValueError:
        _malformed(f"signature is not a DER-encoded ECDSA signature ({len(sig)} bytes)")
    bits = max(r.bit_length(), s.bit_length())
    if bits > 256:
        curve = "P-384" if bits <= 384 else "P-521"
        raise UnsupportedAlgorithm(
            f"signature values are {bits} bits long: it was made with a larger curve ({curve}?); "
            "edgeship accepts only ECDSA P-256"
        )


def _parse_statement(payload: bytes, *, signer_key_id: str, max_bytes: int, max_depth: int) -> VerifiedStatement:
    doc = safejson.loads(payload, max_bytes=max_bytes, max_depth=max_depth, what="signed statement")
    st = _obj(doc, "statement")
    stype = _field(st, "_type", str, "statement")
    if stype != STATEMENT_TYPE:
        raise UnknownFormat(f"unknown statement type {stype!r} (expected {STATEMENT_TYPE!r})")
    ptype = _field(st, "predicateType", str, "statement")
    if ptype != PREDICATE_TYPE:
        raise UnknownFormat(f"unknown predicate type {ptype!r} (this release reads {PREDICATE_TYPE!r})")
    _only(st, {"_type", "subject", "predicateType", "predicate"}, "statement")

    subjects = _field(st, "subject", list, "statement")
    if len(subjects) != 1:
        _malformed(f"statement has {len(subjects)} subjects; expected exactly one")
    subject = _obj(subjects[0], "statement.subject[0]")
    _only(subject, {"name", "digest"}, "statement.subject[0]")
    subject_name = _field(subject, "name", str, "statement.subject[0]")
    subject_digest = _field(subject, "digest", dict, "statement.subject[0]")
    if "sha256" not in subject_digest:
        if subject_digest:
            raise UnsupportedAlgorithm(f"subject digest uses {sorted(subject_digest)}; edgeship needs sha256")
        _malformed("statement.subject[0].digest is empty")
    _only(subject_digest, {"sha256"}, "statement.subject[0].digest")
    root = subject_digest["sha256"]
    if not isinstance(root, str) or not _HEX64.match(root):
        _malformed("subject sha256 digest is not 64 lower-case hex characters")

    # model-signing v1.0: verifiers ignore predicate fields other than these two.
    predicate = _field(st, "predicate", dict, "statement")
    extra = sorted(set(predicate) - {"serialization", "resources"})
    if extra:
        log.debug("ignoring predicate fields %s (model-signing v1.0 rule)", extra)
    _check_serialization(_field(predicate, "serialization", dict, "predicate"))

    resources: dict[str, str] = {}
    ordered: list[str] = []
    for i, item in enumerate(_field(predicate, "resources", list, "predicate")):
        where = f"predicate.resources[{i}]"
        res = _obj(item, where)
        _only(res, {"name", "algorithm", "digest"}, where)
        name = _field(res, "name", str, where)
        problem = _name_problem(name)
        if problem:
            _malformed(f"statement lists an invalid resource name {name[:200]!r}: {problem}")
        algorithm = _field(res, "algorithm", str, where)
        if algorithm != HASH_TYPE:
            raise UnsupportedAlgorithm(f"resource {name!r} uses hash algorithm {algorithm!r}; edgeship needs sha256")
        digest = _field(res, "digest", str, where)
        if not _HEX64.match(digest):
            _malformed(f"resource {name!r} has an invalid sha256 digest")
        if name in resources:
            _malformed(f"statement lists resource {name!r} twice")
        resources[name] = digest
        ordered.append(digest)
    if not resources:
        _malformed("statement lists no resources")
    if _root_digest(ordered) != root:
        _malformed("subject digest does not match the listed resources (statement is inconsistent)")
    log.debug("statement for %r lists %d resources", subject_name, len(resources))
    return VerifiedStatement(
        signer_key_id=signer_key_id, subject_name=subject_name, resources=resources, predicate_type=ptype
    )


def _check_serialization(ser: dict[str, Any]) -> None:
    method = _field(ser, "method", str, "predicate.serialization")
    if method != SERIALIZATION_METHOD:
        raise UnknownFormat(f"serialization method {method!r} is not supported (edgeship reads 'files')")
    unknown = sorted(set(ser) - {"method", "hash_type", "allow_symlinks", "ignore_paths"})
    if unknown:
        raise UnknownFormat(f"unknown serialization parameter(s) {unknown}")
    hash_type = _field(ser, "hash_type", str, "predicate.serialization")
    if hash_type != HASH_TYPE:
        raise UnsupportedAlgorithm(f"files were hashed with {hash_type!r}; edgeship needs sha256")
    if not isinstance(ser.get("allow_symlinks", False), bool):
        _malformed("predicate.serialization.allow_symlinks must be a boolean")
    ignore = ser.get("ignore_paths", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        _malformed("predicate.serialization.ignore_paths must be a list of strings")


# --- transfer signatures ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TransferSignature:
    """A release key's signature over a bundle file's shard digests (see docs/bundle-format.md).

    Only the key id and the signature travel: the signed statement is rebuilt from the shard
    digests TUF already lists (:func:`shard_statement`), so it cannot disagree with them."""

    key_id: str
    sig: bytes

    def to_json(self) -> dict[str, str]:
        return {"keyid": self.key_id, "sig": base64.b64encode(self.sig).decode("ascii")}

    @classmethod
    def from_json(cls, obj: Any) -> TransferSignature:
        """Strict parse; :class:`SignatureError` for anything malformed."""
        fields = _obj(obj, "transfer signature")
        _only(fields, {"keyid", "sig"}, "transfer signature")
        key_id = _field(fields, "keyid", str, "transfer signature")
        if not _HEX64.match(key_id):
            _malformed(f"transfer signature key id {key_id[:80]!r} is not 64 lower-case hex characters")
        sig = _b64(_field(fields, "sig", str, "transfer signature"), "transfer signature sig")
        _check_ecdsa_p256_shape(sig)
        return cls(key_id=key_id, sig=sig)


def transfer_subject(name: str, version: str) -> str:
    """The subject a bundle's transfer signature names: its TUF target path, ``NAME/NAME-VERSION.edge``
    (the directory makes it unambiguous: ``a-1.0.0`` 2.0.0 and ``a`` 1.0.0-2.0.0 differ)."""
    return f"{name}/{name}-{version}.edge"


def verify_transfer_signature(signature: TransferSignature, trusted_keys: Sequence[TrustedKey], *,
                              subject_name: str, shard_size: int, length: int, digests: Sequence[str]) -> str:
    """Check that a trusted key signed exactly these shard digests; return the signer's key id.

    Raises :class:`UntrustedSigner` (the key is not trusted) or :class:`SignatureError` (the
    signature is not over these digests: another file, another shard size, or forged)."""
    try:
        payload = shard_statement(subject_name=subject_name, shard_size=shard_size, length=length, digests=digests)
    except ValueError as e:
        raise SignatureError(f"transfer signature: {e}") from None
    env = _Envelope(hint=signature.key_id, payload_type=PAYLOAD_TYPE, payload=payload, sig=signature.sig)
    try:
        return _verify_envelope(env, trusted_keys)
    except UntrustedSigner as e:
        raise UntrustedSigner(f"transfer signature {e}") from None
    except SignatureError:
        raise SignatureError(f"transfer signature by key {signature.key_id[:16]}... does not cover "
                             f"these {len(digests)} block{'s' if len(digests) != 1 else ''} of {subject_name}") from None


def read_transfer_signature(data: bytes, *, max_bytes: int, max_depth: int) -> tuple[TransferSignature, bytes]:
    """Parse a transfer signature file (a Sigstore bundle, nothing verified yet): the compact
    signature and the statement it carries, which a verifier compares with its own rebuild."""
    env = _parse_bundle(data, max_bytes=max_bytes, max_depth=max_depth)
    if not env.hint:
        _malformed("transfer signature has no key hint")
    return TransferSignature(key_id=env.hint, sig=env.sig), env.payload


# --- checking files -------------------------------------------------------


def check_resources(statement: VerifiedStatement, actual: Mapping[str, str | None]) -> None:
    """Check the files present (name -> sha256 hex, signature file excluded) against the statement.

    Raises :class:`DigestMismatch` naming every file not covered by the
    signature, every signed file that is missing and every file whose digest
    differs (a rename shows as both an unlisted and a missing file). A digest of
    None (a file not hashed, see :func:`agent.archive.scan_archive`) checks the name only.
    """
    signed = statement.resources
    have = {name: digest.lower() if digest is not None else None for name, digest in actual.items()}
    unlisted = sorted(set(have) - set(signed), key=resource_order)
    missing = sorted(set(signed) - set(have), key=resource_order)
    changed = sorted((n for n in set(have) & set(signed) if have[n] is not None and have[n] != signed[n]),
                     key=resource_order)
    if not (unlisted or missing or changed):
        unhashed = sum(d is None for d in have.values())
        log.debug("all %d files are signed, %d of them checked against their signed digests", len(signed),
                  len(signed) - unhashed)
        return
    missing_by_digest = {signed[n]: n for n in missing}
    problems = []
    for name in unlisted:
        was = missing_by_digest.get(have[name] or "")
        suffix = f" (it has the signed digest of missing file {was!r}: renamed?)" if was else ""
        problems.append(f"file {name!r} is not covered by the signature{suffix}")
    problems += [f"signed file {name!r} is missing" for name in missing]
    problems += [f"file {name!r} does not match its signed digest" for name in changed]
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    if len(problems) > _MAX_LISTED_PROBLEMS:
        shown += f"; and {len(problems) - _MAX_LISTED_PROBLEMS} more"
    raise DigestMismatch(shown)


# --- strict parsing helpers -----------------------------------------------


def _malformed(message: str) -> NoReturn:
    raise SignatureError(f"malformed signature: {message}")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _malformed(f"{where} must be a JSON object")
    return value


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        _malformed(f"{where} has no {key!r} field")
    value = obj[key]
    if not isinstance(value, kind):
        _malformed(f"{where}.{key} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _only(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        _malformed(f"{where} has unknown field(s) {extra}")


def _b64(text: str, where: str) -> bytes:
    """Strict, canonical standard base64 (so no two encodings of one value are accepted)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _malformed(f"{where} is not valid base64")
    if base64.b64encode(raw).decode("ascii") != text:
        _malformed(f"{where} is not canonical base64")
    return raw
