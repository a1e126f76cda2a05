"""The error tree.

Two roots, split by who is at fault:

* :class:`BadData` - the input is wrong (a tampered bundle, a wrong key, a
  malformed message). Reject and report; retrying will not help.
* :class:`LinkError` - the link failed (broker gone, timeout). Retry with backoff.

:class:`UsageError` covers wrong local input the user can fix (a missing file,
a wrong passphrase).  Only the CLIs turn these into messages for people.
"""

from __future__ import annotations


class EdgeshipError(Exception):
    """Root of every expected edgeship failure."""


# --- the user's own input -------------------------------------------------


class UsageError(EdgeshipError):
    """Local input the user can fix: a missing file, a bad option value."""


class KeyLoadError(UsageError):
    """A key file is missing, unreadable, of the wrong type, or the passphrase is wrong."""


# --- bad data: reject, report, never retry --------------------------------


class BadData(EdgeshipError):
    """Data failed a check. Never retried."""


class ArchiveError(BadData):
    """The bundle archive is malformed or hostile (escaping paths, links, bombs...)."""


class LimitExceeded(ArchiveError):
    """A configured limit was hit (size, count, depth)."""


class JsonError(BadData):
    """A JSON document is malformed, too large or too deeply nested."""


class ManifestError(BadData):
    """The bundle manifest is missing, malformed or inconsistent."""


class UnknownFormat(BadData):
    """A format version (bundle, manifest, signature predicate) this release does not know."""


class SignatureError(BadData):
    """The signature does not verify."""


class UnsupportedAlgorithm(SignatureError):
    """The signature uses a hash, key type or curve we do not accept."""


class UntrustedSigner(SignatureError):
    """The signature was made by a key that is not trusted."""


class DigestMismatch(BadData):
    """A file's bytes do not match the signed digest, or the file set differs."""


class ModelError(BadData):
    """A model file cannot be loaded or run, or its self-test fails."""


class IncompatibleBundle(BadData):
    """The bundle does not fit this device: runtime missing or too old, wrong device class."""


class SelfTestFailed(ModelError):
    """The golden self-test produced outputs outside the tolerance."""


# --- the device itself -----------------------------------------------------


class StorageError(EdgeshipError):
    """The device's own storage failed (disk full, I/O error). The old model serves on; retried later."""


# --- a failed link: retry with backoff ------------------------------------


class LinkError(EdgeshipError):
    """The network or broker failed; the operation may be retried."""


# --- the update channel ---------------------------------------------------


class MetadataRejected(BadData):
    """TUF metadata failed verification. ``cause`` is python-tuf's exception."""


class MetadataVersionError(MetadataRejected):
    """Older or mismatched metadata: a rollback or a snapshot/targets mix-and-match."""


class MetadataExpired(MetadataRejected):
    """Metadata past its expiry: a freeze attack, or a repository nobody re-signed."""


class MetadataSignatureError(MetadataRejected):
    """Metadata not signed by a threshold of the keys the trusted root names."""


class MetadataDigestMismatch(MetadataRejected):
    """Metadata whose length or hashes differ from what the role above it signed."""


class BlockRejected(BadData):
    """A downloaded block does not match what TUF signed, or the reply does not answer the request."""


class VersionConflict(BadData):
    """The same model version was published again with different bytes."""


class DownloadTimeout(LinkError):
    """A download did not finish before its overall deadline (slow retrieval)."""
