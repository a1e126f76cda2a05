"""Which signed release should this device fetch for a model? A pure decision.

Inputs are the releases TUF verified, the facts of this device, and what the
device already holds for the model; the output is a :class:`Decision`. "Up to
date" is an expected outcome, not an error; the same version published again
with other bytes is bad data (:class:`~agent.errors.VersionConflict`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.errors import VersionConflict
from agent.manifest import semver_key, version_tuple
from agent.preflight import normalize_arch
from agent.trust import Release

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeviceFacts:
    machine: str
    runtimes: Mapping[str, str | None]
    """Runtime name (as in manifests: onnx, tflite) -> installed version, None when absent."""
    accelerators: frozenset[str] = frozenset()
    groups: tuple[str, ...] = ()


def unfit_reason(rel: Release, facts: DeviceFacts) -> str | None:
    """Why ``rel`` is not for this device, or None when it is."""
    if rel.groups and not set(rel.groups) & set(facts.groups):
        return f"published for groups {', '.join(rel.groups)}"
    have = facts.runtimes.get(rel.runtime)
    if have is None:
        return f"needs the {rel.runtime} runtime"
    if version_tuple(have) < version_tuple(rel.min_runtime):
        return f"needs {rel.runtime} >= {rel.min_runtime} (have {have})"
    if rel.arch != "any" and normalize_arch(rel.arch) != normalize_arch(facts.machine):
        return f"built for {rel.arch}"
    if rel.accelerator is not None and rel.accelerator not in facts.accelerators:
        return f"needs accelerator {rel.accelerator}"
    return None


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: Literal["fetch", "up_to_date", "none_available"]
    model: str
    release: Release | None = None
    skipped: tuple[tuple[str, str], ...] = field(default=())
    """(version, reason) for releases of this model that do not fit the device."""


def decide(
    releases: Sequence[Release],
    *,
    model: str,
    facts: DeviceFacts,
    current: tuple[str, str] | None,
    seen: Mapping[str, str],
    refused: frozenset[str] = frozenset(),
) -> Decision:
    """Pick the newest release of ``model`` that fits.

    ``current`` is (version, sha256) of what the device holds (staged or active);
    ``seen`` maps every version the device has accepted to its sha256;
    ``refused`` holds sha256s this device already refused (not retried until the repository changes them).
    """
    fitting: list[Release] = []
    skipped: list[tuple[str, str]] = []
    for rel in releases:
        if rel.name != model:
            continue
        known = seen.get(rel.version)
        if known is not None and known != rel.target.sha256:
            raise VersionConflict(f"{model} {rel.version} was published again with different bytes "
                                  f"(had {known[:12]}, now {rel.target.sha256[:12]}); refusing it")
        reason = unfit_reason(rel, facts)
        if reason is None and rel.target.sha256 in refused:
            reason = "refused earlier"
        if reason is None:
            fitting.append(rel)
        else:
            skipped.append((rel.version, reason))
    if not fitting:
        return Decision(action="none_available", model=model, skipped=tuple(skipped))
    best = max(fitting, key=lambda r: semver_key(r.version))
    if current is not None and (current[1] == best.target.sha256
                                or semver_key(current[0]) >= semver_key(best.version)):
        return Decision(action="up_to_date", model=model, release=best, skipped=tuple(skipped))
    log.debug("%s: fetch %s (current %s)", model, best.version, current[0] if current else None)
    return Decision(action="fetch", model=model, release=best, skipped=tuple(skipped))
