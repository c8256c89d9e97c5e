"""Bounded waits for tests.

Prefer awaiting an event the system emits (a WebSocket frame, a NATS message). For state with no
event to await (rows in PostgreSQL, a consumer's pending count) `eventually` re-checks on a short
interval and fails with the last observation once the deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

RECHECK_S = 0.05


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    timeout: float = 15.0,
    what: str = "condition",
) -> T:
    """Return the first value of `probe()` that `accept` takes; raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s; last value: {value!r}")
        await asyncio.sleep(RECHECK_S)
