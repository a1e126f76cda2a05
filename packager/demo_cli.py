"""``edgeship demo``: the README's main command, narrated with rich.

The command turns options into a :class:`~packager.demo.DemoConfig`, runs
:class:`~packager.demo.Demo` with a rich :class:`Narrator`, and exits 0 only if every step was
verified; otherwise the failed step is named on stderr (``error: step '...' failed: ...``,
exit 1). With ``--json`` the narrative goes to stderr and a summary to stdout. SIGTERM and
SIGHUP are handled like Ctrl-C: everything the demo started is stopped first.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Mapping, Sequence

import click

from agent.cliutil import echo_json, json_option
from packager.demo import Demo
from packager.demo_config import DemoConfig, default_examples, with_timeouts
from packager.gate import QUANTIZE_CHOICES
from packager.demo_procs import DemoFailed


class _Line:
    def __init__(self, narrator: RichNarrator, title: str) -> None:
        self.narrator = narrator
        self.title = title

    def status(self, text: str) -> None:
        from rich.markup import escape

        if self.narrator.live is not None:
            self.narrator.live.update(f"{escape(self.narrator.prefix)} {escape(self.title)} [dim]· {escape(text)}[/]")

    def retitle(self, title: str) -> None:
        self.title = title


class RichNarrator:
    """Numbered steps with a spinner while they run, ✓/✗ and their time after, details indented."""

    def __init__(self, *, stderr: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=stderr, highlight=False)
        if not self.console.is_terminal:  # a file or pipe: do not squeeze tables into 80 columns
            self.console = Console(stderr=stderr, highlight=False, width=max(self.console.width, 120))
        self.stderr = stderr
        self.prefix = ""
        self.live: Any = None
        self._notes: list[str] = []

    @contextmanager
    def step(self, number: int, total: int, title: str) -> Iterator[_Line]:
        from rich.markup import escape

        self.prefix = f"[{number:>{len(str(total))}}/{total}]"
        line = _Line(self, title)
        self._notes = []
        start = time.monotonic()
        status = self.console.status(f"{escape(self.prefix)} {escape(title)}", spinner="dots")
        self.live = status
        ok = False
        try:
            with status:
                yield line
            ok = True
        finally:
            self.live = None
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            self.console.print(f"{mark} [dim]{escape(self.prefix)}[/] {escape(line.title)} "
                               f"[dim]({time.monotonic() - start:.1f} s)[/]")
            for n in self._notes:
                self.console.print(f"      [dim]{escape(n)}[/]")
            self._notes = []

    def note(self, text: str) -> None:
        self._notes.append(text)

    def event(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"      [cyan]›[/] {escape(text)}")

    def quantization_report(self, report: Mapping[str, Any]) -> None:
        from packager.report import render_report

        live = self.live
        if live is not None:
            live.stop()  # the report prints through its own console
        try:
            render_report(report, stderr=self.stderr)
        finally:
            if live is not None:
                live.start()

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        self.console.print(f"      [bold]{escape(title)}[/]")
        t = Table(box=box.SIMPLE_HEAD, header_style="bold", padding=(0, 1), pad_edge=True)
        for i, c in enumerate(columns):
            t.add_column(escape(c), justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            t.add_row(*(escape(str(v)) for v in r))
        from rich.padding import Padding

        self.console.print(Padding(t, (0, 0, 0, 4), expand=False))


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt, so the demo's cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@click.command("demo")
@click.option("--broker", "broker_url", metavar="URL",
              help="Use this broker (e.g. a test Mosquitto: mqtt://127.0.0.1:1883) instead of starting the "
                   "embedded amqtt broker on 127.0.0.1.")
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), default="auto", show_default=True,
              help="Quantization of v1 (v2 is built with static int8).")
@click.option("--devices", type=click.IntRange(1, 16), default=3, show_default=True, help="Number of device agents.")
@click.option("--samples", type=click.IntRange(1, 200), default=20, show_default=True,
              help="Predictions per device and version.")
@click.option("--examples", "examples", type=click.Path(path_type=Path, file_okay=False),
              help="Directory with the digits model and data (default: examples/digits of this checkout).")
@click.option("--timeout-scale", type=click.FloatRange(0.1, 100), default=1.0, show_default=True,
              help="Multiply every wait's timeout (slow machines).")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (keys, repository, states, logs).")
@json_option
def demo(broker_url: str | None, quantize: str, devices: int, samples: int, examples: Path | None,
         timeout_scale: float, keep: bool, as_json: bool) -> None:
    """Run the whole story on this machine: broker, keys, repository, quantized build, server, devices
    installing v1 and moving to v2, predictions, fleet status; then clean up.

    Exit 0 only if every step was verified.
    """
    config = with_timeouts(DemoConfig(examples=examples or default_examples(), broker_url=broker_url,
                                      devices=devices, quantize=quantize, samples=samples, keep=keep), timeout_scale)
    narrator = RichNarrator(stderr=as_json)
    with _terminate_as_interrupt():
        runner = Demo(config, narrator)
        result = runner.run()
    con = narrator.console
    failed = result.failed
    if failed is None:
        con.print(f"[bold green]✓ demo passed[/]: {len(result.steps)} steps verified in {result.seconds:.1f} s")
    else:
        done = sum(1 for s in result.steps if s.ok and s.name != "cleanup")
        con.print(f"[bold red]✗ demo failed[/] at step '{failed.name}' after {done} verified step(s), "
                  f"{result.seconds:.1f} s" + ("" if keep or not result.children.get("started") else
                                             " (run with --keep to inspect the logs)"))
    if as_json:
        echo_json(result.to_dict())
    if failed is not None:
        raise DemoFailed(failed.name, failed.error or "failed")


if __name__ == "__main__":
    from agent.cliutil import run_cli

    group = click.Group("edgeship")
    group.add_command(demo)
    run_cli(group, "edgeship")
