"""How the demo talks: a :class:`Narrator` the CLI implements (with rich), and the line of the
step that runs now. The demo's modules only call these; none of them prints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Mapping, Protocol, Sequence

from packager.progress import Advance


class StepLine(Protocol):
    def status(self, text: str) -> None:
        """Replace the text next to the spinner while the step runs."""

    def retitle(self, title: str) -> None:
        """The line printed with the step's ✓ or ✗."""


class Narrator(Protocol):
    def step(self, number: int, total: int, title: str) -> AbstractContextManager[StepLine]:
        """Step ``number`` of ``total`` runs inside the context; an exception out of it means it failed."""

    def note(self, text: str) -> None:
        """A detail of the current step, shown under its result line."""

    def event(self, text: str) -> None:
        """Something that just happened, shown at once."""

    def quantization_report(self, report: Mapping[str, Any]) -> None:
        """The accuracy gate's table (packager.report)."""

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None: ...


class StepReporter:
    """A :class:`packager.progress.Reporter` that shows build progress as the step's spinner text."""

    def __init__(self, line: StepLine, prefix: str) -> None:
        self.line, self.prefix = line, prefix

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        self.line.status(f"{self.prefix}: {message}")
        yield

    @contextmanager
    def bar(self, message: str) -> Iterator[Advance]:
        self.line.status(f"{self.prefix}: {message}")
        yield lambda done, total: self.line.status(f"{self.prefix}: {message} {done}/{total}")

    def note(self, message: str) -> None:
        pass
