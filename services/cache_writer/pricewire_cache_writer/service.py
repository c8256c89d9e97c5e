"""The cache writer: projects the log into Redis (latest prices) and PostgreSQL (history).

Three independent durable consumers run side by side: `cache-redis` on PRICES,
`cache-db-ticks` on TICKS and `cache-db-prices` on PRICES. Each one acks a message only
once its store holds it, so a store that is down holds back only its own consumer. Each
store keeps the consumer's offset with its rows; a reporter publishes every projection's lag
to the `projection:status` hash in Redis every second.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as redis_asyncio
import structlog

from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks
from pricewire_cache_writer.metrics import CacheWriterMetrics
from pricewire_cache_writer.migrate import apply_migrations, schema_lock, schema_variant
from pricewire_cache_writer.projector import RETRY_DELAY_S, Projection, Projector
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_cache_writer.status import StatusReporter
from pricewire_cache_writer.timescale import Policies, apply_policies, refresh_candles
from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.consumer import durable_pull
from pricewire_common.deadletters import DeadLetters
from pricewire_common.metrics import Exposition
from pricewire_common.operations import open_operations
from pricewire_common.ops_http import nats_check, postgres_check, redis_check
from pricewire_common.tracing import Tracing, open_tracing

log = structlog.get_logger(__name__)

SERVICE = "cache_writer"
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
DB_COMMAND_TIMEOUT_S = 10.0
REDIS_TIMEOUT_S = 5.0
CANDLES_MIGRATION = 3
"""The migration that makes the candles (and, on TimescaleDB, the hypertables)."""

T = TypeVar("T")


async def run(
    settings: Settings, stop: asyncio.Event, *, retry_delay_s: float = RETRY_DELAY_S, tracing: Tracing | None = None
) -> None:
    """Project the log until `stop` is set, then finish the batches in hand, drain and close."""
    async with AsyncExitStack() as stack:
        tracing = open_tracing(stack, settings.tracing, service=SERVICE, given=tracing)  # `tracing`: a test's
        nc = await connect(settings.nats_url, name=SERVICE, auth=settings.nats_auth)
        stack.push_async_callback(nc.close)  # after drain_or_close, a no-op; on an error, the way out
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)

        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            command_timeout=DB_COMMAND_TIMEOUT_S,
        )
        stack.push_async_callback(_close_pool, pool)
        # One critical section for the whole schema step, so replicas starting together take turns at the
        # policies too, not only at the migrations.
        async with pool.acquire() as conn, schema_lock(conn):
            applied = await apply_migrations(conn, timescaledb=settings.cache.timescaledb)
            variant = await schema_variant(conn)
            if variant == "timescaledb":
                policies = Policies(
                    compress_after_s=settings.cache.compress_after_s, retention_s=settings.cache.retention_s
                )
                await apply_policies(conn, policies)
                if CANDLES_MIGRATION in applied:
                    await refresh_candles(conn)  # rows that were there before the hypertables
        log.info(
            "schema_ready",
            applied=applied,
            timescaledb=variant == "timescaledb",
            database=settings.database_url_redacted,
        )

        redis = redis_asyncio.Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        stack.push_async_callback(redis.aclose)

        dead_letters = DeadLetters(js, service=SERVICE)

        async def projector(stream: str, filter_subject: str, projection: Projection[T]) -> Projector[T]:
            sub = await durable_pull(
                js,
                stream=stream,
                durable=projection.name,
                filter_subject=filter_subject,
                ack_wait_s=settings.streams.ack_wait_s,
            )
            return Projector(
                sub,
                projection,
                stream=stream,
                dead_letters=dead_letters,
                batch_size=settings.cache.batch_size,
                batch_wait_s=settings.cache.batch_wait_s,
                retry_delay_s=retry_delay_s,
                nc=nc,
                tracing=tracing,
            )

        projectors: list[Projector[Any]] = [
            await projector(
                subjects.PRICES_STREAM,
                subjects.ALL_PRICES,
                RedisPrices(redis, ttl_s=settings.cache.price_ttl_s, assets=settings.assets),
            ),
            await projector(subjects.TICKS_STREAM, subjects.ALL_TICKS, PostgresTicks(pool, assets=settings.assets)),
            await projector(
                subjects.PRICES_STREAM,
                subjects.ALL_PRICES,
                PostgresPrices(pool, assets=settings.assets, candles=variant == "postgres"),
            ),
        ]
        log.info("cache_writer_started", consumers=[p.name for p in projectors])
        reporter = StatusReporter(redis, js, projectors)
        metrics = CacheWriterMetrics(js, reporter, projectors, service=SERVICE, dead_letters=dead_letters)
        exposition = Exposition(SERVICE)
        exposition.add(metrics.collect)
        exposition.add_refresh("projections", metrics.refresh)
        await open_operations(
            stack,
            nc,
            service=SERVICE,
            description="Projections of the log: latest prices in Redis, ticks, prices and candles in PostgreSQL",
            exposition=exposition,
            checks=[nats_check(nc), redis_check(redis), postgres_check(pool)],
            port=settings.metrics_port,
        )
        projectors_done = asyncio.Event()  # the last report comes after the last batch
        async with asyncio.TaskGroup() as outer:
            outer.create_task(reporter.run(projectors_done), name="status-reporter")
            try:
                async with asyncio.TaskGroup() as tg:
                    for each in projectors:
                        tg.create_task(each.run(stop), name=each.name)
            finally:
                projectors_done.set()
        # Every batch in hand is settled; flush the acks, then let the stack close the stores.
        for each in projectors:
            await each.close()
        await drain_or_close(nc)
        log.info("cache_writer_drained", rejected=dead_letters.total)


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully, but never hang a shutdown on a database that stopped answering."""
    try:
        await asyncio.wait_for(pool.close(), timeout=DB_COMMAND_TIMEOUT_S)
    except TimeoutError:
        log.warning("database_pool_terminated")
        pool.terminate()
