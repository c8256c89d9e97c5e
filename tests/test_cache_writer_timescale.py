"""The TimescaleDB path: hypertables, continuous aggregates, policies. The tests that need the extension run
only against a server with it, named by TIMESCALEDB_URL (e.g. postgresql://postgres:pw@127.0.0.1:5433/postgres,
the image timescale/timescaledb:latest-pg16), and are skipped otherwise, saying so. What can be checked
without it runs on plain PostgreSQL: which policy changes a start makes (pure), the lock they are made
under, and the order key the candle aggregates give first()/last()."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from importlib import resources

import asyncpg
import pytest

from pricewire_cache_writer.candles import INTERVALS, MAX_LIMIT, candles
from pricewire_cache_writer.db_projection import PRICES, Offset, insert_ticks, write_rows
from pricewire_cache_writer.migrate import MIGRATIONS_LOCK_KEY, apply_migrations, packaged_migrations, schema_variant
from pricewire_cache_writer.records import MAX_BIGINT, price_record, tick_record
from pricewire_cache_writer.timescale import (
    Kind,
    Policies,
    PolicyChange,
    apply_policies,
    existing_policies,
    policy_changes,
    refresh_candles,
)
from pricewire_cli.embedded import ensure_database, with_database
from tests.factories import make_tick
from tests.test_cache_writer_candles import T0, T0_NS, brute_candles, random_prices, stored_rows
from tests.waiting import eventually

_names = itertools.count()

CANDLES_SQL = resources.files("pricewire_cache_writer").joinpath("migrations", "0003_candles.timescaledb.sql")


# -- what can be checked on plain PostgreSQL --------------------------------------------------------


def test_a_start_changes_only_the_policies_that_differ() -> None:
    wanted = Policies(compress_after_s=3_600, retention_s=86_400)
    ages: tuple[tuple[Kind, int], ...] = (("compression", 3_600), ("retention", 86_400))
    in_place: dict[tuple[str, Kind], int | None] = {(t, k): a for t in ("ticks", "prices") for k, a in ages}
    assert policy_changes(in_place, wanted) == []  # a second replica, or a restart: nothing to do
    assert policy_changes({}, wanted) == [
        PolicyChange(table=t, kind=k, remove=False, after_s=a) for t in ("ticks", "prices") for k, a in ages
    ]
    other = {**in_place, ("prices", "compression"): 7_200, ("ticks", "retention"): None}  # None: not by age
    assert policy_changes(other, wanted) == [
        PolicyChange(table="ticks", kind="retention", remove=True, after_s=86_400),
        PolicyChange(table="prices", kind="compression", remove=True, after_s=3_600),
    ]
    keep_all = Policies(compress_after_s=3_600, retention_s=None)
    assert policy_changes(in_place, keep_all) == [
        PolicyChange(table=t, kind="retention", remove=True, after_s=None) for t in ("ticks", "prices")
    ]
    assert policy_changes({(t, "compression"): 3_600 for t in ("ticks", "prices")}, keep_all) == []


async def advisory_waiters(pg: asyncpg.Connection) -> int:
    """Sessions waiting for the schema lock now."""
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND ((classid::bigint << 32) | objid::bigint) = $1",
            MIGRATIONS_LOCK_KEY,
        )
    )


async def test_policies_wait_for_the_schema_lock_and_release_it_even_when_they_fail(database_url: str) -> None:
    holder, setter, other = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK_KEY)  # a replica migrating
        setting = asyncio.create_task(apply_policies(setter, Policies()))
        await eventually(lambda: advisory_waiters(other), lambda n: n == 1, what="the policies waiting for the lock")
        assert not setting.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK_KEY)
        # Plain PostgreSQL has no timescaledb_information: the failure is the proof the lock was got.
        with pytest.raises(asyncpg.UndefinedTableError):
            await asyncio.wait_for(setting, timeout=10)
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATIONS_LOCK_KEY)  # released
    finally:
        for conn in (holder, setter, other):
            await conn.close()


def aggregate_order_keys() -> set[str]:
    """The order expressions the candle aggregates give first() and last()."""
    return set(re.findall(r"\b(?:first|last)\((?:price|volume_24h), ([^)]+)\)", CANDLES_SQL.read_text()))


async def test_the_aggregates_order_candles_by_ts_ns_then_seq_as_the_plain_tables_do(pg: asyncpg.Connection) -> None:
    (key,) = aggregate_order_keys()  # one expression for open, close and volume, in both aggregates
    pairs = [(0, MAX_BIGINT), (1, 0), (MAX_BIGINT, 0), (MAX_BIGINT - 1, MAX_BIGINT), (T0_NS, 7), (T0_NS, 6), (0, 0)]
    by_key = await pg.fetch(
        f"SELECT ts_ns, seq FROM unnest($1::bigint[], $2::bigint[]) AS p(ts_ns, seq) ORDER BY {key}",  # our SQL
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    assert [(r["ts_ns"], r["seq"]) for r in by_key] == sorted(pairs)


# -- on a TimescaleDB server -------------------------------------------------------------------------


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
    first = await apply_policies(tsdb, Policies(compress_after_s=3_600, retention_s=86_400))
    assert len(first) == 4
    assert await existing_policies(tsdb) == {
        ("ticks", "compression"): 3_600, ("prices", "compression"): 3_600,
        ("ticks", "retention"): 86_400, ("prices", "retention"): 86_400,
    }  # fmt: skip
    jobs_before = await policy_jobs(tsdb)
    assert await apply_policies(tsdb, Policies(compress_after_s=3_600, retention_s=86_400)) == []
    assert await policy_jobs(tsdb) == jobs_before  # left as they were, not removed and added again
    await apply_policies(tsdb, Policies(compress_after_s=7_200, retention_s=None))
    assert await existing_policies(tsdb) == {("ticks", "compression"): 7_200, ("prices", "compression"): 7_200}
    refresh = await tsdb.fetchval(
        "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate'"
    )
    assert refresh == 2


async def policy_jobs(conn: asyncpg.Connection) -> list[tuple[int, str, str]]:
    rows = await conn.fetch(
        "SELECT job_id, proc_name, hypertable_name FROM timescaledb_information.jobs"
        " WHERE proc_name IN ('policy_compression', 'policy_retention') ORDER BY job_id"
    )
    return [(r["job_id"], r["proc_name"], r["hypertable_name"]) for r in rows]


async def test_replicas_starting_together_set_the_policies_once(timescale_url: str) -> None:
    conns = [await asyncpg.connect(timescale_url) for _ in range(3)]
    try:
        await apply_migrations(conns[0])
        await apply_policies(conns[0], Policies(compress_after_s=3_600, retention_s=86_400))
        wanted = Policies(compress_after_s=7_200, retention_s=172_800)  # new settings, every replica at once
        results = await asyncio.gather(*(apply_policies(c, wanted) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 4]
        assert await existing_policies(conns[0]) == {
            (t, k): a for t in ("ticks", "prices") for k, a in (("compression", 7_200), ("retention", 172_800))
        }
        assert len(await policy_jobs(conns[0])) == 4
    finally:
        for conn in conns:
            await conn.close()


async def test_a_tick_redelivered_is_stored_once_in_the_hypertable(tsdb: asyncpg.Connection) -> None:
    await apply_migrations(tsdb)
    records = [tick_record(make_tick(id=f"t-{i}", ts_exchange=T0_NS + i), stream_seq=i) for i in range(50)]
    assert await insert_ticks(tsdb, records) == 50
    assert await insert_ticks(tsdb, records) == 0


async def test_the_aggregates_give_the_brute_force_candles_before_and_after_a_refresh(tsdb: asyncpg.Connection) -> None:
    await apply_migrations(tsdb)
    rng = random.Random(3)
    prices = random_prices(rng, n=400, assets=("BTC",))  # ties in time are broken by seq, as on plain tables
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
