"""Portfolios: PUT/GET valued at the latest prices, 400s for bad holdings, and live `portfolio_update` frames
on the owner's WebSocket, also when the holdings change through another replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS

from pricewire_common.config import Settings
from tests.test_gateway import cache, decode, publish, serving
from tests.test_gateway_auth import bearer, migrated, token, user_gateway, with_auth
from tests.test_gateway_core import make_price

BTC = make_price("BTC", 7)  # 47000.50, 24h change -100.10 (-0.2125 %)
ETH = make_price("ETH", 3, price=Decimal("2500"), change_24h=Decimal("50"), change_pct_24h=Decimal("2.04"))
HOLDINGS = {
    "holdings": [{"symbol": "BTC", "amount": "2.0"}, {"symbol": "eth", "amount": 10}, {"symbol": "SOL", "amount": "1"}]
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def expected_totals(btc_price: Decimal) -> tuple[Decimal, Decimal, Decimal]:
    value = Decimal("2.0") * btc_price + 10 * Decimal(2500)
    change = Decimal("2.0") * Decimal("-100.10") + 10 * Decimal(50)
    return value, change, (change / (value - change) * 100).quantize(Decimal("0.0001"))


async def test_put_then_get_values_holdings_at_the_latest_prices(
    settings: Settings, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, BTC, ETH)
    async with user_gateway(settings) as gw:
        async with http.get(f"{gw.url}/api/v1/portfolio", headers=bearer("alice")) as response:
            assert decode(await response.text()) == {
                "total_value": 0,
                "total_change_24h": None,
                "total_change_percent_24h": None,
                "holdings": [],
                "unpriced": [],
            }
        async with http.put(f"{gw.url}/api/v1/portfolio", json=HOLDINGS, headers=bearer("alice")) as response:
            assert response.status == 200
        async with http.get(f"{gw.url}/api/v1/portfolio", headers=bearer("alice")) as response:
            assert response.status == 200
            body = decode(await response.text())
        async with http.get(f"{gw.url}/api/v1/portfolio", headers=bearer("bob")) as response:
            assert decode(await response.text())["holdings"] == []  # alice's holdings are hers
    value, change, pct = expected_totals(Decimal("47000.50"))
    assert (body["total_value"], body["total_change_24h"], body["total_change_percent_24h"]) == (value, change, pct)
    assert body["unpriced"] == ["SOL"]
    assert body["holdings"] == [
        {
            "symbol": "BTC",
            "amount": Decimal("2.0"),
            "price": Decimal("47000.50"),
            "value": Decimal("94001.000"),
            "change_24h": Decimal("-200.200"),
            "change_percent_24h": Decimal("-0.2125"),
        },
        {
            "symbol": "ETH",
            "amount": Decimal(10),
            "price": Decimal(2500),
            "value": Decimal(25000),
            "change_24h": Decimal(500),
            "change_percent_24h": Decimal("2.04"),
        },
        {
            "symbol": "SOL",
            "amount": Decimal(1),
            "price": None,
            "value": None,
            "change_24h": None,
            "change_percent_24h": None,
        },
    ]


async def test_bad_holdings_get_400s(settings: Settings, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[Any, str]] = [
        ({"holdings": [{"symbol": "XRP", "amount": "1"}]}, "holdings[0].symbol"),
        ({"holdings": [{"symbol": "BTC", "amount": "-1"}]}, ">= 0"),
        ({"holdings": [{"symbol": "BTC", "amount": "1"}, {"symbol": "btcusdt", "amount": "2"}]}, "twice"),
        ({"holdings": [{"symbol": "BTC", "amount": "lots"}]}, "amount"),
        ({"holdings": [{"symbol": "BTC", "amount": "1", "price": 3}]}, "price"),
        ({"assets": []}, "assets"),
        ({}, "holdings"),
    ]
    async with user_gateway(settings) as gw:
        for body, words in cases:
            async with http.put(f"{gw.url}/api/v1/portfolio", json=body, headers=bearer("alice")) as response:
                answer = decode(await response.text())
                assert response.status == 400, (body, answer)
            assert answer["code"] == "bad_parameter"
            assert words in answer["message"], (body, answer)


async def next_portfolio(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    while True:
        message = decode(await ws.receive_str(timeout=10))
        if message["type"] == "portfolio_update":
            return message


async def test_portfolio_updates_follow_prices_and_changes_on_any_replica(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, BTC, ETH)
    await migrated(settings)
    async with serving(with_auth(settings)) as one, serving(with_auth(settings)) as two:
        async with http.put(f"{one.url}/api/v1/portfolio", json=HOLDINGS, headers=bearer("alice")) as response:
            assert response.status == 200
        async with http.ws_connect(f"{two.ws_url}?token={token('alice')}") as ws:
            assert decode(await ws.receive_str(timeout=5))["type"] == "authenticated"
            snapshot = await next_portfolio(ws)
            assert snapshot["data"]["total_value"] == expected_totals(Decimal("47000.50"))[0]
            assert snapshot["timestamp"].endswith("Z")
            # A live price of a held asset revalues the portfolio.
            await publish(nc, make_price("BTC", 8, price=Decimal("48000")))
            update = await next_portfolio(ws)
            value, change, pct = expected_totals(Decimal("48000"))
            assert update["data"]["total_change_24h"] == change
            assert update["data"]["total_value"] == value
            assert update["data"]["total_change_percent_24h"] == pct
            assert update["data"]["holdings"][0]["value"] == Decimal("96000.0")
            # Holdings replaced through the other replica: this one reloads them and pushes the new valuation.
            only_eth = {"holdings": [{"symbol": "ETH", "amount": "1.5"}]}
            async with http.put(f"{one.url}/api/v1/portfolio", json=only_eth, headers=bearer("alice")) as response:
                assert response.status == 200
            changed = await next_portfolio(ws)
            assert changed["data"]["total_value"] == Decimal("3750.0")
            assert [h["symbol"] for h in changed["data"]["holdings"]] == ["ETH"]
            # A price of an asset no longer held sends nothing; the next ETH price does.
            await publish(nc, make_price("BTC", 9, price=Decimal("49000")))
            await publish(nc, make_price("ETH", 4, price=Decimal("2600"), change_24h=Decimal("150")))
            last = await next_portfolio(ws)
            assert last["data"]["total_value"] == Decimal("3900.0")
            assert last["data"]["total_change_24h"] == Decimal("225.0")
