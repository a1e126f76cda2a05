"""Open a bundle file: extract it safely, verify its signature and digests, parse its manifest.

This is the one place that decides whether a bundle is trusted. The steps are
fixed: stream-extract under limits -> parse and verify the signature against
the trusted keys -> check every extracted file against the signed digests ->
parse the (now authenticated) manifest -> check the manifest's file list
against the archive. Nothing is trusted before its step has passed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from agent import safejson
from agent.archive import Member, extract_archive, scan_archive
from agent.config import BundleLimits
from agent.errors import ArchiveError, DigestMismatch, LimitExceeded, ManifestError, UsageError
from agent.keys import TrustedKey
from agent.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from agent.signing import VerifiedStatement, check_resources, verify_signature

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VerifiedBundle:
    """A bundle whose every file was checked against a signature by a trusted key."""

    path: Path
    """Directory holding the extracted, verified files."""
    manifest: Manifest
    statement: VerifiedStatement
    members: Mapping[str, Member]

    @property
    def signer(self) -> str:
        return self.statement.signer_key_id

    def file(self, name: str) -> Path:
        if name not in self.members:
            raise KeyError(name)
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def _open_source(bundle: Path, limits: BundleLimits):  # type: ignore[no-untyped-def]
    try:
        fh = open(bundle, "rb")
    except FileNotFoundError:
        raise UsageError(f"bundle not found: {bundle}") from None
    except IsADirectoryError:
        raise UsageError(f"{bundle} is a directory, not a bundle") from None
    except OSError as e:
        raise UsageError(f"cannot read bundle {bundle}: {e.strerror}") from None
    size = os.fstat(fh.fileno()).st_size
    if size > limits.max_bundle_bytes:
        fh.close()
        raise LimitExceeded(f"{bundle.name}: {size} bytes exceeds the bundle size limit of {limits.max_bundle_bytes}")
    return fh


def verify_extracted(
    directory: Path,
    members: Mapping[str, Member],
    trusted_keys: Sequence[TrustedKey],
    limits: BundleLimits,
) -> tuple[Manifest, VerifiedStatement]:
    """Verify an extracted bundle: signature, then digests, then manifest. Pure over its inputs but for reads."""
    return verify_members(lambda name: (directory / name).read_bytes(), members, trusted_keys, limits)


def verify_members(
    read: Callable[[str], bytes],
    members: Mapping[str, Member],
    trusted_keys: Sequence[TrustedKey],
    limits: BundleLimits,
) -> tuple[Manifest, VerifiedStatement]:
    """Signature, then every member's digest, then the manifest; ``read(name)`` gives the
    manifest's and the signature's bytes."""
    if SIGNATURE_NAME not in members:
        raise DigestMismatch(f"bundle has no signature file {SIGNATURE_NAME!r}")
    if MANIFEST_NAME not in members:
        raise ManifestError(f"bundle has no {MANIFEST_NAME}")
    signature = read(SIGNATURE_NAME)
    if len(signature) > limits.max_json_bytes:
        raise LimitExceeded(f"{SIGNATURE_NAME}: larger than {limits.max_json_bytes} bytes")
    statement = verify_signature(
        signature, trusted_keys, max_bytes=limits.max_json_bytes, max_depth=limits.max_json_depth
    )
    log.debug("signature verified, signer %s", statement.signer_key_id)
    actual = {name: m.sha256 for name, m in members.items() if name != SIGNATURE_NAME}
    check_resources(statement, actual)
    manifest = parse_manifest(read(MANIFEST_NAME), limits)
    expected = set(manifest.payload_files())
    if expected != set(actual):
        missing = sorted(expected - set(actual))
        extra = sorted(set(actual) - expected)
        raise ManifestError(
            "manifest and archive disagree:"
            + (f" missing {missing}" if missing else "")
            + (f" unexpected {extra}" if extra else "")
        )
    if statement.subject_name != manifest.name:
        raise ManifestError(
            f"signature subject {statement.subject_name!r} does not match manifest name {manifest.name!r}"
        )
    return manifest, statement


def parse_manifest(data: bytes, limits: BundleLimits) -> Manifest:
    doc = safejson.loads(data, max_bytes=limits.max_json_bytes, max_depth=limits.max_json_depth, what=MANIFEST_NAME)
    return Manifest.from_dict(doc)


def open_bundle(
    bundle: Path,
    dest_dir: Path,
    *,
    trusted_keys: Sequence[TrustedKey],
    limits: BundleLimits = BundleLimits(),
    gzip_crc: bool = True,
) -> VerifiedBundle:
    """Extract ``bundle`` into the empty directory ``dest_dir`` and verify it.

    On any failure ``dest_dir`` is left empty and the error propagates. ``gzip_crc=False`` as in
    :func:`verify_stream`.
    """
    if not trusted_keys:
        raise UsageError("no trusted keys given: pass at least one public key")
    with _open_source(bundle, limits) as fh:
        members = extract_archive(fh, dest_dir, limits, gzip_crc=gzip_crc)
    try:
        manifest, statement = verify_extracted(dest_dir, members, trusted_keys, limits)
    except BaseException:
        for name in members:
            (dest_dir / name).unlink(missing_ok=True)
        raise
    log.info("bundle %s %s verified (signer %s)", manifest.name, manifest.version, statement.signer_key_id[:16])
    return VerifiedBundle(path=dest_dir, manifest=manifest, statement=statement, members=members)


@dataclass(frozen=True)
class CheckedFile:
    """A bundle file verified where it lies (nothing extracted)."""

    manifest: Manifest
    statement: VerifiedStatement
    members: Mapping[str, Member]
    sha256: str | None
    """SHA-256 of the .edge file itself, computed in the same pass (None when not asked for)."""


class _HashingReader:
    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.digest.update(data)
        return data


def verify_file(bundle: Path, *, trusted_keys: Sequence[TrustedKey], limits: BundleLimits = BundleLimits(),
                file_sha256: bool = True, gzip_crc: bool = True) -> CheckedFile:
    """Verify ``bundle`` in one streaming pass without writing anything: every archive rule,
    every member digest, the signature, the manifest and, with ``file_sha256``, the file's own
    SHA-256 (the agent skips it: each block was already checked against a TUF-signed hash)."""
    with _open_source(bundle, limits) as fh:
        return verify_stream(fh, trusted_keys=trusted_keys, limits=limits, file_sha256=file_sha256,
                             gzip_crc=gzip_crc)


def verify_stream(src: BinaryIO, *, trusted_keys: Sequence[TrustedKey], limits: BundleLimits = BundleLimits(),
                  file_sha256: bool = True, gzip_crc: bool = True, member_digests: bool = True) -> CheckedFile:
    """:func:`verify_file` over any reader (e.g. a file still being downloaded). ``gzip_crc=False``
    skips the gzip CRC-32, for a reader whose every byte was checked against a TUF-signed hash: it
    would only repeat that check (the member digests and the signature are checked either way).

    ``member_digests=False`` does not hash the members (their names are still checked against the
    signature and the manifest, and the signature itself is verified): only for a reader whose every
    byte was checked against hashes a trusted release key signed, i.e. a bundle's transfer signature
    (docs/bundle-format.md). The members' ``sha256`` are then None."""
    if not trusted_keys:
        raise UsageError("no trusted keys given: pass at least one public key")
    reader: Any = _HashingReader(src) if file_sha256 else src
    members, kept = scan_archive(reader, limits, keep=(MANIFEST_NAME, SIGNATURE_NAME),
                                 max_keep_bytes=limits.max_json_bytes, gzip_crc=gzip_crc,
                                 hash_members=member_digests)
    manifest, statement = verify_members(kept.__getitem__, members, trusted_keys, limits)
    log.info("bundle %s %s verified in place (signer %s)", manifest.name, manifest.version,
             statement.signer_key_id[:16])
    return CheckedFile(manifest=manifest, statement=statement, members=members,
                       sha256=reader.digest.hexdigest() if file_sha256 else None)


@contextmanager
def opened_bundle(
    bundle: Path, *, trusted_keys: Sequence[TrustedKey], limits: BundleLimits = BundleLimits()
) -> Iterator[VerifiedBundle]:
    """Verify ``bundle`` into a temporary directory that is removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="edgeship-verify-"))
    try:
        yield open_bundle(bundle, tmp, trusted_keys=trusted_keys, limits=limits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["VerifiedBundle", "CheckedFile", "open_bundle", "opened_bundle", "verify_extracted", "verify_file", "verify_stream",
           "verify_members", "parse_manifest", "ArchiveError"]


def describe(bundle: VerifiedBundle, *, bundle_file: Path | None = None) -> dict[str, object]:
    """A JSON-ready summary of a verified bundle (used by ``verify`` and ``inspect``)."""
    m = bundle.manifest
    out: dict[str, object] = {
        "name": m.name,
        "version": m.version,
        "format": m.format,
        "created": m.created,
        "runtime": {"name": m.runtime.name, "min_version": m.runtime.min_version},
        "device_class": {"arch": m.device_class.arch, "accelerator": m.device_class.accelerator},
        "signer": bundle.signer,
        "verified": True,
        "inputs": [t.to_dict() for t in m.inputs],
        "outputs": [t.to_dict() for t in m.outputs],
        "selftest": {"cases": m.selftest.cases, "rtol": m.selftest.rtol, "atol": m.selftest.atol},
        "labels": m.labels,
        "quantization": m.quantization,
        "builder": dict(m.builder),
        "files": [
            {"name": n, "size": bundle.members[n].size, "sha256": bundle.members[n].sha256}
            for n in (SIGNATURE_NAME, *m.payload_files())
        ],
    }
    if bundle_file is not None:
        out["bundle"] = str(bundle_file)
    return out


def inspect_bundle(
    bundle: Path, *, trusted_keys: Sequence[TrustedKey] = (), limits: BundleLimits = BundleLimits()
) -> dict[str, object]:
    """Describe a bundle. With trusted keys it is fully verified; without, the files are still
    checked against the statement in the signature file, but the signature itself is not
    (``verified: false``) - a hostile archive is rejected either way.
    """
    if trusted_keys:
        with opened_bundle(bundle, trusted_keys=trusted_keys, limits=limits) as vb:
            return describe(vb, bundle_file=bundle)
    from agent.signing import read_unverified

    tmp = Path(tempfile.mkdtemp(prefix="edgeship-inspect-"))
    try:
        with _open_source(bundle, limits) as fh:
            members = extract_archive(fh, tmp, limits)
        if SIGNATURE_NAME not in members:
            raise DigestMismatch(f"bundle has no signature file {SIGNATURE_NAME!r}")
        statement = read_unverified(
            (tmp / SIGNATURE_NAME).read_bytes(), max_bytes=limits.max_json_bytes, max_depth=limits.max_json_depth
        )
        check_resources(statement, {n: m.sha256 for n, m in members.items() if n != SIGNATURE_NAME})
        if MANIFEST_NAME not in members:
            raise ManifestError(f"bundle has no {MANIFEST_NAME}")
        manifest = parse_manifest((tmp / MANIFEST_NAME).read_bytes(), limits)
        vb = VerifiedBundle(path=tmp, manifest=manifest, statement=statement, members=members)
        d = describe(vb, bundle_file=bundle)
        d["verified"] = False
        return d
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
