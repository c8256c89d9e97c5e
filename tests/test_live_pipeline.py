"""`--feed live` end to end: five fake venues speaking their real protocols, the whole stack, one consensus."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import pytest

from pricewire_cli.stack import run_stack
from pricewire_common.config import Settings
from tests.fakes import coinbase, kraken
from tests.fakes.binance import FakeBinance
from tests.fakes.ccxt_venue import FakeBitstamp, market
from tests.fakes.ccxt_venue import ticker as bitstamp_ticker
from tests.fakes.coingecko import Answer, FakeCoinGecko, simple_price_body
from tests.fakes.script import Pause, Send, Step
from tests.pipeline import running

pytestmark = pytest.mark.slow

LIVE_SOURCES = {"binance", "coinbase", "kraken", "coingecko", "bitstamp"}
EXACT = msgspec.json.Decoder(float_hook=Decimal)


def coinbase_script(n: int) -> list[Step]:
    steps: list[Step] = []
    for i in range(n):
        steps += [Send(coinbase.ticker("BTC-USD", 1000 + i, f"{60005 + i % 3}.00")), Pause(0.2)]
    return steps


def kraken_script(n: int) -> list[Step]:
    steps: list[Step] = [Send(kraken.ticker("BTC/USD", "60003.0", kind="snapshot"))]
    for i in range(n):
        steps += [Pause(0.2), Send(kraken.ticker("BTC/USD", f"{60003 + i % 2}.0"))]
    return steps


async def test_live_feed_turns_five_venues_into_one_consensus(settings: Settings) -> None:
    now_s = int(time.time())
    async with AsyncExitStack() as venues:
        binance = await venues.enter_async_context(FakeBinance(symbols=("BTCUSDT",)))
        cb = await venues.enter_async_context(coinbase.FakeCoinbase([coinbase_script(100)]))
        kr = await venues.enter_async_context(kraken.FakeKraken([kraken_script(100)]))
        gecko_body = simple_price_body(
            {"bitcoin": {"usd": "60004", "usd_24h_vol": "30000000000", "usd_24h_change": "1.5",
                         "last_updated_at": now_s}}
        )  # fmt: skip
        gecko = await venues.enter_async_context(FakeCoinGecko(default=Answer(gecko_body)))
        quote = bitstamp_ticker(
            "BTC/USD", last="60006.00", bid="60005.50", ask="60006.50", volume="1200.5", open_="59100.00",
            timestamp=str(now_s),
        )  # fmt: skip
        bitstamp = await venues.enter_async_context(FakeBitstamp(markets=[market("BTC", "USD")], tickers=[quote]))
        live = replace(
            settings.live,
            binance_ws_url=binance.ws_url,
            binance_rest_url=binance.rest_url,
            coinbase_ws_url=cb.url,
            kraken_ws_url=kr.url,
            coingecko_rest_url=gecko.url,
            ccxt_api_url=bitstamp.url,
            ccxt_exchanges=("bitstamp",),
            coingecko_poll_s=0.5,
            ccxt_poll_s=0.5,
        )
        stack_settings = replace(
            settings,
            feed="live",
            assets=("BTC",),
            live=live,
            gateway=replace(settings.gateway, host="127.0.0.1", port=0),
        )
        stop = asyncio.Event()
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        async with running(asyncio.create_task(run_stack(stack_settings, stop, bound=bound)), stop):
            port = await asyncio.wait_for(bound, timeout=20)
            async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                await ws.send_json({"type": "subscribe", "symbol": "BTC"})
                data = await asyncio.wait_for(consensus_from_all(ws), timeout=30)
                async with http.get(f"http://127.0.0.1:{port}/api/v1/sources") as response:
                    sources = EXACT.decode(await response.read())["sources"]

    assert data["status"] == "ok"
    used = {s["source"] for s in data["sources"] if s["reason"] is None}
    assert used == LIVE_SOURCES
    assert Decimal(60000) < data["price"] < Decimal(60020)
    # Every venue's quote is in USD or a stablecoin, and each keeps the venue's digits.
    assert {s["symbol"] for s in data["sources"]} == {"BTC-USDT", "BTC-USD"}
    states = {s["source"]: s["state"] for s in sources}
    assert {name: states.get(name) for name in LIVE_SOURCES} == dict.fromkeys(LIVE_SOURCES, "connected")


async def consensus_from_all(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The first BTC consensus that used a quote of every live venue."""
    while True:
        frame = EXACT.decode(await ws.receive_str())
        if frame["type"] != "price_update":
            continue
        data = frame["data"]
        if {s["source"] for s in data["sources"] if s["reason"] is None} >= LIVE_SOURCES:
            return dict(data)
