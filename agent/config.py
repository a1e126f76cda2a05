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
