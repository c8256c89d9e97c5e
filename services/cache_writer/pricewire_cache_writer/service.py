"""The cache writer: projects the log into Redis (latest prices) and PostgreSQL (history).

Three independent durable consumers run side by side: `cache-redis` on PRICES,
`cache-db-ticks` on TICKS and `cache-db-prices` on PRICES. Each one acks a message only
once its store holds it, so a store that is down holds back only its own consumer. That holds
at start too: the Redis projector and the ops port start at once, and the PostgreSQL half (pool,
migrations, its two projectors) comes up whenever PostgreSQL answers (postgres_side.py). Each
store keeps the consumer's offset with its rows; a reporter publishes every projection's lag
to the `projection:status` hash in Redis every second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as redis_asyncio
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks
from pricewire_cache_writer.metrics import CacheWriterMetrics
from pricewire_cache_writer.migrate import Variant
from pricewire_cache_writer.postgres_side import Backoff, PostgresSide
from pricewire_cache_writer.progress import Tracked
from pricewire_cache_writer.projector import RETRY_DELAY_S, Projection, Projector
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_cache_writer.status import StatusReporter
from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.consumer import durable_pull
from pricewire_common.deadletters import DeadLetters
from pricewire_common.metrics import Exposition
from pricewire_common.operations import open_operations
from pricewire_common.ops_http import nats_check, redis_check
from pricewire_common.tracing import Tracing, open_tracing

log = structlog.get_logger(__name__)

SERVICE = "cache_writer"
REDIS_TIMEOUT_S = 5.0

T = TypeVar("T")


class Projectors:
    """Makes the cache_writer's projectors, each on its durable consumer, with what they share."""

    def __init__(
        self,
        settings: Settings,
        nc: NATS,
        js: JetStreamContext,
        *,
        dead_letters: DeadLetters,
        retry_delay_s: float,
        tracing: Tracing,
    ) -> None:
        self._settings = settings
        self._nc = nc
        self._js = js
        self._dead_letters = dead_letters
        self._retry_delay_s = retry_delay_s
        self._tracing = tracing

    async def make(self, stream: str, filter_subject: str, projection: Projection[T]) -> Projector[T]:
        sub = await durable_pull(
            self._js,
            stream=stream,
            durable=projection.name,
            filter_subject=filter_subject,
            ack_wait_s=self._settings.streams.ack_wait_s,
        )
        return Projector(
            sub,
            projection,
            stream=stream,
            dead_letters=self._dead_letters,
            batch_size=self._settings.cache.batch_size,
            batch_wait_s=self._settings.cache.batch_wait_s,
            retry_delay_s=self._retry_delay_s,
            nc=self._nc,
            tracing=self._tracing,
        )

    async def postgres(self, pool: asyncpg.Pool, variant: Variant) -> list[Projector[Any]]:
        """The two PostgreSQL projectors, once the schema is ready (the candle tables only on plain PostgreSQL)."""
        assets = self._settings.assets
        return [
            await self.make(subjects.TICKS_STREAM, subjects.ALL_TICKS, PostgresTicks(pool, assets=assets)),
            await self.make(
                subjects.PRICES_STREAM,
                subjects.ALL_PRICES,
                PostgresPrices(pool, assets=assets, candles=variant == "postgres"),
            ),
        ]


async def run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    retry_delay_s: float = RETRY_DELAY_S,
    postgres_backoff: Backoff | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Project the log until `stop` is set, then finish the batches in hand, drain and close.

    `postgres_backoff`: the waits between tries while PostgreSQL does not answer at start.
    """
    async with AsyncExitStack() as stack:
        tracing = open_tracing(stack, settings.tracing, service=SERVICE, given=tracing)  # `tracing`: a test's
        nc = await connect(settings.nats_url, name=SERVICE, auth=settings.nats_auth)
        stack.push_async_callback(nc.close)  # after drain_or_close, a no-op; on an error, the way out
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)

        redis = redis_asyncio.Redis.from_url(
            settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )  # connects on first use: Redis down at start holds back only its projector
        stack.push_async_callback(redis.aclose)

        dead_letters = DeadLetters(js, service=SERVICE)
        projectors = Projectors(
            settings, nc, js, dead_letters=dead_letters, retry_delay_s=retry_delay_s, tracing=tracing
        )
        redis_projector = await projectors.make(
            subjects.PRICES_STREAM,
            subjects.ALL_PRICES,
            RedisPrices(redis, ttl_s=settings.cache.price_ttl_s, assets=settings.assets),
        )
        postgres = PostgresSide(
            database_url=settings.database_url,
            database_name=settings.database_url_redacted,
            cache=settings.cache,
            make_projectors=projectors.postgres,
            backoff=postgres_backoff,
        )
        stack.push_async_callback(postgres.close)

        def tracked() -> Sequence[Tracked]:
            return [redis_projector, *postgres.tracked()]

        reporter = StatusReporter(redis, js, tracked)
        metrics = CacheWriterMetrics(js, reporter, tracked, service=SERVICE, dead_letters=dead_letters)
        exposition = Exposition(SERVICE)
        exposition.add(metrics.collect)
        exposition.add_refresh("projections", metrics.refresh)
        await open_operations(
            stack,
            nc,
            service=SERVICE,
            description="Projections of the log: latest prices in Redis, ticks, prices and candles in PostgreSQL",
            exposition=exposition,
            checks=[nats_check(nc), redis_check(redis), postgres.check()],
            port=settings.metrics_port,
        )
        log.info("cache_writer_started", consumers=[redis_projector.name], postgres="starting")
        projectors_done = asyncio.Event()  # the last report comes after the last batch
        async with asyncio.TaskGroup() as outer:
            outer.create_task(reporter.run(projectors_done), name="status-reporter")
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(redis_projector.run(stop), name=redis_projector.name)
                    tg.create_task(postgres.run(stop), name="postgres-side")
            finally:
                projectors_done.set()
        # Every batch in hand is settled; flush the acks, then let the stack close the stores.
        for each in [redis_projector, *postgres.projectors]:
            await each.close()
        await drain_or_close(nc)
        log.info("cache_writer_drained", rejected=dead_letters.total)
