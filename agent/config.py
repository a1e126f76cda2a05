"""Every limit in one place: typed, defaulted, frozen, passed in (never a global)."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True, kw_only=True)
class BundleLimits:
    """Limits applied while reading a bundle that may be hostile.

    Each is checked while streaming, before the bytes past the limit are used.
    """

    max_bundle_bytes: int = 2 * GiB
    """Size of the .edge file as stored (compressed)."""
    max_unpacked_bytes: int = 4 * GiB
    """Sum of all member sizes after decompression."""
    max_member_bytes: int = 2 * GiB
    """One member after decompression."""
    max_members: int = 64
    """Number of archive entries."""
    max_name_bytes: int = 200
    """Length of one member name in bytes (UTF-8)."""
    max_json_bytes: int = 1 * MiB
    """Size of the manifest and of the signature file."""
    max_json_depth: int = 32
    """Nesting depth of any JSON document."""
    max_selftest_bytes: int = 16 * MiB
    """Size of the golden self-test file."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BundleLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class UpdateLimits:
    """Limits of the update channel: what one device accepts from the broker."""

    request_timeout: float = 10.0
    """Seconds to wait for one reply before asking again."""
    request_retries: int = 5
    """Attempts per request before the download gives up (a link error, resumed later)."""
    blocks_in_flight: int = 16
    """Block requests outstanding at once."""
    request_bytes: int = 256 * KiB
    """Bytes asked for per block request (rounded to the repository's block size, at most 1 MiB)."""
    max_bundle_bytes: int = 2 * GiB
    """Largest bundle this device downloads, whatever the repository says."""
    download_deadline: float = 3600.0
    """Seconds one bundle download may take in total (stops slow-retrieval attacks)."""
    max_received_ratio: float = 2.0
    """Reply bytes received during a download, over the bundle length, before it is abandoned."""
    record_flush_interval: float = 0.5
    """Seconds between persisting the record of received blocks."""
    root_max_bytes: int = 512 * KiB
    timestamp_max_bytes: int = 16 * KiB
    snapshot_max_bytes: int = 2 * MiB
    targets_max_bytes: int = 5 * MiB
    release_keys_max_bytes: int = 256 * KiB
    max_root_rotations: int = 64

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"UpdateLimits.{name} must be a positive number, got {value!r}")
        if self.request_bytes > MiB:
            raise ValueError("UpdateLimits.request_bytes must be at most 1 MiB")
        if self.max_received_ratio < 1:
            raise ValueError("UpdateLimits.max_received_ratio must be at least 1")
