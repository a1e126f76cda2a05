"""asyncio helpers the agent's loops share."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that returns normally when it
    is cancelled just as the event is set (the inner wait already done), swallowing the
    cancellation, so a loop that sleeps this way can outlive the task that cancelled it."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, again_after: float = 0.1) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again any still running
    after ``again_after`` seconds.

    Once is not always enough on Python 3.11: ``asyncio.wait_for`` (which aiomqtt's publish and
    subscribe use) returns normally when it is cancelled just as what it waits for completes, so
    a task cancelled mid-publish can carry on into its next wait, and a plain ``gather`` after
    ``cancel()`` then waits for it forever. Each new cancel lands on that next wait."""
    pending = {t for t in tasks if not t.done()}
    for t in pending:
        t.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=again_after)
        for t in pending:
            t.cancel()
