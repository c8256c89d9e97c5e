"""A store really stopped and started again under load: the cache_writer holds back only that store's
consumers, shows their lag, and catches up by itself with nothing lost and nothing doubled.

Each test runs a PostgreSQL or Redis server of its own (the embedded binaries), so it can stop it: a
process gone, connections refused, not a proxy. tests/test_cache_writer.py has the finer-grained outage
tests (naks and redeliveries through a cut proxy); these check the whole catch-up against the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pricewire_cache_writer.progress import ProjectionStatus
from pricewire_cli.embedded import PostgresServer, RedisServer, ensure_database
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.events import decode_tick, encode
from tests.factories import make_price, make_tick
from tests.projections import brute_minute_counts, events_in_log, last_consensus, prices_in_log, stored_minute_counts
from tests.test_cache_writer import consumers_idle, count, service
from tests.test_cache_writer_offsets import read_status
from tests.waiting import eventually

pytestmark = pytest.mark.slow

OUTAGE_S = 3.0
"""How long the store stays down once the cache_writer has noticed."""
TICKS_PER_S = 300.0
TICKS_PER_PRICE = 10


class Flow:
    """Publishes ticks, and a consensus price every TICKS_PER_PRICE ticks, at a steady rate until stopped."""

    def __init__(self, js: JetStreamContext, assets: tuple[str, ...]) -> None:
        self._js = js
        self._assets = assets
        self._seqs = dict.fromkeys(assets, 0)
        self.published = 0

    async def run(self, stop: asyncio.Event) -> None:
        every_s = TICKS_PER_PRICE / TICKS_PER_S
        for n in itertools.count():
            if stop.is_set():
                return
            now = time.time_ns()
            asset = self._assets[n % len(self._assets)]
            for i in range(TICKS_PER_PRICE):
                tick = make_tick(
                    id=f"flow-{n}-{i}", symbol=f"{asset}-USDT", base=asset,
                    price=Decimal(100 + n % 7), ts_exchange=now, ts_received=now,
                )  # fmt: skip
                await self._js.publish(subjects.tick(tick.source, asset, "USDT"), encode(tick))
            self._seqs[asset] += 1
            price = make_price(asset=asset, seq=self._seqs[asset], price=Decimal(100 + n % 7), ts=now, ts_tick=now)
            await self._js.publish(
                subjects.price(asset), encode(price), headers={MSG_ID_HEADER: f"price:{asset}:{price.seq}"}
            )
            self.published += TICKS_PER_PRICE
            # The rate, not a wait for state: the flow is the load, it only needs to be steady.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)


@contextlib.asynccontextmanager
async def flowing(js: JetStreamContext, assets: tuple[str, ...]) -> AsyncIterator[Flow]:
    flow, stop = Flow(js, assets), asyncio.Event()
    task = asyncio.create_task(flow.run(stop))
    try:
        yield flow
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def status_of(client: redis_asyncio.Redis, projection: str) -> ProjectionStatus | None:
    return (await read_status(client)).get(projection)


def all_caught_up(reports: dict[str, ProjectionStatus]) -> bool:
    return len(reports) == 3 and all(r.lag == 0 and r.store_up for r in reports.values())


async def count_rows(url: str, table: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await count(conn, table)
    finally:
        await conn.close()


async def assert_postgres_holds_the_log(url: str, js: JetStreamContext) -> None:
    """Every tick of TICKS once, every price of PRICES, candles that count them."""
    ticks = [tick.id for _, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick)]
    prices = await prices_in_log(js)
    conn = await asyncpg.connect(url)
    try:
        stored = [r["id"] for r in await conn.fetch("SELECT id FROM ticks")]
        assert len(stored) == len(ticks) and set(stored) == set(ticks)
        assert await conn.fetchval("SELECT count(*) FROM prices") == len(prices)
        assert await stored_minute_counts(conn) == brute_minute_counts(prices)
    finally:
        await conn.close()


async def assert_redis_holds_the_last_consensus(client: redis_asyncio.Redis, js: JetStreamContext) -> None:
    for asset, last in last_consensus(await prices_in_log(js)).items():
        assert await client.get(f"price:{asset}:seq") == str(last.seq), asset
        assert await client.get(f"price:{asset}") == str(last.price), asset
        assert await client.get(f"price:{asset}:detail") == encode(last).decode(), asset


@contextlib.asynccontextmanager
async def redis_at(url: str) -> AsyncIterator[redis_asyncio.Redis]:
    """A client for one phase of a test: one that lived through a restart fails its next command."""
    client = redis_asyncio.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[tuple[PostgresServer, str]]:
    """A PostgreSQL server of this test's own, to stop and start, and the URL of a database on it."""
    server = PostgresServer(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    try:
        yield server, await ensure_database(server.url, "pricewire")
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis server of this test's own (in memory only: a restart comes back empty)."""
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_postgresql_stopped_under_load_catches_up_by_itself_while_redis_goes_on(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis, own_postgres: tuple[PostgresServer, str]
) -> None:
    server, database_url = own_postgres
    settings = replace(settings, database_url=database_url)
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    async with service(settings, retry_delay_s=0.2):
        async with flowing(js, settings.assets):
            await eventually(lambda: count_rows(database_url, "ticks"), lambda n: n >= 100, what="ticks stored")

            await asyncio.to_thread(server.stop)
            stopped_ns = time.time_ns()
            down = await eventually(
                lambda: status_of(redis_client, "cache-db-ticks"),
                # A report from after the stop: the one before the first rows were stored says down too.
                lambda r: r is not None and r.ts > stopped_ns and not r.store_up and r.lag > 0,
                what="the tick projection reported down and lagging",
            )
            assert down is not None
            redis_seq = await redis_client.get("projection:cache-redis:seq")
            await asyncio.sleep(OUTAGE_S)  # the outage itself: the flow goes on meanwhile
            lagging = await read_status(redis_client)
            assert lagging["cache-db-ticks"].lag > down.lag  # the backlog grew
            assert lagging["cache-db-prices"].lag > 0 and not lagging["cache-db-prices"].store_up
            assert lagging["cache-redis"].store_up
            assert int(str(await redis_client.get("projection:cache-redis:seq"))) > int(str(redis_seq))  # Redis went on

            await asyncio.to_thread(server.start)
            # Still under load: the backlog drains while new ticks keep coming.
            await eventually(
                lambda: status_of(redis_client, "cache-db-ticks"),
                lambda r: r is not None and r.store_up and r.lag < TICKS_PER_S,
                timeout=30,
                what="the tick projection catching up under load",
            )
        await eventually(lambda: read_status(redis_client), all_caught_up, timeout=30, what="lag back to 0")
        await eventually(lambda: consumers_idle(js), bool, what="every message settled")
    await assert_postgres_holds_the_log(database_url, js)
    await assert_redis_holds_the_last_consensus(redis_client, js)


async def test_redis_stopped_under_load_catches_up_by_itself_while_postgresql_goes_on(
    settings: Settings, nc: NATS, own_redis: RedisServer
) -> None:
    settings = replace(settings, redis_url=own_redis.url)
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    async with service(settings, retry_delay_s=0.2):
        async with flowing(js, settings.assets):
            async with redis_at(own_redis.url) as client:
                await eventually(lambda: client.keys("price:*:seq"), lambda k: len(k) == len(settings.assets))

            await asyncio.to_thread(own_redis.stop)
            before = await count_rows(settings.database_url, "ticks")
            await asyncio.sleep(OUTAGE_S)  # the outage itself: the flow goes on meanwhile
            # PostgreSQL is not held back...
            await eventually(
                lambda: count_rows(settings.database_url, "ticks"), lambda n: n > before + 100, what="ticks stored"
            )
            # ...while JetStream keeps what Redis still owes.
            info = await js.consumer_info(subjects.PRICES_STREAM, "cache-redis")
            stream = await js.stream_info(subjects.PRICES_STREAM)
            assert info.ack_floor.stream_seq < stream.state.last_seq - 10

            await asyncio.to_thread(own_redis.start)  # same port, empty: it kept nothing in memory
            async with redis_at(own_redis.url) as client:
                await eventually(
                    lambda: status_of(client, "cache-redis"),
                    lambda r: r is not None and r.store_up and r.lag < TICKS_PER_S / TICKS_PER_PRICE,
                    timeout=30,
                    what="the Redis projection catching up under load",
                )
        async with redis_at(own_redis.url) as client:
            await eventually(lambda: read_status(client), all_caught_up, timeout=30, what="lag back to 0")
            await eventually(lambda: consumers_idle(js), bool, what="every message settled")
            await assert_redis_holds_the_last_consensus(client, js)
    await assert_postgres_holds_the_log(settings.database_url, js)
