"""Candles of the consensus price: the schema v2 migration, the candles the cache_writer keeps with the
prices, and `candles()` for every interval, checked against a brute-force computation over `prices`."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import NamedTuple
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricewire_cache_writer.candles import INTERVALS, MAX_LIMIT, Candle, bucket_ceil, bucket_floor, candles, window
from pricewire_cache_writer.db_projection import (
    COPY_FROM,
    PRICES,
    PRICES_AND_CANDLES,
    Offset,
    insert_prices,
    write_batch,
    write_rows,
)
from pricewire_cache_writer.errors import CandleQueryError
from pricewire_cache_writer.migrate import apply_migrations, packaged_migrations, schema_variant
from pricewire_cache_writer.records import PriceRecord, price_record
from pricewire_common.events import Price
from tests.factories import make_price

DAY_NS = 86_400 * 10**9
T0 = datetime(2026, 11, 20, tzinfo=UTC)
T0_NS = int(T0.timestamp()) * 10**9
PRICE_DETAILS_SQL = (
    resources.files("pricewire_cache_writer").joinpath("migrations", "0004_price_details.sql").read_text()
)


# -- buckets and parameters (pure) ---------------------------------------------------------------


moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


@given(ts=moments, interval=st.sampled_from(sorted(INTERVALS)))
def test_a_moment_lies_in_the_bucket_its_floor_begins(ts: datetime, interval: str) -> None:
    seconds = INTERVALS[interval].seconds
    low = bucket_floor(ts, seconds)
    assert low <= ts < low + timedelta(seconds=seconds)
    assert int(low.timestamp()) % seconds == 0 and low.microsecond == 0
    high = bucket_ceil(ts, seconds)
    assert high == (low if low == ts else low + timedelta(seconds=seconds))


def test_bad_parameters_are_refused_with_a_message_a_client_can_read() -> None:
    start, end = T0, T0 + timedelta(hours=1)
    with pytest.raises(CandleQueryError, match="interval must be one of 1m, 5m, 15m, 1h, 1d; got '2m'"):
        window("2m", start, end, 10)
    with pytest.raises(CandleQueryError, match="start must carry a time zone"):
        window("1m", start.replace(tzinfo=None), end, 10)
    with pytest.raises(CandleQueryError, match="must be after start"):
        window("1m", end, start, 10)
    with pytest.raises(CandleQueryError, match=f"limit must be between 1 and {MAX_LIMIT}; got 0"):
        window("1m", start, end, 0)


def test_the_window_holds_the_buckets_that_begin_inside_it() -> None:
    paris = datetime(2026, 11, 20, 11, 2, tzinfo=UTC).astimezone(ZoneInfo("Europe/Paris"))
    win = window("5m", paris, paris + timedelta(minutes=10), 10)
    assert (win.low, win.high) == (T0.replace(hour=11, minute=5), T0.replace(hour=11, minute=15))
    assert win.low.utcoffset() == timedelta(0)


# -- brute force -------------------------------------------------------------------------------


class Row(NamedTuple):
    asset: str
    seq: int
    price: Decimal
    volume: Decimal | None
    ts_ns: int
    status: str


def brute_candles(rows: list[Row], asset: str, seconds: int) -> list[Candle]:
    """Candles straight from the definition: group by the bucket of the stored (µs) time, open/close by (ts, seq)."""
    groups: dict[int, list[Row]] = defaultdict(list)
    width_us = seconds * 10**6
    for row in rows:
        if row.asset == asset and row.status != "stale":
            groups[row.ts_ns // 1000 // width_us * width_us].append(row)
    result = []
    for start_us, members in sorted(groups.items()):
        members.sort(key=lambda r: (r.ts_ns, r.seq))
        result.append(
            Candle(
                bucket=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=start_us),
                open=members[0].price,
                high=max(r.price for r in members),
                low=min(r.price for r in members),
                close=members[-1].price,
                volume=members[-1].volume,
                n=len(members),
            )
        )
    return result


def in_window(all_candles: list[Candle], start: datetime, end: datetime, limit: int, *, latest: bool) -> list[Candle]:
    inside = [c for c in all_candles if start <= c.bucket < end]
    return inside[-limit:] if latest else inside[:limit]


def random_prices(rng: random.Random, *, n: int, assets: tuple[str, ...], ties: bool = True) -> list[Price]:
    """Prices over two days in no particular order: ties in time (unless not `ties`), a missing volume now
    and then, some stale."""
    result = []
    seqs = dict.fromkeys(assets, 0)
    level = {a: Decimal(rng.randint(100, 70_000)) for a in assets}
    for _ in range(n):
        asset = rng.choice(assets)
        seqs[asset] += 1
        tied = ties and rng.random() < 0.1
        ts = T0_NS + 3_600 * 10**9 + 123 if tied else T0_NS + rng.randrange(0, 2 * DAY_NS)
        move = Decimal(rng.randint(-500, 500)) / 100
        result.append(
            make_price(
                asset=asset,
                seq=seqs[asset],
                price=max(Decimal("0.01"), level[asset] + move),
                volume_24h=None if rng.random() < 0.1 else Decimal(rng.randint(1, 10**6)) / 10,
                status=rng.choice(("ok", "ok", "ok", "degraded", "stale")),
                ts=ts,
                ts_tick=ts - 1_000_000,
            )
        )
    return result


async def stored_rows(conn: asyncpg.Connection) -> list[Row]:
    return [
        Row(r["asset"], r["seq"], r["price"], r["volume_24h"], r["ts_ns"], r["status"])
        for r in await conn.fetch("SELECT asset, seq, price, volume_24h, ts_ns, status FROM prices")
    ]


async def write_in_shuffled_batches(
    conn: asyncpg.Connection, rng: random.Random, records: list[PriceRecord], *, redeliver: float, copy_from: int
) -> None:
    """The projector's writes in any order, a share of the batches delivered twice (a crash before the ack)."""
    rng.shuffle(records)
    cut = sorted(rng.sample(range(1, len(records)), 12))
    batches = [records[a:b] for a, b in zip([0, *cut], [*cut, len(records)], strict=True)]
    for number, batch in enumerate(batches, start=1):
        offset = Offset("cache-db-prices", number)
        await write_rows(conn, PRICES_AND_CANDLES, batch, offset, copy_from=copy_from)
        if rng.random() < redeliver:
            await write_rows(conn, PRICES_AND_CANDLES, batch, offset, copy_from=copy_from)


@pytest.fixture
async def schema(pg: asyncpg.Connection) -> asyncpg.Connection:
    await apply_migrations(pg)
    return pg


# -- the plain PostgreSQL path -------------------------------------------------------------------


async def test_without_the_extension_the_schema_is_plain_postgresql(schema: asyncpg.Connection) -> None:
    assert await schema_variant(schema) == "postgres"
    kinds = {
        r["relname"]: r["relkind"]
        for r in await schema.fetch(
            "SELECT relname, relkind::text AS relkind FROM pg_class WHERE relname LIKE 'candles_%'"
        )
    }
    assert kinds["candles_1m"] == kinds["candles_1h"] == "r"  # tables, kept by the cache_writer
    variants = await schema.fetch("SELECT version, variant FROM schema_migrations ORDER BY version")
    assert {r["variant"] for r in variants} == {"postgres"}


@pytest.mark.parametrize(("seed", "copy_from"), [(1, COPY_FROM), (2, 1)], ids=["unnest", "copy"])
async def test_candles_match_a_brute_force_over_the_stored_prices_for_every_interval(
    schema: asyncpg.Connection, seed: int, copy_from: int
) -> None:
    rng = random.Random(seed)
    prices = random_prices(rng, n=600, assets=("BTC", "ETH"))
    records = [price_record(p, stream_seq=i) for i, p in enumerate(prices, start=1)]
    await write_in_shuffled_batches(schema, rng, records, redeliver=0.5, copy_from=copy_from)
    rows = await stored_rows(schema)
    assert len(rows) == len(prices)  # redelivered batches added nothing

    everything = (T0 - timedelta(days=1), T0 + timedelta(days=3))
    for asset in ("BTC", "ETH"):
        for interval, width in INTERVALS.items():
            expected = brute_candles(rows, asset, width.seconds)
            got = await candles(schema, asset, interval, start=everything[0], end=everything[1], limit=MAX_LIMIT)
            assert got == expected, (asset, interval)
            # A window that cuts buckets, both ends, and a limit from either side.
            start = T0 + timedelta(seconds=rng.randrange(0, 86_400), microseconds=rng.randrange(10**6))
            end = start + timedelta(seconds=rng.randrange(1, 86_400))
            for latest in (False, True):
                got = await candles(schema, asset, interval, start=start, end=end, limit=7, latest=latest)
                assert got == in_window(expected, start, end, 7, latest=latest), (asset, interval, latest)
    assert await candles(schema, "SOL", "1m", start=everything[0], end=everything[1], limit=10) == []


async def test_a_redelivered_batch_counts_nothing_twice(schema: asyncpg.Connection) -> None:
    batch = [
        price_record(make_price(seq=s, price=Decimal(100 + s), ts=T0_NS + s * 10**9, ts_tick=T0_NS), stream_seq=s)
        for s in range(1, 6)
    ]
    await write_rows(schema, PRICES_AND_CANDLES, batch, Offset("cache-db-prices", 5))
    first = await schema.fetch("SELECT * FROM candles_1m")
    await write_rows(schema, PRICES_AND_CANDLES, batch, Offset("cache-db-prices", 5))
    await write_rows(schema, PRICES_AND_CANDLES, batch[2:3], Offset("cache-db-prices", 3))
    assert await schema.fetch("SELECT * FROM candles_1m") == first
    (candle,) = await candles(schema, "BTC", "1m", start=T0, end=T0 + timedelta(minutes=1), limit=1)
    assert (candle.open, candle.high, candle.low, candle.close, candle.n) == (
        Decimal(101),
        Decimal(105),
        Decimal(101),
        Decimal(105),
        5,
    )


async def test_a_refused_row_leaves_the_candles_of_the_others(schema: asyncpg.Connection, database_url: str) -> None:
    good = [
        price_record(make_price(seq=s, price=Decimal(s), ts=T0_NS + s, ts_tick=T0_NS), stream_seq=s) for s in (1, 2, 3)
    ]
    bad = good[1]._replace(currency="US\x00D")  # past records.py's checks, as a bug there would be
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        written = await write_batch(pool, PRICES_AND_CANDLES, [good[0], bad, good[2]], Offset("cache-db-prices", 3))
    finally:
        await pool.close()
    assert list(written.refused) == [1] and written.applied_seq == 3
    (candle,) = await candles(schema, "BTC", "1m", start=T0, end=T0 + timedelta(minutes=1), limit=1)
    assert (candle.open, candle.close, candle.n) == (Decimal(1), Decimal(3), 2)


async def test_insert_prices_keeps_the_candles_unless_told_otherwise(schema: asyncpg.Connection) -> None:
    btc = [price_record(make_price(seq=1, ts=T0_NS, ts_tick=T0_NS), stream_seq=1)]
    eth = [price_record(make_price(asset="ETH", seq=1, ts=T0_NS, ts_tick=T0_NS), stream_seq=2)]
    assert await insert_prices(schema, btc) == 1
    assert await insert_prices(schema, eth, candles=False) == 1
    assert [r["asset"] for r in await schema.fetch("SELECT asset FROM candles_1m")] == ["BTC"]


async def test_the_candles_migration_summarises_the_prices_stored_before_it(pg: asyncpg.Connection) -> None:
    before_candles = [m for m in packaged_migrations() if m.version < 3]
    await apply_migrations(pg, before_candles)
    await pg.execute(PRICE_DETAILS_SQL)  # today's writer, which fills the old rows here, needs v4's columns
    rng = random.Random(5)
    prices = random_prices(rng, n=200, assets=("BTC",))
    # Prices only, as the cache_writer wrote them before version 3.
    await write_rows(pg, PRICES, [price_record(p, stream_seq=i) for i, p in enumerate(prices, 1)], Offset("x", 1))
    assert await apply_migrations(pg) == [3, 4]
    rows = await stored_rows(pg)
    for interval in ("1m", "1h"):
        got = await candles(pg, "BTC", interval, start=T0, end=T0 + timedelta(days=2), limit=MAX_LIMIT)
        assert got == brute_candles(rows, "BTC", INTERVALS[interval].seconds)

    # Run again by hand, the migration changes nothing: it is idempotent in itself, not only by the ledger.
    before = await pg.fetch("SELECT * FROM candles_1m ORDER BY asset, bucket")
    sql = resources.files("pricewire_cache_writer").joinpath("migrations", "0003_candles.sql").read_text()
    await pg.execute(sql)
    assert await pg.fetch("SELECT * FROM candles_1m ORDER BY asset, bucket") == before


async def test_replicas_upgrading_together_summarise_the_old_prices_once(
    pg: asyncpg.Connection, database_url: str
) -> None:
    await apply_migrations(pg, [m for m in packaged_migrations() if m.version < 3])
    await pg.execute(PRICE_DETAILS_SQL)
    prices = random_prices(random.Random(8), n=300, assets=("BTC", "ETH"))
    await write_rows(pg, PRICES, [price_record(p, stream_seq=i) for i, p in enumerate(prices, 1)], Offset("x", 1))
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(results) == [[], [], [3, 4]]
    live = sum(1 for p in prices if p.status != "stale")
    assert await pg.fetchval("SELECT sum(n) FROM candles_1m") == live
    assert await pg.fetchval("SELECT sum(n) FROM candles_1h") == live


async def test_a_day_of_minutes_is_one_query_on_the_primary_key(schema: asyncpg.Connection) -> None:
    records = [
        price_record(make_price(seq=m + 1, ts=T0_NS + m * 60 * 10**9, ts_tick=T0_NS), stream_seq=m + 1)
        for m in range(1_440)
    ]
    await write_rows(schema, PRICES_AND_CANDLES, records, Offset("cache-db-prices", 1_440))
    day = await candles(schema, "BTC", "1m", start=T0, end=T0 + timedelta(days=1), limit=MAX_LIMIT)
    assert len(day) == 1_440 and day[0].bucket == T0 and day[-1].bucket == T0 + timedelta(minutes=1_439)
    (daily,) = await candles(schema, "BTC", "1d", start=T0, end=T0 + timedelta(days=1), limit=1)
    assert daily.n == 1_440
