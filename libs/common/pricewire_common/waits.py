"""Waiting on an event for at most a while, without losing a cancellation that lands meanwhile."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passes; whether it is set.

    Use it instead of `asyncio.wait_for(event.wait(), timeout)`, which on Python 3.11 returns normally when
    the task is cancelled just as the event is set, and the cancellation is lost (CPython gh-86296, fixed
    in 3.12). A validator whose partition worker was cancelled that way kept deciding and never stopped.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()
