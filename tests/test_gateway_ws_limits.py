"""The WebSocket limits on real NATS, Redis and PostgreSQL: an offending connection goes, the others never notice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from pricewire_cache_writer.migrate import apply_migrations
from pricewire_common.config import Settings
from pricewire_gateway import messages
from pricewire_gateway import ws as ws_module
from pricewire_gateway.client import Client
from pricewire_gateway.limits import RateLimit
from tests.scraping import scrape
from tests.test_gateway import (
    FRAME_TIMEOUT_S,
    Gateway,
    frame,
    publish,
    request,
    serving,
    small_receive_buffer,
    wide_price,
)
from tests.test_gateway_core import make_price
from tests.waiting import eventually


@asynccontextmanager
async def limited(settings: Settings, **limits: Any) -> AsyncIterator[Gateway]:
    """The gateway over a migrated database, with some of its WebSocket limits changed."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    async with serving(replace(settings, gateway=replace(settings.gateway, **limits))) as gw:
        yield gw


async def still_served(bystander: aiohttp.ClientWebSocketResponse, nc: NATS, seq: int) -> None:
    """The bystander (in room `prices`) gets a live update and answers a ping."""
    await publish(nc, make_price("ETH", seq))
    update = await frame(bystander)
    assert (update["type"], update["data"]["symbol"], update["data"]["seq"]) == ("price_update", "ETH", seq)
    assert await request(bystander, {"type": "ping"}) == {"type": "pong"}


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = RateLimit(rate=10.0, burst=10.0, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(10))
    assert not bucket.allow(0.0)
    assert bucket.allow(0.1)  # one token back after a tenth of a second
    assert not bucket.allow(0.1)
    assert sum(bucket.allow(100.0) for _ in range(50)) == 10  # an idle sender banks a burst, no more


async def test_an_oversized_frame_closes_that_connection_only(settings: Settings, nc: NATS) -> None:
    async with (
        limited(settings, ws_max_frame_bytes=4096) as gw,
        aiohttp.ClientSession() as http,
        http.ws_connect(gw.ws_url) as big,
        http.ws_connect(gw.ws_url) as bystander,
    ):
        assert (await request(bystander, {"type": "join_room", "room": "prices"}))["type"] == "room_joined"
        assert await request(big, {"type": "ping", "pad": "x" * 3000}) == {"type": "pong"}  # under the limit
        await big.send_str('{"type":"ping","pad":"' + "x" * 5000 + '"}')
        closed = await big.receive(timeout=FRAME_TIMEOUT_S)
        assert closed.type is aiohttp.WSMsgType.CLOSE
        assert closed.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await still_served(bystander, nc, 1)


async def test_a_flood_closes_that_connection_only_with_a_reason(settings: Settings, nc: NATS) -> None:
    async with (
        limited(settings, ws_max_messages_per_s=5.0) as gw,
        aiohttp.ClientSession() as http,
        http.ws_connect(gw.ws_url) as flooder,
        http.ws_connect(gw.ws_url) as bystander,
    ):
        assert (await request(bystander, {"type": "join_room", "room": "prices"}))["type"] == "room_joined"
        for _ in range(50):
            await flooder.send_str('{"type":"ping"}')
        pongs = 0
        while (message := await flooder.receive(timeout=FRAME_TIMEOUT_S)).type is aiohttp.WSMsgType.TEXT:
            assert message.json() == {"type": "pong"}
            pongs += 1
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert "too many messages" in str(message.extra)
        assert pongs <= 5  # at most the burst (one second's worth) was answered, never the whole flood
        await still_served(bystander, nc, 1)
        assert (await closed_for(http, gw, "flood"), await closed_for(http, gw, "too_slow")) == (1, 0)


async def test_a_subscription_bomb_is_refused_and_bad_json_answered(settings: Settings, nc: NATS) -> None:
    async with (
        limited(settings, ws_max_subscriptions=2) as gw,
        aiohttp.ClientSession() as http,
        http.ws_connect(gw.ws_url) as ws,
    ):
        assert await request(ws, {"type": "subscribe", "symbols": ["BTC", "ETH"]}) == {
            "type": "subscribed",
            "symbols": ["BTC", "ETH"],
        }
        again = await request(ws, {"type": "subscribe", "symbol": "btcusdt"})
        assert again == {"type": "subscribed", "symbols": ["BTC"]}
        for bomb in ({"type": "subscribe", "symbol": "SOL"}, {"type": "subscribe", "symbols": ["ADA", "DOT", "SOL"]}):
            refused = await request(ws, bomb)
            assert (refused["type"], refused["code"]) == ("error", "too_many_subscriptions"), bomb
            assert "at most 2" in refused["message"]
        bad = await request(ws, {"type": "subscribe", "symbols": ["BTC"] * 65})
        assert (bad["type"], bad["code"]) == ("error", "bad_message")
        await ws.send_str("{not json")
        bad = await frame(ws)
        assert (bad["type"], bad["code"]) == ("error", "bad_message")
        assert bad["message"]

        # The refused subscriptions did not take: SOL is not sent, BTC still is; after an unsubscribe there is room.
        await publish(nc, make_price("SOL", 1))
        await publish(nc, make_price("BTC", 2))
        assert (await frame(ws))["data"]["symbol"] == "BTC"
        assert (await request(ws, {"type": "unsubscribe", "symbol": "ETH"}))["type"] == "unsubscribed"
        assert await request(ws, {"type": "subscribe", "symbol": "SOL"}) == {"type": "subscribed", "symbols": ["SOL"]}


async def websocket_clients(http: aiohttp.ClientSession, gw: Gateway) -> float:
    gauge = (await scrape(http, gw.url)).value("pricewire_websocket_clients")
    assert gauge is not None
    return gauge


async def closed_for(http: aiohttp.ClientSession, gw: Gateway, reason: str) -> float:
    """`pricewire_websocket_closed_total{reason}` of the gateway (0 before its first such close)."""
    return (await scrape(http, gw.url)).value("pricewire_websocket_closed_total", reason=reason) or 0.0


async def test_a_client_that_stays_behind_is_closed_and_the_others_go_on(settings: Settings, nc: NATS) -> None:
    async with (
        limited(settings, ws_slow_client_s=1.0) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as slow_http,
        aiohttp.ClientSession() as http,
        slow_http.ws_connect(gw.ws_url) as slow,
        http.ws_connect(gw.ws_url) as fast,
    ):
        for ws in (slow, fast):
            assert (await request(ws, {"type": "join_room", "room": "prices"}))["type"] == "room_joined"
        assert await websocket_clients(http, gw) == 2
        # Fill the slow client's pipe (it never reads): its writer blocks on one frame past the grace.
        for seq in range(1, 121):
            await publish(nc, wide_price(seq))
            assert (await frame(fast))["data"]["seq"] == seq
        # It leaves the fan-out (and the count) as soon as it is found behind; its close waits for it to read.
        await eventually(lambda: websocket_clients(http, gw), lambda n: n == 1, what="the slow client dropped")
        await still_served(fast, nc, 1)
        assert (await closed_for(http, gw, "too_slow"), await closed_for(http, gw, "flood")) == (1, 0)

        # What the slow client's buffers held, then a close that says why, never the whole backlog.
        seqs: list[int] = []
        while (message := await slow.receive(timeout=FRAME_TIMEOUT_S)).type is aiohttp.WSMsgType.TEXT:
            seqs.append(message.json()["data"]["seq"])
        assert message.type is aiohttp.WSMsgType.CLOSE, message
        assert (message.data, message.extra) == (aiohttp.WSCloseCode.POLICY_VIOLATION, "too slow: frames left unread")
        assert seqs == sorted(set(seqs))
        assert len(seqs) < 120


async def test_a_fault_serving_one_frame_answers_internal_and_the_socket_goes_on(
    settings: Settings, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in serving one request, injected into the gateway's own code (no store is faked): the first ping.
    serve = ws_module.serve_request
    pings: list[messages.Request] = []

    async def first_ping_fails(app: web.Application, client: Client, req: messages.Request) -> None:
        if isinstance(req, messages.Ping) and not pings:
            pings.append(req)
            raise RuntimeError("a bug in serving a ping")
        await serve(app, client, req)

    monkeypatch.setattr(ws_module, "serve_request", first_ping_fails)
    async with (
        limited(settings) as gw,
        aiohttp.ClientSession() as http,
        http.ws_connect(gw.ws_url) as ws,
    ):
        assert (await request(ws, {"type": "subscribe", "symbol": "ETH"}))["type"] == "subscribed"
        failed = await request(ws, {"type": "ping"})
        await still_served(ws, nc, 1)  # the same socket: its subscription and the next ping are served

    assert (failed["type"], failed["code"]) == ("error", "internal")
    assert "logged" in failed["message"]  # the traceback is in the log (ws_request_failed), not in the frame
    assert "a bug" not in failed["message"]
