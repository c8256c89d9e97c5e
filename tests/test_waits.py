"""wait_event: a bounded wait on an event that never loses a cancellation (CPython gh-86296 on 3.11)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pricewire_common.lifecycle import await_chain
from pricewire_common.waits import wait_event


async def test_a_cancellation_that_lands_as_the_event_is_set_is_raised() -> None:
    # The exact race that asyncio.wait_for loses on 3.11: the event is set and the waiting task cancelled
    # in the same turn of the loop. A worker looping on such a wait then never stopped.
    event = asyncio.Event()

    async def loop_until_cancelled() -> None:
        while True:
            await wait_event(event, 10.0)
            event.clear()

    task = asyncio.create_task(loop_until_cancelled())
    await asyncio.sleep(0)  # the task is waiting now
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


async def test_it_says_whether_the_event_was_set_within_the_time() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 10.0) is True


async def test_the_await_chain_of_a_task_goes_down_through_async_generators() -> None:
    event = asyncio.Event()

    async def innermost() -> None:
        await event.wait()

    async def generator() -> AsyncIterator[None]:
        await innermost()
        yield None

    async def outer() -> None:
        async for _ in generator():
            pass

    task = asyncio.create_task(outer())
    await asyncio.sleep(0)
    chain = await_chain(task.get_coro())
    event.set()
    await task
    assert [entry.rsplit(" in ", 1)[1] for entry in chain] == ["outer", "generator", "innermost", "wait"]
