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

    request_timeout: float = 20.0
    """Seconds with no reply before asking again: once a request sent later has been answered, or
    once no request at all has been answered for that long (a request queued behind the replies
    to earlier ones on a slow link waits while they arrive). It must cover one reply on the
    slowest link: 512 KiB in 20 s needs about 26 KiB/s."""
    request_retries: int = 5
    """Attempts per request before the download gives up (a link error, resumed later)."""
    blocks_in_flight: int = 8
    """Block requests outstanding at once (with ``request_bytes``, 4 MiB in flight: what the
    broker may queue for this device)."""
    request_bytes: int = 512 * KiB
    """Bytes asked for per block request (rounded to the repository's block size, at most 1 MiB).
    Fewer, larger messages cost less CPU on both ends: on 2 cores 8 x 512 KiB delivered 64 MiB at
    a median 338 MiB/s, 16 x 256 KiB (the same bytes in flight) at 303 (bench/transfer.py)."""
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


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    """The probation of a newly switched release: a fault inside it rolls back to the previous one."""

    inferences: int = 50
    """Commit after this many inferences without a fault..."""
    seconds: float = 60.0
    """...or after this many seconds, whichever comes first."""
    latency_budget_ms: float = 0.0
    """An inference slower than this is a fault (0: no budget)."""
    check_interval: float = 0.2
    """Seconds between looks at the watch counters."""

    def __post_init__(self) -> None:
        if self.inferences < 1 or self.seconds <= 0 or self.latency_budget_ms < 0 or self.check_interval <= 0:
            raise ValueError("watch: inferences >= 1, seconds > 0, latency_budget_ms >= 0, check_interval > 0")


@dataclass(frozen=True, kw_only=True)
class InstallConfig:
    reserve_bytes: int = 16 * MiB
    """Disk space that must stay free after an install."""
    threads: int = 1
    """Runtime threads per model (self-test and serving)."""

    def __post_init__(self) -> None:
        if self.reserve_bytes < 0 or self.threads < 1:
            raise ValueError("install: reserve_bytes >= 0 and threads >= 1")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Where the inference API listens: loopback TCP by default, or a Unix socket."""

    host: str = "127.0.0.1"
    port: int = 8080
    """0 picks a free port (the agent writes the address it got to ``<state_dir>/serve.json``)."""
    unix_socket: str = ""
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"serve: port {self.port} out of range")
