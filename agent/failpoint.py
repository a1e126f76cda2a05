"""Crash points for tests: ``EDGESHIP_FAILPOINTS=install.extracted,switch.after`` makes the
process SIGKILL itself when it reaches one of the named points.

This is how the crash tests stop the agent at an exact step of an update (a kill
from outside lands somewhere random). The variable is read once; unset, every
``hit`` is a set lookup on an empty set.
"""

from __future__ import annotations

import os
import signal

_POINTS = frozenset(p for p in os.environ.get("EDGESHIP_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    if name in _POINTS:
        os.kill(os.getpid(), signal.SIGKILL)
