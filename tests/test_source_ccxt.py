"""ccxt: the parser of ccxt frames (venue digits kept), and the collector polling a fake Bitstamp through ccxt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_collector.service import run
from pricewire_collector.sources.base import VenueFrameError
from pricewire_collector.sources.ccxt_source import CcxtParser, encode_frame, point_at
from pricewire_common import subjects
from pricewire_common.config import DEFAULT_ASSETS, DEFAULT_USD_QUOTES, LiveSettings, Settings
from pricewire_common.events import (
    DeadLetter,
    SourceStatus,
    Tick,
    decode_dead_letter,
    decode_source_status,
    decode_tick,
)
from tests.fakes.ccxt_venue import FakeBitstamp, market, ticker
from tests.sourcing import collector

RECEIVED = 1_686_068_945_000_000_000


def parser() -> CcxtParser:
    return CcxtParser(assets=DEFAULT_ASSETS, quotes=DEFAULT_USD_QUOTES)


def unified(symbol: str, info: Mapping[str, object], **figures: float | int | None) -> dict[str, object]:
    """A ticker as ccxt returns it: floats for figures, the venue's raw ticker under `info`."""
    return {"symbol": symbol, "datetime": "2023-06-06T16:29:04.000Z", "info": info, **figures}


# Bitstamp's documented ticker, as ccxt's bitstamp.parse_ticker turns it into floats.
BITSTAMP_INFO = ticker(
    "BTC/USD",
    last="26216.50",
    bid="26208",
    ask="26211.10",
    volume="3563.13819902",
    open_="25730",
    timestamp="1686068944",
)
BITSTAMP_TICKER = unified(
    "BTC/USD",
    BITSTAMP_INFO,
    timestamp=1686068944000,
    last=26216.5,
    bid=26208.0,
    ask=26211.1,
    baseVolume=3563.13819902,
    open=25730.0,
)


def test_figures_keep_the_venues_own_digits() -> None:
    (tick,) = parser().parse(encode_frame("bitstamp", {"BTC/USD": BITSTAMP_TICKER}), RECEIVED)
    assert tick == Tick(
        id="bitstamp:BTC-USD:1686068944000",
        source="bitstamp",
        symbol="BTC-USD",
        base="BTC",
        quote="USD",
        price=Decimal("26216.50"),
        bid=Decimal("26208"),
        ask=Decimal("26211.10"),
        volume_24h=Decimal("3563.13819902"),
        open_24h=Decimal("25730"),
        ts_exchange=1_686_068_944_000_000_000,
        ts_received=RECEIVED,
        kind="poll",
    )
    assert str(tick.price) == "26216.50"


def test_figures_the_raw_ticker_lacks_are_the_floats_shortest_text() -> None:
    bare = unified("ETH/USDT", {"c": ["1800.1", "0.5"]}, timestamp=None, last=1800.1, bid=None, baseVolume=0.1 + 0.2)
    (tick,) = parser().parse(encode_frame("kraken", {"ETH/USDT": bare}), RECEIVED)
    assert (tick.symbol, tick.quote, tick.price, tick.bid) == ("ETH-USDT", "USDT", Decimal("1800.1"), None)
    assert tick.volume_24h == Decimal("0.30000000000000004")
    # No venue time: the receive time stands in, and names the tick.
    assert (tick.ts_exchange, tick.id) == (RECEIVED, f"kraken:ETH-USDT:r{RECEIVED}")


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"not json", "malformed_frame"),
        (b'{"exchange": "bitstamp"}', "malformed_frame"),
        (encode_frame("bitstamp", {"DOGE/USD": unified("DOGE/USD", {}, last=0.1)}), "unknown_symbol"),
        (encode_frame("bitstamp", {"BTC/EUR": unified("BTC/EUR", {}, last=25000.0)}), "unknown_symbol"),
        (encode_frame("bitstamp", {"BTC/USD": unified("BTC/USD", {}, last=None)}), "missing_field"),
        (encode_frame("bitstamp", {"BTC/USD": unified("BTC/USD", {}, last=-5.0)}), "invalid_price"),
        (encode_frame("bitstamp", {"BTC/USD": unified("BTC/USD", {}, last=1e300)}), "invalid_price"),
        (encode_frame("Bit Stamp", {"BTC/USD": unified("BTC/USD", {}, last=1.0)}), "bad_source"),
    ],
)
def test_bad_frames_are_rejected_with_their_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(VenueFrameError) as caught:
        parser().parse(frame, RECEIVED)
    assert caught.value.reason == reason


def test_one_ticker_without_a_price_keeps_the_exchanges_other_tickers() -> None:
    frame = encode_frame(
        "bitstamp",
        {
            "BTC/USD": BITSTAMP_TICKER,
            "ETH/USD": unified("ETH/USD", {}, timestamp=1686068950000, last=None),
        },
    )
    with pytest.raises(VenueFrameError) as caught:
        parser().parse(frame, RECEIVED)
    assert caught.value.reason == "missing_field"
    assert [(t.symbol, t.price) for t in caught.value.ticks] == [("BTC-USD", Decimal("26216.50"))]


def test_api_urls_are_pointed_at_the_override_keeping_their_paths() -> None:
    urls = {"public": "https://www.bitstamp.net/api", "sapi": {"v1": "https://api.binance.com/sapi/v1"}, "x": None}
    assert point_at(urls, "http://127.0.0.1:9/") == {
        "public": "http://127.0.0.1:9/api",
        "sapi": {"v1": "http://127.0.0.1:9/sapi/v1"},
        "x": None,
    }
    assert point_at("https://example.com", "http://proxy/prefix") == "http://proxy/prefix"


# ---- the collector against a fake Bitstamp, through the real ccxt library, and a real NATS --------------------


def bitstamp() -> FakeBitstamp:
    return FakeBitstamp(
        markets=[
            market("BTC", "USD"),
            market("ETH", "USD"),
            market("ETH", "EUR"),
            market("ADA", "USD", trading="Disabled"),
        ],
        tickers=[
            BITSTAMP_INFO,
            ticker(
                "ETH/USD",
                last="1888.4",
                bid="1888.3",
                ask="1888.5",
                volume="1200.5",
                open_="1850",
                timestamp="1686068950",
            ),
            ticker("ETH/EUR", last="1750.0", bid="1749", ask="1751", volume="10", open_="1700", timestamp="1686068950"),
        ],
    )


def live_settings(nats_url: str, fake: FakeBitstamp) -> Settings:
    return replace(
        Settings(),
        nats_url=nats_url,
        feed="live",
        live=replace(
            LiveSettings(),
            sources=("ccxt",),
            ccxt_exchanges=("bitstamp",),
            ccxt_api_url=fake.url,
            ccxt_poll_s=0.05,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
        ),
    )


async def subscribe(nc: NATS) -> tuple[asyncio.Queue[Tick], asyncio.Queue[SourceStatus]]:
    ticks: asyncio.Queue[Tick] = asyncio.Queue()
    states: asyncio.Queue[SourceStatus] = asyncio.Queue()

    async def on_tick(msg: Msg) -> None:
        await ticks.put(decode_tick(msg.data))

    async def on_state(msg: Msg) -> None:
        await states.put(decode_source_status(msg.data))

    await nc.subscribe(f"{subjects.TICK_ROOT}.bitstamp.>", cb=on_tick)
    await nc.subscribe(subjects.source_status("bitstamp"), cb=on_state)
    await nc.flush()
    return ticks, states


async def subscribe_dead_letters(nc: NATS) -> asyncio.Queue[DeadLetter]:
    letters: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def on_letter(msg: Msg) -> None:
        await letters.put(decode_dead_letter(msg.data))

    await nc.subscribe(subjects.dead_letter("collector"), cb=on_letter)
    await nc.flush()
    return letters


async def states_until(states: asyncio.Queue[SourceStatus], wanted: str, *, timeout: float = 5.0) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while not seen or seen[-1] != wanted:
            seen.append((await states.get()).state)
    return seen


async def test_bitstamp_tickers_arrive_through_ccxt_as_exact_ticks(nats_url: str, nc: NATS) -> None:
    ticks, states = await subscribe(nc)
    async with bitstamp() as fake, collector(live_settings(nats_url, fake)):
        assert await states_until(states, "connected") == ["connecting", "connected"]
        got: dict[str, Tick] = {}
        async with asyncio.timeout(5):
            while len(got) < 2:
                tick = await ticks.get()
                got[tick.symbol] = tick
    assert set(got) == {"BTC-USD", "ETH-USD"}  # ETH/EUR is not USD; ADA/USD does not trade; SOL, DOT unlisted
    btc = got["BTC-USD"]
    assert (btc.source, btc.price, btc.bid, btc.ask, btc.volume_24h) == (
        "bitstamp",
        Decimal("26216.50"),
        Decimal("26208"),
        Decimal("26211.10"),
        Decimal("3563.13819902"),
    )
    assert btc.id == "bitstamp:BTC-USD:1686068944000"
    assert got["ETH-USD"].price == Decimal("1888.4")


async def test_a_failing_exchange_reconnects_and_a_429_only_slows_it(nats_url: str, nc: NATS) -> None:
    ticks, states = await subscribe(nc)
    fake = bitstamp()
    fake.ticker_errors.extend([503, 429])
    fake.retry_after = "1"
    async with fake, collector(live_settings(nats_url, fake)):
        seen = await states_until(states, "connected")
        await asyncio.wait_for(ticks.get(), timeout=5)
    assert seen == ["connecting", "reconnecting", "connected"]
    polls = [r for r in fake.requests if r.path == "/api/v2/ticker/"]
    assert [r.status for r in polls[:3]] == [503, 429, 200]
    assert polls[2].at - polls[1].at >= 1.0  # Retry-After: 1


async def test_a_ticker_without_a_price_is_dead_lettered_and_the_others_published(nats_url: str, nc: NATS) -> None:
    ticks, _ = await subscribe(nc)
    letters = await subscribe_dead_letters(nc)
    fake = bitstamp()
    fake.tickers[1] = {**fake.tickers[1], "last": None}  # ETH/USD
    async with fake, collector(live_settings(nats_url, fake)):
        tick = await asyncio.wait_for(ticks.get(), timeout=5)
        letter = await asyncio.wait_for(letters.get(), timeout=5)
    assert (tick.symbol, tick.price) == ("BTC-USD", Decimal("26216.50"))
    assert (letter.subject, letter.reason) == ("venue.bitstamp", "missing_field")
    assert b'"ETH/USD"' in letter.payload


@pytest.mark.parametrize("path", ["/api/v2/markets/", "/api/v2/ticker/"], ids=["load_markets", "fetch_tickers"])
async def test_a_stop_cancels_a_slow_request_and_nothing_is_delivered_after_it(
    nats_url: str, nc: NATS, path: str
) -> None:
    _, states = await subscribe(nc)
    fake = bitstamp()
    fake.delay_s[path] = 5.0
    async with fake:
        stop = asyncio.Event()
        task = asyncio.create_task(run(live_settings(nats_url, fake), stop))
        await fake.wait_requests(path, 1, timeout=5)  # in flight; the answer is 5 s away
        stop.set()
        stopped_at = time.monotonic()
        await asyncio.wait_for(task, timeout=10)
        took_s = time.monotonic() - stopped_at
    assert took_s < 1.0
    assert await states_until(states, "stopped") == ["connecting", "stopped"]
    assert (await nc.jetstream().stream_info(subjects.TICKS_STREAM)).state.messages == 0


async def test_a_dropped_connection_is_a_network_error_retried_as_a_reconnect(nats_url: str, nc: NATS) -> None:
    ticks, states = await subscribe(nc)
    fake = bitstamp()
    fake.drops.extend(["/api/v2/ticker/"] * 2)  # twice: aiohttp retries a reused keep-alive connection once
    async with fake, collector(live_settings(nats_url, fake)):
        seen = await states_until(states, "connected")
        tick = await asyncio.wait_for(ticks.get(), timeout=5)
    assert seen == ["connecting", "reconnecting", "connected"]
    assert tick.source == "bitstamp"
    assert 0 in [r.status for r in fake.requests if r.path == "/api/v2/ticker/"]


async def test_an_answer_ccxt_chokes_on_is_a_bug_that_restarts_the_exchange(nats_url: str, nc: NATS) -> None:
    ticks, states = await subscribe(nc)
    fake = bitstamp()
    markets = fake.markets
    fake.markets = [{**market("BTC", "USD"), "base_decimals": "eight"}]  # ccxt's bitstamp: int("eight"), a ValueError
    async with fake, collector(live_settings(nats_url, fake)):
        seen: list[SourceStatus] = []
        async with asyncio.timeout(5):
            while not seen or seen[-1].state != "stopped":
                seen.append(await states.get())
        fake.markets = markets  # the supervisor starts the exchange again after its backoff
        after = await states_until(states, "connected")
        tick = await asyncio.wait_for(ticks.get(), timeout=5)
    assert [s.state for s in seen] == ["connecting", "stopped"]  # not retried as a venue's 'reconnecting'
    assert "ValueError" in (seen[-1].detail or "")
    assert after == ["connecting", "connected"]
    assert tick.source == "bitstamp"
