"""Helpers for the live-source tests: the collector running against a fake venue, and what it published."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from nats.aio.subscription import Subscription

from pricewire_collector.service import run
from pricewire_common.config import Settings
from pricewire_common.events import (
    DeadLetter,
    SourceStatus,
    Tick,
    decode_dead_letter,
    decode_source_status,
    decode_tick,
)


@contextlib.asynccontextmanager
async def collector(settings: Settings) -> AsyncIterator[None]:
    """The collector service running with `settings` for the body of the `async with`; stopped after it."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def take_ticks(sub: Subscription, n: int) -> list[tuple[str, Tick]]:
    """The next `n` ticks on `sub`, with their subjects."""
    return [(m.subject, decode_tick(m.data)) for m in [await sub.next_msg(timeout=10) for _ in range(n)]]


async def take_letters(sub: Subscription, n: int) -> list[DeadLetter]:
    """The next `n` dead letters on `sub`."""
    return [decode_dead_letter((await sub.next_msg(timeout=10)).data) for _ in range(n)]


async def states_until(sub: Subscription, done: Callable[[list[SourceStatus]], bool]) -> list[SourceStatus]:
    """Source states read from `sub` until `done` accepts what was seen."""
    seen: list[SourceStatus] = []
    while not done(seen):
        seen.append(decode_source_status((await sub.next_msg(timeout=10)).data))
    return seen
