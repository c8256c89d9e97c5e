"""Kraken WebSocket v2: the parser on documented frames, and the collector against a fake Kraken and a real NATS."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from structlog.testing import capture_logs

from pricewire_collector.sources import kraken
from pricewire_collector.sources.base import VenueFrameError
from pricewire_common import subjects
from pricewire_common.config import Settings
from pricewire_common.events import (
    Tick,
)
from pricewire_common.rules import check_tick
from tests.fakes.kraken import (
    PAIRS,
    FakeKraken,
    entry,
    heartbeat,
    refused,
    rest_answer,
    rest_ticker,
    status,
    subscribed,
    ticker,
    tickers,
)
from tests.fakes.script import Drop, Send, Silence, Step
from tests.sourcing import collector, states_until, take_letters, take_ticks

RECEIVED = 1_695_632_671_800_000_000
FIXTURE = Path(__file__).parent / "fixtures" / "kraken.ndjson"
ASSETS = ("BTC", "ETH", "DOGE", "ALGO")

# The snapshot example of Kraken's v2 ticker documentation, verbatim.
DOCUMENTED_SNAPSHOT = b"""{
    "channel": "ticker",
    "type": "snapshot",
    "data": [
        {
            "symbol": "ALGO/USD",
            "bid": 0.10025,
            "bid_qty": 740.0,
            "ask": 0.10036,
            "ask_qty": 1361.44813783,
            "last": 0.10035,
            "volume": 997038.98383185,
            "vwap": 0.10148,
            "low": 0.09979,
            "high": 0.10285,
            "change": -0.00017,
            "change_pct": -0.17,
            "timestamp": "2023-09-25T09:04:31.742648Z"
        }
    ]
}"""


def parser() -> kraken.KrakenParser:
    return kraken.KrakenParser(assets=ASSETS, quotes=("USD", "USDT", "USDC"))


def reason_of(frame: bytes | str) -> str:
    with pytest.raises(VenueFrameError) as caught:
        parser().parse(frame.encode() if isinstance(frame, str) else frame, RECEIVED)
    return caught.value.reason


# --- the parser -------------------------------------------------------------------------------------------


def test_documented_snapshot_becomes_an_exact_tick() -> None:
    [tick] = parser().parse(DOCUMENTED_SNAPSHOT, RECEIVED)
    assert tick == Tick(
        id="kraken:ALGO-USD:1695632671742648000",
        source="kraken",
        symbol="ALGO-USD",
        base="ALGO",
        quote="USD",
        price=Decimal("0.10035"),
        bid=Decimal("0.10025"),
        ask=Decimal("0.10036"),
        volume_24h=Decimal("997038.98383185"),
        open_24h=Decimal("0.10052"),  # last - change
        ts_exchange=1_695_632_671_742_648_000,
        ts_received=RECEIVED,
    )


def test_json_numbers_keep_their_digits_in_a_valid_tick() -> None:
    frame = (
        '{"channel":"ticker","type":"update","data":[{"symbol":"ETH/USD","last":1000.1,"change":0.3,"volume":1e-7}]}'
    )
    [tick] = parser().parse(frame.encode(), RECEIVED)
    # As floats, 1000.1 - 0.3 would be 999.8000000000001.
    assert (str(tick.price), str(tick.open_24h), str(tick.volume_24h)) == ("1000.1", "999.8", "1E-7")


def test_quoted_figures_are_accepted_too() -> None:
    [tick] = parser().parse(ticker("BTC/USD", "67000.15").replace("67000.15", '"67000.15"').encode(), RECEIVED)
    assert tick.price == Decimal("67000.15")


def test_legacy_codes_are_normalized_and_a_missing_timestamp_is_the_receive_time() -> None:
    [btc] = parser().parse(ticker("XBT/USD", "67000.15", timestamp=None).encode(), RECEIVED)
    [doge] = parser().parse(ticker("XDG/USD", "0.16", change="0.01").encode(), RECEIVED)
    assert (btc.symbol, btc.ts_exchange, btc.id) == ("BTC-USD", RECEIVED, f"kraken:BTC-USD:{RECEIVED}")
    assert (doge.symbol, doge.base, doge.open_24h) == ("DOGE-USD", "DOGE", Decimal("0.15"))


@pytest.mark.parametrize(
    "frame",
    [
        heartbeat(),
        status(),
        status("maintenance"),
        subscribed("BTC/USD"),
        '{"method":"pong","req_id":7,"time_in":"2023-09-25T09:04:31.742599Z","time_out":"2023-09-25T09:04:31.742648Z"}',
        '{"method":"unsubscribe","result":{"channel":"ticker","symbol":"BTC/USD"},"success":true}',
        '{"channel":"book","type":"update","data":[]}',  # a channel never subscribed to
        '{"channel":"ticker","type":"update","data":[]}',
    ],
)
def test_control_frames_carry_no_ticks(frame: str) -> None:
    assert parser().parse(frame.encode(), RECEIVED) == []


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (refused("Currency pair not supported", symbol="FOO/USD"), "venue_error"),
        ('{"error":"Malformed request","success":false}', "venue_error"),
        ("garbage", "malformed_frame"),
        ('["ticker"]', "malformed_frame"),
        ('{"type":"update"}', "malformed_frame"),
        ('{"channel":"ticker","type":"delta","data":[]}', "malformed_frame"),
        ('{"channel":"ticker","type":"update"}', "missing_field"),
        ('{"channel":"ticker","type":"update","data":[{"symbol":"BTC/USD","bid":1}]}', "missing_field"),
        ('{"channel":"ticker","type":"update","data":{"symbol":"BTC/USD"}}', "malformed_frame"),
        ('{"channel":"ticker","type":"update","data":[{"symbol":"BTC/USD","last":"high"}]}', "malformed_frame"),
        ('{"channel":"status","type":"update","data":[{"system":5}]}', "malformed_frame"),
        (ticker("BTC/EUR", "60000"), "unknown_symbol"),
        (ticker("SHIB/USD", "0.00001"), "unknown_symbol"),
        (ticker("BTCUSD", "60000"), "unknown_symbol"),
        (ticker("BTC/USD", "0"), "invalid_price"),
        (ticker("BTC/USD", "-1"), "invalid_price"),
        (ticker("BTC/USD", "1e13"), "invalid_price"),
        (ticker("BTC/USD", "60000", change="60000"), "invalid_price"),  # the 24h open would be 0
        (ticker("BTC/USD", "60000").replace('"last":60000', '"last":"NaN"'), "invalid_price"),
        (ticker("BTC/USD", "60000").replace('"change":-17.5', '"change":"-Infinity"'), "invalid_price"),
        (ticker("BTC/USD", "9e999999", change="-9e999999"), "invalid_price"),
        (ticker("BTC/USD", "60000", volume="-3"), "invalid_volume"),
        (ticker("BTC/USD", "60000", timestamp="2023-09-25 9:04"), "malformed_frame"),
    ],
)
def test_bad_frames_are_rejected_with_their_reason(frame: str, reason: str) -> None:
    assert reason_of(frame) == reason


def test_an_update_older_than_the_last_of_its_pair_is_out_of_order() -> None:
    p = parser()
    t1, t2 = "2023-09-25T09:04:31Z", "2023-09-25T09:04:32Z"
    assert p.parse(ticker("BTC/USD", "67001", timestamp=t2).encode(), RECEIVED)
    with pytest.raises(VenueFrameError) as late:
        p.parse(ticker("BTC/USD", "67000", timestamp=t1).encode(), RECEIVED)
    assert late.value.reason == "out_of_order"
    [again] = p.parse(ticker("BTC/USD", "67001", timestamp=t2).encode(), RECEIVED)  # equal: passes, its id dedupes
    assert again.id == "kraken:BTC-USD:1695632672000000000"
    assert p.parse(ticker("ETH/USD", "1585", timestamp=t1).encode(), RECEIVED)  # each pair keeps its own order
    with pytest.raises(VenueFrameError):  # a rejected frame does not move the pair on
        p.parse(ticker("BTC/USD", "0", timestamp="2023-09-25T09:04:40Z").encode(), RECEIVED)
    assert p.parse(ticker("BTC/USD", "67002", timestamp="2023-09-25T09:04:33Z").encode(), RECEIVED)


def test_a_snapshot_with_one_bad_pair_keeps_the_good_ones() -> None:
    frame = tickers(entry("BTC/USD", "67000.15"), entry("ETH/USD", "-1585.42"))
    with pytest.raises(VenueFrameError) as caught:
        parser().parse(frame.encode(), RECEIVED)
    assert caught.value.reason == "invalid_price"
    assert [(t.symbol, t.price) for t in caught.value.ticks] == [("BTC-USD", Decimal("67000.15"))]


def test_the_parser_keeps_the_status_and_only_the_live_source_logs_it() -> None:
    p = parser()
    with capture_logs() as pure_logs:
        assert p.parse(status("maintenance").encode(), RECEIVED) == []
    assert pure_logs == []
    assert p.status is not None and p.status.system == "maintenance"
    live = kraken.StatusLog(p)
    with capture_logs() as logs:
        for system in ("online", "online", "maintenance"):
            assert live.parse(status(system).encode(), RECEIVED) == []
    assert [(log["event"], log["system"]) for log in logs] == [
        ("venue_status", "online"),
        ("venue_status_not_online", "maintenance"),
    ]


def test_subscribe_message_names_usd_pairs() -> None:
    message = json.loads(kraken.subscribe_message(replace(Settings(), assets=("BTC", "ETH"))))
    assert message == {"method": "subscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD", "ETH/USD"]}}


def test_capture_fixture_parses_as_documented() -> None:
    p = kraken.KrakenParser(assets=("BTC", "ETH", "SOL"), quotes=("USD",))
    outcomes: list[str] = []
    for line in FIXTURE.read_bytes().splitlines():
        record = json.loads(line)
        assert record["source"] == "kraken"
        try:
            ticks = p.parse(record["frame"].encode(), record["received_ns"])
        except VenueFrameError as err:
            outcomes.append(err.reason)
        else:
            outcomes.append(f"{len(ticks)} ticks")
    assert len(outcomes) >= 12
    assert outcomes.count("1 ticks") >= 6
    assert "malformed_frame" in outcomes


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_field_values = (
    _json
    | st.decimals().map(str)
    | st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: float(d) if abs(d) < 1e300 else 0.0)
    | st.sampled_from(["BTC/USD", "XBT/USD", "2024-02-29T23:59:60Z", "ticker", "snapshot"])
)


def _only_rejections(frame: bytes) -> None:
    try:
        ticks = parser().parse(frame, RECEIVED)
    except VenueFrameError:
        return
    for tick in ticks:
        check_tick(tick, assets=ASSETS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_or_parsed(frame: bytes) -> None:
    _only_rejections(frame)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_documented_frames_are_rejected_or_parsed(data: st.DataObject) -> None:
    document = json.loads(DOCUMENTED_SNAPSHOT)
    entry = document["data"][0]
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from([document, entry]))
        key = data.draw(st.sampled_from([*target, "extra"]))
        if data.draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = data.draw(_field_values)
    _only_rejections(json.dumps(document).encode())


# The `GET /0/public/Ticker?pair=XBTUSD` example of Kraken's REST documentation.
DOCUMENTED_REST_TICKER = b"""{"error":[],"result":{"XXBTZUSD":{"a":["30300.10000","1","1.000"],
"b":["30300.00000","1","1.000"],"c":["30303.20000","0.00067643"],"v":["4083.67001100","4412.73601799"],
"p":["30706.77771","30689.13205"],"t":[34619,38907],"l":["29868.30000","29868.30000"],
"h":["31631.00000","31631.00000"],"o":"30502.80000"}}}"""


def rest_parser() -> kraken.KrakenRestParser:
    return kraken.KrakenRestParser(assets=("BTC", "ETH", "SOL", "DOGE"))


def test_documented_rest_ticker_becomes_an_exact_tick() -> None:
    [tick] = rest_parser().parse(DOCUMENTED_REST_TICKER, RECEIVED)
    assert tick == Tick(
        id=f"kraken:BTC-USD:r{RECEIVED // 1_000_000}",
        source="kraken",
        symbol="BTC-USD",
        base="BTC",
        quote="USD",
        price=Decimal("30303.20000"),
        bid=Decimal("30300.00000"),
        ask=Decimal("30300.10000"),
        volume_24h=Decimal("4412.73601799"),
        open_24h=None,  # `o` is today's open at 00:00 UTC, not 24 h ago
        ts_exchange=RECEIVED,
        ts_received=RECEIVED,
    )


def test_rest_pair_names_legacy_and_plain_map_back_to_assets() -> None:
    body = rest_answer(
        {
            "XXBTZUSD": rest_ticker("67000"),
            "XETHZUSD": rest_ticker("3500"),
            "SOLUSD": rest_ticker("150.5"),
            "XDGUSD": rest_ticker("0.16"),
        }
    )
    ticks = rest_parser().parse(body.encode(), RECEIVED)
    assert [(t.symbol, t.price) for t in ticks] == [
        ("BTC-USD", Decimal("67000")),
        ("ETH-USD", Decimal("3500")),
        ("SOL-USD", Decimal("150.5")),
        ("DOGE-USD", Decimal("0.16")),
    ]
    settings = replace(Settings(), assets=("BTC", "ETH", "SOL", "DOGE"))
    assert kraken.rest_pairs(settings) == ["XBTUSD", "ETHUSD", "SOLUSD", "XDGUSD"]


def test_a_rest_answer_with_one_unknown_pair_keeps_the_good_ones() -> None:
    body = rest_answer({"XXBTZUSD": rest_ticker("67000"), "XXRPZUSD": rest_ticker("0.5")})
    with pytest.raises(VenueFrameError) as caught:
        rest_parser().parse(body.encode(), RECEIVED)
    assert caught.value.reason == "unknown_symbol"
    assert [t.symbol for t in caught.value.ticks] == ["BTC-USD"]


def _without(field: str, value: object) -> str:
    pair = rest_ticker("67000")
    pair[field] = value
    return rest_answer({"XXBTZUSD": pair})


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"error":["EQuery:Unknown asset pair"]}', "venue_error"),
        (b'{"error":["EAPI:Rate limit exceeded"],"result":{}}', "venue_error"),
        (b"not json", "malformed_frame"),
        (b'{"result":{}}', "missing_field"),
        (_without("c", []).encode(), "missing_field"),
        (_without("v", ["1"]).encode(), "missing_field"),
        (_without("c", ["-1", "1"]).encode(), "invalid_price"),
        (_without("a", "30300.1").encode(), "malformed_frame"),
    ],
)
def test_bad_rest_answers_are_rejected_with_their_reason(body: bytes, reason: str) -> None:
    with pytest.raises(VenueFrameError) as caught:
        rest_parser().parse(body, RECEIVED)
    assert caught.value.reason == reason


def test_the_fallback_asks_every_pair_in_one_request_once_a_second() -> None:
    settings = replace(Settings(), assets=("BTC", "ETH"))
    settings = replace(settings, live=replace(settings.live, kraken_rest_url="https://rest.example"))
    [endpoint] = kraken.build_fallback(settings).endpoints
    assert (endpoint.url, dict(endpoint.params)) == ("https://rest.example/0/public/Ticker", {"pair": "XBTUSD,ETHUSD"})
    bucket = kraken.build_fallback(settings).bucket
    assert (bucket.rate, bucket.capacity) == (1, 1)


# --- the collector against the fake exchange and a real NATS --------------------------------------------------


def live_settings(nats_url: str, fake: FakeKraken, *, watchdog_s: float = 5.0) -> Settings:
    base = Settings()
    live = replace(
        base.live,
        sources=("kraken",),
        kraken_ws_url=fake.url,
        watchdog_s=watchdog_s,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    return replace(base, nats_url=nats_url, feed="live", assets=("BTC", "ETH", "DOT"), live=live)


def fallback_settings(nats_url: str, fake: FakeKraken, *, reset_s: float) -> Settings:
    settings = live_settings(nats_url, fake)
    live = replace(settings.live, kraken_rest_url=fake.rest_url, breaker_failures=2, breaker_reset_s=reset_s)
    return replace(settings, live=live)


async def test_an_open_breaker_polls_the_rest_ticker_until_the_exchange_is_back(nats_url: str, nc: NATS) -> None:
    # Two refused handshakes open the breaker: the REST ticker meanwhile; its try after 1 s connects.
    body = rest_answer(
        {"XXBTZUSD": rest_ticker("67005.5"), "XETHZUSD": rest_ticker("3501.25"), "DOTUSD": rest_ticker("4.12")}
    )
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.kraken.>")
    status_sub = await nc.subscribe(subjects.source_status("kraken"))
    script: list[Step] = [Send(ticker("BTC/USD", "67010.1")), Silence()]
    async with (
        FakeKraken([script], refuse_handshakes=2, rest_body=body) as fake,
        collector(fallback_settings(nats_url, fake, reset_s=1.0)),
    ):
        ticks = await take_ticks(ticks_sub, 4)
        states = await states_until(status_sub, lambda seen: [s.state for s in seen][-1:] == ["connected"])

    assert [(subject, t.price) for subject, t in ticks] == [
        ("md.tick.kraken.BTC-USD", Decimal("67005.5")),
        ("md.tick.kraken.ETH-USD", Decimal("3501.25")),
        ("md.tick.kraken.DOT-USD", Decimal("4.12")),
        ("md.tick.kraken.BTC-USD", Decimal("67010.1")),
    ]
    rest_ids = [t.id for _, t in ticks[:3]]
    assert all(i.startswith(f"kraken:{t.symbol}:r") for i, (_, t) in zip(rest_ids, ticks, strict=False))
    assert len({i.rpartition(":r")[2] for i in rest_ids}) == 1  # one answer, one receive time
    assert ticks[3][1].id == "kraken:BTC-USD:1695632671742648000"
    assert [(s.state, s.transport) for s in states] == [
        ("connecting", "websocket"),
        ("reconnecting", "websocket"),
        ("breaker_open", "websocket"),
        ("fallback", "rest"),
        ("connecting", "websocket"),
        ("connected", "websocket"),
    ]
    assert fake.rest_requests == [{"pair": "XBTUSD,ETHUSD,DOTUSD"}]
    assert len(fake.handshakes_s) == 3 and fake.handshakes_s[2] - fake.handshakes_s[1] >= 0.99


async def test_a_rest_error_answer_is_dead_lettered_as_a_venue_error(nats_url: str, nc: NATS) -> None:
    body = rest_answer({}, error=["EService:Unavailable"])
    dlq_sub = await nc.subscribe(subjects.dead_letter("collector"))
    async with (
        FakeKraken([], refuse_handshakes=100, rest_body=body) as fake,
        collector(fallback_settings(nats_url, fake, reset_s=30.0)),
    ):
        [letter] = await take_letters(dlq_sub, 1)
    assert (letter.subject, letter.reason, letter.payload) == ("venue.kraken", "venue_error", body.encode())


async def test_ticks_reach_their_subjects_and_bad_frames_the_dead_letters(nats_url: str, nc: NATS) -> None:
    garbage = '{"channel":"ticker","type":"update","data":[{"symbol":"BTC/USD","last":'
    script: list[Step] = [
        Send(ticker("BTC/USD", "67000.15", kind="snapshot", timestamp="2023-09-25T09:04:31.742648Z")),
        Send(ticker("ETH/USD", "1585.42", kind="snapshot", change="-2.1", timestamp="2023-09-25T09:04:31.801002Z")),
        Send(garbage),
        Send(heartbeat()),
        Send(ticker("XBT/USD", "67001.0", timestamp="2023-09-25T09:04:32.000317Z")),
        Silence(),
    ]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.kraken.>")
    dlq_sub = await nc.subscribe(subjects.dead_letter("collector"))
    status_sub = await nc.subscribe(subjects.source_status("kraken"))
    # The fake lists no DOT/USD: its subscription is refused, the other pairs stream on.
    async with FakeKraken([script], pairs=PAIRS - {"DOT/USD"}) as fake:
        async with collector(live_settings(nats_url, fake)):
            ticks = await take_ticks(ticks_sub, 3)
            letters = await take_letters(dlq_sub, 2)
        states = await states_until(status_sub, lambda seen: bool(seen) and seen[-1].state == "stopped")

    assert [(subject, t.id, t.price, t.open_24h) for subject, t in ticks] == [
        ("md.tick.kraken.BTC-USD", "kraken:BTC-USD:1695632671742648000", Decimal("67000.15"), Decimal("67017.65")),
        ("md.tick.kraken.ETH-USD", "kraken:ETH-USD:1695632671801002000", Decimal("1585.42"), Decimal("1587.52")),
        ("md.tick.kraken.BTC-USD", "kraken:BTC-USD:1695632672000317000", Decimal("67001.0"), Decimal("67018.5")),
    ]
    assert [(letter.subject, letter.reason) for letter in letters] == [
        ("venue.kraken", "venue_error"),
        ("venue.kraken", "malformed_frame"),
    ]
    assert b"DOT/USD" in letters[0].payload and letters[1].payload == garbage.encode()
    assert fake.subscribed == [["BTC/USD", "ETH/USD", "DOT/USD"]]
    assert [s.state for s in states] == ["connecting", "connected", "stopped"]
    # status + three acks + five scripted frames
    assert (states[-1].frames, states[-1].ticks, states[-1].rejected) == (9, 3, 2)


async def test_a_dropped_connection_is_reconnected_and_data_continues(nats_url: str, nc: NATS) -> None:
    scripts: list[list[Step]] = [
        [Send(ticker("BTC/USD", "67000", timestamp="2023-09-25T09:04:31Z")), Drop()],
        [Send(ticker("BTC/USD", "67001", kind="snapshot", timestamp="2023-09-25T09:04:33Z")), Silence()],
    ]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.kraken.>")
    status_sub = await nc.subscribe(subjects.source_status("kraken"))
    async with FakeKraken(scripts) as fake, collector(live_settings(nats_url, fake)):
        ticks = await take_ticks(ticks_sub, 2)
        states = await states_until(status_sub, lambda seen: len(seen) > 2 and seen[-1].state == "connected")

    assert [t.price for _, t in ticks] == [Decimal("67000"), Decimal("67001")]
    assert [s.state for s in states] == ["connecting", "connected", "reconnecting", "connected"]
    assert fake.connections == 2 and fake.subscribed[0] == fake.subscribed[1]


async def test_a_silent_stream_is_reconnected_by_the_watchdog(nats_url: str, nc: NATS) -> None:
    scripts: list[list[Step]] = [
        [Send(ticker("ETH/USD", "1585", timestamp="2023-09-25T09:04:31Z")), Silence()],
        [Send(ticker("ETH/USD", "1586", timestamp="2023-09-25T09:04:35Z")), Silence()],
    ]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.kraken.>")
    status_sub = await nc.subscribe(subjects.source_status("kraken"))
    async with FakeKraken(scripts) as fake, collector(live_settings(nats_url, fake, watchdog_s=0.5)):
        ticks = await take_ticks(ticks_sub, 2)
        states = await states_until(status_sub, lambda seen: any(s.state == "reconnecting" for s in seen))

    assert [t.price for _, t in ticks] == [Decimal("1585"), Decimal("1586")]
    assert (states[-1].detail or "").startswith("watchdog")
    assert fake.connections >= 2


async def test_the_fake_refuses_a_request_that_is_not_a_ticker_subscription() -> None:
    async with (
        FakeKraken() as fake,
        aiohttp.ClientSession() as session,
        session.ws_connect(fake.url) as ws,
    ):
        greeting = await ws.receive(timeout=5)
        await ws.send_str('{"method":"subscribe","params":{"channel":"book","symbol":["BTC/USD"]}}')
        answer = await ws.receive(timeout=5)
    assert json.loads(greeting.data)["channel"] == "status"
    assert json.loads(answer.data)["success"] is False
    assert fake.subscribed == [] and fake.refused == ["Channel must be ticker"]


async def test_a_snapshot_with_one_bad_pair_delivers_the_good_tick_and_dead_letters_the_frame(
    nats_url: str, nc: NATS
) -> None:
    frame = tickers(entry("BTC/USD", "67000.15"), entry("ETH/USD", "-1585.42"))
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.kraken.>")
    dlq_sub = await nc.subscribe(subjects.dead_letter("collector"))
    async with FakeKraken([[Send(frame), Silence()]]) as fake, collector(live_settings(nats_url, fake)):
        [(subject, tick)] = await take_ticks(ticks_sub, 1)
        [letter] = await take_letters(dlq_sub, 1)
    assert (subject, tick.price) == ("md.tick.kraken.BTC-USD", Decimal("67000.15"))
    assert (letter.subject, letter.reason, letter.payload) == ("venue.kraken", "invalid_price", frame.encode())
