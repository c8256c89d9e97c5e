"""Binance: the parser on documented frames (and on anything at all), and the source end to end against
a fake Binance and a real NATS: ticks, dead letters, reconnects, the watchdog, the breaker's REST fallback
and back, Retry-After, and the planned reconnect with no gap."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_collector.sources.base import VenueFrameError
from pricewire_collector.sources.binance import BinanceSource, build_parser, ticker_24hr_weight
from pricewire_collector.sources.binance_parse import BinanceParser, split_symbol
from pricewire_common import subjects
from pricewire_common.config import LiveSettings, Settings
from pricewire_common.errors import RejectedInput
from pricewire_common.events import (
    DeadLetter,
    SourceState,
    SourceStatus,
    Tick,
    decode_dead_letter,
    decode_source_status,
    decode_tick,
)
from pricewire_common.rules import check_tick
from tests.fakes.binance import FakeBinance, Plan
from tests.sourcing import collector

RECEIVED = 1_733_594_400_123_000_000
ASSETS = ("BTC", "ETH", "BNB")
FIXTURE = Path(__file__).parent / "fixtures" / "binance.ndjson"

# The payloads of Binance's spot WebSocket docs (Individual Symbol Book Ticker / Ticker Streams),
# wrapped as the combined stream sends them.
DOC_BOOK_TICKER = {"u": 400900217, "s": "BNBUSDT", "b": "25.35190000", "B": "31.21000000", "a": "25.36520000"}
DOC_BOOK_TICKER["A"] = "40.66000000"
DOC_TICKER: dict[str, Any] = {
    "e": "24hrTicker", "E": 1672515782136, "s": "BNBBTC", "p": "0.0015", "P": "250.00", "w": "0.0018",
    "x": "0.0009", "c": "0.0025", "Q": "10", "b": "0.0024", "B": "10", "a": "0.0026", "A": "100", "o": "0.0010",
    "h": "0.0025", "l": "0.0010", "v": "10000", "q": "18", "O": 0, "C": 86400000, "F": 0, "L": 18150, "n": 18151,
}  # fmt: skip
DOC_REST_ROW: dict[str, Any] = {
    "symbol": "BNBBTC", "priceChange": "-94.99999800", "priceChangePercent": "-95.960",
    "weightedAvgPrice": "0.29628482", "prevClosePrice": "0.10002000", "lastPrice": "4.00000200",
    "lastQty": "200.00000000", "bidPrice": "4.00000000", "bidQty": "100.00000000", "askPrice": "4.00000200",
    "askQty": "100.00000000", "openPrice": "99.00000000", "highPrice": "100.00000000", "lowPrice": "0.10000000",
    "volume": "8913.30000000", "quoteVolume": "15.30000000", "openTime": 1499783499040, "closeTime": 1499869899040,
    "firstId": 28385, "lastId": 28460, "count": 76,
}  # fmt: skip


def combined(stream: str, data: dict[str, Any]) -> bytes:
    return json.dumps({"stream": stream, "data": data}, separators=(",", ":")).encode()


@pytest.fixture
def parser() -> BinanceParser:
    return BinanceParser(ASSETS)


# --- the parser ---------------------------------------------------------------------------------------


def test_a_documented_book_ticker_is_a_mid_price_tick(parser: BinanceParser) -> None:
    (tick,) = parser.parse(combined("bnbusdt@bookTicker", DOC_BOOK_TICKER), RECEIVED)
    assert tick == Tick(
        id="binance:BNB-USDT:b400900217",
        source="binance",
        symbol="BNB-USDT",
        base="BNB",
        quote="USDT",
        price=Decimal("25.35855"),
        bid=Decimal("25.35190000"),
        ask=Decimal("25.36520000"),
        ts_exchange=RECEIVED,  # spot bookTicker frames carry no event time
        ts_received=RECEIVED,
    )
    assert check_tick(tick, assets=ASSETS) is tick


def test_a_documented_24hr_ticker_is_a_last_price_tick_with_its_day(parser: BinanceParser) -> None:
    (tick,) = parser.parse(combined("bnbbtc@ticker", DOC_TICKER), RECEIVED)
    assert (tick.id, tick.symbol, tick.base, tick.quote) == ("binance:BNB-BTC:t1672515782136", "BNB-BTC", "BNB", "BTC")
    assert (tick.price, tick.bid, tick.ask) == (Decimal("0.0025"), Decimal("0.0024"), Decimal("0.0026"))
    assert (tick.volume_24h, tick.open_24h) == (Decimal("10000"), Decimal("0.0010"))
    assert tick.ts_exchange == 1672515782136 * 1_000_000
    check_tick(tick, assets=ASSETS)


def test_a_documented_rest_ticker_row_is_a_tick_keyed_by_its_close_time(parser: BinanceParser) -> None:
    (tick,) = parser.parse(json.dumps(DOC_REST_ROW).encode(), RECEIVED)
    assert tick.id == "binance:BNB-BTC:r1499869899040"
    assert (tick.price, tick.bid, tick.ask) == (Decimal("4.00000200"), Decimal("4.00000000"), Decimal("4.00000200"))
    assert (tick.volume_24h, tick.open_24h, tick.ts_exchange) == (
        Decimal("8913.30000000"),
        Decimal("99.00000000"),
        1499869899040 * 1_000_000,
    )


def test_the_mid_price_is_exact_even_for_thirty_digit_quotes(parser: BinanceParser) -> None:
    data = DOC_BOOK_TICKER | {"b": "99999999999.99999999", "a": "99999999999.99999998"}
    (tick,) = parser.parse(combined("bnbusdt@bookTicker", data), RECEIVED)
    assert tick.price == Decimal("99999999999.999999985")
    assert tick.price * 2 == tick.bid + tick.ask  # type: ignore[operator]


@pytest.mark.parametrize(
    "frame",
    [b'{"result":null,"id":1}', b'{"result":["btcusdt@ticker","btcusdt@bookTicker"],"id":3}', b'{"id":7}'],
)
def test_subscription_answers_are_no_ticks(parser: BinanceParser, frame: bytes) -> None:
    assert parser.parse(frame, RECEIVED) == []


def bad(stream: str = "bnbusdt@bookTicker", **changes: Any) -> bytes:
    data = {k: v for k, v in (DOC_BOOK_TICKER | changes).items() if v is not None}
    return combined(stream, data)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "malformed_frame"),
        (b"not json", "malformed_frame"),
        (b'{"stream":"bnbusdt@bookTicker","data":{"u":1,"s":"BNBUSDT","b":"25.3', "malformed_frame"),
        (b"[]", "malformed_frame"),
        (b"{}", "malformed_frame"),
        (b'{"stream":"bnbusdt@bookTicker","data":[]}', "malformed_frame"),
        (bad(u="12"), "malformed_frame"),
        (bad("bnbusdt@trade"), "malformed_frame"),
        (combined("bnbbtc@ticker", DOC_TICKER | {"E": -5}), "malformed_frame"),
        (b'{"stream":"bnbusdt@bookTicker"}', "missing_field"),
        (b'{"data":{"u":1,"s":"BNBUSDT","b":"1","a":"2"}}', "missing_field"),
        (bad(b=None), "missing_field"),
        (bad(u=None), "missing_field"),
        (combined("bnbbtc@ticker", {k: v for k, v in DOC_TICKER.items() if k != "c"}), "missing_field"),
        (combined("bnbbtc@ticker", {k: v for k, v in DOC_TICKER.items() if k != "E"}), "missing_field"),
        (bad("dogeusdt@bookTicker", s="DOGEUSDT"), "unknown_symbol"),
        (bad("bnbxyz@bookTicker", s="BNBXYZ"), "unknown_symbol"),
        (bad(s="BTCUSDT"), "malformed_frame"),  # the stream names another symbol than its data
        (bad(s="bnbusdt"), "malformed_frame"),
        (bad(b="0.00000000"), "invalid_price"),
        (bad(a="-1"), "invalid_price"),
        (bad(b="NaN"), "invalid_price"),
        (bad(a="Infinity"), "invalid_price"),
        (bad(b="1e12"), "invalid_price"),
        (bad(b="abc"), "invalid_price"),
        (bad(b="1.0000000000000000001"), "invalid_price"),
        (bad(b="1.000000000000000001", a="1.000000000000000002"), "invalid_price"),  # the mid needs 19 places
        (combined("bnbbtc@ticker", DOC_TICKER | {"v": "-1"}), "invalid_volume"),
        (b'{"code":2,"msg":"Invalid request: request ID must be an unsigned integer","id":null}', "venue_error"),
        (b'{"error":{"code":-1003,"msg":"Too many requests"},"id":1}', "venue_error"),
        (json.dumps(DOC_REST_ROW | {"lastPrice": "0"}).encode(), "invalid_price"),
        (json.dumps({k: v for k, v in DOC_REST_ROW.items() if k != "closeTime"}).encode(), "missing_field"),
    ],
)
def test_bad_frames_are_rejected_with_their_reason(parser: BinanceParser, frame: bytes, reason: str) -> None:
    parser.parse(combined("bnbusdt@bookTicker", DOC_BOOK_TICKER), RECEIVED)  # the hot path is warm
    with pytest.raises(VenueFrameError) as caught:
        parser.parse(frame, RECEIVED)
    assert caught.value.reason == reason


def test_the_hot_path_gives_the_same_ticks_as_the_first_sight(parser: BinanceParser) -> None:
    first = parser.parse(combined("bnbusdt@bookTicker", DOC_BOOK_TICKER), RECEIVED)
    again = parser.parse(combined("bnbusdt@bookTicker", DOC_BOOK_TICKER | {"u": 400900218}), RECEIVED + 1)
    assert again == [replace_tick(first[0], id="binance:BNB-USDT:b400900218", ts_exchange=RECEIVED + 1)]
    assert (
        parser.parse(combined("bnbusdt@bookTicker", DOC_BOOK_TICKER | {"u": 400900219, "E": 1672515782136}), RECEIVED)[
            0
        ].ts_exchange
        == 1672515782136 * 1_000_000
    )


def replace_tick(tick: Tick, **changes: Any) -> Tick:
    return msgspec.structs.replace(tick, ts_received=changes.get("ts_exchange", tick.ts_received), **changes)


def book(u: int, symbol: str = "BNBUSDT", **changes: Any) -> bytes:
    return combined(f"{symbol.lower()}@bookTicker", DOC_BOOK_TICKER | {"u": u, "s": symbol} | changes)


def outcome(parser: BinanceParser, frame: bytes) -> list[str] | str:
    """The tick ids of a frame, or the reason it was rejected."""
    try:
        return [t.id for t in parser.parse(frame, RECEIVED)]
    except VenueFrameError as err:
        return err.reason


def test_a_late_book_update_is_out_of_order_an_equal_one_passes_per_stream(parser: BinanceParser) -> None:
    assert outcome(parser, book(10)) == ["binance:BNB-USDT:b10"]
    assert outcome(parser, book(12)) == ["binance:BNB-USDT:b12"]  # the hot path
    assert outcome(parser, book(11)) == "out_of_order"  # a late update, hot-path quotes or not
    assert outcome(parser, book(11, b="25.35200000")) == "out_of_order"
    assert outcome(parser, book(12)) == ["binance:BNB-USDT:b12"]  # a duplicate: its id dedupes it downstream
    assert outcome(parser, book(5, "BTCUSDT")) == ["binance:BTC-USDT:b5"]  # each stream keeps its own order
    assert outcome(parser, book(13)) == ["binance:BNB-USDT:b13"]  # a rejected one moved nothing
    assert outcome(parser, book(-1)) == "malformed_frame"


def test_a_late_ticker_or_rest_row_is_out_of_order(parser: BinanceParser) -> None:
    ticker = combined("bnbbtc@ticker", DOC_TICKER)
    earlier = combined("bnbbtc@ticker", DOC_TICKER | {"E": DOC_TICKER["E"] - 1})
    assert outcome(parser, ticker) == ["binance:BNB-BTC:t1672515782136"]
    assert outcome(parser, earlier) == "out_of_order"
    assert outcome(parser, ticker) == ["binance:BNB-BTC:t1672515782136"]
    row = json.dumps(DOC_REST_ROW).encode()
    assert outcome(parser, row) == ["binance:BNB-BTC:r1499869899040"]
    assert outcome(parser, json.dumps(DOC_REST_ROW | {"closeTime": 1499869899039}).encode()) == "out_of_order"
    assert outcome(parser, row) == ["binance:BNB-BTC:r1499869899040"]
    assert outcome(parser, book(1)) == ["binance:BNB-USDT:b1"]  # REST, ticker and book keys are apart


def test_a_ticker_price_row_is_a_price_only_tick_stamped_with_its_receipt(parser: BinanceParser) -> None:
    # The documented answer row of GET /api/v3/ticker/price.
    (tick,) = parser.parse(b'{"symbol":"BNBUSDT","price":"4.00000200"}', RECEIVED)
    assert tick.id == f"binance:BNB-USDT:p{RECEIVED // 1_000_000}"
    assert (tick.price, tick.bid, tick.ask, tick.volume_24h) == (Decimal("4.00000200"), None, None, None)
    assert tick.ts_exchange == RECEIVED // 1_000_000 * 1_000_000 and tick.ts_received == RECEIVED
    check_tick(tick, assets=ASSETS)
    assert outcome(parser, b'{"symbol":"BNBUSDT","price":"0"}') == "invalid_price"
    assert outcome(parser, b'{"symbol":"DOGEUSDT","price":"0.1"}') == "unknown_symbol"


@pytest.mark.parametrize(
    ("symbol", "pair"),
    [
        ("BTCUSDT", ("BTC", "USDT")),
        ("ETHBTC", ("ETH", "BTC")),
        ("SOLFDUSD", ("SOL", "FDUSD")),
        ("BTCUSDC", ("BTC", "USDC")),
        ("BTCTUSD", ("BTC", "TUSD")),
        ("BNBEUR", ("BNB", "EUR")),
        ("USDT", None),
        ("BTCXYZ", None),
    ],
)
def test_symbols_split_by_their_known_quote(symbol: str, pair: tuple[str, str] | None) -> None:
    assert split_symbol(symbol) == pair


def test_the_capture_file_holds_both_streams_a_control_frame_and_bad_ones() -> None:
    parser = build_parser(replace(Settings(), assets=("BTC", "ETH", "SOL")))
    kinds: list[str] = []
    for line in FIXTURE.read_text().splitlines():
        record = json.loads(line)
        assert record["source"] == "binance"
        try:
            ticks = parser.parse(record["frame"].encode(), record["received_ns"])
        except VenueFrameError as err:
            kinds.append(err.reason)
            continue
        kinds.extend(t.id.split(":")[2][0] for t in ticks)
        kinds.extend("control" for _ in range(not ticks))
        for tick in ticks:
            check_tick(tick, assets=("BTC", "ETH", "SOL"))
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "b": 18,
        "t": 9,
        "control": 1,
        "venue_error": 1,
        "malformed_frame": 1,
        "invalid_price": 1,
    }


def test_ticker_24hr_weight_follows_the_documented_table() -> None:
    assert [ticker_24hr_weight(n) for n in (1, 20, 21, 100, 101, 500)] == [2, 2, 40, 40, 80, 80]


def test_the_source_subscribes_both_streams_of_each_asset() -> None:
    settings = replace(Settings(), assets=("BTC", "ETH"))
    source = BinanceSource(settings)
    assert source.url == (
        "wss://stream.binance.com:9443/stream?streams="
        "btcusdt@ticker/btcusdt@bookTicker/ethusdt@ticker/ethusdt@bookTicker"
    )
    assert source.rest.url_24hr == "https://api.binance.com/api/v3/ticker/24hr"
    assert source.rest.url_price == "https://api.binance.com/api/v3/ticker/price"
    assert (source.rest.weight_24hr, source.rest.weight_price) == (2, 4)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
_PRICE_TEXT = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["0", "-0", "1e12", "1E-13", "0.00000001", "99999999999.999999999", "1_000.5", " 7 "]),
    st.text(max_size=25),
)
_SAMPLES = [
    ("bnbusdt@bookTicker", DOC_BOOK_TICKER),
    ("bnbbtc@ticker", DOC_TICKER),
    ("btcusdt@bookTicker", DOC_BOOK_TICKER | {"s": "BTCUSDT"}),
]


def warm_parser() -> BinanceParser:
    """A parser that has seen the sample frames, so mutations of them run through its hot path; at the
    lowest update id and event time, so no valid mutation of them is late."""
    parser = BinanceParser(ASSETS)
    for stream, data in _SAMPLES:
        parser.parse(combined(stream, data | ({"u": 0} if "u" in data else {"E": 1})), RECEIVED)
    return parser


_WARM = warm_parser()


@hypothesis_settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_give_ticks_or_a_venue_frame_error(raw: bytes) -> None:
    with contextlib.suppress(VenueFrameError):
        for tick in _WARM.parse(raw, RECEIVED):
            check_tick(tick, assets=ASSETS)


@hypothesis_settings(max_examples=400, deadline=None)
@given(
    sample=st.sampled_from(_SAMPLES),
    key=st.sampled_from(["u", "s", "b", "a", "E", "c", "o", "v", "stream", "data"]),
    value=_JSON | _PRICE_TEXT,
    drop=st.booleans(),
)
def test_mutated_frames_give_contract_ticks_or_a_venue_frame_error(
    sample: tuple[str, dict[str, Any]], key: str, value: Any, drop: bool
) -> None:
    stream, data = sample
    frame: dict[str, Any] = {"stream": stream, "data": dict(data)}
    target = frame if key in ("stream", "data") else frame["data"]
    if drop:
        target.pop(key, None)
    else:
        target[key] = value
    outcomes: list[list[Tick] | str] = []
    for parser in (BinanceParser(ASSETS), warm_parser()):
        try:
            ticks = parser.parse(json.dumps(frame).encode(), RECEIVED)
        except VenueFrameError as err:
            outcomes.append(err.reason)
            continue
        for tick in ticks:
            check_tick(tick, assets=ASSETS)
        outcomes.append(ticks)
    assert outcomes[0] == outcomes[1]  # the hot path decides as the first sight does


# --- the source, end to end ------------------------------------------------------------------------


def live_settings(nats_url: str, fake: FakeBinance, **live: float) -> Settings:
    return replace(
        Settings(),
        nats_url=nats_url,
        feed="live",
        assets=("BTC", "ETH"),
        live=replace(
            LiveSettings(),
            sources=("binance",),
            binance_ws_url=fake.ws_url,
            binance_rest_url=fake.rest_url,
            watchdog_s=0.5,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            **live,  # type: ignore[arg-type]
        ),
    )


class Watch:
    """What the collector puts on NATS for Binance: ticks, source states, dead letters, as they arrive."""

    def __init__(self) -> None:
        self.ticks: list[Tick] = []
        self.subjects: list[str] = []
        self.states: list[SourceStatus] = []
        self.letters: list[DeadLetter] = []
        self._changed = asyncio.Condition()

    async def start(self, nc: NATS) -> None:
        async def on_tick(msg: Msg) -> None:
            self.ticks.append(decode_tick(msg.data))
            self.subjects.append(msg.subject)
            await self._notify()

        async def on_state(msg: Msg) -> None:
            self.states.append(decode_source_status(msg.data))
            await self._notify()

        async def on_letter(msg: Msg) -> None:
            self.letters.append(decode_dead_letter(msg.data))
            await self._notify()

        await nc.subscribe(f"{subjects.TICK_ROOT}.binance.>", cb=on_tick)
        await nc.subscribe(subjects.source_status("binance"), cb=on_state)
        await nc.subscribe(subjects.dead_letter("collector"), cb=on_letter)
        await nc.flush()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def state_names(self) -> list[str]:
        return [s.state for s in self.states]

    def ticks_after(self, index: int, kind: str = "") -> list[Tick]:
        return [t for t in self.ticks[index:] if f":{kind}" in t.id]


def book_ids(ticks: list[Tick], symbol: str = "BTC-USDT") -> list[int]:
    return [int(t.id.rsplit(":b", 1)[1]) for t in ticks if t.symbol == symbol and ":b" in t.id]


def follows(sequence: list[str], *wanted: str) -> bool:
    """Whether `wanted` occur in `sequence` in this order (not necessarily next to each other)."""
    it = iter(sequence)
    return all(any(x == w for x in it) for w in wanted)


@pytest.fixture
async def watch(nc: NATS) -> Watch:
    watching = Watch()
    await watching.start(nc)
    return watching


async def test_stream_frames_become_ticks_of_both_assets_in_the_ticks_stream(
    nats_url: str, nc: NATS, watch: Watch
) -> None:
    async with FakeBinance() as fake, collector(live_settings(nats_url, fake)):
        await watch.until(
            lambda: (
                {(t.symbol, t.id.split(":")[2][0]) for t in watch.ticks}
                >= {("BTC-USDT", "b"), ("ETH-USDT", "b"), ("BTC-USDT", "t"), ("ETH-USDT", "t")}
            )
        )
    assert set(watch.subjects) == {"md.tick.binance.BTC-USDT", "md.tick.binance.ETH-USDT"}
    book = next(t for t in watch.ticks if ":b" in t.id)
    assert book.bid is not None and book.ask is not None and book.price == (book.bid + book.ask) / 2
    day = next(t for t in watch.ticks if ":t" in t.id)
    assert day.volume_24h == Decimal("12345.67800000") and day.open_24h is not None
    assert fake.connections[0].streams == (
        "btcusdt@ticker",
        "btcusdt@bookTicker",
        "ethusdt@ticker",
        "ethusdt@bookTicker",
    )
    assert follows(watch.state_names(), "connecting", "connected", "stopped")
    assert watch.states[-1].state == "stopped" and watch.states[-1].ticks >= 4
    js = nc.jetstream()
    stored = await js.get_last_msg(subjects.TICKS_STREAM, "md.tick.binance.BTC-USDT")
    assert decode_tick(stored.data or b"").source == "binance"


async def test_garbage_and_error_frames_are_dead_lettered_and_the_stream_goes_on(nats_url: str, watch: Watch) -> None:
    async with FakeBinance() as fake, collector(live_settings(nats_url, fake)):
        await watch.until(lambda: len(watch.ticks) > 2)
        await fake.inject("this is not json {")
        await fake.inject('{"code":3,"msg":"Invalid JSON: expected value at line 1 column 1","id":null}')
        await fake.inject(fake.book_frame("DOGEUSDT", 1))
        await watch.until(lambda: len(watch.letters) >= 3)
        after = len(watch.ticks)
        await watch.until(lambda: len(watch.ticks) > after + 2)
    assert {(d.subject, d.reason) for d in watch.letters} == {
        ("venue.binance", "malformed_frame"),
        ("venue.binance", "venue_error"),
        ("venue.binance", "unknown_symbol"),
    }
    assert b"this is not json {" in [d.payload for d in watch.letters]
    assert all(d.service == "collector" for d in watch.letters)
    assert "reconnecting" not in watch.state_names()


async def test_a_dropped_connection_is_reconnected_and_ticks_go_on(nats_url: str, watch: Watch) -> None:
    async with FakeBinance(plans=[Plan(drop_after=6)]) as fake, collector(live_settings(nats_url, fake)):
        await watch.until(lambda: follows(watch.state_names(), "connected", "reconnecting", "connected"))
        await fake.wait_for(lambda: len(fake.connections) >= 2 and fake.connections[1].frames > 0)
        second_from = fake.update_id
        await watch.until(lambda: any(i > second_from for i in book_ids(watch.ticks)))
    reconnecting = next(s for s in watch.states if s.state == "reconnecting")
    assert reconnecting.transport == "websocket" and reconnecting.detail and "closed" in reconnecting.detail
    assert watch.states[-1].reconnects >= 1


async def test_a_silent_stream_is_reconnected_by_the_watchdog_though_pings_go_on(nats_url: str, watch: Watch) -> None:
    async with FakeBinance(plans=[Plan(silent=True)], ping_s=0.1) as fake, collector(live_settings(nats_url, fake)):
        await watch.until(lambda: "reconnecting" in watch.state_names())
        await watch.until(lambda: len(watch.ticks) > 0)
    assert follows(watch.state_names(), "connected", "reconnecting", "connected")
    reconnecting = next(s for s in watch.states if s.state == "reconnecting")
    assert reconnecting.detail is not None and reconnecting.detail.startswith("watchdog")
    assert fake.connections[0].frames == 0 and fake.connections[0].closed_at is not None
    assert fake.connections[1].frames > 0


async def test_refused_connections_open_the_breaker_to_rest_and_it_closes_again(nats_url: str, watch: Watch) -> None:
    refused = [Plan(refuse=True)] * 3
    settings = live_settings(nats_url, FakeBinance(), breaker_failures=3, breaker_reset_s=1.0)
    async with (
        FakeBinance(plans=refused) as fake,
        collector(
            replace(settings, live=replace(settings.live, binance_ws_url=fake.ws_url, binance_rest_url=fake.rest_url))
        ),
    ):
        await watch.until(lambda: bool(watch.ticks_after(0, "r")))
        await watch.until(lambda: follows(watch.state_names(), "breaker_open", "fallback", "connected"), timeout=8)
        back_at = len(watch.ticks)
        await watch.until(lambda: bool(watch.ticks_after(back_at, "b")))
    names = watch.state_names()
    assert names.count("reconnecting") == 2  # the third refusal opened the breaker
    fallback = next(s for s in watch.states if s.state == "fallback")
    assert fallback.transport == "rest"
    connected = [s for s in watch.states if s.state == "connected"]
    assert connected[-1].transport == "websocket"
    rest = watch.ticks_after(0, "r")
    assert {t.symbol for t in rest} == {"BTC-USDT", "ETH-USDT"}
    assert rest[0].bid is not None and rest[0].volume_24h == Decimal("12345.67800000")
    assert {t.kind for t in rest} == {"poll"}  # held to the polled max age by the validator
    assert {t.kind for t in watch.ticks_after(back_at, "b")} == {"stream"}
    assert fake.rest_calls and all(c.path == "/api/v3/ticker/24hr" and c.weight == 2 for c in fake.rest_calls)


@pytest.mark.parametrize("status", [429, 418])
async def test_a_429_or_418_retry_after_holds_every_request_back_for_that_long(
    nats_url: str, watch: Watch, status: int
) -> None:
    fake_plans = [Plan(refuse=True)] * 1000
    async with FakeBinance(plans=fake_plans, rate_limited=1, limit_status=status, retry_after_s=3) as fake:
        settings = live_settings(nats_url, fake, breaker_failures=1, breaker_reset_s=30.0)
        async with collector(settings):
            await watch.until(lambda: bool(watch.ticks_after(0, "r")), timeout=8)
    first, second = fake.rest_calls[0], fake.rest_calls[1]
    assert first.status == status and second.status == 200
    assert second.path == "/api/v3/ticker/24hr"  # a rate limit is no reason to try the other endpoint
    assert second.at - first.at >= 3.0  # nothing inside the Retry-After window, though polls are due every 2 s
    assert "reconnecting" not in watch.state_names()[watch.state_names().index("fallback") :]


async def test_a_planned_reconnect_hands_over_with_no_gap(nats_url: str, watch: Watch) -> None:
    async with FakeBinance(interval_s=0.02) as fake, collector(live_settings(nats_url, fake, max_connection_age_s=0.3)):
        await fake.wait_for(lambda: len(fake.connections) >= 4 and fake.connections[3].frames > 5)
        last = fake.update_id
        await watch.until(lambda: bool(book_ids(watch.ticks)) and max(book_ids(watch.ticks)) >= last)
    ids = sorted(set(book_ids(watch.ticks)))
    assert ids == list(range(ids[0], ids[-1] + 1))  # every update id, across three hand-overs
    for old, new in zip(fake.connections, fake.connections[1:4], strict=False):
        assert new.first_frame_at is not None and old.closed_at is not None
        assert old.closed_at >= new.first_frame_at  # the old one closed only after the new one delivered
    assert "reconnecting" not in watch.state_names()


async def test_a_venue_that_drops_each_stream_after_one_frame_opens_the_breaker_not_a_reconnect_storm(
    nats_url: str, watch: Watch
) -> None:
    async with FakeBinance(default_plan=Plan(drop_after=1)) as fake, collector(live_settings(nats_url, fake)):
        with pytest.raises(TimeoutError):  # the whole 2 s pass without a 13th connection
            await fake.wait_for(lambda: len(fake.connections) > 12, timeout=2.0)
        await watch.until(lambda: bool(watch.ticks_after(0, "r")))
    assert all(c.frames <= 1 for c in fake.connections)
    assert follows(watch.state_names(), "connected", "reconnecting", "breaker_open", "fallback")
    opened = next(s for s in watch.states if s.state == "breaker_open")
    assert opened.detail is not None and opened.detail.startswith("5 failures")  # the default breaker_failures


@pytest.mark.parametrize(("status", "letters"), [(503, set()), (400, {("venue.binance", "venue_error")})])
async def test_when_ticker_24hr_answers_an_error_the_fallback_gets_prices_from_ticker_price(
    nats_url: str, watch: Watch, status: int, letters: set[tuple[str, str]]
) -> None:
    failing = {"/api/v3/ticker/24hr": status}
    async with FakeBinance(plans=[Plan(refuse=True)] * 1000, failing=failing) as fake:
        settings = live_settings(nats_url, fake, breaker_failures=1, breaker_reset_s=30.0)
        async with collector(settings):
            await watch.until(lambda: {t.symbol for t in watch.ticks_after(0, "p")} == {"BTC-USDT", "ETH-USDT"})
            await watch.until(lambda: {(d.subject, d.reason) for d in watch.letters} == letters)
    btc = next(t for t in watch.ticks if t.symbol == "BTC-USDT")
    assert btc.id.startswith("binance:BTC-USDT:p") and btc.bid is None and btc.volume_24h is None
    assert btc.price >= Decimal(60000) and btc.ts_exchange // 1_000_000 == int(btc.id.rsplit(":p", 1)[1])
    assert not watch.ticks_after(0, "r")
    assert [(c.path, c.status, c.weight) for c in fake.rest_calls[:2]] == [
        ("/api/v3/ticker/24hr", status, 2),
        ("/api/v3/ticker/price", 200, 4),
    ]


class RecordingSink:
    """A `Sink` that keeps what a source hands it (for a source run without the collector)."""

    def __init__(self) -> None:
        self.ticks: list[Tick] = []
        self.states: list[str] = []
        self.rejected: list[str] = []

    def frame(self, source: str, frame: bytes, received_ns: int) -> None:
        pass

    async def tick(self, tick: Tick) -> None:
        self.ticks.append(tick)

    async def reject(self, error: RejectedInput, *, source: str, frame: bytes) -> None:
        self.rejected.append(error.reason)

    async def state(self, source: str, state: SourceState, *, transport: str, detail: str | None = None) -> None:
        self.states.append(state)


async def test_rest_polls_never_spend_more_request_weight_than_the_bucket_allows() -> None:
    capacity = 60  # binance_weight_per_min: 60 at once, then 1 per second
    failing = {"/api/v3/ticker/24hr": 503}  # each poll then costs 2 + 4
    async with FakeBinance(plans=[Plan(refuse=True)] * 1000, failing=failing) as fake:
        settings = live_settings("nats://127.0.0.1:1", fake, breaker_failures=1, breaker_reset_s=30.0)
        settings = replace(settings, live=replace(settings.live, binance_weight_per_min=capacity))
        source, sink, stop = BinanceSource(settings, poll_s=0.001), RecordingSink(), asyncio.Event()
        task = asyncio.create_task(source.run(sink, stop))
        try:
            with pytest.raises(TimeoutError):  # polls are due every ms for 2.5 s
                await fake.wait_for(lambda: fake.weight_used > capacity + 3, timeout=2.5)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=5)
    start, spent = fake.rest_calls[0].at, 0
    for call in fake.rest_calls:
        spent += call.weight
        assert spent <= capacity + 1.0 * (call.at - start) + 1e-6
    assert fake.weight_used >= capacity  # the bucket set the pace, not the poll interval
    assert {c.path for c in fake.rest_calls} == {"/api/v3/ticker/24hr", "/api/v3/ticker/price"}
    assert {t.id.split(":")[2][0] for t in sink.ticks} == {"p"}
    assert sink.states[:3] == ["connecting", "breaker_open", "fallback"] and sink.states[-1] == "stopped"
