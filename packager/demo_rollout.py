"""Watching the demo's devices take a release, and asking them for predictions.

:func:`wait_version` follows every device's own state file until the release is active (its
watch window committed), showing each change as it happens, then confirms with
``edgeship-agent status --json``. :func:`predict_all` sends evaluation digits through each
device's inference API and checks which version answered and how many it got right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from packager.demo_devices import MODEL, Device, Predictions, agent_status, predict
from packager.demo_narrator import Narrator, StepLine
from packager.demo_procs import Child, DemoFailed, StepTimeout, wait_until


def wait_version(devices: Sequence[Device], *, version: str, previous: str | None, timeout: float,
                 status_timeout: float, watch: Sequence[Child], line: StepLine, say: Narrator, step: str,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Until every device has ``version`` active (and ``previous`` kept as its previous release).

    Fails as soon as a device reports the release failed or rolled back, when an agent process
    exits, or after ``timeout`` seconds naming the devices that did not get there and where they
    were. Returns the step's detail: per device, seconds until active."""
    t0 = time.monotonic()
    done: dict[str, float] = {}
    shown: dict[str, str] = {}

    def check() -> bool | None:
        phases = []
        for d in devices:
            st = d.model_state()
            phase = d.phase(st)
            if shown.get(d.device_id) != phase:
                if d.device_id in shown or phase != f"{previous} active":  # not the starting point
                    say.event(f"{d.device_id}: {phase}  [{time.monotonic() - t0:.1f} s]")
                shown[d.device_id] = phase
            if st is not None and st.status in ("failed", "rolled_back"):
                raise DemoFailed(step, f"{d.device_id}: {version} {st.status}: {st.last_error}")
            if (d.device_id not in done and st is not None and st.status == "active"
                    and st.active is not None and st.active.version == version):
                done[d.device_id] = time.monotonic() - t0
            phases.append(f"{d.device_id} {phase}")
        line.status(f"{len(done)}/{len(devices)} on {version} · " + " · ".join(phases))
        return True if len(done) == len(devices) else None

    try:
        wait_until(check, timeout=timeout, watch=watch, interval=0.1)
    except StepTimeout:
        late = ", ".join(f"{d.device_id} ({shown.get(d.device_id, '?')})" for d in devices if d.device_id not in done)
        raise DemoFailed(step, f"not every device had {version} active within {timeout:g} s: {late}") from None

    line.status("asking `edgeship-agent status --json` on every device")
    devices_detail: dict[str, Any] = {}
    for dev, doc in agent_status(list(devices), timeout=status_timeout, env=env).items():
        m = doc["models"][MODEL]
        active = (m.get("active") or {}).get("version")
        prev = (m.get("previous") or {}).get("version")
        if m["status"] != "active" or active != version or (previous is not None and prev != previous):
            raise DemoFailed(step, f"`edgeship-agent status` for {dev} says {m['status']} {active} (previous {prev}), "
                                   f"expected active {version}" + (f" (previous {previous})" if previous else ""))
        devices_detail[dev] = {"seconds": round(done[dev], 3), "status": m["status"], "version": active,
                               "previous": prev}
    say.note("confirmed by `edgeship-agent status --json` on every device")
    return {"version": version, "previous": previous, "slowest_s": round(max(done.values()), 3),
            "devices": devices_detail}


def predict_all(devices: Sequence[Device], x: np.ndarray, labels: np.ndarray, *, version: str, samples: int,
                min_accuracy: float, timeout: float, line: StepLine, say: Narrator, step: str) -> dict[str, Any]:
    """``samples`` digits per device (each device its own slice of ``x``), one request each; fails unless
    ``version`` answered every one and each device got at least ``min_accuracy`` right."""
    results: list[Predictions] = []
    for i, d in enumerate(devices):
        line.status(f"{d.device_id}: {samples} predictions")
        idx = np.arange(i * samples, (i + 1) * samples) % len(x)
        results.append(predict(d, x[idx], labels[idx], timeout=timeout))
    say.table(f"predictions through the inference API ({samples} eval digits per device)",
              ["device", "answered by", "correct", "accuracy", "p50 ms", "max ms"],
              [[p.device, ", ".join(p.versions), f"{p.correct}/{p.samples}", f"{p.accuracy:.2f}",
                f"{p.p50_ms:.2f}", f"{p.max_ms:.2f}"] for p in results])
    for p in results:
        if p.versions != (version,):
            raise DemoFailed(step, f"{p.device} answered with {', '.join(p.versions)}, expected {version}")
        if p.accuracy < min_accuracy:
            raise DemoFailed(step, f"{p.device} got {p.correct}/{p.samples} right, below {min_accuracy:.0%}")
    correct = sum(p.correct for p in results)
    count = sum(p.samples for p in results)
    return {"version": version, "samples": count, "correct": correct, "accuracy": round(correct / count, 4),
            "devices": {p.device: p.to_dict() for p in results}}
