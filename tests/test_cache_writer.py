"""The cache writer against real PostgreSQL, Redis and NATS: migrations, projections, the service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from pricewire_cache_writer.db_projection import TICKS, Offset, insert_prices, insert_ticks, write_batch
from pricewire_cache_writer.migrate import apply_migrations, packaged_migrations
from pricewire_cache_writer.postgres_side import Backoff
from pricewire_cache_writer.records import price_record, tick_record
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_cache_writer.service import run
from pricewire_cli.embedded import free_port
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.clock import datetime_from_ns
from pricewire_common.config import Settings
from pricewire_common.events import DeadLetter, Price, Tick, decode_dead_letter, decode_price, encode
from pricewire_common.keys import PRICES_CHANNEL
from tests.factories import TS, make_price, make_tick
from tests.scraping import ops_base, scrape
from tests.test_cache_writer_records import ASSETS
from tests.waiting import eventually

CONSUMERS = (
    (subjects.PRICES_STREAM, "cache-redis"),
    (subjects.TICKS_STREAM, "cache-db-ticks"),
    (subjects.PRICES_STREAM, "cache-db-prices"),
)


# -- helpers -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(settings: Settings, **kwargs: Any) -> AsyncIterator[asyncio.Task[None]]:
    """The cache writer running in this loop; on exit: stop, and it must return cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, **kwargs))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


@contextlib.asynccontextmanager
async def price_channel(redis_url: str) -> AsyncIterator[redis_asyncio.client.PubSub]:
    client = redis_asyncio.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(PRICES_CHANNEL)
    # The subscription is live once its confirmation arrives.
    assert await pubsub.get_message(timeout=5) is not None
    try:
        yield pubsub
    finally:
        await pubsub.aclose()
        await client.aclose()


async def next_published(pubsub: redis_asyncio.client.PubSub, timeout: float = 10.0) -> Price:
    """The next Price event on the `prices` channel."""

    async def receive() -> Price:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is not None:
                return decode_price(message["data"])

    return await asyncio.wait_for(receive(), timeout)


class CuttableProxy:
    """A TCP proxy to PostgreSQL that a test cuts and restores: a real outage, seen from the service."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        self._socket_dir = query.pop("host", None)  # the embedded server listens on a Unix socket
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.port = free_port()
        netloc = f"{quote(parts.username or 'postgres')}:{quote(parts.password or '')}@127.0.0.1:{self.port}"
        self.url = urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._socket_dir is not None:
            return await asyncio.open_unix_connection(f"{self._socket_dir}/.s.PGSQL.{self._target[1]}")
        return await asyncio.open_connection(*self._target)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._connect_upstream()
        self._writers |= {writer, up_writer}
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_writer))
                tg.create_task(self._pipe(up_reader, writer))
        finally:
            for each in (writer, up_writer):
                self._writers.discard(each)
                each.close()
                with contextlib.suppress(OSError):
                    await each.wait_closed()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def restore(self) -> None:
        """Listen (again): connections succeed."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Stop listening and break every open connection: connects are refused, queries fail."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None


@contextlib.asynccontextmanager
async def proxy_to(database_url: str) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(database_url)
    await proxy.restore()
    try:
        yield proxy
    finally:
        await proxy.cut()


async def publish_ticks(js: JetStreamContext, ticks: list[Tick]) -> None:
    for tick in ticks:
        subject = subjects.tick(tick.source, tick.base, tick.quote)
        await js.publish(subject, encode(tick), headers={MSG_ID_HEADER: tick.id})


async def publish_prices(js: JetStreamContext, prices: list[Price]) -> None:
    for price in prices:
        msg_id = f"price:{price.asset}:{price.seq}"
        await js.publish(subjects.price(price.asset), encode(price), headers={MSG_ID_HEADER: msg_id})


async def stored_detail(client: redis_asyncio.Redis, asset: str) -> Price:
    raw = await client.get(f"price:{asset}:detail")
    assert isinstance(raw, str)
    return decode_price(raw.encode())


async def count(pg: asyncpg.Connection, table: str) -> int:
    try:
        return int(await pg.fetchval(f"SELECT count(*) FROM {table}"))  # table names are ours
    except asyncpg.UndefinedTableError:  # the service has not migrated yet
        return 0


async def consumers_idle(js: JetStreamContext) -> bool:
    """True when the cache writer's consumers have nothing left to deliver or to be acked."""
    for stream, durable in CONSUMERS:
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:  # the service has not created it yet
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


def ticks(n: int, *, prefix: str = "t") -> list[Tick]:
    return [make_tick(id=f"{prefix}-{i}", price=Decimal("47000.50") + i, ts_exchange=TS + i) for i in range(n)]


# -- migrations ----------------------------------------------------------------------------------


async def test_migrations_apply_once_and_then_find_nothing_to_do(pg: asyncpg.Connection) -> None:
    versions = [m.version for m in packaged_migrations()]
    assert await apply_migrations(pg) == versions
    assert await apply_migrations(pg) == []
    rows = await pg.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == versions
    assert all(r["applied_at"] is not None for r in rows)
    indexes = {r["indexname"] for r in await pg.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    assert {"ticks_base_ts_exchange_idx", "prices_asset_ts_idx", "ticks_pkey", "prices_pkey"} <= indexes


async def test_replicas_starting_together_apply_each_migration_once(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply_migrations(conn) for conn in conns))
        versions = [m.version for m in packaged_migrations()]
        assert sorted(results) == [[], [], [], versions]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(versions)
        # The lock is released: a later run neither blocks nor applies anything.
        assert await asyncio.wait_for(apply_migrations(conns[1]), timeout=5) == []
    finally:
        for conn in conns:
            await conn.close()


# -- Redis projection ----------------------------------------------------------------------------


async def test_the_script_applies_a_newer_seq_and_ignores_an_older_or_equal_one(
    redis_client: redis_asyncio.Redis,
) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    assert await projection.apply(make_price(seq=5, price=Decimal("47000.50")))
    assert await redis_client.get("price:BTC") == "47000.50"
    assert await stored_detail(redis_client, "BTC") == make_price(seq=5, price=Decimal("47000.50"))
    assert await redis_client.get("price:BTC:seq") == "5"
    assert 0 < await redis_client.ttl("price:BTC") <= 60
    assert 0 < await redis_client.ttl("price:BTC:detail") <= 60
    assert await redis_client.ttl("price:BTC:seq") == -1  # no expiry

    assert not await projection.apply(make_price(seq=5, price=Decimal("1.00")))  # redelivered
    assert not await projection.apply(make_price(seq=4, price=Decimal("2.00")))  # older
    assert await redis_client.get("price:BTC") == "47000.50"
    assert await redis_client.get("price:BTC:seq") == "5"

    assert await projection.apply(make_price(seq=6, price=Decimal("47001.00")))
    assert await redis_client.get("price:BTC") == "47001.00"


async def test_the_ttl_comes_from_the_setting(redis_client: redis_asyncio.Redis) -> None:
    await RedisPrices(redis_client, ttl_s=7, assets=ASSETS).apply(make_price())
    assert 0 < await redis_client.ttl("price:BTC") <= 7
    assert 0 < await redis_client.ttl("price:BTC:detail") <= 7


async def test_a_stale_event_updates_the_price_but_never_extends_its_ttl(
    redis_url: str, redis_client: redis_asyncio.Redis
) -> None:
    projection = RedisPrices(redis_client, ttl_s=2, assets=ASSETS)
    keys = ("price:BTC", "price:BTC:detail")
    async with price_channel(redis_url) as pubsub:
        assert await projection.apply(make_price(seq=1, price=Decimal("100")))
        assert (await next_published(pubsub)).seq == 1
        for key in keys:
            assert 1000 < await redis_client.pttl(key) <= 2000  # an ok consensus starts the TTL

        # As if 1.5 s had passed: the stale repeat of the last consensus must not restart the clock.
        for key in keys:
            await redis_client.pexpire(key, 500)
        stale = make_price(seq=2, price=Decimal("100"), status="stale", n_used=0)
        assert await projection.apply(stale)
        assert await next_published(pubsub) == stale
        for key in keys:
            assert 0 < await redis_client.pttl(key) <= 500
        assert await stored_detail(redis_client, "BTC") == stale
        assert await redis_client.get("price:BTC:seq") == "2"

        # A degraded consensus is live data: it restarts the TTL.
        assert await projection.apply(make_price(seq=3, price=Decimal("101"), status="degraded", n_used=1))
        assert (await next_published(pubsub)).seq == 3
        for key in keys:
            assert 1000 < await redis_client.pttl(key) <= 2000

        # The TTL runs out (an expiry time in the past expires the keys at once); stale events go on.
        for key in keys:
            await redis_client.pexpireat(key, 1)
        assert await redis_client.exists(*keys) == 0
        later = make_price(seq=4, price=Decimal("101"), status="stale", n_used=0)
        assert await projection.apply_all([later]) == [True]
        assert await next_published(pubsub) == later  # still announced
        assert await redis_client.exists(*keys) == 0  # but the expired price is not brought back
        assert await redis_client.get("price:BTC:seq") == "4"
        assert not await projection.apply(later)  # and its seq counts: a redelivery changes nothing

        # A live consensus brings the price back, with a fresh TTL.
        assert await projection.apply(make_price(seq=5, price=Decimal("102")))
        assert await redis_client.get("price:BTC") == "102"
        assert 1000 < await redis_client.pttl("price:BTC:detail") <= 2000


async def test_seqs_compare_exactly_beyond_double_precision(redis_client: redis_asyncio.Redis) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    assert await projection.apply(make_price(seq=2**53))
    assert await projection.apply(make_price(seq=2**53 + 1))  # equal as doubles
    assert not await projection.apply(make_price(seq=2**53))
    assert await projection.apply(make_price(seq=10**18))  # longer text, larger number
    assert not await projection.apply(make_price(seq=9 * 10**17))


async def test_an_applied_event_is_published_and_a_stale_one_is_not(
    redis_url: str, redis_client: redis_asyncio.Redis
) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    async with price_channel(redis_url) as pubsub:
        assert await projection.apply(make_price(seq=2))
        assert await next_published(pubsub) == make_price(seq=2)
        assert not await projection.apply(make_price(seq=1))
        assert await projection.apply(make_price(seq=3))
        # Had seq 1 been published it would come first.
        assert (await next_published(pubsub)).seq == 3


async def test_a_batch_is_applied_in_order_in_one_pipeline(redis_client: redis_asyncio.Redis) -> None:
    projection = RedisPrices(redis_client, ttl_s=60, assets=ASSETS)
    batch = [
        make_price(seq=2, price=Decimal("2.0")),
        make_price(seq=1, price=Decimal("1.0")),
        make_price(asset="ETH", seq=1, price=Decimal("3000.25")),
        make_price(seq=2, price=Decimal("9.9")),
    ]
    assert await projection.apply_all(batch) == [True, False, True, False]
    assert await redis_client.mget("price:BTC", "price:ETH") == ["2.0", "3000.25"]


# -- PostgreSQL projection -----------------------------------------------------------------------


@pytest.fixture
async def schema(pg: asyncpg.Connection) -> asyncpg.Connection:
    await apply_migrations(pg)
    return pg


@pytest.mark.parametrize(
    "text", ["47000.50", "0.00000001", "123456789012345678901234567890.123456789012345678", "1.10"]
)
async def test_ticks_keep_their_exact_decimal_digits(schema: asyncpg.Connection, text: str) -> None:
    record = tick_record(make_tick(price=Decimal(text), bid=None), stream_seq=9)
    await insert_ticks(schema, [record])
    row = await schema.fetchrow("SELECT * FROM ticks WHERE id = $1", record.id)
    assert isinstance(row["price"], Decimal)
    assert row["price"].as_tuple() == Decimal(text).as_tuple()  # same digits, same exponent
    assert row["bid"] is None
    assert row["ask"] == Decimal("47000.60")
    assert row["stream_seq"] == 9


async def test_timestamps_are_the_event_ns_truncated_to_microseconds(schema: asyncpg.Connection) -> None:
    stamps = [TS, 1, 999, 1_000, 9_000_000_000_123_456_789]
    records = [tick_record(make_tick(id=f"t-{ns}", ts_exchange=ns), stream_seq=1) for ns in stamps]
    await insert_ticks(schema, records)
    rows = await schema.fetch("SELECT ts_exchange, ts_exchange_ns, ts_received FROM ticks")
    assert {r["ts_exchange_ns"]: r["ts_exchange"] for r in rows} == {ns: datetime_from_ns(ns) for ns in stamps}
    assert all(r["ts_received"] == datetime_from_ns(TS + 1_000_000) for r in rows)


async def test_inserting_the_same_batch_twice_leaves_one_row_each(schema: asyncpg.Connection) -> None:
    records = [tick_record(tick, stream_seq=i) for i, tick in enumerate(ticks(500))]
    assert await insert_ticks(schema, records) == 500
    assert await insert_ticks(schema, records) == 0
    assert await count(schema, "ticks") == 500
    # A tick republished outside the duplicate window may repeat inside one batch.
    assert await insert_ticks(schema, [records[0], records[0]]) == 0
    assert await insert_ticks(schema, [*[tick_record(make_tick(id="new"), stream_seq=1)] * 2]) == 1


async def test_prices_are_stored_once_with_their_sources(schema: asyncpg.Connection) -> None:
    records = [price_record(make_price(seq=s, price=Decimal("47000.50")), stream_seq=s) for s in (1, 2)]
    assert await insert_prices(schema, records) == 2
    assert await insert_prices(schema, records) == 0
    row = await schema.fetchrow("SELECT * FROM prices WHERE asset = 'BTC' AND seq = 2")
    assert str(row["price"]) == "47000.50"
    assert row["confidence"] == Decimal("0.10")
    assert row["ts"] == datetime_from_ns(TS)
    assert (row["status"], row["currency"], row["n_sources"], row["n_used"]) == ("ok", "USD", 2, 2)
    sources = msgspec.json.decode(row["sources"])
    assert sources[0]["source"] == "sim-a" and sources[0]["price"] == "47000.40"
    assert row["change_24h"] is None


async def test_a_row_the_database_refuses_is_rejected_alone(schema: asyncpg.Connection, database_url: str) -> None:
    good = [tick_record(tick, stream_seq=i) for i, tick in enumerate(ticks(3))]
    # Built around records.py's checks, as a bug there would: PostgreSQL refuses a NUL in text.
    bad = good[1]._replace(id="bad\x00id")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        written = await write_batch(pool, TICKS, [good[0], bad, good[2]], Offset("cache-db-ticks", 3))
    finally:
        await pool.close()
    assert list(written.refused) == [1]
    assert written.refused[1].reason == "unstorable"
    assert {r["id"] for r in await schema.fetch("SELECT id FROM ticks")} == {good[0].id, good[2].id}
    assert written.applied_seq == 3  # the refused row is dealt with: dead-lettered by the projector


# -- the service ---------------------------------------------------------------------------------


async def test_the_service_projects_ticks_and_prices_into_both_stores(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(40))
    prices = [make_price(seq=1, price=Decimal("47000.50")), make_price(asset="ETH", seq=1, price=Decimal("3000.1"))]
    prices.append(make_price(seq=2, price=Decimal("47010.25")))
    await publish_prices(js, prices)

    async with price_channel(settings.redis_url) as pubsub, service(settings):
        published = [await next_published(pubsub) for _ in range(3)]
        await eventually(lambda: count(pg, "ticks"), lambda n: n == 40, what="40 ticks stored")
        await eventually(lambda: count(pg, "prices"), lambda n: n == 3, what="3 prices stored")

    assert [(p.asset, p.seq) for p in published] == [("BTC", 1), ("ETH", 1), ("BTC", 2)]
    assert await redis_client.get("price:BTC") == "47010.25"
    assert await redis_client.get("price:ETH") == "3000.1"
    assert 0 < await redis_client.ttl("price:BTC") <= settings.cache.price_ttl_s
    assert await stored_detail(redis_client, "BTC") == prices[2]
    row = await pg.fetchrow("SELECT price, stream_seq FROM prices WHERE asset = 'BTC' AND seq = 2")
    assert row["price"] == Decimal("47010.25") and row["stream_seq"] == 3
    stored = await pg.fetchrow("SELECT price, stream_seq FROM ticks WHERE id = 't-7'")
    assert str(stored["price"]) == "47007.50" and stored["stream_seq"] == 8
    assert await consumers_idle(js)


async def dead_letters(js: JetStreamContext, n: int) -> list[DeadLetter]:
    sub = await js.pull_subscribe(subjects.dead_letter("cache_writer"), stream=subjects.DLQ_STREAM)
    try:
        msgs = await sub.fetch(n, timeout=10)
        while len(msgs) < n:
            msgs += await sub.fetch(n - len(msgs), timeout=10)
        return [decode_dead_letter(m.data) for m in msgs]
    finally:
        await sub.unsubscribe()


async def test_malformed_input_goes_to_the_dead_letters_and_the_rest_is_stored(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(2, prefix="before"))
    await js.publish("md.tick.x.BTC-USDT", b'{"id": "broken"')
    await js.publish(subjects.tick("sim-a", "BTC", "USDT"), encode(make_tick(id="nan", price=Decimal("NaN"))))
    await js.publish(subjects.price("BTC"), encode(make_price(asset="ETH")))
    await publish_ticks(js, ticks(2, prefix="after"))
    await publish_prices(js, [make_price(seq=9)])

    async with service(settings):
        letters = await dead_letters(js, 3)
        await eventually(lambda: count(pg, "ticks"), lambda n: n == 4, what="the good ticks")
        await eventually(lambda: count(pg, "prices"), lambda n: n == 1, what="the good price")
        await eventually(lambda: consumers_idle(js), bool, what="every message settled")
        assert (await js.stream_info(subjects.DLQ_STREAM)).state.messages == 3

    by_subject = sorted((letter.subject, letter.reason, letter.stream_seq) for letter in letters)
    assert by_subject == [
        ("md.price.BTC", "asset_mismatch", 1),  # once, though both consumers of PRICES rejected it
        ("md.tick.sim-a.BTC-USDT", "invalid_price", 4),
        ("md.tick.x.BTC-USDT", "decode_error", 3),
    ]
    assert {letter.service for letter in letters} == {"cache_writer"}
    broken = next(letter for letter in letters if letter.subject == "md.tick.x.BTC-USDT")
    assert broken.payload == b'{"id": "broken"'
    assert {r["id"] for r in await pg.fetch("SELECT id FROM ticks")} == {"before-0", "before-1", "after-0", "after-1"}
    assert await redis_client.get("price:BTC:seq") == "9"
    assert await redis_client.get("price:ETH") is None


async def test_an_asset_that_is_not_configured_reaches_no_projection(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    assert "XRP" not in settings.assets
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    xrp_tick = make_tick(id="xrp-1", symbol="XRP-USDT", base="XRP", price=Decimal("0.61"))
    await publish_ticks(js, [xrp_tick, *ticks(1, prefix="btc")])
    await publish_prices(js, [make_price(asset="XRP", seq=1, price=Decimal("0.61")), make_price(seq=1)])

    async with price_channel(settings.redis_url) as pubsub, service(settings):
        # Applied in stream order: an XRP price reaching Redis would be announced before BTC's.
        published = await next_published(pubsub)
        assert (published.asset, published.seq) == ("BTC", 1)
        letters = await dead_letters(js, 2)
        await eventually(lambda: consumers_idle(js), bool, what="every message settled")
        assert (await js.stream_info(subjects.DLQ_STREAM)).state.messages == 2

    assert sorted((letter.subject, letter.reason, letter.stream_seq) for letter in letters) == [
        ("md.price.XRP", "unknown_asset", 1),  # once, though both consumers of PRICES rejected it
        ("md.tick.sim-a.XRP-USDT", "unknown_asset", 1),
    ]
    assert {r["id"] for r in await pg.fetch("SELECT id FROM ticks")} == {"btc-0"}
    assert [r["asset"] for r in await pg.fetch("SELECT asset FROM prices")] == ["BTC"]
    assert await redis_client.keys("price:XRP*") == []
    assert await redis_client.get("price:BTC:seq") == "1"


async def test_a_restart_or_a_full_replay_stores_nothing_twice(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(300))
    await publish_prices(js, [make_price(seq=s) for s in range(1, 6)])
    async with service(settings):
        await eventually(lambda: consumers_idle(js), bool, what="first run settled")
    assert (await count(pg, "ticks"), await count(pg, "prices")) == (300, 5)

    # Run again, nothing reset: the durable consumers resume where they stopped.
    await publish_ticks(js, ticks(10, prefix="more"))
    async with service(settings):
        await eventually(lambda: count(pg, "ticks"), lambda n: n >= 310, what="the new ticks")
        await eventually(lambda: consumers_idle(js), bool, what="second run settled")
    assert (await count(pg, "ticks"), await count(pg, "prices")) == (310, 5)

    # Replay the whole log (new consumers start at the beginning): every write is a no-op.
    for stream, durable in CONSUMERS:
        await js.delete_consumer(stream, durable)
    async with price_channel(settings.redis_url) as pubsub, service(settings):
        await eventually(lambda: consumers_idle(js), bool, what="replay settled")
        # The replay is applied in stream order before this new price, so an old price announced
        # again would reach the channel first.
        await publish_prices(js, [make_price(seq=6)])
        assert (await next_published(pubsub)).seq == 6
        await eventually(lambda: consumers_idle(js), bool, what="the new price settled")
    assert (await count(pg, "ticks"), await count(pg, "prices")) == (310, 6)
    assert await pg.fetchval("SELECT count(DISTINCT id) FROM ticks") == 310
    assert await redis_client.get("price:BTC:seq") == "6"


async def test_redis_down_holds_back_only_its_own_consumer(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(20))
    await publish_prices(js, [make_price(seq=1), make_price(seq=2)])
    no_redis = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")

    async with service(no_redis, retry_delay_s=0.1):
        await eventually(lambda: count(pg, "ticks"), lambda n: n == 20, what="ticks while Redis is down")
        await eventually(lambda: count(pg, "prices"), lambda n: n == 2, what="prices while Redis is down")
        info = await js.consumer_info(subjects.PRICES_STREAM, "cache-redis")
        assert info.ack_floor.stream_seq == 0  # nothing acked: it is all still owed to Redis
    assert await redis_client.get("price:BTC") is None

    # Redis is back: the prices it missed arrive from the log. Their redeliveries may come in either order
    # (one may wait out the ack wait of the reader that stopped), so seq 1 is published only if it comes first.
    async with price_channel(settings.redis_url) as pubsub, service(settings):
        published = [(await next_published(pubsub)).seq]
        while published[-1] != 2:
            published.append((await next_published(pubsub)).seq)
    assert published in ([1, 2], [2])  # never an older price after a newer one
    assert await redis_client.get("price:BTC:seq") == "2"


async def test_lost_database_connections_are_retried_without_loss(
    settings: Settings, nc: NATS, pg: asyncpg.Connection
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(50, prefix="a"))
    async with service(settings, retry_delay_s=0.1):
        await eventually(lambda: count(pg, "ticks"), lambda n: n == 50, what="first ticks")
        # What a database restart does to the pool: every connection of the service is cut.
        killed = await pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert killed >= 1
        await publish_ticks(js, ticks(50, prefix="b"))
        await eventually(lambda: count(pg, "ticks"), lambda n: n == 100, what="ticks after the cut")
        await eventually(lambda: consumers_idle(js), bool, what="every message settled")
    assert await pg.fetchval("SELECT count(DISTINCT id) FROM ticks") == 100


async def test_postgresql_down_holds_back_only_its_own_consumers_and_nothing_is_lost(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(20, prefix="a"))
    await publish_prices(js, [make_price(seq=1)])
    async with proxy_to(settings.database_url) as proxy:
        proxied = replace(settings, database_url=proxy.url)
        async with price_channel(settings.redis_url) as pubsub, service(proxied, retry_delay_s=0.1):
            assert (await next_published(pubsub)).seq == 1
            await eventually(lambda: count(pg, "ticks"), lambda n: n == 20, what="ticks before the outage")
            # Stored is not yet acked: a cut between the commit and its answer sends the batch back (written
            # again, stored once), and the ack floor below would still be 0.
            await eventually(
                lambda: js.consumer_info(subjects.TICKS_STREAM, "cache-db-ticks"),
                lambda i: i.ack_floor.stream_seq == 20,
                what="the first ticks acked",
            )

            await proxy.cut()
            await publish_ticks(js, ticks(20, prefix="b"))
            await publish_prices(js, [make_price(seq=2)])
            assert (await next_published(pubsub)).seq == 2  # Redis goes on while PostgreSQL is down
            info = await eventually(
                lambda: js.consumer_info(subjects.TICKS_STREAM, "cache-db-ticks"),
                lambda i: i.num_redelivered > 0,
                what="ticks naked and redelivered while PostgreSQL is down",
            )
            assert info.ack_floor.stream_seq == 20
            assert await count(pg, "ticks") == 20

            await proxy.restore()
            await eventually(lambda: count(pg, "ticks"), lambda n: n == 40, what="ticks after the outage")
            await eventually(lambda: count(pg, "prices"), lambda n: n == 2, what="prices after the outage")
            await eventually(lambda: consumers_idle(js), bool, what="every message settled")
    assert await pg.fetchval("SELECT count(DISTINCT id) FROM ticks") == 40
    assert await redis_client.get("price:BTC:seq") == "2"


async def readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """`/readyz`'s status and its checks by name."""
    async with http.get(f"{base}/readyz") as response:
        body = msgspec.json.decode(await response.read())
        return response.status, {check["name"]: check for check in body["checks"]}


async def projection_statuses(client: redis_asyncio.Redis) -> dict[str, dict[str, Any]]:
    raw = await client.hgetall("projection:status")
    return {str(name): msgspec.json.decode(value) for name, value in raw.items()}


async def test_postgresql_down_at_start_holds_back_neither_redis_nor_the_ops_port(
    settings: Settings, nc: NATS, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(30))
    await publish_prices(js, [make_price(seq=1), make_price(seq=2)])
    proxy = CuttableProxy(settings.database_url)  # not listening yet: every connection is refused
    down = replace(settings, database_url=proxy.url, metrics_port=0)
    quick = Backoff(initial_s=0.05, max_s=0.2)
    try:
        async with (
            price_channel(settings.redis_url) as pubsub,
            service(down, retry_delay_s=0.1, postgres_backoff=quick),
            aiohttp.ClientSession() as http,
        ):
            assert [(await next_published(pubsub)).seq for _ in range(2)] == [1, 2]  # Redis does not wait
            base = await ops_base(nc, "cache_writer")  # the ops port is up before PostgreSQL
            code, checks = await readyz(http, base)
            assert code == 503
            assert (checks["nats"]["ok"], checks["redis"]["ok"], checks["postgres"]["ok"]) == (True, True, False)
            assert checks["postgres"]["error"].startswith("NotReady: connecting: ")
            scraped = await scrape(http, base)
            for name in ("cache-db-ticks", "cache-db-prices"):
                assert scraped.value("pricewire_projection_store_up", projection=name) == 0
            assert scraped.value("pricewire_projection_store_up", projection="cache-redis") == 1
            reports = await eventually(
                lambda: projection_statuses(redis_client), lambda r: len(r) == 3, what="all three reported"
            )
            assert not reports["cache-db-ticks"]["store_up"] and reports["cache-redis"]["store_up"]
            assert await count(pg, "ticks") == 0  # not even migrated

            await proxy.restore()
            await eventually(lambda: count(pg, "ticks"), lambda n: n == 30, what="the ticks, once PostgreSQL answers")
            await eventually(lambda: count(pg, "prices"), lambda n: n == 2, what="the prices")
            await eventually(lambda: consumers_idle(js), bool, what="every message settled")
            await eventually(lambda: readyz(http, base), lambda answer: answer[0] == 200, what="ready")
    finally:
        await proxy.cut()
    assert await pg.fetchval("SELECT count(DISTINCT id) FROM ticks") == 30
    assert [tuple(r) for r in await pg.fetch("SELECT asset, seq FROM prices ORDER BY seq")] == [("BTC", 1), ("BTC", 2)]
    assert await pg.fetchval("SELECT sum(n) FROM candles_1m") == 2  # each price counted once
    assert await redis_client.get("price:BTC:seq") == "2"


async def test_a_stop_while_postgresql_is_still_down_at_start_exits_cleanly(settings: Settings, nc: NATS) -> None:
    never = replace(settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none", metrics_port=0)
    async with (
        service(never, postgres_backoff=Backoff(initial_s=60.0, max_s=60.0)) as task,
        aiohttp.ClientSession() as http,
    ):
        base = await ops_base(nc, "cache_writer")
        await eventually(
            lambda: readyz(http, base),
            lambda answer: "Connect call failed" in str(answer[1]["postgres"]["error"]),
            what="the first try failed: a minute to the next",
        )
    # `service` stopped it within its 15 s bound: the stop cut the backoff short.
    assert task.done() and task.exception() is None


async def test_while_redis_is_down_the_cache_writer_still_tells_how_far_behind_cache_redis_is(
    settings: Settings, nc: NATS, pg: asyncpg.Connection
) -> None:
    """The gateway's status has no lag for `cache-redis` then (both halves live in Redis); the metrics do."""
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_prices(js, [make_price(seq=1), make_price(seq=2), make_price(seq=3)])
    no_redis = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0", metrics_port=0)
    async with service(no_redis, retry_delay_s=0.1), aiohttp.ClientSession() as http:
        await eventually(lambda: count(pg, "prices"), lambda n: n == 3, what="the prices in PostgreSQL")
        base = await ops_base(nc, "cache_writer")
        scraped = await eventually(
            lambda: scrape(http, base),
            lambda s: s.value("pricewire_projection_store_up", projection="cache-redis") == 0,
            what="cache-redis seen down",
        )
        assert scraped.value("pricewire_projection_lag_events", projection="cache-redis") == 3
        assert scraped.value("pricewire_projection_lag_events", projection="cache-db-prices") == 0
