"""The gateway's history half on real PostgreSQL, Redis and NATS: candles and ticks over REST, the
projections' status, and prices served from PostgreSQL (`stale`) when Redis has none to give."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS

from pricewire_cache_writer.db_projection import insert_prices, insert_ticks
from pricewire_cache_writer.migrate import apply_migrations, schema_variant
from pricewire_cache_writer.progress import ProjectionStatus
from pricewire_cache_writer.records import price_record, tick_record
from pricewire_cli.embedded import free_port
from pricewire_common.bus import ensure_streams
from pricewire_common.clock import NS_PER_S, Clock
from pricewire_common.config import Settings
from pricewire_common.events import Price
from pricewire_common.keys import PROJECTION_STATUS_KEY
from pricewire_gateway.errors import BadParameter, RequestError, StoreUnavailable
from pricewire_gateway.fallback import Served, choose_many, choose_one, missing
from pricewire_gateway.health import readiness_status
from pricewire_gateway.messages import Check
from pricewire_gateway.params import MAX_LIMIT, history_query, parse_time, ticks_query
from pricewire_gateway.status_view import Observed, StreamView, status_body
from tests.factories import make_price, make_tick
from tests.mutations import DEEP_LEVELS
from tests.test_cache_writer import publish_prices, publish_ticks, service, ticks
from tests.test_gateway import cache, decode, publish, request, serving
from tests.waiting import eventually

T0 = datetime(2026, 11, 20, tzinfo=UTC)
T0_NS = int(T0.timestamp()) * NS_PER_S


def at(hours: int, minutes: int, seconds: float = 0) -> int:
    """ns of T0 + the given time (hours may pass 24: the next day)."""
    return T0_NS + int((hours * 3600 + minutes * 60 + seconds) * NS_PER_S)


def fixed(ts_ns: int) -> Clock:
    """A clock standing still at `ts_ns`: ages and default windows come out exact."""
    return lambda: ts_ns


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def schema(pg: asyncpg.Connection) -> asyncpg.Connection:
    await apply_migrations(pg)
    return pg


async def get(http: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, str]:
    async with http.get(url, params=params) as response:
        return response.status, await response.text()


# -- parameters, fallback, readiness, status: the pure parts -----------------------------------------


def test_times_need_a_zone_and_an_unencoded_plus_is_read_as_one() -> None:
    paris = parse_time("start", "2026-11-20T01:00:00+01:00")
    assert paris == T0 and paris.tzinfo is UTC
    assert parse_time("start", "2026-11-20T01:00:00 01:00") == T0  # `+` decoded to a space by the query string
    assert parse_time("start", "2026-11-20T00:00:00.123456789Z") == T0 + timedelta(microseconds=123456)
    with pytest.raises(BadParameter, match="start must carry a time zone"):
        parse_time("start", "2026-11-20T00:00:00")
    with pytest.raises(BadParameter, match="end must be an ISO 8601 time such as"):
        parse_time("end", "yesterday")
    with pytest.raises(BadParameter, match="out of range"):
        parse_time("end", "0001-01-01T00:00:00+01:00")


def test_the_history_window_defaults_to_limit_intervals_on_the_side_given() -> None:
    now = T0 + timedelta(minutes=6, seconds=30)
    q = history_query("BTC", [], now=now)
    assert (q.interval, q.limit, q.end, q.start) == ("1m", 500, now, now - timedelta(minutes=500))
    q = history_query("BTC", [("interval", "1h"), ("limit", "3"), ("end", "2026-11-20T00:00:00Z")], now=now)
    assert (q.start, q.end) == (T0 - timedelta(hours=3), T0)
    q = history_query("BTC", [("interval", "5m"), ("limit", "2"), ("start", "2026-11-20T00:00:00Z")], now=now)
    assert (q.start, q.end) == (T0, T0 + timedelta(minutes=10))
    with pytest.raises(BadParameter, match="leaves the calendar"):
        history_query("BTC", [("interval", "1d"), ("limit", "5000"), ("end", "0005-01-01T00:00:00Z")], now=now)


def test_tick_parameters() -> None:
    q = ticks_query("BTC", [("source", "sim-a"), ("limit", "7")])
    assert (q.source, q.start, q.end, q.limit) == ("sim-a", None, None, 7)
    with pytest.raises(BadParameter, match="source must be a venue name"):
        ticks_query("BTC", [("source", "md.*")])
    with pytest.raises(BadParameter, match="unknown parameter 'interval'"):
        ticks_query("BTC", [("interval", "1m")])


def test_redis_first_then_postgresql_then_the_right_error() -> None:
    live, old = make_price(seq=9), make_price(seq=5)
    redis_down = StoreUnavailable("redis", "refused")
    pg_down = StoreUnavailable("postgres", "refused")
    assert choose_one("BTC", {"BTC": live}, None) == Served(live, stale=False)
    assert choose_one("BTC", {"BTC": None}, {"BTC": old}) == Served(old, stale=True)
    assert choose_one("BTC", redis_down, {"BTC": old}) == Served(old, stale=True)
    with pytest.raises(RequestError) as none:
        choose_one("BTC", {"BTC": None}, {})
    assert none.value.code == "no_price"
    for live_side, archive_side, store in (({"BTC": None}, pg_down, "postgres"), (redis_down, {}, "redis")):
        with pytest.raises(StoreUnavailable) as unknown:
            choose_one("BTC", live_side, archive_side)
        assert unknown.value.store == store

    # Lists: what either store has, in order; an entry that does not decode (absent) is not looked up.
    eth = make_price(asset="ETH", seq=2)
    assert missing(["BTC", "ETH", "SOL"], {"BTC": live, "ETH": None}) == ["ETH"]
    assert missing(["BTC", "ETH"], redis_down) == ["BTC", "ETH"]
    assert choose_many(["BTC", "ETH", "SOL"], {"BTC": live, "ETH": None, "SOL": None}, {"ETH": eth}) == [
        Served(live, stale=False),
        Served(eth, stale=True),
    ]
    assert choose_many(["BTC", "ETH"], {"BTC": live, "ETH": None}, pg_down) == [Served(live, stale=False)]
    assert choose_many(["BTC", "ETH"], redis_down, {"ETH": eth}) == [Served(eth, stale=True)]
    with pytest.raises(StoreUnavailable):
        choose_many(["BTC"], redis_down, pg_down)


def test_readiness_is_degraded_with_one_store_and_unavailable_without_nats_or_both() -> None:
    def status(*ok: bool) -> str:
        return readiness_status([Check(name=n, ok=o) for n, o in zip(("nats", "redis", "postgres"), ok, strict=True)])

    assert status(True, True, True) == "ready"
    assert status(True, False, True) == status(True, True, False) == "degraded"
    assert status(True, False, False) == status(False, True, True) == "unavailable"


def report(name: str, *, applied: int, last: int, ts: int) -> ProjectionStatus:
    stream = "TICKS" if name == "cache-db-ticks" else "PRICES"
    store = "redis" if name == "cache-redis" else "postgres"
    return ProjectionStatus(
        projection=name, stream=stream, store=store, applied_seq=applied, stream_last_seq=last,
        lag=last - applied, store_up=True, written=applied, rejected=0, retried=0, ts=ts,
    )  # fmt: skip


def test_the_status_is_live_when_store_and_stream_answer_else_the_last_report() -> None:
    now = at(0, 1)
    streams = {
        "TICKS": StreamView(stream="TICKS", messages=50, bytes=1, first_seq=1, last_seq=50),
        "PRICES": StreamView(stream="PRICES", messages=9, bytes=1, first_seq=1, last_seq=9),
    }
    reports = {
        "cache-redis": report("cache-redis", applied=4, last=8, ts=now - 3 * NS_PER_S),
        "cache-db-ticks": report("cache-db-ticks", applied=20, last=40, ts=now - 3 * NS_PER_S),
    }
    observed = Observed(
        streams=streams,
        reports=reports,
        redis_offsets="ConnectionError: refused",
        postgres_offsets={"cache-db-ticks": 45},
    )
    body = status_body(observed, now_ns=now)
    views = {v.projection: v for v in body.projections}
    ticks_view = views["cache-db-ticks"]
    assert (ticks_view.basis, ticks_view.applied_seq, ticks_view.stream_last_seq, ticks_view.lag) == ("live", 45, 50, 5)
    assert ticks_view.report_age_s == Decimal("3.000")
    redis_view = views["cache-redis"]  # its store did not answer: the report stands in
    assert (redis_view.basis, redis_view.applied_seq, redis_view.stream_last_seq, redis_view.lag) == ("report", 4, 8, 4)
    prices_view = views["cache-db-prices"]  # no offset row yet: nothing applied
    assert (prices_view.basis, prices_view.applied_seq, prices_view.lag, prices_view.reported_at) == (
        "live",
        0,
        9,
        None,
    )
    assert [(c.name, c.ok) for c in body.checks] == [("nats", True), ("redis", False), ("postgres", True)]

    nothing = status_body(
        Observed(streams="not connected", reports="x", redis_offsets="x", postgres_offsets="x"), now_ns=now
    )
    assert all(v.basis is None and v.lag is None for v in nothing.projections)
    assert not any(c.ok for c in nothing.checks)


# -- candles -------------------------------------------------------------------------------------

BTC_PRICES = [
    # seq, time, price, volume_24h, status
    (1, at(0, 0, 10), "100.10", "10.0", "ok"),
    (2, at(0, 0, 50), "105.00", "11.0", "ok"),
    (3, at(0, 1, 30), "98.25", "12.0", "degraded"),
    (4, at(0, 4, 59), "101.5", None, "ok"),
    (5, at(0, 5, 0), "110", "13.0", "ok"),
    (6, at(0, 14, 0), "90.000", "14.0", "ok"),
    (7, at(0, 20, 0), "95", "15.0", "stale"),  # a repeat of the last consensus: in no candle
    (8, at(1, 30, 0), "120.5", "15.5", "ok"),
    (9, at(26, 0, 0), "130.25", "16.0", "ok"),  # the next day, 02:00
]

DAY2 = "2026-11-21T02:00:00.000Z"
# time, open, high, low, close, volume, count: worked out by hand from BTC_PRICES
EXPECTED: dict[str, list[tuple[str, str, str, str, str, str | None, int]]] = {
    "1m": [
        ("2026-11-20T00:00:00.000Z", "100.10", "105.00", "100.10", "105.00", "11.0", 2),
        ("2026-11-20T00:01:00.000Z", "98.25", "98.25", "98.25", "98.25", "12.0", 1),
        ("2026-11-20T00:04:00.000Z", "101.5", "101.5", "101.5", "101.5", None, 1),
        ("2026-11-20T00:05:00.000Z", "110", "110", "110", "110", "13.0", 1),
        ("2026-11-20T00:14:00.000Z", "90.000", "90.000", "90.000", "90.000", "14.0", 1),
        ("2026-11-20T01:30:00.000Z", "120.5", "120.5", "120.5", "120.5", "15.5", 1),
        (DAY2, "130.25", "130.25", "130.25", "130.25", "16.0", 1),
    ],
    "5m": [
        ("2026-11-20T00:00:00.000Z", "100.10", "105.00", "98.25", "101.5", None, 4),
        ("2026-11-20T00:05:00.000Z", "110", "110", "110", "110", "13.0", 1),
        ("2026-11-20T00:10:00.000Z", "90.000", "90.000", "90.000", "90.000", "14.0", 1),
        ("2026-11-20T01:30:00.000Z", "120.5", "120.5", "120.5", "120.5", "15.5", 1),
        (DAY2, "130.25", "130.25", "130.25", "130.25", "16.0", 1),
    ],
    "15m": [
        ("2026-11-20T00:00:00.000Z", "100.10", "110", "90.000", "90.000", "14.0", 6),
        ("2026-11-20T01:30:00.000Z", "120.5", "120.5", "120.5", "120.5", "15.5", 1),
        (DAY2, "130.25", "130.25", "130.25", "130.25", "16.0", 1),
    ],
    "1h": [
        ("2026-11-20T00:00:00.000Z", "100.10", "110", "90.000", "90.000", "14.0", 6),
        ("2026-11-20T01:00:00.000Z", "120.5", "120.5", "120.5", "120.5", "15.5", 1),
        (DAY2, "130.25", "130.25", "130.25", "130.25", "16.0", 1),
    ],
    "1d": [
        ("2026-11-20T00:00:00.000Z", "100.10", "120.5", "90.000", "120.5", "15.5", 7),
        ("2026-11-21T00:00:00.000Z", "130.25", "130.25", "130.25", "130.25", "16.0", 1),
    ],
}


async def store_prices(conn: asyncpg.Connection, prices: list[Price]) -> None:
    """Prices (and, on plain PostgreSQL, their candles) as the cache_writer writes them."""
    records = [price_record(p, stream_seq=i) for i, p in enumerate(prices, start=1)]
    await insert_prices(conn, records, candles=await schema_variant(conn) == "postgres")


def btc_prices() -> list[Price]:
    return [
        make_price(
            seq=seq, ts=ts, ts_tick=ts - 1_000_000, price=Decimal(price),
            volume_24h=None if volume is None else Decimal(volume), status=status,
        )
        for seq, ts, price, volume, status in BTC_PRICES
    ]  # fmt: skip


def as_rows(body: dict[str, Any]) -> list[tuple[str, str, str, str, str, str | None, int]]:
    return [
        (c["time"], str(c["open"]), str(c["high"]), str(c["low"]), str(c["close"]),
         None if c["volume"] is None else str(c["volume"]), c["count"])
        for c in body["candles"]
    ]  # fmt: skip


async def test_candles_of_every_interval_are_the_ones_worked_out_by_hand(
    settings: Settings, schema: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await store_prices(schema, [*btc_prices(), make_price(asset="ETH", seq=1, ts=at(0, 0, 20), ts_tick=at(0, 0, 19))])
    async with serving(settings) as gw:
        for interval, expected in EXPECTED.items():
            status, text = await get(
                http,
                f"{gw.url}/api/v1/history/btcusdt",
                interval=interval,
                start="2026-11-20T01:00:00+01:00",  # T0, given with an offset
                end="2026-11-22T00:00:00Z",
                limit=str(MAX_LIMIT),
            )
            assert status == 200, text
            body = decode(text)
            assert as_rows(body) == expected, interval
            assert (body["symbol"], body["interval"], body["truncated"]) == ("BTC", interval, False)
            assert (body["start"], body["end"]) == ("2026-11-20T00:00:00.000Z", "2026-11-22T00:00:00.000Z")
        # Numbers keep their stored digits, as JSON numbers.
        assert '"open":100.10,"high":120.5,"low":90.000,"close":120.5,"volume":15.5,"count":7' in text

        # The window holds the candles that *begin* in it, and `limit` keeps the latest of them.
        status, text = await get(
            http,
            f"{gw.url}/api/v1/history/BTC",
            interval="5m",
            start="2026-11-20T00:02:00Z",
            end="2026-11-20T00:15:00Z",
        )
        assert [c[0][11:16] for c in as_rows(decode(text))] == ["00:05", "00:10"]
        status, text = await get(
            http, f"{gw.url}/api/v1/history/BTC", interval="1m", start="2026-11-20T00:00:00Z",
            end="2026-11-22T00:00:00Z", limit="2",
        )  # fmt: skip
        body = decode(text)
        assert [c[0] for c in as_rows(body)] == ["2026-11-20T01:30:00.000Z", DAY2] and body["truncated"] is True


async def test_the_default_window_is_the_last_limit_intervals_before_now(
    settings: Settings, schema: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await store_prices(schema, btc_prices())
    async with serving(settings, clock=fixed(at(0, 6, 30))) as gw:
        url = f"{gw.url}/api/v1/history/BTC"
        body = decode((await get(http, url))[1])
        assert (body["interval"], body["start"], body["end"]) == (
            "1m",
            "2026-11-19T15:46:30.000Z",  # 500 minutes before now
            "2026-11-20T00:06:30.000Z",
        )
        assert [c[0][11:16] for c in as_rows(body)] == ["00:00", "00:01", "00:04", "00:05"]
        assert [c[0][11:16] for c in as_rows(decode((await get(http, url, limit="2"))[1]))] == ["00:05"]
        after = decode((await get(http, url, start="2026-11-20T00:01:00Z", limit="4"))[1])
        assert [c[0][11:16] for c in as_rows(after)] == ["00:01", "00:04"]
        before = decode((await get(http, url, end="2026-11-20T00:02:00Z", limit="2"))[1])
        assert [c[0][11:16] for c in as_rows(before)] == ["00:00", "00:01"]


BAD_HISTORY: list[tuple[dict[str, str], str]] = [
    ({"interval": "2m"}, "interval must be one of 1m, 5m, 15m, 1h, 1d; got '2m'"),
    ({"start": "yesterday"}, "start must be an ISO 8601 time"),
    ({"end": "2026-11-20T00:00:00"}, "end must carry a time zone"),
    ({"start": "2026-11-20T01:00:00Z", "end": "2026-11-20T00:00:00Z"}, "must be before end"),
    ({"start": "2026-11-20T00:00:00Z", "end": "2026-11-20T00:00:00Z"}, "must be before end"),
    ({"limit": "0"}, "limit must be a whole number from 1 to 5000; got '0'"),
    ({"limit": "5001"}, "limit must be a whole number from 1 to 5000; got '5001'"),
    ({"limit": "ten"}, "limit must be a whole number from 1 to 5000"),
    ({"limit": "-1"}, "limit must be a whole number from 1 to 5000"),
    ({"from": "2026-11-20T00:00:00Z"}, "unknown parameter 'from'; this endpoint takes interval, start, end, limit"),
]


async def test_bad_parameters_are_400s_that_say_what_is_wrong(
    settings: Settings, schema: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    async with serving(settings) as gw:
        for params, message in BAD_HISTORY:
            status, text = await get(http, f"{gw.url}/api/v1/history/BTC", **params)
            body = decode(text)
            assert (status, body["type"], body["code"]) == (400, "error", "bad_parameter"), params
            assert message in body["message"], (params, body["message"])
        async with http.get(f"{gw.url}/api/v1/history/BTC?limit=1&limit=2") as response:
            assert response.status == 400
            assert decode(await response.text())["message"] == "limit is given more than once"
        for path in ("history", "ticks"):
            status, text = await get(http, f"{gw.url}/api/v1/{path}/XRP")
            assert (status, decode(text)["code"]) == (404, "unknown_asset")  # as for prices
        for params in ({"source": "Not A Venue"}, {"limit": "0"}, {"interval": "1m"},
                       {"start": "2026-11-20T00:00:01Z", "end": "2026-11-20T00:00:00Z"}):  # fmt: skip
            status, text = await get(http, f"{gw.url}/api/v1/ticks/BTC", **params)
            assert (status, decode(text)["code"]) == (400, "bad_parameter"), params


# -- ticks ---------------------------------------------------------------------------------------


async def test_ticks_newest_first_by_source_and_range_with_exact_digits(
    settings: Settings, schema: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    base = T0_NS + 1_234_567  # µs and a sub-µs rest: the µs is kept, the rest is not
    stored = [
        make_tick(id=f"a{i}", source="sim-a", price=Decimal("47000.10") + i, ts_exchange=base + i * NS_PER_S,
                  ts_received=base + i * NS_PER_S + 2_000_000)
        for i in range(5)
    ] + [
        make_tick(id=f"b{i}", source="sim-b", symbol="BTC-USD", quote="USD", price=Decimal("47001.000"), bid=None,
                  ask=None, ts_exchange=base + i * NS_PER_S + NS_PER_S // 2, ts_received=base + i * NS_PER_S)
        for i in range(3)
    ] + [make_tick(id="e0", base="ETH", symbol="ETH-USDT", price=Decimal("2500.5"), ts_exchange=base)]  # fmt: skip
    await insert_ticks(schema, [tick_record(t, stream_seq=n) for n, t in enumerate(stored, start=1)])
    async with serving(settings) as gw:
        url = f"{gw.url}/api/v1/ticks/BTC"

        async def ids(**params: str) -> tuple[list[str], bool]:
            status, text = await get(http, url, **params)
            assert status == 200, text
            body = decode(text)
            return [t["id"] for t in body["ticks"]], body["truncated"]

        assert await ids() == (["a4", "a3", "b2", "a2", "b1", "a1", "b0", "a0"], False)
        assert await ids(source="sim-b") == (["b2", "b1", "b0"], False)
        assert await ids(start="2026-11-20T00:00:01.001234Z", end="2026-11-20T00:00:03.001234Z") == (
            ["b2", "a2", "b1", "a1"],
            False,
        )
        assert await ids(limit="3") == (["a4", "a3", "b2"], True)
        assert await ids(source="sim-b", limit="3") == (["b2", "b1", "b0"], False)
        assert await ids(source="kraken") == ([], False)

        status, text = await get(http, url, source="sim-a", limit="1")
        assert status == 200
        assert '"price":47004.10,"bid":47000.40,"ask":47000.60,"volume_24h":1234.5,"open_24h":null' in text
        (tick,) = decode(text)["ticks"]
        assert tick["ts_exchange"] == "2026-11-20T00:00:04.001234Z"
        assert tick["ts_received"] == "2026-11-20T00:00:04.003234Z"
        assert (tick["source"], tick["symbol"], tick["base"], tick["quote"], tick["stream_seq"]) == (
            "sim-a", "BTC-USDT", "BTC", "USDT", 5,
        )  # fmt: skip
        # Paging back from the oldest tick seen misses nothing and repeats nothing.
        page = decode((await get(http, url, end=tick["ts_exchange"], limit="2"))[1])
        assert [t["id"] for t in page["ticks"]] == ["a3", "b2"]


# -- status --------------------------------------------------------------------------------------


async def test_status_answers_past_unreadable_reports_even_one_nested_too_deep(
    settings: Settings, schema: asyncpg.Connection, redis_client: redis_asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    # msgspec raises RecursionError, not a DecodeError, on JSON nested ~1000 deep: such a report in Redis
    # once escaped the handling of unreadable reports and made the whole status answer a 500.
    deep = "[" * DEEP_LEVELS + "]" * DEEP_LEVELS
    await redis_client.hset(
        PROJECTION_STATUS_KEY, mapping={"cache-redis": '{"projection":' + deep + "}", "cache-db-ticks": "{not json"}
    )
    async with serving(settings) as gw:
        code, text = await get(http, f"{gw.url}/api/v1/status")
    assert code == 200, text
    views = {p["projection"]: p for p in decode(text)["projections"]}
    assert views["cache-redis"]["reported_at"] is None  # skipped, not believed
    assert views["cache-db-ticks"]["reported_at"] is None


async def test_status_shows_the_lag_until_the_cache_writer_catches_up(
    settings: Settings, schema: asyncpg.Connection, nc: NATS, http: aiohttp.ClientSession
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    await publish_ticks(js, ticks(12))
    await publish_prices(js, [make_price(seq=s, ts=at(0, 0, s), ts_tick=at(0, 0, s)) for s in (1, 2, 3)])

    async def status_of(gw_url: str) -> dict[str, Any]:
        code, text = await get(http, f"{gw_url}/api/v1/status")
        assert code == 200, text
        return decode(text)

    def lags(body: dict[str, Any]) -> dict[str, tuple[int | None, int | None, str | None]]:
        return {p["projection"]: (p["applied_seq"], p["lag"], p["basis"]) for p in body["projections"]}

    async with serving(settings) as gw:
        before = await status_of(gw.url)
        assert lags(before) == {
            "cache-redis": (0, 3, "live"),
            "cache-db-ticks": (0, 12, "live"),
            "cache-db-prices": (0, 3, "live"),
        }
        assert all(p["reported_at"] is None for p in before["projections"])  # no cache_writer yet
        streams = {s["stream"]: s for s in before["streams"]}
        assert (streams["TICKS"]["messages"], streams["TICKS"]["last_seq"]) == (12, 12)
        assert (streams["PRICES"]["messages"], streams["PRICES"]["last_seq"]) == (3, 3)
        assert {"SOURCES", "DLQ"} <= set(streams)
        assert before["checks"] == [
            {"name": "nats", "ok": True, "error": None},
            {"name": "redis", "ok": True, "error": None},
            {"name": "postgres", "ok": True, "error": None},
        ]

        async with service(settings):
            after = await eventually(
                lambda: status_of(gw.url),
                # The first report may come before PostgreSQL's side is up (its projections waiting, store_up false).
                lambda body: all(p["lag"] == 0 and p["reported_at"] and p["store_up"] for p in body["projections"]),
                what="every projection caught up and reported",
            )
            await publish_ticks(js, ticks(5, prefix="late"))
            await eventually(
                lambda: status_of(gw.url),
                lambda body: lags(body)["cache-db-ticks"] == (17, 0, "live"),
                what="the new ticks applied",
            )
    assert lags(after) == {
        "cache-redis": (3, 0, "live"),
        "cache-db-ticks": (12, 0, "live"),
        "cache-db-prices": (3, 0, "live"),
    }
    assert all(p["store_up"] is True and p["report_age_s"] is not None for p in after["projections"])


# -- degradation ---------------------------------------------------------------------------------


async def test_an_expired_price_is_served_from_postgresql_stale_with_its_age(
    settings: Settings, schema: asyncpg.Connection, redis_client: redis_asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    stored = [
        make_price(
            seq=5,
            ts=at(0, 0),
            ts_tick=at(0, 0),
            price=Decimal("47000.50"),
            method="vwap",
            cv_pct=Decimal("0.0123"),
            anomaly=True,
            z_score=Decimal("-3.41"),
        ),
        make_price(seq=6, ts=at(0, 0, 10), ts_tick=at(0, 0), status="stale"),  # a repeat: not the latest consensus
        make_price(asset="ETH", seq=2, ts=at(0, 0, 40), ts_tick=at(0, 0, 40), price=Decimal("2500.000001")),
    ]
    await store_prices(schema, stored)
    live = make_price(seq=7, ts=at(0, 0, 30), ts_tick=at(0, 0, 30), price=Decimal("47010.25"))
    await cache(redis_client, live)
    async with serving(settings, clock=fixed(at(0, 0, 42.5))) as gw:
        status, text = await get(http, f"{gw.url}/api/v1/prices/BTC")
        body = decode(text)
        assert (status, body["seq"], body["stale"], body["age_s"]) == (200, 7, False, Decimal("12.500"))

        await redis_client.delete("price:BTC:detail")  # as the TTL would
        status, text = await get(http, f"{gw.url}/api/v1/prices/BTC")
        assert status == 200, text
        assert '"price":47000.50' in text and '"stale":true,"age_s":42.500' in text
        body = decode(text)
        assert (body["seq"], body["status"], body["timestamp"]) == (5, "ok", "2026-11-20T00:00:00.000Z")
        assert body["sources"][0]["source"] == "sim-a"  # the stored evidence comes back too
        # ... and how the consensus was made (schema v4 columns).
        assert (body["method"], body["cv_pct"], body["anomaly"], body["z_score"]) == (
            "vwap",
            Decimal("0.0123"),
            True,
            Decimal("-3.41"),
        )
        eth = decode((await get(http, f"{gw.url}/api/v1/prices/ETH"))[1])
        assert (eth["method"], eth["cv_pct"], eth["anomaly"], eth["z_score"]) == ("median", None, False, None)

        listed = decode((await get(http, f"{gw.url}/api/v1/prices"))[1])["prices"]
        assert [(p["symbol"], p["seq"], p["stale"], p["age_s"]) for p in listed] == [
            ("BTC", 5, True, Decimal("42.500")),
            ("ETH", 2, True, Decimal("2.500")),
        ]
        status, text = await get(http, f"{gw.url}/api/v1/prices/SOL")
        assert (status, decode(text)["code"]) == (404, "no_price")  # both stores answered: there is none

        async with http.ws_connect(gw.ws_url) as ws:
            frame = await request(ws, {"type": "get_price", "symbol": "btc"})
            assert (frame["type"], frame["data"]["seq"], frame["data"]["stale"]) == ("price_update", 5, True)


async def test_with_redis_down_prices_come_from_postgresql(
    settings: Settings, schema: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await store_prices(schema, btc_prices())
    dead = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with serving(dead, clock=fixed(at(26, 0, 1))) as gw:
        status, text = await get(http, f"{gw.url}/api/v1/prices/BTC")
        body = decode(text)
        assert (status, body["seq"], body["price"], body["stale"], body["age_s"]) == (
            200, 9, Decimal("130.25"), True, Decimal("1.000"),
        )  # fmt: skip
        listed = decode((await get(http, f"{gw.url}/api/v1/prices"))[1])["prices"]
        assert [(p["symbol"], p["stale"]) for p in listed] == [("BTC", True)]
        status, text = await get(http, f"{gw.url}/api/v1/prices/SOL")
        assert (status, decode(text)["code"]) == (503, "store_unavailable")  # Redis might have had one

        ready = decode((await get(http, f"{gw.url}/readyz"))[1])
        assert ready["status"] == "degraded"
        assert [(c["name"], c["ok"]) for c in ready["checks"]] == [("nats", True), ("redis", False), ("postgres", True)]

        async with http.ws_connect(gw.ws_url) as ws:
            assert await request(ws, {"type": "subscribe", "symbol": "BTC"}) == {
                "type": "subscribed",
                "symbols": ["BTC"],
            }
            snapshot = decode(await ws.receive_str(timeout=5))
            assert (snapshot["data"]["seq"], snapshot["data"]["stale"]) == (9, True)

        body = decode((await get(http, f"{gw.url}/api/v1/status"))[1])
        assert [(c["name"], c["ok"]) for c in body["checks"]] == [("nats", True), ("redis", False), ("postgres", True)]
        views = {p["projection"]: p for p in body["projections"]}
        assert (views["cache-redis"]["basis"], views["cache-redis"]["lag"]) == (None, None)  # neither way answers
        assert views["cache-db-prices"]["basis"] == "live"


async def test_with_postgresql_down_the_gateway_starts_and_serves_live_prices(
    settings: Settings, redis_client: redis_asyncio.Redis, nc: NATS, http: aiohttp.ClientSession
) -> None:
    await cache(redis_client, make_price(seq=3))
    dead = replace(settings, database_url=f"postgresql://pricewire@127.0.0.1:{free_port()}/pricewire")
    async with serving(dead) as gw:
        status, text = await get(http, f"{gw.url}/api/v1/prices/BTC")
        assert (status, decode(text)["seq"], decode(text)["stale"]) == (200, 3, False)
        ready = decode((await get(http, f"{gw.url}/readyz"))[1])
        assert ready["status"] == "degraded"
        assert [(c["name"], c["ok"]) for c in ready["checks"]] == [("nats", True), ("redis", True), ("postgres", False)]
        for path in ("history/BTC", "ticks/BTC", "prices/ETH"):
            status, text = await get(http, f"{gw.url}/api/v1/{path}")
            body = decode(text)
            assert (status, body["code"]) == (503, "store_unavailable"), path
            assert body["message"].startswith("postgres unavailable"), body
        listed = decode((await get(http, f"{gw.url}/api/v1/prices"))[1])["prices"]
        assert [p["symbol"] for p in listed] == ["BTC"]  # what Redis has

        async with http.ws_connect(gw.ws_url) as ws:
            await request(ws, {"type": "subscribe", "symbol": "ETH"})
            await publish(nc, make_price(asset="ETH", seq=8))
            update = decode(await ws.receive_str(timeout=5))
            assert (update["data"]["symbol"], update["data"]["seq"], update["data"]["stale"]) == ("ETH", 8, False)

        body = decode((await get(http, f"{gw.url}/api/v1/status"))[1])
        assert [(c["name"], c["ok"]) for c in body["checks"]] == [("nats", True), ("redis", True), ("postgres", False)]
        views = {p["projection"]: p for p in body["projections"]}
        assert views["cache-db-ticks"]["basis"] is None
        assert views["cache-redis"]["basis"] == "live"
