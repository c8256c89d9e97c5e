"""Projection offsets: each store keeps the stream sequence it applied through, atomically with its rows,
and the cache_writer reports every projection's lag to `projection:status`."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS

from pricewire_cache_writer.db_projection import PRICES, TICKS, Offset, PostgresPrices, PostgresTicks, write_rows
from pricewire_cache_writer.migrate import apply_migrations
from pricewire_cache_writer.progress import Progress, ProjectionStatus, decode_status, encode_status, lag, status
from pricewire_cache_writer.records import TickRecord, price_record, tick_record
from pricewire_cache_writer.redis_projection import RedisPrices, StreamPrice
from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.config import Settings
from pricewire_common.consumer import durable_pull, stream_seq
from pricewire_common.keys import PROJECTION_STATUS_KEY, projection_seq_key
from tests.factories import TS, make_price, make_tick
from tests.test_cache_writer import consumers_idle, count, proxy_to, publish_prices, publish_ticks, service, ticks
from tests.test_cache_writer_records import ASSETS
from tests.waiting import eventually

REDIS_OFFSET = projection_seq_key("cache-redis")


# -- the pure part -------------------------------------------------------------------------------


def test_lag_is_what_the_stream_holds_beyond_the_offset_and_never_negative() -> None:
    assert lag(120, 100) == 20
    assert lag(100, 100) == 0
    assert lag(5, 100) == 0  # a stream recreated below the offset


def test_a_status_report_round_trips_through_its_json() -> None:
    progress = Progress(written=7, rejected=1, retried=2, batches=3, applied_seq=40, store_up=False)
    report = status(
        projection="cache-db-ticks", stream="TICKS", store="postgres", progress=progress, stream_last_seq=55, ts=123
    )
    assert report.lag == 15 and not report.store_up
    assert decode_status(encode_status(report)) == report


# -- Redis ---------------------------------------------------------------------------------------


async def test_the_redis_offset_moves_with_the_keys_and_never_back(redis_client: redis_asyncio.Redis) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    batch = [StreamPrice(make_price(seq=s), stream_seq=10 + s) for s in (1, 2, 3)]
    written = await projection.write(batch, through_seq=13)
    assert written.applied_seq == 13 and not written.refused
    assert await redis_client.get(REDIS_OFFSET) == "13"
    assert await redis_client.get("price:BTC:seq") == "3"

    # Redelivered after a crash between the write and the ack: nothing changes.
    assert (await projection.write(batch, through_seq=13)).applied_seq == 13
    assert await redis_client.get("price:BTC:seq") == "3"
    # A batch nak'd earlier and delivered late: its prices are older, and the offset stays ahead.
    late = [StreamPrice(make_price(seq=9), stream_seq=5)]
    assert (await projection.write(late, through_seq=5)).applied_seq == 13
    assert await redis_client.get("price:BTC:seq") == "9"  # applied on its own seq, not by the offset
    assert await projection.load_offset() == 13


async def test_a_batch_of_dead_letters_only_still_moves_the_redis_offset(redis_client: redis_asyncio.Redis) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    assert await projection.load_offset() == 0
    assert (await projection.write([], through_seq=4)).applied_seq == 4
    assert await redis_client.get(REDIS_OFFSET) == "4"
    assert await redis_client.keys("price:*") == []


async def test_the_offset_compares_exactly_beyond_double_precision(redis_client: redis_asyncio.Redis) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    await projection.write([StreamPrice(make_price(seq=1), stream_seq=2**53 + 1)], through_seq=2**53 + 1)
    assert (await projection.write([], through_seq=2**53)).applied_seq == 2**53 + 1
    assert (await projection.write([], through_seq=10**17)).applied_seq == 10**17


async def test_applying_without_a_stream_seq_leaves_the_offset_alone(redis_client: redis_asyncio.Redis) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    assert await projection.apply(make_price(seq=1))
    assert await projection.apply_all([make_price(seq=2)]) == [True]
    assert await redis_client.get(REDIS_OFFSET) is None


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
async def schema(pg: asyncpg.Connection) -> asyncpg.Connection:
    await apply_migrations(pg)
    return pg


async def offset_of(pg: asyncpg.Connection, projection: str) -> int | None:
    seq: int | None = await pg.fetchval("SELECT stream_seq FROM projection_offsets WHERE projection = $1", projection)
    return seq


async def test_the_offset_commits_with_the_rows_or_not_at_all(schema: asyncpg.Connection) -> None:
    records = [tick_record(t, stream_seq=i + 1) for i, t in enumerate(ticks(5))]
    tx = schema.transaction()
    await tx.start()
    await write_rows(schema, TICKS, records, Offset("cache-db-ticks", 5))
    await tx.rollback()  # the process died before COMMIT
    assert (await count(schema, "ticks"), await offset_of(schema, "cache-db-ticks")) == (0, None)

    written = await write_rows(schema, TICKS, records, Offset("cache-db-ticks", 5))
    assert written.applied_seq == 5
    assert (await count(schema, "ticks"), await offset_of(schema, "cache-db-ticks")) == (5, 5)


async def test_a_redelivered_or_late_batch_changes_neither_rows_nor_offset(schema: asyncpg.Connection) -> None:
    first = [tick_record(t, stream_seq=i + 1) for i, t in enumerate(ticks(5))]
    await write_rows(schema, TICKS, first, Offset("cache-db-ticks", 5))
    later = [tick_record(t, stream_seq=i + 6) for i, t in enumerate(ticks(5, prefix="later"))]
    await write_rows(schema, TICKS, later, Offset("cache-db-ticks", 10))
    before = await schema.fetch("SELECT * FROM ticks ORDER BY id")

    assert (await write_rows(schema, TICKS, first, Offset("cache-db-ticks", 5))).applied_seq == 10
    assert await schema.fetch("SELECT * FROM ticks ORDER BY id") == before
    assert await offset_of(schema, "cache-db-ticks") == 10


async def test_copy_and_unnest_store_the_same_rows_and_offsets(schema: asyncpg.Connection) -> None:
    def batch(prefix: str) -> list[TickRecord]:
        texts = ["47000.50", "0.00000001", "123456789012345678901234567890.123456789012345678", "1.10"]
        return [
            tick_record(
                make_tick(id=f"{prefix}-{i}", price=Decimal(texts[i % 4]), bid=None if i % 3 else Decimal("1.0")),
                stream_seq=i + 1,
            )
            for i in range(300)
        ]

    # A fresh connection: its first COPY also makes its staging table.
    by_copy = await write_rows(schema, TICKS, batch("c"), Offset("copy", 300), copy_from=1)
    by_unnest = await write_rows(schema, TICKS, batch("u"), Offset("unnest", 300), copy_from=10_000)
    assert by_copy.applied_seq == by_unnest.applied_seq == 300
    again = await write_rows(schema, TICKS, batch("c"), Offset("copy", 200), copy_from=1)  # redelivered
    assert again.applied_seq == 300

    def without_id(rows: list[asyncpg.Record]) -> list[tuple[object, ...]]:
        return [tuple(r.values())[1:] for r in rows]

    copied = await schema.fetch("SELECT * FROM ticks WHERE id LIKE 'c-%' ORDER BY stream_seq")
    unnested = await schema.fetch("SELECT * FROM ticks WHERE id LIKE 'u-%' ORDER BY stream_seq")
    assert len(copied) == 300 and without_id(copied) == without_id(unnested)
    digits = {str(r["price"]) for r in copied}
    assert "123456789012345678901234567890.123456789012345678" in digits and "1.10" in digits
    # The staging table is emptied at each commit: nothing of a batch lingers into the next.
    assert await schema.fetchval("SELECT count(*) FROM ticks_stage") == 0


async def test_a_batch_inside_a_callers_transaction_is_not_copied(schema: asyncpg.Connection) -> None:
    records = [tick_record(t, stream_seq=i + 1) for i, t in enumerate(ticks(5))]
    async with schema.transaction():
        await write_rows(schema, TICKS, records, Offset("cache-db-ticks", 5), copy_from=1)
        await write_rows(schema, TICKS, records, Offset("cache-db-ticks", 5), copy_from=1)
    assert await count(schema, "ticks") == 5
    assert await schema.fetchval("SELECT to_regclass('pg_temp.ticks_stage')") is None  # unnest was used


async def test_each_projection_has_its_own_offset(schema: asyncpg.Connection) -> None:
    await write_rows(schema, TICKS, [tick_record(ticks(1)[0], stream_seq=40)], Offset("cache-db-ticks", 40))
    prices = [price_record(make_price(seq=s, price=Decimal("47000") + s), stream_seq=s) for s in (1, 2)]
    await write_rows(schema, PRICES, prices, Offset("cache-db-prices", 2))
    await write_rows(schema, PRICES, [], Offset("cache-db-prices", 3))  # a dead-lettered message
    rows = await schema.fetch("SELECT projection, stream_seq FROM projection_offsets ORDER BY projection")
    assert [(r["projection"], r["stream_seq"]) for r in rows] == [("cache-db-prices", 3), ("cache-db-ticks", 40)]


# -- the service ---------------------------------------------------------------------------------


async def read_status(client: redis_asyncio.Redis) -> dict[str, ProjectionStatus]:
    raw = await client.hgetall(PROJECTION_STATUS_KEY)
    return {str(name): decode_status(value) for name, value in raw.items()}


def caught_up(reports: dict[str, ProjectionStatus], *, ticks_seq: int, prices_seq: int) -> bool:
    expected = {"cache-redis": prices_seq, "cache-db-ticks": ticks_seq, "cache-db-prices": prices_seq}
    return all(
        name in reports and reports[name].applied_seq == seq and reports[name].lag == 0 and reports[name].store_up
        for name, seq in expected.items()
    )


async def test_the_service_stores_offsets_and_reports_lag_through_an_outage(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(30, prefix="a"))
    await publish_prices(js, [make_price(seq=s) for s in (1, 2)])
    async with proxy_to(settings.database_url) as proxy:
        proxied = replace(settings, database_url=proxy.url)
        async with service(proxied, retry_delay_s=0.1):
            await eventually(
                lambda: read_status(redis_client),
                lambda r: caught_up(r, ticks_seq=30, prices_seq=2),
                what="every projection caught up",
            )
            assert await offset_of(pg, "cache-db-ticks") == 30
            assert await offset_of(pg, "cache-db-prices") == 2
            assert await redis_client.get(REDIS_OFFSET) == "2"

            await proxy.cut()
            await publish_ticks(js, ticks(20, prefix="b"))
            reports = await eventually(
                lambda: read_status(redis_client),
                lambda r: r["cache-db-ticks"].lag == 20 and not r["cache-db-ticks"].store_up,
                what="the tick projection's lag while PostgreSQL is down",
            )
            assert reports["cache-db-ticks"].applied_seq == 30
            assert reports["cache-redis"].lag == 0  # the other store is not held back

            await proxy.restore()
            await eventually(
                lambda: read_status(redis_client),
                lambda r: caught_up(r, ticks_seq=50, prices_seq=2),
                what="caught up after the outage",
            )
            await eventually(lambda: consumers_idle(js), bool, what="every message settled")
    assert await offset_of(pg, "cache-db-ticks") == 50
    assert await count(pg, "ticks") == 50
    info = await js.stream_info(subjects.TICKS_STREAM)
    assert info.state.last_seq == 50


async def test_a_batch_written_but_never_acked_is_redelivered_and_doubles_nothing(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    """The crash between commit and ack: a writer stores a batch and dies before acking it; JetStream
    redelivers the batch to the next writer, which must change nothing (rows, candle counts, offsets)."""
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(120))
    prices = [make_price(seq=s, price=Decimal(47000 + s), ts=TS + s * 7 * 10**9, ts_tick=TS) for s in range(1, 41)]
    await publish_prices(js, prices)
    await apply_migrations(pg)

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        # The writer that dies: real consumers of the service's names, a real write, no ack.
        redis_projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
        projections: list[tuple[str, str, Any]] = [
            (subjects.TICKS_STREAM, subjects.ALL_TICKS, PostgresTicks(pool, assets=ASSETS)),
            (subjects.PRICES_STREAM, subjects.ALL_PRICES, PostgresPrices(pool, assets=ASSETS)),
            (subjects.PRICES_STREAM, subjects.ALL_PRICES, redis_projection),
        ]
        for stream, subject, projection in projections:
            sub = await durable_pull(
                js,
                stream=stream,
                durable=projection.name,
                filter_subject=subject,
                ack_wait_s=settings.streams.ack_wait_s,
            )
            msgs = await sub.fetch(60, timeout=5)
            items = [projection.decode(m.subject, m.data, stream_seq(m)) for m in msgs]
            await projection.write(items, through_seq=stream_seq(msgs[-1]))
            await sub.unsubscribe()
    finally:
        await pool.close()
    candles_before = await pg.fetchval("SELECT sum(n) FROM candles_1m")
    assert candles_before == 40  # the first 60 prices held all 40 of them

    async with service(settings):
        await eventually(lambda: consumers_idle(js), bool, what="the redelivered and the new messages settled")
        await eventually(
            lambda: read_status(redis_client),
            lambda r: caught_up(r, ticks_seq=120, prices_seq=40),
            what="offsets at the streams' ends",
        )
    # The unacked batch was delivered again (each delivery takes a consumer sequence).
    info = await js.consumer_info(subjects.TICKS_STREAM, "cache-db-ticks")
    assert info.delivered.consumer_seq == 120 + 60
    assert await count(pg, "ticks") == 120
    assert await pg.fetchval("SELECT count(DISTINCT id) FROM ticks") == 120
    assert await count(pg, "prices") == 40
    assert await pg.fetchval("SELECT sum(n) FROM candles_1m") == 40
    assert await pg.fetchval("SELECT sum(n) FROM candles_1h") == 40
    assert await offset_of(pg, "cache-db-ticks") == 120
    assert await offset_of(pg, "cache-db-prices") == 40
    assert await redis_client.get(REDIS_OFFSET) == "40"
    assert await redis_client.get("price:BTC:seq") == "40"
