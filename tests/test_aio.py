"""agent.aio.wait_event: a timed wait for an event that a cancellation always ends."""

from __future__ import annotations

import asyncio

import pytest

from agent.aio import wait_event


def test_wait_event_says_whether_the_event_came() -> None:
    async def go() -> tuple[bool, bool, bool]:
        ev = asyncio.Event()
        timed_out = await wait_event(ev, 0.01)
        asyncio.get_running_loop().call_later(0.01, ev.set)
        came = await wait_event(ev, 5)
        already = await wait_event(ev, 5)
        return timed_out, came, already

    assert asyncio.run(go()) == (False, True, True)


def test_a_cancel_that_races_the_event_is_not_swallowed() -> None:
    """The event is set and the waiting task cancelled in the same turn of the loop: the event's
    waiter finishes first, and 3.11's wait_for would then return instead of raising."""
    async def go() -> None:
        ev = asyncio.Event()
        task = asyncio.ensure_future(wait_event(ev, 10))
        await asyncio.sleep(0)  # the task is waiting
        ev.set()
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())


def test_cancel_and_wait_ends_a_task_that_swallowed_the_first_cancel() -> None:
    """What aiomqtt's publish can do on 3.11 (its wait_for returns as the PUBACK lands): the
    task carries on into its next wait. One cancel and a gather would wait forever."""
    from agent.aio import cancel_and_wait

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # as if the awaited publish had just completed
        await asyncio.sleep(30)

    async def go() -> tuple[bool, bool]:
        once = asyncio.ensure_future(swallows_once())
        await asyncio.sleep(0)
        once.cancel()
        done, _ = await asyncio.wait((once,), timeout=0.3)
        one_cancel_was_enough = bool(done)
        await cancel_and_wait((once,), again_after=0.05)
        return one_cancel_was_enough, once.cancelled()

    assert asyncio.run(asyncio.wait_for(go(), 10)) == (False, True)
