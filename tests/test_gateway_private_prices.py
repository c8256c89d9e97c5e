"""PRICEWIRE_PUBLIC_PRICES: price reads are public by default; switched off, every price read needs a valid token
(REST, the SSE stream, WebSocket price frames), and a socket's price frames end with its sign-in."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import aiohttp
import jwt
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS

from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError
from pricewire_gateway.openapi import PATH as OPENAPI_PATH
from tests.test_gateway import FRAME_TIMEOUT_S, Gateway, cache, decode, frame, publish, request, serving
from tests.test_gateway_auth import AUTH, SECRET, bearer, migrated, token
from tests.test_gateway_core import make_price

PRICE_READS = (
    "/api/v1/prices",
    "/api/v1/prices/BTC",
    "/api/v1/history/BTC",
    "/api/v1/ticks/BTC",
    "/api/v1/quality",
    "/api/v1/quality/BTC",
    "/api/v1/stream",
)


def test_public_prices_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).gateway.public_prices is True
    private = Settings.from_env({"PRICEWIRE_PUBLIC_PRICES": "false", "PRICEWIRE_JWT_SECRET": SECRET})
    assert private.gateway.public_prices is False
    with pytest.raises(ConfigError, match="PRICEWIRE_JWT_SECRET"):  # private, but no key to check tokens with
        Settings.from_env({"PRICEWIRE_PUBLIC_PRICES": "false"})
    with pytest.raises(ConfigError, match="PRICEWIRE_PUBLIC_PRICES"):
        Settings.from_env({"PRICEWIRE_PUBLIC_PRICES": "maybe", "PRICEWIRE_JWT_SECRET": SECRET})


@asynccontextmanager
async def gateway(settings: Settings, *, public: bool, leeway_s: float = 30.0) -> AsyncIterator[Gateway]:
    await migrated(settings)
    configured = replace(
        settings,
        auth=replace(AUTH, leeway_s=leeway_s),
        gateway=replace(settings.gateway, public_prices=public),
    )
    async with serving(configured) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def status_of(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> int:
    async with http.get(url, headers=headers) as response:
        if response.status == 401:
            assert decode(await response.text())["code"] == "unauthorized"
        return response.status  # the stream's 200 comes with its headers: leaving closes it


async def test_price_reads_need_a_token_only_when_prices_are_not_public(
    settings: Settings, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 1))
    async with gateway(settings, public=True) as gw:
        for path in PRICE_READS:
            assert await status_of(http, gw.url + path) == 200, path
    async with gateway(settings, public=False) as gw:
        for path in PRICE_READS:
            assert await status_of(http, gw.url + path) == 401, path
            assert await status_of(http, gw.url + path, bearer("alice")) == 200, path
        # An EventSource cannot send a header: the stream takes the token in its query too.
        assert await status_of(http, f"{gw.url}/api/v1/stream?token={token('alice')}") == 200
        assert await status_of(http, f"{gw.url}/api/v1/stream?token=forged") == 401
        async with http.get(gw.url + OPENAPI_PATH) as response:
            doc = await response.json()
        assert doc["paths"]["/api/v1/prices/{asset}"]["get"]["security"] == [{"bearer": []}]
        assert "401" in doc["paths"]["/api/v1/history/{asset}"]["get"]["responses"]
        assert await status_of(http, f"{gw.url}/api/v1/status") == 200  # not a price read


async def test_a_socket_needs_a_sign_in_for_prices_when_they_are_not_public(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    async with gateway(settings, public=False) as gw, http.ws_connect(gw.ws_url) as ws:
        for ask in (
            {"type": "subscribe", "symbol": "BTC"},
            {"type": "join_room", "room": "prices"},
            {"type": "get_price", "symbol": "BTC"},
        ):
            refused = await request(ws, ask)
            assert (refused["type"], refused["code"]) == ("error", "unauthorized"), ask
        assert await request(ws, {"type": "ping"}) == {"type": "pong"}  # the socket stays open, as for any error
        assert (await request(ws, {"type": "auth", "token": token("alice")}))["type"] == "authenticated"
        assert await request(ws, {"type": "subscribe", "symbol": "BTC"}) == {"type": "subscribed", "symbols": ["BTC"]}
        await publish(nc, make_price("BTC", 7))
        update = await frame(ws)
        assert (update["type"], update["data"]["seq"]) == ("price_update", 7)


async def test_a_private_price_subscription_ends_with_its_token(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    async with gateway(settings, public=False, leeway_s=0.0) as gw:
        # Minted once the gateway is up (its start takes a second or so): 1 to 2 s left as the socket opens.
        soon = jwt.encode({"sub": "ivy", "exp": int(time.time()) + 2}, SECRET, algorithm="HS256")
        async with http.ws_connect(f"{gw.ws_url}?token={soon}") as ws:
            assert decode(await ws.receive_str(timeout=FRAME_TIMEOUT_S))["type"] == "authenticated"
            assert (await request(ws, {"type": "subscribe", "symbol": "ETH"}))["type"] == "subscribed"
            # Its token runs out within two seconds: the socket is closed saying so, not left streaming prices.
            while (message := await ws.receive(timeout=FRAME_TIMEOUT_S)).type is aiohttp.WSMsgType.TEXT:
                assert decode(message.data)["type"] == "price_update"
            assert message.type is aiohttp.WSMsgType.CLOSE, message
            assert (message.data, message.extra) == (
                aiohttp.WSCloseCode.POLICY_VIOLATION,
                "sign-in expired: prices here need a valid token",
            )
