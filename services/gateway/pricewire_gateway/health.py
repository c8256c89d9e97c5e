"""Readiness: NATS and the two stores, probed concurrently.

The gateway is `ready` when all three answer and `degraded` (still ready: it serves) when one of Redis
and PostgreSQL does not, since each can stand in for the other for the latest prices. It is
`unavailable` without NATS (no live prices) or without both stores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from redis.exceptions import RedisError

from pricewire_gateway.errors import NotReady
from pricewire_gateway.messages import Check, Readiness, ReadinessStatus

PROBE_TIMEOUT_S = 2.0


class Probes:
    """The three readiness probes, run concurrently, each bounded by PROBE_TIMEOUT_S."""

    def __init__(self, nc: NATS, redis: redis_asyncio.Redis, pool: asyncpg.Pool) -> None:
        self._nc = nc
        self._redis = redis
        self._pool = pool

    async def readiness(self) -> Readiness:
        checks = await asyncio.gather(
            _check("nats", self._nats),
            _check("redis", self._redis_ping),
            _check("postgres", self._postgres),
        )
        return Readiness(status=readiness_status(checks), checks=list(checks))

    async def _nats(self) -> None:
        if not self._nc.is_connected:
            raise NotReady("not connected")

    async def _redis_ping(self) -> None:
        if not await self._redis.ping():
            raise NotReady("PING was not answered with PONG")

    async def _postgres(self) -> None:
        if await self._pool.fetchval("SELECT 1") != 1:
            raise NotReady("SELECT 1 did not return 1")


def readiness_status(checks: Sequence[Check]) -> ReadinessStatus:
    """`ready` when every check passed; `degraded` when NATS and one store did; else `unavailable`."""
    ok = {check.name for check in checks if check.ok}
    if len(ok) == len(checks):
        return "ready"
    if "nats" in ok and ok & {"redis", "postgres"}:
        return "degraded"
    return "unavailable"


async def _check(name: str, probe: Callable[[], Awaitable[None]]) -> Check:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await probe()
    except TimeoutError:
        return Check(name=name, ok=False, error=f"no answer within {PROBE_TIMEOUT_S} s")
    except (NotReady, RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        return Check(name=name, ok=False, error=f"{type(exc).__name__}: {exc}")
    return Check(name=name, ok=True)
