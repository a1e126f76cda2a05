"""``edgeship fleet status``: what every device runs, whether it is online, how it is doing.

The command turns options into :class:`~agent.mqtt.BrokerSettings` and
:class:`~packager.fleet.CollectLimits`, runs :func:`packager.fleet.collect`, and prints
:func:`packager.fleet.summarize`'s view as a table (rich) or JSON. Errors go through the
shared handler (``agent.cliutil``): an unreachable broker is a link error (exit 3).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import click

from agent.cliutil import BrokerArgs, broker_options, echo_json, json_option


@click.group("fleet")
def fleet() -> None:
    """See what the devices report: state, presence, telemetry."""


@fleet.command("status")
@broker_options
@click.option("--group", help="Only devices in this group.")
@click.option("--model", help="Only this model (and the devices that run it).")
@click.option("--wait", type=click.FloatRange(0.1, 600), default=10.0, show_default=True,
              help="Longest time, in seconds, to collect the retained state and presence.")
@click.option("--quiet", "quiet_s", type=click.FloatRange(0.01, 60), default=0.3, show_default=True,
              help="The retained flood is over after this many seconds without one.")
@click.option("--telemetry-wait", type=click.FloatRange(0, 3600), default=0.0, show_default=True,
              help="Also wait up to this many seconds for telemetry from every online device.")
@json_option
def status(broker: BrokerArgs, group: str | None, model: str | None, wait: float, quiet_s: float,
           telemetry_wait: float, as_json: bool) -> None:
    """Show every device's models, versions, status, presence and latest telemetry."""
    from packager.fleet import CollectLimits, collect, view_of

    settings = broker.settings()
    limits = CollectLimits(wait=wait, quiet=min(quiet_s, wait), telemetry_wait=telemetry_wait)
    got = asyncio.run(collect(settings, limits))
    snap = got.snapshot
    view = view_of(got, group=group, model=model)
    if as_json:
        echo_json({**view.to_dict(), "collected": {
            "messages": snap.messages, "malformed_by_kind": dict(snap.malformed),
            "connect_s": round(got.connect_s, 3), "retained_s": round(got.retained_s, 3),
            "total_s": round(got.total_s, 3)}})
        return
    _render(view, got.total_s, snap.messages)


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    s = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def _clean(text: str | None, limit: int = 120) -> str:
    """Text a device sent, safe for a terminal: no control characters or markup, bounded length."""
    from rich.markup import escape

    if text is None:
        return "-"
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return escape(shown + ("..." if len(text) > limit else ""))


STATUS_STYLE = {"active": "green", "watching": "yellow", "rolled_back": "red", "failed": "red", "none": "dim"}


def _render(view: Any, seconds: float, messages: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from packager.fleet import cell

    console = Console()
    if not console.is_terminal:  # a file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 132))
    now = datetime.now(timezone.utc)
    table = Table(title=f"{view.devices} device(s)", show_lines=False, header_style="bold", box=box.SIMPLE_HEAD)
    for name, justify in (("device", "left"), ("model", "left"), ("version", "left"), ("status", "left"),
                          ("online", "left"), ("last seen", "right"), ("inferences", "right"),
                          ("errors", "right"), ("p50 ms", "right"), ("p99 ms", "right"), ("CPU %", "right"),
                          ("RSS MiB", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in view.rows:
        status = r.status or "-"
        online = {True: "[green]yes[/]", False: "[red]no[/]", None: "[dim]?[/]"}[r.online]
        table.add_row(
            r.device, _clean(r.model, 40), _clean(r.version, 40),
            f"[{STATUS_STYLE.get(status, 'default')}]{status}[/]",
            online, _age(r.last_seen, now), cell(r.inferences), cell(r.errors), cell(r.p50_ms, "{:.2f}"),
            cell(r.p99_ms, "{:.2f}"), cell(r.cpu_percent, "{:.1f}"),
            cell(None if r.rss_bytes is None else r.rss_bytes / 2**20, "{:.1f}"))
    console.print(table)
    console.print(f"online {view.online}, offline {view.offline}, unknown {view.unknown}  "
                  f"({messages} messages in {seconds:.2f} s)")
    for model, versions in view.versions.items():
        counts = ", ".join(f"{v} x{n}" for v, n in versions.items())
        states = ", ".join(f"{s} {n}" for s, n in view.statuses.get(model, {}).items())
        console.print(_clean(f"{model}: {counts}  [{states}]", 2000))
    for r in view.failures:
        detail = _clean(f"{r.device} {r.model} {r.version or '-'}" + (f": {r.last_error}" if r.last_error else ""), 300)
        console.print(f"[red]{r.status}[/]: {detail}", highlight=False)
    if view.malformed:
        console.print(f"[yellow]{view.malformed} malformed message(s) skipped[/]")
