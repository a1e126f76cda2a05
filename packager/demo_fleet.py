"""The demo's last look: the fleet as the broker holds it (``edgeship fleet status``'s data).

:func:`check_fleet` collects retained state and presence plus a round of telemetry with
:func:`packager.fleet.collect`, summarizes the demo's devices with :func:`packager.fleet.summarize`,
shows the rows, and fails unless every device is online, on the expected version, active.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Sequence

from agent.mqtt import BrokerSettings
from packager.demo_devices import MODEL
from packager.demo_procs import DemoFailed
from packager.fleet import CollectLimits, FleetView, cell, collect, view_of

if TYPE_CHECKING:
    from packager.demo_narrator import Narrator


def check_fleet(settings: BrokerSettings, *, group: str, devices: Sequence[str], version: str, min_inferences: int,
                timeout: float, say: Narrator, step: str) -> tuple[FleetView, float]:
    """The fleet view of ``group``; :class:`DemoFailed` unless exactly ``devices`` are there, online, active on
    ``version``, and their telemetry counted at least ``min_inferences`` inferences each."""
    limits = CollectLimits(wait=timeout, quiet=0.3, telemetry_wait=min(timeout, 5.0))
    got = asyncio.run(collect(settings, limits))
    snap = got.snapshot
    view = view_of(got, group=group, model=MODEL)
    say.table(f"edgeship fleet status --broker {settings.url} --group {group}",
              ["device", "model", "version", "status", "online", "inferences", "errors", "p50 ms", "RSS MiB"],
              [[r.device, r.model or "-", r.version or "-", r.status or "-",
                {True: "yes", False: "no", None: "?"}[r.online], cell(r.inferences), cell(r.errors),
                cell(r.p50_ms, "{:.2f}"), cell(None if r.rss_bytes is None else r.rss_bytes / 2**20, "{:.0f}")]
               for r in view.rows])
    say.note(f"{snap.messages} messages (retained state and presence, then telemetry) in {got.total_s:.2f} s")
    seen = sorted(r.device for r in view.rows)
    problems = []
    if seen != sorted(devices):
        problems.append(f"devices {seen}, expected {sorted(devices)}")
    if view.online != len(devices):
        problems.append(f"{view.online} of {len(devices)} online")
    if view.versions.get(MODEL) != {version: len(devices)}:
        problems.append(f"versions {view.versions.get(MODEL)}")
    if view.statuses.get(MODEL) != {"active": len(devices)}:
        problems.append(f"statuses {view.statuses.get(MODEL)}")
    short = [f"{r.device} ({cell(r.inferences)})" for r in view.rows
             if r.inferences is None or r.inferences < min_inferences]
    if short:
        problems.append(f"telemetry counted fewer than {min_inferences} inferences on {', '.join(short)}")
    if problems:
        raise DemoFailed(step, "the fleet view disagrees: " + "; ".join(problems))
    return view, got.total_s
