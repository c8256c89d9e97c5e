"""The gateway service on real NATS, Redis and PostgreSQL: REST, readiness, the WebSocket protocol, the page."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from aiohappyeyeballs import AddrInfoType
from nats.aio.client import Client as NATS

from pricewire_cache_writer.migrate import apply_migrations, packaged_migrations
from pricewire_cli.embedded import NatsServer, free_port
from pricewire_common import subjects
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.events import Price, SourceQuote, decode_dead_letter, encode
from pricewire_gateway.service import run
from tests.test_gateway_core import make_price
from tests.waiting import eventually

FRAME_TIMEOUT_S = 5.0
PRICE_DETAILS_MIGRATION = 4
"""The migration that adds the prices' method, cv_pct, anomaly and z_score columns."""


@dataclass
class Gateway:
    url: str
    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def ws_url(self) -> str:
        return f"{self.url}/ws"


@asynccontextmanager
async def serving(settings: Settings, *, clock: Clock = wall_clock) -> AsyncIterator[Gateway]:
    """The gateway on a free port of 127.0.0.1, stopped (and its error raised) on the way out."""
    settings = replace(settings, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(settings, stop, bound=bound, clock=clock))
    try:
        started: set[asyncio.Future[Any]] = {task, bound}
        await asyncio.wait(started, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield Gateway(f"http://127.0.0.1:{bound.result()}", settings, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway over a migrated database, as it finds one once the cache_writer has started."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    async with serving(settings) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def cache(redis_client: redis_asyncio.Redis, *prices: Price) -> None:
    """Write prices where cache_writer would: `price:<ASSET>:detail`."""
    for price in prices:
        await redis_client.set(f"price:{price.asset}:detail", encode(price))


async def publish(nc: NATS, price: Price, *, subject: str | None = None) -> None:
    await nc.publish(subject or subjects.price(price.asset), encode(price))
    await nc.flush()


def decode(text: str) -> dict[str, Any]:
    value = json.loads(text, parse_float=Decimal)
    assert isinstance(value, dict)
    return value


async def frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    return decode(await ws.receive_str(timeout=FRAME_TIMEOUT_S))


async def request(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> dict[str, Any]:
    await ws.send_json(message)
    return await frame(ws)


# --- REST ----------------------------------------------------------------------------------------


async def test_prices_list_in_configured_order_with_exact_digits(
    gateway: Gateway, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("ETH", 3, price=Decimal("2500.000001")), make_price("BTC", 7))
    async with http.get(f"{gateway.url}/api/v1/prices") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        text = await response.text()
    assert '"price":47000.50' in text
    assert '"price":2500.000001' in text
    body = decode(text)
    assert [p["symbol"] for p in body["prices"]] == ["BTC", "ETH"]  # settings.assets order, SOL.. have none
    btc = body["prices"][0]
    assert btc.pop("age_s") > 0  # the event is from 2023; exact ages: tests/test_gateway_history.py
    assert btc == {
        "symbol": "BTC",
        "price": Decimal("47000.50"),
        "change_24h": Decimal("-100.10"),
        "change_percent_24h": Decimal("-0.2125"),
        "volume_24h": Decimal("1234.5"),
        "timestamp": "2023-11-14T22:13:20.123Z",
        "currency": "USD",
        "confidence": Decimal("12.25"),
        "status": "ok",
        "method": "median",  # an event without the field (the factory sets none) reads as median
        "cv_pct": None,
        "anomaly": False,
        "z_score": None,
        "n_sources": 3,
        "n_used": 2,
        "sources": [
            {
                "source": "sim-a",
                "symbol": "BTC-USDT",
                "price": Decimal("47000.40"),
                "deviation_pct": Decimal("-0.0002"),
                "age_ms": 120,
                "outlier": False,
                "reason": None,
                "weight": Decimal("0"),
                "kind": "stream",
            }
        ],
        "seq": 7,
        "ts_tick": 1_700_000_000_100_000_000,
        "stale": False,
    }
    assert body["timestamp"].endswith("Z")


async def test_one_price_by_asset_or_pair(
    gateway: Gateway, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 7))
    for name in ("BTC", "btc", "BTC-USDT", "btcusd"):
        async with http.get(f"{gateway.url}/api/v1/prices/{name}") as response:
            assert response.status == 200, name
            text = await response.text()
        assert text.startswith('{"symbol":"BTC","price":47000.50,')
        assert decode(text)["seq"] == 7


async def test_unknown_asset_and_missing_price_are_typed_404s(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/api/v1/prices/XRP") as response:
        assert response.status == 404
        body = decode(await response.text())
    assert body["type"] == "error"
    assert body["code"] == "unknown_asset"
    assert "XRP" in body["message"]
    async with http.get(f"{gateway.url}/api/v1/prices/SOL") as response:
        assert response.status == 404
        assert decode(await response.text())["code"] == "no_price"
    async with http.get(f"{gateway.url}/api/v1/prices") as response:
        assert response.status == 200
        assert decode(await response.text())["prices"] == []


async def test_a_corrupt_cache_entry_is_reported_not_served(
    gateway: Gateway, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 1))
    await redis_client.set("price:ETH:detail", "{not a price")
    async with http.get(f"{gateway.url}/api/v1/prices/ETH") as response:
        assert response.status == 500
        assert decode(await response.text())["code"] == "bad_cache_entry"
    async with http.get(f"{gateway.url}/api/v1/prices") as response:
        assert [p["symbol"] for p in decode(await response.text())["prices"]] == ["BTC"]


async def test_health_and_readiness(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/healthz") as response:
        assert response.status == 200
        assert await response.text() == '{"status":"ok"}'
    async with http.get(f"{gateway.url}/readyz") as response:
        assert response.status == 200
        body = decode(await response.text())
    assert body == {
        "status": "ready",
        "checks": [
            {"name": "nats", "ok": True, "error": None},
            {"name": "redis", "ok": True, "error": None},
            {"name": "postgres", "ok": True, "error": None},
        ],
    }


async def test_readiness_is_degraded_while_redis_is_unreachable(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    dead = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with serving(dead) as gw:
        async with http.get(f"{gw.url}/readyz") as response:
            assert response.status == 200  # PostgreSQL stands in for the latest prices
            body = decode(await response.text())
        async with http.get(f"{gw.url}/api/v1/prices/BTC") as response:
            assert response.status == 503  # and has none (no schema yet): no store could tell
            error = decode(await response.text())
        async with http.get(f"{gw.url}/healthz") as response:
            assert response.status == 200
    checks = {check["name"]: check for check in body["checks"]}
    assert body["status"] == "degraded"
    assert checks["redis"]["ok"] is False
    assert checks["redis"]["error"]
    assert checks["nats"]["ok"] is True
    assert checks["postgres"]["ok"] is True
    assert error["code"] == "store_unavailable"
    assert error["message"].startswith("redis unavailable: no price for BTC")


async def test_a_schema_migrated_halfway_is_a_store_not_ready_yet_not_a_crash(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    # The cache_writer migrates while the gateway already serves (its PostgreSQL side comes up in the
    # background): prices without the columns migration 4 adds made the archive's query raise
    # UndefinedColumnError, a 500, and a WebSocket subscribe crashed the connection (found in CI).
    conn = await asyncpg.connect(settings.database_url)
    try:
        await apply_migrations(conn, [m for m in packaged_migrations() if m.version < PRICE_DETAILS_MIGRATION])
    finally:
        await conn.close()
    async with serving(settings) as gw:
        async with http.get(f"{gw.url}/api/v1/prices/BTC") as response:
            assert response.status == 503, await response.text()
            error = decode(await response.text())
        async with http.ws_connect(gw.ws_url) as ws:
            assert await request(ws, {"type": "subscribe", "symbol": "BTC"}) == {
                "type": "subscribed",
                "symbols": ["BTC"],
            }
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"  # the socket is still served
    assert error["code"] == "store_unavailable"
    assert "not migrated yet" in error["message"]


async def test_readiness_fails_while_both_stores_are_unreachable(
    settings: Settings, http: aiohttp.ClientSession
) -> None:
    dead = replace(
        settings,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        database_url=f"postgresql://pricewire@127.0.0.1:{free_port()}/pricewire",
    )
    async with serving(dead) as gw:
        async with http.get(f"{gw.url}/readyz") as response:
            assert response.status == 503
            body = decode(await response.text())
        async with http.get(f"{gw.url}/api/v1/prices") as response:
            assert response.status == 503
            assert decode(await response.text())["code"] == "store_unavailable"
        async with http.get(f"{gw.url}/healthz") as response:
            assert response.status == 200  # alive, just not ready
    assert body["status"] == "unavailable"
    assert [(c["name"], c["ok"]) for c in body["checks"]] == [("nats", True), ("redis", False), ("postgres", False)]


async def test_a_stop_while_nats_is_reconnecting_closes_cleanly(
    settings: Settings, nats_server: NatsServer, http: aiohttp.ClientSession
) -> None:
    # nats-py refuses to drain a reconnecting client (ConnectionReconnectingError): run must not raise.
    async with serving(replace(settings, nats_url=nats_server.url)) as gw:
        nats_server.stop()

        async def nats_check() -> dict[str, Any]:
            async with http.get(f"{gw.url}/readyz") as response:
                body = decode(await response.text())
            return next(check for check in body["checks"] if check["name"] == "nats")

        await eventually(nats_check, lambda check: check["ok"] is False, what="the gateway sees NATS gone")
    # serving() has stopped the gateway and awaited run(): it returned instead of raising.
    assert gw.task.done() and gw.task.exception() is None


# --- the page ------------------------------------------------------------------------------------


async def test_the_page_has_a_card_per_asset_and_its_own_script(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    for asset in gateway.settings.assets:
        assert f'<article class="card" data-asset="{asset}" id="card-{asset}">' in page
    assert page.count('class="price"') == page.count('class="status"') == len(gateway.settings.assets)
    assert 'id="connection"' in page
    assert '<script src="/static/app.js" defer></script>' in page
    assert '<link rel="stylesheet" href="/static/style.css">' in page
    async with http.get(f"{gateway.url}/static/app.js") as response:
        assert response.status == 200
        script = await response.text()
    for needle in ('fetch("/api/v1/prices"', "new WebSocket(", '"join_room"', '"price_update"', ".card[data-asset="):
        assert needle in script
    async with http.get(f"{gateway.url}/static/style.css") as response:
        assert response.status == 200
        style = await response.text()
    for text in (page, script, style):
        assert "http://" not in text
        assert "https://" not in text  # no CDN: the page works offline


# --- WebSocket -----------------------------------------------------------------------------------


async def test_subscribe_sends_the_latest_price_then_live_updates(
    gateway: Gateway, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis, nc: NATS
) -> None:
    await cache(redis_client, make_price("BTC", 1))
    async with http.ws_connect(gateway.ws_url) as ws:
        assert await request(ws, {"type": "subscribe", "symbol": "btcusdt"}) == {
            "type": "subscribed",
            "symbols": ["BTC"],
        }
        snapshot = await frame(ws)
        assert snapshot["type"] == "price_update"
        assert snapshot["data"]["seq"] == 1

        await publish(nc, make_price("BTC", 2, price=Decimal("47001.25"), status="degraded", n_used=1))
        text = await ws.receive_str(timeout=FRAME_TIMEOUT_S)
        assert '"price":47001.25' in text
        update = decode(text)
        assert update["type"] == "price_update"
        assert update["timestamp"].endswith("Z")
        data = update["data"]
        assert (data["symbol"], data["seq"], data["status"], data["n_used"]) == ("BTC", 2, "degraded", 1)
        assert data["price"] == Decimal("47001.25")
        assert data["confidence"] == Decimal("12.25")
        assert data["ts_tick"] == 1_700_000_000_100_000_000
        assert data["sources"][0]["source"] == "sim-a"


async def test_room_prices_gets_every_asset(
    gateway: Gateway, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis, nc: NATS
) -> None:
    await cache(redis_client, make_price("SOL", 4), make_price("BTC", 1), make_price("ETH", 2))
    async with http.ws_connect(gateway.ws_url) as ws:
        assert await request(ws, {"type": "join_room", "room": "prices"}) == {
            "type": "room_joined",
            "room": "prices",
        }
        snapshot = [await frame(ws) for _ in range(3)]
        assert [(f["type"], f["data"]["symbol"]) for f in snapshot] == [
            ("price_update", "BTC"),
            ("price_update", "ETH"),
            ("price_update", "SOL"),
        ]
        for asset in ("DOT", "ADA"):
            await publish(nc, make_price(asset, 1))
        assert [(await frame(ws))["data"]["symbol"] for _ in range(2)] == ["DOT", "ADA"]

        assert await request(ws, {"type": "leave_room", "room": "prices"}) == {"type": "room_left", "room": "prices"}
        assert await request(ws, {"type": "subscribe", "symbol": "BTC"}) == {"type": "subscribed", "symbols": ["BTC"]}
        assert (await frame(ws))["data"]["seq"] == 1  # the BTC snapshot
        # One publisher, one subscription: the gateway handles DOT before BTC, so a DOT update
        # still sent after leaving the room would reach the socket before the BTC one.
        await publish(nc, make_price("DOT", 2))
        await publish(nc, make_price("BTC", 2))
        update = await frame(ws)
        assert (update["type"], update["data"]["symbol"], update["data"]["seq"]) == ("price_update", "BTC", 2)


async def test_an_unsubscribed_asset_is_not_sent(gateway: Gateway, http: aiohttp.ClientSession, nc: NATS) -> None:
    async with http.ws_connect(gateway.ws_url) as ws:
        assert await request(ws, {"type": "subscribe", "symbols": ["BTC", "ETH-USDT"]}) == {
            "type": "subscribed",
            "symbols": ["BTC", "ETH"],
        }
        assert await request(ws, {"type": "unsubscribe", "symbol": "eth"}) == {
            "type": "unsubscribed",
            "symbols": ["ETH"],
        }
        # Published in this order on one connection: an ETH update, if sent, would arrive first.
        await publish(nc, make_price("ETH", 1))
        await publish(nc, make_price("SOL", 1))
        await publish(nc, make_price("BTC", 1))
        update = await frame(ws)
        assert (update["type"], update["data"]["symbol"]) == ("price_update", "BTC")


async def test_bad_requests_get_typed_errors_and_the_socket_stays_usable(
    gateway: Gateway, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 9))
    async with http.ws_connect(gateway.ws_url) as ws:
        await ws.send_str("this is not json")
        assert (await frame(ws))["code"] == "bad_message"
        await ws.send_bytes(b'{"type":"ping"}')
        assert (await frame(ws))["code"] == "bad_message"
        cases: list[tuple[dict[str, Any], str]] = [
            ({"type": "dance"}, "unknown_type"),
            ({"type": "subscribe"}, "bad_message"),
            ({"type": "subscribe", "symbols": ["BTC", "XRP"]}, "unknown_asset"),
            ({"type": "subscribe", "symbol": "BTC-EUR"}, "unknown_asset"),
            ({"type": "join_room", "room": "vip"}, "unknown_room"),
            ({"type": "leave_room"}, "bad_message"),
            ({"type": "get_price", "symbol": "SOL"}, "no_price"),
            ({"type": "get_price", "symbol": "DOGE"}, "unknown_asset"),
        ]
        for message, code in cases:
            reply = await request(ws, message)
            assert reply["type"] == "error", message
            assert reply["code"] == code, message
            assert reply["message"]
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        price = await request(ws, {"type": "get_price", "symbol": "BTCUSDT"})
        assert (price["type"], price["data"]["symbol"], price["data"]["seq"]) == ("price_update", "BTC", 9)
        assert not ws.closed


async def test_an_oversized_frame_closes_the_connection(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(gateway.ws_url) as ws:
        await ws.send_str('{"type":"ping","pad":"' + "x" * 70_000 + '"}')
        message = await ws.receive(timeout=FRAME_TIMEOUT_S)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_a_bad_price_is_dead_lettered_and_the_feed_goes_on(
    gateway: Gateway, http: aiohttp.ClientSession, nc: NATS
) -> None:
    js = nc.jetstream()
    letters = await js.subscribe(subjects.dead_letter("gateway"), stream=subjects.DLQ_STREAM)
    async with http.ws_connect(gateway.ws_url) as ws:
        await request(ws, {"type": "subscribe", "symbol": "BTC"})
        await nc.publish(subjects.price("BTC"), b'{"v":1,"asset":')
        await publish(nc, make_price("ETH", 1), subject=subjects.price("BTC"))
        await publish(nc, make_price("BTC", 5))

        update = await frame(ws)
        assert (update["data"]["symbol"], update["data"]["seq"]) == ("BTC", 5)
    first = decode_dead_letter((await letters.next_msg(timeout=FRAME_TIMEOUT_S)).data)
    second = decode_dead_letter((await letters.next_msg(timeout=FRAME_TIMEOUT_S)).data)
    await letters.unsubscribe()
    assert (first.service, first.subject, first.reason) == ("gateway", "md.price.BTC", "decode_error")
    assert first.payload == b'{"v":1,"asset":'
    assert (second.reason, second.subject) == ("asset_mismatch", "md.price.BTC")
    assert second.payload == encode(make_price("ETH", 1))


def small_receive_buffer(addr_info: AddrInfoType) -> socket.socket:
    """A client socket with a fixed 64 KiB receive buffer (no autotuning): a client that does not read
    stalls the server's writes after a known amount, whatever the host's TCP settings."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return sock


def wide_price(seq: int) -> Price:
    """A BTC price with many sources: about 31 KiB on the wire."""
    quotes = tuple(
        SourceQuote(
            source=f"venue-{i:02d}",
            symbol="BTC-USDT",
            price=Decimal("47000.50"),
            deviation_pct=Decimal("0.0001"),
            age_ms=i,
            outlier=False,
        )
        for i in range(240)
    )
    return make_price("BTC", seq, sources=quotes, n_sources=240, n_used=240)


async def test_a_client_that_never_reads_does_not_delay_the_others(gateway: Gateway, nc: NATS) -> None:
    rounds = 120
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as slow_http,
        aiohttp.ClientSession() as fast_http,
        slow_http.ws_connect(gateway.ws_url) as slow,
        fast_http.ws_connect(gateway.ws_url) as fast,
    ):
        for ws in (slow, fast):
            assert (await request(ws, {"type": "join_room", "room": "prices"}))["type"] == "room_joined"

        # The fast client sees every update as soon as it is published, however full the slow one's pipe is.
        for seq in range(1, rounds + 1):
            await publish(nc, wide_price(seq))
            update = await frame(fast)
            assert update["data"]["seq"] == seq

        # The slow client then gets what its buffers held, and the latest price: conflated, never lost.
        seen: list[int] = []
        while not seen or seen[-1] != rounds:
            seen.append((await frame(slow))["data"]["seq"])
        assert seen == sorted(set(seen))
        assert len(seen) < rounds  # frames replaced while its pipe was full


async def test_stop_closes_clients_with_going_away(settings: Settings, nc: NATS) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as slow_http,
        aiohttp.ClientSession() as http,
        serving(settings) as gw,
    ):
        stuck = await slow_http.ws_connect(gw.ws_url)
        await request(stuck, {"type": "subscribe", "symbol": "BTC"})
        for seq in range(1, 100):
            await publish(nc, wide_price(seq))  # fill its pipe: its writer is blocked when we stop
        ws = await http.ws_connect(gw.ws_url)
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
        gw.stop.set()
        message = await ws.receive(timeout=FRAME_TIMEOUT_S)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(gw.task, timeout=10)  # not held up by the client that never reads
        await ws.close()
        await stuck.close()
