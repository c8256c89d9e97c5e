"""The seeds' WebSocket clients, frame for frame, on real NATS, Redis and PostgreSQL: each message they send
gets its typed answer on one socket, and errors are typed frames that leave the socket open."""

from __future__ import annotations

import aiohttp
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS

from pricewire_common.config import Settings
from tests.test_gateway import cache, frame, publish, request
from tests.test_gateway_auth import token, user_gateway
from tests.test_gateway_core import make_price


async def test_every_message_the_seed_clients_send_is_answered(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 3))
    async with user_gateway(settings) as gw, aiohttp.ClientSession() as http, http.ws_connect(gw.ws_url) as ws:
        # Seed 002's page: join the prices room, then every update.
        assert await request(ws, {"type": "join_room", "room": "prices"}) == {"type": "room_joined", "room": "prices"}
        snapshot = await frame(ws)
        assert (snapshot["type"], snapshot["data"]["symbol"], snapshot["data"]["seq"]) == ("price_update", "BTC", 3)
        assert await request(ws, {"type": "leave_room", "room": "prices"}) == {"type": "room_left", "room": "prices"}

        # Seed 004's three messages, verbatim.
        subscribed = await request(ws, {"type": "subscribe", "symbol": "btcusdt"})
        assert subscribed == {"type": "subscribed", "symbols": ["BTC"]}
        assert (await frame(ws))["data"]["seq"] == 3  # the latest price follows the answer
        got = await request(ws, {"type": "get_price", "symbol": "btcusdt"})
        assert (got["type"], got["data"]["symbol"], got["data"]["price"]) == ("price_update", "BTC", 47000.5)
        seed_alert = {
            "type": "price_alert",
            "data": {"symbol": "btcusdt", "target_price": 50000.0, "alert_type": "above"},
        }
        refused = await request(ws, seed_alert)
        assert (refused["type"], refused["code"]) == ("error", "unauthorized")
        signed_in = await request(ws, {"type": "auth", "token": token("seed")})
        assert signed_in == {"type": "authenticated", "user": "seed", "admin": False}
        created = await request(ws, seed_alert)
        assert created["type"] == "alert_created"
        assert (created["data"]["symbol"], created["data"]["alert_type"]) == ("BTC", "above")
        assert created["data"]["target_price"] == 50000.0

        # Live updates of the subscribed asset only; unsubscribe by list.
        await publish(nc, make_price("ETH", 4))
        await publish(nc, make_price("BTC", 5))
        assert (await frame(ws))["data"]["symbol"] == "BTC"
        unsubscribed = await request(ws, {"type": "unsubscribe", "symbols": ["BTC-USDT"]})
        assert unsubscribed == {"type": "unsubscribed", "symbols": ["BTC"]}
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}
