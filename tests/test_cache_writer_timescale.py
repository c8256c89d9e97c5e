"""The TimescaleDB path: hypertables, continuous aggregates, policies. Runs only against a server with the
extension, named by TIMESCALEDB_URL (e.g. postgresql://postgres:pw@127.0.0.1:5433/postgres, the image
timescale/timescaledb:latest-pg16); skipped otherwise, saying so."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from pricewire_cache_writer.candles import INTERVALS, MAX_LIMIT, candles
from pricewire_cache_writer.db_projection import PRICES, Offset, insert_ticks, write_rows
from pricewire_cache_writer.migrate import apply_migrations, packaged_migrations, schema_variant
from pricewire_cache_writer.records import price_record, tick_record
from pricewire_cache_writer.timescale import Policies, apply_policies, refresh_candles
from pricewire_cli.embedded import ensure_database, with_database
from tests.factories import make_tick
from tests.test_cache_writer_candles import T0, T0_NS, brute_candles, random_prices, stored_rows

_names = itertools.count()


@pytest.fixture
async def timescale_url() -> AsyncIterator[str]:
    """A fresh database on the TimescaleDB server of TIMESCALEDB_URL, dropped afterwards."""
    server = os.environ.get("TIMESCALEDB_URL", "").strip()
    if not server:
        pytest.skip("TIMESCALEDB_URL is not set: no PostgreSQL server with the timescaledb extension to test against")
    name = f"pw_tsdb_test_{os.getpid()}_{next(_names)}"
    maintenance = with_database(server, "postgres")
    url = await ensure_database(maintenance, name)
    yield url
    conn = await asyncpg.connect(maintenance)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # our own generated name
    finally:
        await conn.close()


@pytest.fixture
async def tsdb(timescale_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(timescale_url)
    yield conn
    await conn.close()


async def test_the_schema_takes_the_timescaledb_path_when_the_extension_is_there(tsdb: asyncpg.Connection) -> None:
    versions = [m.version for m in packaged_migrations()]
    assert await apply_migrations(tsdb) == versions
    assert await apply_migrations(tsdb) == []
    assert await schema_variant(tsdb) == "timescaledb"
    hypertables = {r["hypertable_name"] for r in await tsdb.fetch("SELECT * FROM timescaledb_information.hypertables")}
    assert {"ticks", "prices"} <= hypertables
    views = {
        r["view_name"]: r["materialized_only"]
        for r in await tsdb.fetch("SELECT * FROM timescaledb_information.continuous_aggregates")
    }
    assert views == {"candles_1m": False, "candles_1h": False}


async def test_policies_are_set_from_the_settings_and_reset_without_piling_up(tsdb: asyncpg.Connection) -> None:
    await apply_migrations(tsdb)
    await apply_policies(tsdb, Policies(compress_after_s=3_600, retention_s=86_400))
    await apply_policies(tsdb, Policies(compress_after_s=7_200, retention_s=None))
    jobs = await tsdb.fetch(
        "SELECT proc_name, hypertable_name, config FROM timescaledb_information.jobs"
        " WHERE proc_name IN ('policy_compression', 'policy_retention')"
    )
    assert sorted((j["proc_name"], j["hypertable_name"]) for j in jobs) == [
        ("policy_compression", "prices"),
        ("policy_compression", "ticks"),
    ]
    refresh = await tsdb.fetchval(
        "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate'"
    )
    assert refresh == 2


async def test_a_tick_redelivered_is_stored_once_in_the_hypertable(tsdb: asyncpg.Connection) -> None:
    await apply_migrations(tsdb)
    records = [tick_record(make_tick(id=f"t-{i}", ts_exchange=T0_NS + i), stream_seq=i) for i in range(50)]
    assert await insert_ticks(tsdb, records) == 50
    assert await insert_ticks(tsdb, records) == 0


async def test_the_aggregates_give_the_brute_force_candles_before_and_after_a_refresh(tsdb: asyncpg.Connection) -> None:
    await apply_migrations(tsdb)
    rng = random.Random(3)
    prices = random_prices(rng, n=400, assets=("BTC",), ties=False)  # first()/last() break time ties arbitrarily
    records = [price_record(p, stream_seq=i) for i, p in enumerate(prices, start=1)]
    rng.shuffle(records)
    for number, start in enumerate(range(0, len(records), 50), start=1):
        await write_rows(tsdb, PRICES, records[start : start + 50], Offset("cache-db-prices", number))
        await write_rows(tsdb, PRICES, records[start : start + 50], Offset("cache-db-prices", number))  # redelivered
    rows = await stored_rows(tsdb)
    assert len(rows) == len(prices)
    window = (T0 - timedelta(days=1), T0 + timedelta(days=3))

    async def check() -> None:
        for interval, width in INTERVALS.items():
            got = await candles(tsdb, "BTC", interval, start=window[0], end=window[1], limit=MAX_LIMIT)
            assert got == brute_candles(rows, "BTC", width.seconds), interval

    await check()  # real-time: computed from `prices`
    await refresh_candles(tsdb)
    await check()  # materialized


async def test_two_runners_at_once_migrate_a_timescaledb_database_once(timescale_url: str) -> None:
    conns = [await asyncpg.connect(timescale_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert sorted(results) == [[], [], [m.version for m in packaged_migrations()]]
        assert await schema_variant(conns[0]) == "timescaledb"
    finally:
        for conn in conns:
            await conn.close()
