"""Progress reporting for long steps. Library code calls a Reporter; only the CLI picks one.

Progress goes to stderr so that ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol


Advance = Callable[[int, int], None]
"""``advance(done, total)``: report progress inside a long step."""


class Reporter(Protocol):
    def step(self, message: str) -> ContextManager[None]: ...
    def bar(self, message: str) -> ContextManager[Advance]: ...
    def note(self, message: str) -> None: ...


class Silent:
    """Reports nothing (library use, tests)."""

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        yield

    @contextmanager
    def bar(self, message: str) -> Iterator[Advance]:
        yield lambda done, total: None

    def note(self, message: str) -> None:
        pass


class Console:
    """Prints each step with a spinner while it runs and its duration when done (stderr)."""

    def __init__(self) -> None:
        from rich.console import Console as RichConsole

        self._console = RichConsole(stderr=True, highlight=False)

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        start = time.perf_counter()
        with self._console.status(message, spinner="dots"):
            try:
                yield
            except BaseException:
                self._console.print(f"[red]✗[/red] {message}")
                raise
        self._console.print(f"[green]✓[/green] {message} [dim]({time.perf_counter() - start:.2f} s)[/dim]")

    @contextmanager
    def bar(self, message: str) -> Iterator[Advance]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        start = time.perf_counter()
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self._console, transient=True) as progress:
            task = progress.add_task(message, total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            yield advance
        self._console.print(f"  {message} [dim]({time.perf_counter() - start:.2f} s)[/dim]")

    def note(self, message: str) -> None:
        self._console.print(f"  {message}")


def default_reporter(quiet: bool = False) -> Reporter:
    if quiet:
        return Silent()
    try:
        return Console()
    except ImportError:  # rich missing: keep going without progress
        print("edgeship: install 'rich' for progress output", file=sys.stderr)
        return Silent()
