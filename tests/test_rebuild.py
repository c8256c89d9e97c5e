"""`pricewire rebuild` and `pricewire replay`, run as the command an operator types, against a pipeline's
real output on NATS, Redis and PostgreSQL: the projections come back the same, a replay changes nothing,
and a rebuild that would lose history refuses unless forced."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, DeliverPolicy
from typer.testing import CliRunner

from pricewire_cache_writer.db_projection import PostgresTicks
from pricewire_cache_writer.errors import ReplayStopped
from pricewire_cache_writer.migrate import apply_migrations, schema_variant
from pricewire_cache_writer.redis_projection import RedisPrices, StreamPrice
from pricewire_cache_writer.replay import StreamProgress, StreamReplay, consumer_config, rebuild
from pricewire_cache_writer.reset import Held
from pricewire_cache_writer.service import run as run_cache_writer
from pricewire_cli.app import app
from pricewire_cli.embedded import free_port
from pricewire_collector.service import run as run_collector
from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.clock import NS_PER_S
from pricewire_common.config import Settings
from pricewire_common.events import decode_tick
from pricewire_validator.service import run as run_validator
from tests import test_cache_writer_timescale
from tests.factories import make_price
from tests.pipeline import running, service_env
from tests.projections import (
    RedisState,
    brute_minute_counts,
    events_in_log,
    last_consensus,
    prices_in_log,
    redis_state,
    stored_minute_counts,
    table_rows,
)
from tests.test_cache_writer import (
    consumers_idle,
    count,
    next_published,
    price_channel,
    publish_prices,
    publish_ticks,
    ticks,
)
from tests.test_cache_writer_records import ASSETS
from tests.waiting import eventually

pytestmark = pytest.mark.slow

timescale_url = test_cache_writer_timescale.timescale_url
"""A database on the server TIMESCALEDB_URL names; the test that needs it is skipped without one."""

EXPIRY_SLACK_MS = 1_500
"""A replayed key expires `ttl` after its event's `ts`; the live one `ttl` after the cache_writer applied it."""


@dataclass(frozen=True, slots=True)
class Ran:
    code: int
    out: str
    err: str


async def pricewire(settings: Settings, *args: str) -> Ran:
    """`python -m pricewire_cli ARGS` with this test's servers in its environment, as a user runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pricewire_cli", *args,
        env=service_env(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def applied(ran: Ran) -> int:
    """The total of events applied, from the summary's last line."""
    match = re.search(r"^total: ([\d,]+) events applied", ran.out, re.MULTILINE)
    assert match is not None, ran.out + ran.err
    return int(match[1].replace(",", ""))


async def produce(settings: Settings, nc: NATS, pg: asyncpg.Connection, *, prices: int, ticks: int = 0) -> None:
    """Sim feed -> validator -> cache_writer until `prices` consensus prices and `ticks` ticks are stored; then the feed
    and the validator stop and the cache_writer settles everything before it stops too."""
    js = nc.jetstream()
    writer_stop, validator_stop, collector_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    async with running(asyncio.create_task(run_cache_writer(settings, writer_stop)), writer_stop):
        async with (
            running(asyncio.create_task(run_validator(settings, validator_stop)), validator_stop),
            running(asyncio.create_task(run_collector(settings, collector_stop)), collector_stop),
        ):
            await eventually(lambda: count(pg, "prices"), lambda n: n >= prices, timeout=30, what="prices")
            await eventually(lambda: count(pg, "ticks"), lambda n: n >= ticks, timeout=30, what="ticks")
        await eventually(lambda: consumers_idle(js), bool, what="the cache_writer settled")


def assert_same_redis(rebuilt: RedisState, live: RedisState) -> None:
    assert rebuilt.values == live.values
    assert rebuilt.expiries_ms.keys() == live.expiries_ms.keys()
    for key, expiry in live.expiries_ms.items():
        assert abs(rebuilt.expiries_ms[key] - expiry) <= EXPIRY_SLACK_MS, key


async def test_a_rebuild_gives_back_the_same_projections_and_a_replay_changes_nothing(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    await produce(settings, nc, pg, prices=80)
    js = nc.jetstream()
    live_rows, live_redis = await table_rows(pg), await redis_state(redis_client)
    ticks_info = await js.stream_info(subjects.TICKS_STREAM)
    prices_info = await js.stream_info(subjects.PRICES_STREAM)
    assert len(live_rows["ticks"]) == ticks_info.state.messages > 200
    assert len(live_rows["prices"]) == prices_info.state.messages >= 80
    assert live_rows["candles_1m"] and live_rows["candles_1h"]
    assert any(key.endswith(":detail") for key in live_redis.values)

    await redis_client.flushdb()
    await pg.execute("TRUNCATE ticks, prices, candles_1m, candles_1h, projection_offsets")
    ran = await pricewire(settings, "rebuild", "--projection", "all")
    assert ran.code == 0, ran.err
    assert applied(ran) == ticks_info.state.messages + prices_info.state.messages

    rebuilt_rows = await table_rows(pg)
    for table, rows in live_rows.items():
        assert rebuilt_rows[table] == rows, table
    assert_same_redis(await redis_state(redis_client), live_redis)
    # Nothing rebuilt was announced to the live price channel's clients as news: checked by the script's
    # own test; here the offsets say where each projection stands.
    assert await redis_client.get("projection:cache-redis:seq") == str(prices_info.state.last_seq)

    # A tail of both streams applied again: every event is already there, so nothing changes.
    tail_from = prices_info.state.last_seq // 2
    ran = await pricewire(settings, "replay", "--projection", "all", "--seq", str(tail_from))
    assert ran.code == 0, ran.err
    tail = (ticks_info.state.last_seq - tail_from + 1) + (prices_info.state.last_seq - tail_from + 1)
    assert applied(ran) == tail
    replayed_rows = await table_rows(pg)
    for table, rows in live_rows.items():
        assert replayed_rows[table] == rows, table
    assert_same_redis(await redis_state(redis_client), live_redis)


async def test_a_rebuild_that_would_lose_rows_the_log_no_longer_has_refuses_unless_forced(
    settings: Settings, nc: NATS, pg: asyncpg.Connection
) -> None:
    await produce(settings, nc, pg, prices=10, ticks=150)
    js = nc.jetstream()
    stored = await count(pg, "ticks")
    await js.purge_stream(subjects.TICKS_STREAM, keep=50)  # what retention does to old ticks

    refused = await pricewire(settings, "rebuild", "--projection", "db")
    assert refused.code == 1
    assert "not rebuilding: ticks holds rows from stream sequence 1" in refused.err
    assert await count(pg, "ticks") == stored > 50  # untouched

    forced = await pricewire(settings, "rebuild", "--projection", "db", "--force")
    assert forced.code == 0, forced.err
    kept = {tick.id for _, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick)}
    assert {r["id"] for r in await pg.fetch("SELECT id FROM ticks")} == kept
    assert len(kept) == 50
    prices = await prices_in_log(js)
    assert await count(pg, "prices") == len(prices)
    assert await stored_minute_counts(pg) == brute_minute_counts(prices)


async def test_a_rebuild_under_a_running_pipeline_loses_and_doubles_nothing(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    """The cache_writer keeps writing while the rebuild empties and refills its stores: what it commits
    before the emptying is replayed, what it commits after is kept, and its durable consumers go on."""
    js = nc.jetstream()
    writer_stop, validator_stop, collector_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    async with running(asyncio.create_task(run_cache_writer(settings, writer_stop)), writer_stop):
        async with (
            running(asyncio.create_task(run_validator(settings, validator_stop)), validator_stop),
            running(asyncio.create_task(run_collector(settings, collector_stop)), collector_stop),
        ):
            await eventually(lambda: count(pg, "prices"), lambda n: n >= 30, timeout=30, what="prices")
            ran = await pricewire(settings, "rebuild")
            assert ran.code == 0, ran.err
            before = await count(pg, "ticks")
            await eventually(lambda: count(pg, "ticks"), lambda n: n > before + 50, what="writing goes on")
        await eventually(lambda: consumers_idle(js), bool, what="the cache_writer settled")

    logged = [tick.id for _, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick)]
    stored = [r["id"] for r in await pg.fetch("SELECT id FROM ticks")]
    assert sorted(stored) == sorted(logged)  # every tick of the log, once
    prices = await prices_in_log(js)
    assert await count(pg, "prices") == len(prices)
    assert await stored_minute_counts(pg) == brute_minute_counts(prices)
    for asset, last in last_consensus(prices).items():
        assert await redis_client.get(f"price:{asset}:seq") == str(last.seq)
        assert await redis_client.get(f"price:{asset}:detail") is not None


async def test_a_replayed_price_is_silent_and_expires_a_ttl_after_its_own_time(
    redis_url: str, redis_client: redis_asyncio.Redis
) -> None:
    projection = RedisPrices.for_replay(redis_client, ttl_s=60, assets=ASSETS)
    now = time.time_ns()
    async with price_channel(redis_url) as pubsub:
        # Older than the TTL: the live copy has expired, so the replay leaves no key (the seq still counts).
        old = make_price(seq=1, ts=now - 90 * NS_PER_S)
        written = await projection.write([StreamPrice(old, 1)], through_seq=1)
        assert written.applied_seq == 1
        assert await redis_client.exists("price:BTC", "price:BTC:detail") == 0
        assert await redis_client.get("price:BTC:seq") == "1"
        # 20 s old: 40 s left, as the live writer's copy has.
        recent = make_price(seq=2, ts=now - 20 * NS_PER_S)
        await projection.write([StreamPrice(recent, 2)], through_seq=2)
        assert 38_000 < await redis_client.pttl("price:BTC") <= 40_000
        assert 38_000 < await redis_client.pttl("price:BTC:detail") <= 40_000
        # A stale repeat keeps that expiry, as live.
        await projection.write([StreamPrice(make_price(seq=3, status="stale", ts=now), 3)], through_seq=3)
        assert await redis_client.pttl("price:BTC") <= 40_000
        # Nothing of it reached the channel: a live event published now is the first message there.
        await RedisPrices(redis_client, ttl_s=60, assets=ASSETS).apply(make_price(seq=4, ts=now))
        assert (await next_published(pubsub)).seq == 4


async def test_a_replay_whose_consumer_is_lost_carries_on_with_a_new_one_and_applies_each_event_once(
    settings: Settings, nc: NATS, database_url: str
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(300))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn)
        lost: list[str] = []

        def lose_the_consumer(progress: StreamProgress) -> None:
            # After the first batch, as a server restart or an inactivity timeout would.
            if not lost and not progress.done:
                lost.append("yes")
                deleting.append(asyncio.create_task(delete_replay_consumers(js)))

        deleting: list[asyncio.Task[None]] = []
        projection = PostgresTicks(pool, assets=ASSETS)
        replay = StreamReplay(
            nc,
            stream=subjects.TICKS_STREAM,
            filter_subject=subjects.ALL_TICKS,
            projections=[projection],
            batch=40,
            on_progress=lose_the_consumer,
            idle_s=0.5,
        )
        progress = await asyncio.wait_for(replay.run(None), timeout=30)
        await asyncio.gather(*deleting)
        async with pool.acquire() as conn:
            stored = [r["id"] for r in await conn.fetch("SELECT id FROM ticks")]
            offset = await conn.fetchval(
                "SELECT stream_seq FROM projection_offsets WHERE projection = 'cache-db-ticks'"
            )
    finally:
        await pool.close()
    assert lost
    assert sorted(stored) == sorted(t.id for t in ticks(300))
    assert (progress.applied, progress.first_seq, progress.through_seq, offset) == (300, 1, 300, 300)
    assert [c.name for c in await js.consumers_info(subjects.TICKS_STREAM)] == []  # none left behind


async def delete_replay_consumers(js: JetStreamContext) -> None:
    for consumer in await js.consumers_info(subjects.TICKS_STREAM):
        await js.delete_consumer(subjects.TICKS_STREAM, consumer.name)


async def test_a_replay_gives_up_on_a_store_that_stays_down_and_says_where_to_resume(
    settings: Settings, nc: NATS
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(10))
    pool = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/none", min_size=0)
    try:
        replay = StreamReplay(
            nc,
            stream=subjects.TICKS_STREAM,
            filter_subject=subjects.ALL_TICKS,
            projections=[PostgresTicks(pool, assets=ASSETS)],
            batch=5,
            retry_delay_s=0.05,
            give_up_after_s=0.3,
        )
        with pytest.raises(ReplayStopped) as stopped:
            await asyncio.wait_for(replay.run(3), timeout=30)
    finally:
        await pool.close()
    assert (stopped.value.stream, stopped.value.resume_seq) == (subjects.TICKS_STREAM, 3)
    assert replay.progress.retried > 0


async def test_a_rebuild_on_timescaledb_empties_and_refreshes_the_candle_aggregates(
    settings: Settings, nc: NATS, timescale_url: str
) -> None:
    settings = replace(settings, database_url=timescale_url)
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    now = time.time_ns()
    prices = [
        make_price(seq=s, price=Decimal(47000 + s), ts=now - (200 - s) * 7 * NS_PER_S, ts_tick=now)
        for s in range(1, 201)
    ]
    await publish_prices(js, prices)
    await publish_ticks(js, ticks(100))
    first = await rebuild(settings, projection="db")
    again = await rebuild(settings, projection="db")  # empties what the first one wrote, aggregates included
    conn = await asyncpg.connect(timescale_url)
    try:
        assert await schema_variant(conn) == "timescaledb"
        assert (await count(conn, "ticks"), await count(conn, "prices")) == (100, 200)
        assert await stored_minute_counts(conn) == brute_minute_counts(prices)
    finally:
        await conn.close()
    assert first.applied == again.applied == 300


def test_a_replay_consumer_starts_where_it_is_told_and_acks_nothing() -> None:
    assert consumer_config("TICKS", None, "md.tick.>").deliver_policy == DeliverPolicy.ALL
    by_seq = consumer_config("TICKS", 42, "md.tick.>")
    assert (by_seq.deliver_policy, by_seq.opt_start_seq) == (DeliverPolicy.BY_START_SEQUENCE, 42)
    moment = datetime(2026, 11, 22, 10, tzinfo=UTC)
    by_time = consumer_config("PRICES", moment, "md.price.>")
    assert (by_time.deliver_policy, by_time.opt_start_time) == (DeliverPolicy.BY_START_TIME, moment)
    assert by_seq.ack_policy == AckPolicy.NONE and by_seq.durable_name is None
    assert by_seq.inactive_threshold is not None  # a killed replay leaves nothing behind for long
    with pytest.raises(ValueError, match="time zone"):
        consumer_config("TICKS", datetime(2026, 11, 22), "md.tick.>")


def test_a_table_the_log_no_longer_covers_is_reported() -> None:
    covered = Held("ticks", "TICKS", rows=10, oldest_seq=5, messages=10, first_seq=5)
    assert covered.loss() is None
    assert Held("ticks", "TICKS", rows=0, oldest_seq=None, messages=0, first_seq=0).loss() is None
    expired = Held("ticks", "TICKS", rows=10, oldest_seq=1, messages=6, first_seq=5)
    assert expired.loss() == "holds rows from stream sequence 1, the log only from 5"
    recreated = Held("prices", "PRICES", rows=10, oldest_seq=3, messages=4, first_seq=1)
    assert recreated.loss() == "holds 10 rows, the log only 4 messages"


def test_bad_options_are_refused_with_a_clear_message() -> None:
    runner = CliRunner()
    for args, message in (
        (["replay", "--from", "2026-11-22T10:00:00"], "has no time zone"),
        (["replay", "--from", "yesterday"], "is not an ISO 8601 time"),
        (["replay", "--from", "2026-11-22T10:00:00Z", "--seq", "5"], "not both"),
        (["replay", "--seq", "0"], "1 or more"),
        (["rebuild", "--projection", "mongo"], "must be one of redis, db, all"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, args
        assert message in result.output, (args, result.output)


async def test_a_replay_from_a_time_applies_only_what_the_log_took_in_at_or_after_it(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(20, prefix="before"))
    await publish_prices(js, [make_price(seq=1), make_price(seq=2)])
    await publish_ticks(js, ticks(15, prefix="after"))
    await publish_prices(js, [make_price(seq=3), make_price(seq=4)])
    # JetStream's receipt times, which --from compares with, truncated to microseconds by nats-py: a start at the
    # first "after" message's time still takes it in, and the last message before it is in an earlier microsecond.
    since = (await js.get_msg(subjects.TICKS_STREAM, 21)).time
    last_before = (await js.get_msg(subjects.PRICES_STREAM, 2)).time
    assert since is not None and last_before is not None
    assert last_before < since  # so a start at `since` splits both streams between the two halves

    ran = await pricewire(settings, "replay", "--projection", "all", "--from", since.isoformat())
    assert ran.code == 0, ran.err
    assert applied(ran) == 15 + 2
    assert re.search(r"^TICKS .*: 15 events applied, 0 rejected \(seq 21\.\.35, stream ends at 35\)", ran.out, re.M)
    assert re.search(r"^PRICES .*: 2 events applied, 0 rejected \(seq 3\.\.4, stream ends at 4\)", ran.out, re.M)
    assert sorted(r["id"] for r in await pg.fetch("SELECT id FROM ticks")) == sorted(
        t.id for t in ticks(15, prefix="after")
    )
    assert [r["seq"] for r in await pg.fetch("SELECT seq FROM prices ORDER BY seq")] == [3, 4]
    assert await pg.fetchval("SELECT sum(n) FROM candles_1m") == 2
    offsets = {r["projection"]: r["stream_seq"] for r in await pg.fetch("SELECT * FROM projection_offsets")}
    assert offsets == {"cache-db-ticks": 35, "cache-db-prices": 4}
    assert await redis_client.get("price:BTC:seq") == "4"
    assert await redis_client.get("projection:cache-redis:seq") == "4"
