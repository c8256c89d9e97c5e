"""The cache_writer's PostgreSQL half: its pool, its schema and its two projectors, brought up whenever
PostgreSQL first answers, so the Redis half never waits for it.

PostgreSQL may be down when the cache_writer starts (restarted during an outage, a database still
starting). The Redis projector starts at once; this side tries the pool and then the schema step
(migrations and, on TimescaleDB, policies, under the schema lock) until both succeed, waiting between
tries on a doubling backoff, logging each failure, and answering `/readyz` with `postgres` not ready and
why. Once up, its projectors run like the Redis one, and a later outage is theirs to ride out (nak and
retry), as before. A failure that is not an outage (a migration's bug, a refused password, a missing
database) stops the service, as a bad setting does.

Until then the status report and the metrics carry the two PostgreSQL projections as waiting ones:
`store_up` false, and offset 0, since what PostgreSQL holds cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import asyncpg
import structlog

from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks
from pricewire_cache_writer.errors import StoreUnavailable, postgres_guard
from pricewire_cache_writer.migrate import Variant, apply_migrations, schema_lock, schema_variant
from pricewire_cache_writer.progress import Progress, Tracked
from pricewire_cache_writer.projector import Projector
from pricewire_cache_writer.timescale import Policies, apply_policies, refresh_candles
from pricewire_common import subjects
from pricewire_common.config import CacheSettings
from pricewire_common.consumer import ConsumerTally
from pricewire_common.ops_http import Check, NotReady
from pricewire_common.waits import wait_event

log = structlog.get_logger(__name__)

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
DB_COMMAND_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
"""A connection attempt that hears nothing (a partition, not a refusal) fails after this."""
CANDLES_MIGRATION = 3
"""The migration that makes the candles (and, on TimescaleDB, the hypertables)."""

Phase = Literal["connecting", "migrating", "up"]
MakeProjectors = Callable[[asyncpg.Pool, Variant], Awaitable[list[Projector[Any]]]]
"""Builds the PostgreSQL projectors once the schema is ready (their consumers are bound then)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Waits between tries: `initial_s`, doubled each time, at most `max_s`."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.max_s, delay * 2)


@dataclass(slots=True)
class Waiting:
    """A PostgreSQL projection whose projector is not running yet: what the report and metrics show of it."""

    name: str
    stream: str
    store: str = "postgres"
    progress: Progress = field(default_factory=lambda: Progress(store_up=False))
    tally: ConsumerTally = field(default_factory=ConsumerTally)


async def prepare_schema(conn: asyncpg.Connection, cache: CacheSettings) -> tuple[list[int], Variant]:
    """Migrations, then (TimescaleDB) policies and a first refresh, as one critical section: the versions
    applied by this call and the database's path."""
    # One lock for the whole step, so replicas starting together take turns at the policies too.
    async with schema_lock(conn):
        applied = await apply_migrations(conn, timescaledb=cache.timescaledb)
        variant = await schema_variant(conn)
        if variant == "timescaledb":
            await apply_policies(conn, Policies(compress_after_s=cache.compress_after_s, retention_s=cache.retention_s))
            if CANDLES_MIGRATION in applied:
                await refresh_candles(conn)  # rows that were there before the hypertables
    return applied, variant


class PostgresSide:
    """Brings the PostgreSQL projections up when PostgreSQL answers, then runs them until stopped."""

    def __init__(
        self,
        *,
        database_url: str,
        database_name: str,
        cache: CacheSettings,
        make_projectors: MakeProjectors,
        backoff: Backoff | None = None,
    ) -> None:
        """`database_name` is the URL as logs may show it (no password)."""
        self._url = database_url
        self._database_name = database_name
        self._cache = cache
        self._make_projectors = make_projectors
        self._backoff = backoff or Backoff()
        self.phase: Phase = "connecting"
        self.error: str | None = None
        """Why the last try failed, while the side is not up."""
        self.pool: asyncpg.Pool | None = None
        self.projectors: list[Projector[Any]] = []
        self._waiting = [
            Waiting(PostgresTicks.name, subjects.TICKS_STREAM),
            Waiting(PostgresPrices.name, subjects.PRICES_STREAM),
        ]

    def tracked(self) -> Sequence[Tracked]:
        """The PostgreSQL projections as they stand: running projectors, or waiting ones."""
        return self.projectors if self.phase == "up" else self._waiting

    def check(self) -> Check:
        """`/readyz`'s `postgres`: not ready until the side is up, then PostgreSQL's `SELECT 1`."""

        async def probe() -> None:
            if self.phase != "up" or self.pool is None:
                raise NotReady(f"{self.phase}: {self.error or 'first try under way'}")
            if await self.pool.fetchval("SELECT 1") != 1:
                raise NotReady("SELECT 1 did not return 1")

        return Check("postgres", probe)

    async def run(self, stop: asyncio.Event) -> None:
        """Bring the side up (or return when `stop` is set first), then run its projectors until `stop`."""
        if not await self._bring_up(stop):
            return
        async with asyncio.TaskGroup() as tg:
            for projector in self.projectors:
                tg.create_task(projector.run(stop), name=projector.name)

    async def close(self) -> None:
        """Close the pool gracefully, but never hang a shutdown on a database that stopped answering."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(DB_COMMAND_TIMEOUT_S):
                await pool.close()
        except TimeoutError:
            log.warning("database_pool_terminated")
            pool.terminate()

    async def _bring_up(self, stop: asyncio.Event) -> bool:
        delays = self._backoff.delays()
        while True:
            try:
                variant = await _until(stop, self._try())
            except StoreUnavailable as exc:
                self.error = exc.detail
                delay = next(delays)
                log.warning("postgres_not_up", phase=self.phase, error=exc.detail, retry_in_s=delay)
                await wait_event(stop, delay)  # a backoff that a stop cuts short
                if stop.is_set():
                    return False
                continue
            if variant is None:
                return False  # stopped while trying
            break
        assert self.pool is not None  # _try made it
        self.projectors = await self._make_projectors(self.pool, variant)
        self.phase, self.error = "up", None
        log.info("postgres_up", consumers=[p.name for p in self.projectors])
        return True

    async def _try(self) -> Variant:
        """One try: the pool (kept once made), then the schema step. Raises StoreUnavailable for an outage."""
        with postgres_guard():
            if self.pool is None:
                self.phase = "connecting"
                self.pool = await asyncpg.create_pool(
                    self._url,
                    min_size=POOL_MIN_SIZE,
                    max_size=POOL_MAX_SIZE,
                    command_timeout=DB_COMMAND_TIMEOUT_S,
                    timeout=CONNECT_TIMEOUT_S,
                )
            self.phase = "migrating"
            async with self.pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                applied, variant = await prepare_schema(conn, self._cache)
        log.info("schema_ready", applied=applied, timescaledb=variant == "timescaledb", database=self._database_name)
        return variant


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """What `work` returns, or None once `stop` is set first (then `work` is cancelled)."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()
