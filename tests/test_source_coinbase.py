"""Coinbase Exchange feed: the parser on documented frames, and the collector against a fake feed and a real NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from pricewire_collector.sources import coinbase
from pricewire_collector.sources.base import VenueFrameError
from pricewire_collector.sources.resilience import Backoff, CircuitBreaker
from pricewire_collector.sources.wsconnection import WebSocketSource
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.clock import ns_from_rfc3339
from pricewire_common.config import Settings
from pricewire_common.errors import RejectedInput
from pricewire_common.events import (
    SourceState,
    Tick,
)
from pricewire_common.rules import check_tick
from tests.fakes.coinbase import FakeCoinbase, error, heartbeat, rest_ticker, subscriptions, ticker
from tests.fakes.script import Drop, Pause, Send, Silence, Step
from tests.sourcing import collector, states_until, take_letters, take_ticks

RECEIVED = 1_666_222_102_100_000_000
FIXTURE = Path(__file__).parent / "fixtures" / "coinbase.ndjson"

# The ticker example of the Exchange WebSocket documentation, verbatim.
DOCUMENTED_TICKER = (
    b'{"type":"ticker","sequence":37475248783,"product_id":"ETH-USD","price":"1285.22","open_24h":"1310.79",'
    b'"volume_24h":"245532.79269678","low_24h":"1280.52","high_24h":"1313.8","volume_30d":"9788783.60117027",'
    b'"best_bid":"1285.04","best_bid_size":"0.46688654","best_ask":"1285.27","best_ask_size":"1.56637040",'
    b'"side":"buy","time":"2022-10-19T23:28:22.061769Z","trade_id":370843401,"last_size":"11.4396987"}'
)


def parser() -> coinbase.CoinbaseParser:
    return coinbase.CoinbaseParser(assets=("BTC", "ETH", "SOL"), quotes=("USD", "USDT", "USDC"))


def reason_of(frame: bytes | str, p: coinbase.CoinbaseParser | None = None) -> str:
    with pytest.raises(VenueFrameError) as caught:
        (p or parser()).parse(frame.encode() if isinstance(frame, str) else frame, RECEIVED)
    return caught.value.reason


# --- the parser -------------------------------------------------------------------------------------------


def test_documented_ticker_becomes_an_exact_tick() -> None:
    [tick] = parser().parse(DOCUMENTED_TICKER, RECEIVED)
    assert tick == Tick(
        id="coinbase:ETH-USD:37475248783",
        source="coinbase",
        symbol="ETH-USD",
        base="ETH",
        quote="USD",
        price=Decimal("1285.22"),
        bid=Decimal("1285.04"),
        ask=Decimal("1285.27"),
        volume_24h=Decimal("245532.79269678"),
        open_24h=Decimal("1310.79"),
        ts_exchange=1_666_222_102_061_769_000,
        ts_received=RECEIVED,
    )
    assert str(tick.volume_24h) == "245532.79269678"


@pytest.mark.parametrize(
    "frame",
    [
        heartbeat("BTC-USD", 90, time="2014-11-07T08:19:28.464459Z"),
        subscriptions(["BTC-USD"], ["ticker", "heartbeat"]),
        '{"type":"status","products":[],"currencies":[]}',  # a type the feed may add: ignored, as documented
    ],
)
def test_control_frames_carry_no_ticks(frame: str) -> None:
    assert parser().parse(frame.encode(), RECEIVED) == []


def test_error_frame_is_a_venue_error() -> None:
    assert reason_of(error("Failed to subscribe", "DOGE-XYZ is not a valid product")) == "venue_error"


def test_older_or_repeated_sequence_is_out_of_order_per_product() -> None:
    p = parser()
    assert p.parse(ticker("BTC-USD", 100, "67000").encode(), RECEIVED)
    assert reason_of(ticker("BTC-USD", 100, "67000"), p) == "out_of_order"  # a duplicate
    assert reason_of(ticker("BTC-USD", 99, "66990"), p) == "out_of_order"
    assert p.parse(ticker("ETH-USD", 5, "3500").encode(), RECEIVED)  # other products keep their own order
    assert reason_of(ticker("BTC-USD", 101, "0"), p) == "invalid_price"  # a rejected frame does not move it on
    [tick] = p.parse(ticker("BTC-USD", 101, "67001").encode(), RECEIVED)
    assert tick.id == "coinbase:BTC-USD:101"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"not json {", "malformed_frame"),
        (b"[1, 2]", "malformed_frame"),
        (b'{"no_type": 1}', "malformed_frame"),
        (b'{"type":"ticker","product_id":"BTC-USD","price":"1","time":"2022-10-19T23:28:22Z"}', "missing_field"),
        (ticker("BTC-USD", 1, "1").replace('"sequence":1', '"sequence":"one"').encode(), "malformed_frame"),
        (ticker("DOGE-USD", 1, "0.1").encode(), "unknown_symbol"),
        (ticker("BTC-EUR", 1, "60000").encode(), "unknown_symbol"),
        (ticker("BTCUSD", 1, "60000").encode(), "unknown_symbol"),
        (ticker("BTC-USD", 1, "0").encode(), "invalid_price"),
        (ticker("BTC-USD", 1, "-5").encode(), "invalid_price"),
        (ticker("BTC-USD", 1, "1e13").encode(), "invalid_price"),
        (ticker("BTC-USD", 1, "67000", best_bid="NaN").encode(), "invalid_price"),
        (ticker("BTC-USD", 1, "67000", time="yesterday").encode(), "malformed_frame"),
        (ticker("BTC-USD", 1, "67000", time="2022-02-30T00:00:00Z").encode(), "malformed_frame"),
        (ticker("BTC-USD", 1, "67000", time="1969-12-31T23:59:59Z").encode(), "bad_timestamp"),
    ],
)
def test_bad_frames_are_rejected_with_their_reason(frame: bytes, reason: str) -> None:
    assert reason_of(frame) == reason


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2022-10-19T23:28:22.061769Z", 1_666_222_102_061_769_000),
        ("2023-06-23T20:31:26.122969572Z", 1_687_552_286_122_969_572),
        ("2023-06-23T20:31:26.1229695729Z", 1_687_552_286_122_969_572),
        ("2023-06-23T22:31:26.5+02:00", 1_687_552_286_500_000_000),
        ("2023-06-23T18:01:26-02:30", 1_687_552_286_000_000_000),
    ],
)
def test_rfc3339_times_to_exact_ns(text: str, ns: int) -> None:
    assert ns_from_rfc3339(text) == ns


def test_subscribe_message_names_usd_products_and_both_channels() -> None:
    message = json.loads(coinbase.subscribe_message(replace(Settings(), assets=("BTC", "ETH"))))
    assert message == {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"], "channels": ["ticker", "heartbeat"]}


def test_capture_fixture_parses_as_documented() -> None:
    p = parser()
    outcomes: list[str] = []
    for line in FIXTURE.read_bytes().splitlines():
        record = json.loads(line)
        assert record["source"] == "coinbase"
        try:
            ticks = p.parse(record["frame"].encode(), record["received_ns"])
        except VenueFrameError as err:
            outcomes.append(err.reason)
        else:
            outcomes.append(f"{len(ticks)} ticks")
    assert len(outcomes) >= 12
    assert outcomes.count("1 ticks") >= 6
    assert {"malformed_frame", "out_of_order"} <= set(outcomes)


# The `GET /products/{product_id}/ticker` example of the Exchange REST documentation.
DOCUMENTED_REST_TICKER = (
    b'{"ask":"6267.71","bid":"6265.15","volume":"53602.03940154","trade_id":86326522,'
    b'"price":"6268.48","size":"0.00698254","time":"2020-03-20T00:22:57.833Z"}'
)


def rest_parser(product_id: str = "BTC-USD") -> coinbase.CoinbaseRestParser:
    return coinbase.CoinbaseRestParser(product_id, assets=("BTC", "ETH", "SOL"), quotes=("USD", "USDT", "USDC"))


def test_documented_rest_ticker_becomes_an_exact_tick_with_an_r_id() -> None:
    [tick] = rest_parser().parse(DOCUMENTED_REST_TICKER, RECEIVED)
    assert tick == Tick(
        id="coinbase:BTC-USD:r86326522",
        source="coinbase",
        symbol="BTC-USD",
        base="BTC",
        quote="USD",
        price=Decimal("6268.48"),
        bid=Decimal("6265.15"),
        ask=Decimal("6267.71"),
        volume_24h=Decimal("53602.03940154"),
        open_24h=None,
        ts_exchange=1_584_663_777_833_000_000,
        ts_received=RECEIVED,
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"message":"NotFound"}', "venue_error"),
        (b"<html>502 Bad Gateway</html>", "malformed_frame"),
        (b'{"ask":"1","bid":"1","volume":"1","price":"6268.48","time":"2020-03-20T00:22:57.833Z"}', "missing_field"),
        (rest_ticker("0", 1).encode(), "invalid_price"),
        (rest_ticker("67000", 1, bid="NaN").encode(), "invalid_price"),
        (rest_ticker("67000", 1, time="soon").encode(), "malformed_frame"),
    ],
)
def test_bad_rest_answers_are_rejected_with_their_reason(body: bytes, reason: str) -> None:
    with pytest.raises(VenueFrameError) as caught:
        rest_parser().parse(body, RECEIVED)
    assert caught.value.reason == reason


def test_the_fallback_asks_each_usd_product_of_the_rest_base_url() -> None:
    settings = replace(Settings(), assets=("BTC", "ETH"))
    settings = replace(settings, live=replace(settings.live, coinbase_rest_url="https://rest.example"))
    fallback = coinbase.build_fallback(settings)
    assert [e.url for e in fallback.endpoints] == [
        "https://rest.example/products/BTC-USD/ticker",
        "https://rest.example/products/ETH-USD/ticker",
    ]
    assert (fallback.bucket.rate, fallback.bucket.capacity) == (10, 10)
    source = coinbase.build(settings)
    assert isinstance(source, WebSocketSource) and source.fallback is not None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_field_values = _json | st.decimals().map(str) | st.sampled_from(["BTC-USD", "ETH-USD", "2024-02-29T23:59:60Z"])


def _only_rejections(frame: bytes) -> None:
    try:
        ticks = parser().parse(frame, RECEIVED)
    except VenueFrameError:
        return
    for tick in ticks:
        check_tick(tick, assets=("BTC", "ETH", "SOL"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_or_parsed(frame: bytes) -> None:
    _only_rejections(frame)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_documented_frames_are_rejected_or_parsed(data: st.DataObject) -> None:
    document = json.loads(DOCUMENTED_TICKER)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*document, "extra"]))
        if data.draw(st.booleans()):
            document.pop(key, None)
        else:
            document[key] = data.draw(_field_values)
    _only_rejections(json.dumps(document).encode())


# --- the collector against the fake feed and a real NATS -----------------------------------------------------


def live_settings(nats_url: str, fake: FakeCoinbase, *, watchdog_s: float = 5.0) -> Settings:
    base = Settings()
    live = replace(
        base.live,
        sources=("coinbase",),
        coinbase_ws_url=fake.url,
        watchdog_s=watchdog_s,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    return replace(base, nats_url=nats_url, feed="live", assets=("BTC", "ETH"), live=live)


def fallback_settings(nats_url: str, fake: FakeCoinbase, *, reset_s: float) -> Settings:
    settings = live_settings(nats_url, fake)
    live = replace(settings.live, coinbase_rest_url=fake.rest_url, breaker_failures=2, breaker_reset_s=reset_s)
    return replace(settings, live=live)


async def test_an_open_breaker_polls_rest_tickers_until_the_feed_is_back(nats_url: str, nc: NATS) -> None:
    # Two refused handshakes open the breaker: REST tickers meanwhile; its try after 1 s connects.
    rest = {"BTC-USD": rest_ticker("67005.5", 86326522), "ETH-USD": rest_ticker("3501.25", 1234)}
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    status_sub = await nc.subscribe(subjects.source_status("coinbase"))
    script: list[Step] = [Send(ticker("BTC-USD", 50, "67010")), Silence()]
    async with (
        FakeCoinbase([script], refuse_handshakes=2, rest_tickers=rest) as fake,
        collector(fallback_settings(nats_url, fake, reset_s=1.0)),
    ):
        ticks = await take_ticks(ticks_sub, 3)
        states = await states_until(status_sub, lambda seen: [s.state for s in seen][-1:] == ["connected"])

    assert [(subject, t.id, t.price) for subject, t in ticks] == [
        ("md.tick.coinbase.BTC-USD", "coinbase:BTC-USD:r86326522", Decimal("67005.5")),
        ("md.tick.coinbase.ETH-USD", "coinbase:ETH-USD:r1234", Decimal("3501.25")),
        ("md.tick.coinbase.BTC-USD", "coinbase:BTC-USD:50", Decimal("67010")),
    ]
    assert [(s.state, s.transport) for s in states] == [
        ("connecting", "websocket"),
        ("reconnecting", "websocket"),
        ("breaker_open", "websocket"),
        ("fallback", "rest"),
        ("connecting", "websocket"),
        ("connected", "websocket"),
    ]
    assert states[4].detail == "breaker half-open"
    assert [product for product, _ in fake.rest_requests] == ["BTC-USD", "ETH-USD"]  # polled only while open
    assert len(fake.handshakes_s) == 3 and fake.handshakes_s[2] - fake.handshakes_s[1] >= 0.99


async def test_a_rate_limited_fallback_waits_for_retry_after(nats_url: str, nc: NATS) -> None:
    rest = {"BTC-USD": rest_ticker("67005.5", 7), "ETH-USD": rest_ticker("3501.25", 8)}
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    async with (
        FakeCoinbase([], refuse_handshakes=100, rest_tickers=rest, rest_rate_limited=1, rest_retry_after="0.4") as fake,
        collector(fallback_settings(nats_url, fake, reset_s=30.0)),
    ):
        [(_, tick)] = await take_ticks(ticks_sub, 1)
        await fake.wait_rest_requests(2)
    # The 429 for BTC held the next request (ETH) back for its Retry-After, though 10 a second are allowed.
    (first, first_s), (second, second_s) = fake.rest_requests[:2]
    assert (first, second, tick.id) == ("BTC-USD", "ETH-USD", "coinbase:ETH-USD:r8")
    assert second_s - first_s >= 0.39


async def test_ticks_reach_their_subjects_and_bad_frames_the_dead_letters(nats_url: str, nc: NATS) -> None:
    garbage = "not json {"
    late = ticker("BTC-USD", 9, "66990.00")
    script: list[Step] = [
        Send(ticker("BTC-USD", 10, "67000.50")),
        Send(garbage),
        Send(late),
        Send(heartbeat("BTC-USD", 11)),
        Send(ticker("ETH-USD", 5, "3500.25")),
        Send(ticker("BTC-USD", 12, "67001.00")),
        Silence(),
    ]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    dlq_sub = await nc.subscribe(subjects.dead_letter("collector"))
    status_sub = await nc.subscribe(subjects.source_status("coinbase"))
    async with FakeCoinbase([script]) as fake:
        async with collector(live_settings(nats_url, fake)):
            ticks = await take_ticks(ticks_sub, 3)
            letters = await take_letters(dlq_sub, 2)
        states = await states_until(status_sub, lambda seen: bool(seen) and seen[-1].state == "stopped")

    assert [(subject, t.id, t.price) for subject, t in ticks] == [
        ("md.tick.coinbase.BTC-USD", "coinbase:BTC-USD:10", Decimal("67000.50")),
        ("md.tick.coinbase.ETH-USD", "coinbase:ETH-USD:5", Decimal("3500.25")),
        ("md.tick.coinbase.BTC-USD", "coinbase:BTC-USD:12", Decimal("67001.00")),
    ]
    assert [(letter.subject, letter.reason, letter.payload) for letter in letters] == [
        ("venue.coinbase", "malformed_frame", garbage.encode()),
        ("venue.coinbase", "out_of_order", late.encode()),
    ]
    assert [s.state for s in states] == ["connecting", "connected", "stopped"]
    assert states[-1].ticks == 3 and states[-1].rejected == 2 and states[-1].frames == 7  # with `subscriptions`
    assert fake.subscribed[0].product_ids == ["BTC-USD", "ETH-USD"]
    assert fake.subscribed[0].channels == ["ticker", "heartbeat"]

    js = nc.jetstream()
    stored = [await js.get_msg(subjects.TICKS_STREAM, seq) for seq in (1, 2, 3)]
    assert [(m.headers or {}).get(MSG_ID_HEADER) for m in stored] == [t.id for _, t in ticks]


async def test_a_dropped_connection_is_reconnected_and_data_continues(nats_url: str, nc: NATS) -> None:
    scripts: list[list[Step]] = [
        [Send(ticker("BTC-USD", 1, "67000")), Drop()],
        [Send(ticker("BTC-USD", 2, "67001")), Silence()],
    ]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    status_sub = await nc.subscribe(subjects.source_status("coinbase"))
    async with FakeCoinbase(scripts) as fake, collector(live_settings(nats_url, fake)):
        ticks = await take_ticks(ticks_sub, 2)
        states = await states_until(
            status_sub, lambda seen: [s.state for s in seen][-1:] == ["connected"] and len(seen) > 2
        )

    assert [t.id for _, t in ticks] == ["coinbase:BTC-USD:1", "coinbase:BTC-USD:2"]
    assert [s.state for s in states] == ["connecting", "connected", "reconnecting", "connected"]
    assert states[2].reconnects == 1
    assert fake.connections == 2 and fake.subscribed[0] == fake.subscribed[1]


async def test_a_silent_stream_is_reconnected_by_the_watchdog(nats_url: str, nc: NATS) -> None:
    scripts: list[list[Step]] = [
        [Send(ticker("BTC-USD", 1, "67000")), Silence()],
        [Send(ticker("BTC-USD", 2, "67001")), Silence()],
    ]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    status_sub = await nc.subscribe(subjects.source_status("coinbase"))
    async with FakeCoinbase(scripts) as fake, collector(live_settings(nats_url, fake, watchdog_s=0.5)):
        ticks = await take_ticks(ticks_sub, 2)
        states = await states_until(status_sub, lambda seen: any(s.state == "reconnecting" for s in seen))

    assert [t.id for _, t in ticks] == ["coinbase:BTC-USD:1", "coinbase:BTC-USD:2"]
    assert (states[-1].detail or "").startswith("watchdog")
    assert fake.connections >= 2


async def test_heartbeats_keep_a_quiet_market_connected(nats_url: str, nc: NATS) -> None:
    # 1 s without a ticker, twice the watchdog, but a heartbeat every 0.2 s.
    quiet: list[Step] = [step for n in range(5) for step in (Send(heartbeat("BTC-USD", n)), Pause(0.2))]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    script = [*quiet, Send(ticker("BTC-USD", 7, "67000")), Silence()]
    async with FakeCoinbase([script]) as fake, collector(live_settings(nats_url, fake, watchdog_s=0.5)):
        [(_, tick)] = await take_ticks(ticks_sub, 1)
        assert fake.connections == 1
    assert tick.id == "coinbase:BTC-USD:7"


async def test_the_fake_refuses_a_client_that_does_not_subscribe_properly() -> None:
    async with (
        FakeCoinbase([[Send(ticker("BTC-USD", 1, "1"))]]) as fake,
        aiohttp.ClientSession() as session,
        session.ws_connect(fake.url) as ws,
    ):
        await ws.send_str('{"type":"subscribe","product_ids":["BTC-USD"],"channels":["level2"]}')
        answer = await ws.receive(timeout=5)
    assert json.loads(answer.data) == {
        "type": "error",
        "message": "Failed to subscribe",
        "reason": "channels must include ticker",
    }
    assert fake.subscribed == []


async def test_pings_without_data_do_not_keep_a_dead_feed_connected(nats_url: str, nc: NATS) -> None:
    # aiohttp restarts `receive(timeout=)` on every ping it answers: the watchdog must count data frames only.
    scripts: list[list[Step]] = [[Send(ticker("BTC-USD", 1, "67000")), Silence()]]
    status_sub = await nc.subscribe(subjects.source_status("coinbase"))
    async with (
        FakeCoinbase(scripts, ping_every_s=0.1) as fake,
        collector(live_settings(nats_url, fake, watchdog_s=0.5)),
    ):
        await fake.wait_connections(1)
        states = await asyncio.wait_for(
            states_until(status_sub, lambda seen: any(s.state == "reconnecting" for s in seen)), timeout=1.5
        )
    assert (states[-1].detail or "").startswith("watchdog")


# --- the shared WebSocket loop, on its own ----------------------------------------------------------------------


class Recorder:
    """A sink that keeps what a source delivered: these tests are about the loop, not the bus."""

    def __init__(self) -> None:
        self.ticks: list[Tick] = []
        self.rejected: list[str] = []
        self.states: list[tuple[SourceState, str | None]] = []
        self._changed = asyncio.Condition()

    def frame(self, source: str, frame: bytes, received_ns: int) -> None:
        pass

    async def tick(self, tick: Tick) -> None:
        async with self._changed:
            self.ticks.append(tick)
            self._changed.notify_all()

    async def reject(self, error: RejectedInput, *, source: str, frame: bytes) -> None:
        self.rejected.append(error.reason)

    async def state(self, source: str, state: SourceState, *, transport: str, detail: str | None = None) -> None:
        async with self._changed:
            self.states.append((state, detail))
            self._changed.notify_all()

    async def until(self, done: Callable[[Recorder], bool], *, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: done(self))


class Longest(random.Random):
    """Backoff jitter that always draws its cap, so every delay is known."""

    def uniform(self, a: float, b: float) -> float:
        return b


@contextlib.asynccontextmanager
async def streaming(
    fake: FakeCoinbase,
    sink: Recorder,
    *,
    stable_s: float | None = None,
    breaker: CircuitBreaker | None = None,
) -> AsyncIterator[None]:
    source = WebSocketSource(
        name="coinbase",
        url=fake.url,
        parser=parser(),
        subscribe=[coinbase.subscribe_message(replace(Settings(), assets=("BTC",)))],
        watchdog_s=5.0,
        stable_s=stable_s,
        backoff=Backoff(0.05, 0.4, rng=Longest()),
        breaker=breaker,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(sink, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


def gaps(fake: FakeCoinbase) -> list[float]:
    return [later - earlier for earlier, later in zip(fake.opened_s, fake.opened_s[1:], strict=False)]


async def test_a_venue_that_drops_after_every_frame_is_retried_ever_more_slowly() -> None:
    # Each connection delivers one tick, then drops: a tick alone must not reset the backoff (a storm).
    scripts: list[list[Step]] = [[Send(ticker("BTC-USD", n, "67000")), Drop()] for n in range(1, 30)]
    sink = Recorder()
    async with FakeCoinbase(scripts) as fake, streaming(fake, sink):
        await fake.wait_connections(6)
    assert len(sink.ticks) >= 5
    delays = [0.05, 0.1, 0.2, 0.4, 0.4]  # the backoff's caps, drawn whole
    assert all(gap >= delay - 0.01 for gap, delay in zip(gaps(fake), delays, strict=False)), gaps(fake)


async def test_a_connection_that_stayed_up_starts_the_backoff_small_again() -> None:
    scripts: list[list[Step]] = [
        [Send(ticker("BTC-USD", 1, "67000")), Drop()],
        [Send(ticker("BTC-USD", 2, "67000")), Drop()],
        [Send(ticker("BTC-USD", 3, "67000")), Drop()],
        [Send(ticker("BTC-USD", 4, "67000")), Pause(0.4), Drop()],  # healthy: up for more than stable_s
        [Send(ticker("BTC-USD", 5, "67000")), Silence()],
    ]
    sink = Recorder()
    async with FakeCoinbase(scripts) as fake, streaming(fake, sink, stable_s=0.3):
        await fake.wait_connections(5)
    # Without the reset the last retry would wait 0.4 s after the 0.4 s connection (0.8); with it, 0.05.
    assert 0.4 <= gaps(fake)[3] < 0.7, gaps(fake)


async def test_failed_connections_open_the_breaker_until_it_lets_one_try_through() -> None:
    # Three refusals open it; its first try after 0.5 s is refused too (open again); the next one connects.
    sink = Recorder()
    async with (
        FakeCoinbase([[Send(ticker("BTC-USD", 1, "67000")), Silence()]], refuse_handshakes=4) as fake,
        streaming(fake, sink, breaker=CircuitBreaker(failures=3, reset_s=0.5)),
    ):
        await sink.until(lambda seen: bool(seen.ticks))
    assert [state for state, _ in sink.states] == [
        "connecting",
        "reconnecting",
        "reconnecting",
        "breaker_open",
        "breaker_open",
        "connected",
        "stopped",
    ]
    assert [detail for state, detail in sink.states if state == "breaker_open"] == [
        f"{n} failed connections in a row, last: handshake refused: HTTP 503 Invalid response status" for n in (3, 4)
    ]
    tries = fake.handshakes_s
    assert len(tries) == 5 and [t.symbol for t in sink.ticks] == ["BTC-USD"]
    assert tries[3] - tries[2] >= 0.49 and tries[4] - tries[3] >= 0.49  # nothing tried while it was open
