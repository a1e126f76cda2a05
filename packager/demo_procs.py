"""The demo's child processes: started, watched and always stopped.

Every child (broker, server, agents) runs through a small launcher that asks Linux to send it
SIGTERM when the demo dies (``PR_SET_PDEATHSIG``), so not even a SIGKILLed demo leaves one
behind; each gets its own session, so a Ctrl-C at the terminal reaches only the demo, which
then stops them in order (agents first, so they can say goodbye on the broker, the broker
last). Output goes to one log file per child, whose tail goes into failure messages.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TypeVar

from agent.errors import BadData

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_TAIL_LINES = 12
KILLED_TAIL_LINES = 60
"""Log lines kept of a child that had to be killed: enough for an agent's thread stacks."""

# Run a module as __main__ after asking for SIGTERM when the parent (the demo) dies; exit at once if
# the parent is already gone. On systems without prctl the demo's own cleanup is all there is.
_LAUNCHER = (
    "import ctypes, os, runpy, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


class DemoFailed(BadData):
    """A step of the demo did not do what it claims; ``step`` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step '{step}' failed: {message}")
        self.step = step
        self.reason = message


class StepTimeout(Exception):
    """A wait ran out (the caller turns it into :class:`DemoFailed` naming what did not happen)."""


class ChildExited(Exception):
    """A child process ended while something waited on it."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def check(self) -> None:
        """Raise :class:`ChildExited` if the process has ended (its log tail is for the narrator to show)."""
        rc = self.proc.poll()
        if rc is None:
            return
        try:
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        except ValueError:
            how = f"exited with status {rc}"
        raise ChildExited(f"{self.name} (pid {self.pid}) {how}")


@dataclass(frozen=True, kw_only=True)
class StopReport:
    stopped: tuple[str, ...]
    """Children that exited on SIGTERM."""
    killed: tuple[str, ...]
    """Children that needed SIGKILL."""
    left_running: tuple[str, ...]
    """Children still alive afterwards (should never happen)."""
    killed_tails: dict[str, str] = field(default_factory=dict)
    """The last lines of each killed child's log: where it was when SIGTERM did not stop it (an
    agent writes its threads' stacks there after STOP_STACKS_AFTER seconds)."""


class Children:
    """The processes the demo started, stopped in reverse order of :meth:`start` unless told otherwise."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Child] = []

    def start(self, name: str, module: str, args: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        """Run ``python -m module args...`` as a child; its output goes to ``log_dir/name.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(os.getpid()), module, *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        child = Child(name=name, proc=proc, log_path=log_path)
        self.started.append(child)
        log.debug("started %s (pid %d): %s %s", name, proc.pid, module, " ".join(args))
        return child

    def stop(self, children: Sequence[Child], *, timeout: float) -> StopReport:
        """SIGTERM all of ``children`` at once, wait up to ``timeout``, SIGKILL what is left.

        Interrupts are held back meanwhile (:func:`interrupts_deferred`)."""
        stopped: list[str] = []
        killed: list[str] = []
        with interrupts_deferred():
            running = [c for c in children if c.alive]
            for c in running:
                _signal(c, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for c in running:
                try:
                    c.proc.wait(max(0.0, deadline - time.monotonic()))
                    stopped.append(c.name)
                except subprocess.TimeoutExpired:
                    _signal(c, signal.SIGKILL)
                    try:
                        c.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        log.warning("%s (pid %d) survived SIGKILL", c.name, c.pid)
                    killed.append(c.name)
        left = tuple(c.name for c in children if c.alive)
        tails = {c.name: c.tail(KILLED_TAIL_LINES) for c in children if c.name in killed}
        return StopReport(stopped=tuple(stopped), killed=tuple(killed), left_running=left, killed_tails=tails)

    def stop_all(self, *, timeout: float, order: Callable[[Child], int] | None = None) -> StopReport:
        """Stop every child, in groups by ``order`` (lowest first; default: newest first, one at a time)."""
        groups: dict[int, list[Child]] = {}
        for i, c in enumerate(self.started):
            groups.setdefault(order(c) if order else -i, []).append(c)
        stopped: list[str] = []
        killed: list[str] = []
        tails: dict[str, str] = {}
        for key in sorted(groups):
            rep = self.stop(groups[key], timeout=timeout)
            stopped += rep.stopped
            killed += rep.killed
            tails.update(rep.killed_tails)
        left = tuple(c.name for c in self.started if c.alive)
        return StopReport(stopped=tuple(stopped), killed=tuple(killed), left_running=left, killed_tails=tails)


def _signal(child: Child, sig: signal.Signals) -> None:
    try:
        child.proc.send_signal(sig)
    except ProcessLookupError:
        pass


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP (a second Ctrl-C must not cut a cleanup short): they are
    remembered and raised again, once each, to the handlers in place before, when the body completes.

    Python-level handlers, not a signal mask: CPython runs handlers in the main thread whichever
    thread the signal hit (runtime thread pools included). Outside the main thread: no effect."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def remember(signum: int, frame: object) -> None:
        caught.append(signum)

    old = {s: signal.signal(s, remember) for s in _INTERRUPTS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)


_INTERRUPTS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(probe: Callable[[], T | None], *, timeout: float, watch: Sequence[Child] = (),
               interval: float = 0.05) -> T:
    """Call ``probe`` until it returns something other than None; raise :class:`StepTimeout` after
    ``timeout`` seconds, or :class:`ChildExited` as soon as one of ``watch`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        for c in watch:
            c.check()
        got = probe()
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            raise StepTimeout(f"not within {timeout:g} s")
        time.sleep(interval)
