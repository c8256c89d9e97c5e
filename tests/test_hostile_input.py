"""Hostile input: every venue parser and every event decoder fed arbitrary bytes and mutated real frames.

Only the package's typed errors may come out (VenueFrameError from a venue parser, RejectedInput from
an event decoder, RequestError from the gateway's client decoders): never another exception. What a
parser does accept keeps the tick contract. Over a real NATS, a burst of mutated frames from a fake venue
ends as one dead letter each, with its reason, while the good frames between them still become ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from pricewire_cache_writer import records
from pricewire_cache_writer.progress import ProjectionStatus, decode_status, encode_status
from pricewire_cache_writer.service import run as cache_writer_run
from pricewire_collector.sources import binance_parse, coinbase, kraken
from pricewire_collector.sources.base import Parser, VenueFrameError
from pricewire_collector.sources.ccxt_source import encode_frame
from pricewire_collector.sources.registry import build_parser
from pricewire_common import control, subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.errors import RejectedInput
from pricewire_common.events import (
    DeadLetter,
    SourceStatus,
    decode_dead_letter,
    decode_price,
    decode_source_status,
    decode_tick,
    encode,
)
from pricewire_common.rules import check_price, check_tick
from pricewire_gateway.alerts import AlertFired, decode_fired, encode_fired
from pricewire_gateway.errors import RequestError
from pricewire_gateway.messages import decode_request
from pricewire_gateway.user_messages import decode_alert_create, decode_portfolio_put
from pricewire_validator.service import run as validator_run
from tests.factories import TS, make_price, make_tick
from tests.fakes import coinbase as fake_coinbase
from tests.fakes import kraken as fake_kraken
from tests.fakes.script import Send, Silence, Step
from tests.mutations import DEEP_LEVELS, mutate_bytes, mutate_text
from tests.sourcing import collector
from tests.waiting import eventually

FIXTURES = Path(__file__).parent / "fixtures"
SETTINGS = Settings()
RECEIVED = 1_733_594_400_000_000_000
REASON = re.compile(r"[a-z][a-z0-9_]*")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _recorded(source: str) -> list[tuple[bytes, int]]:
    """The frames a live capture recorded from `source`, with their receive times."""
    lines = (FIXTURES / f"{source}.ndjson").read_text().splitlines()
    return [(r["frame"].encode(), r["received_ns"]) for r in map(json.loads, lines) if r]


_CCXT_FRAME = encode_frame(
    "bitstamp",
    {
        "BTC/USD": {
            "symbol": "BTC/USD", "timestamp": 1733594400000, "last": 99728.5, "bid": 99728.4, "ask": 99728.6,
            "baseVolume": 1234.5, "open": 98000.0, "info": {"last": "99728.5", "bid": "99728.4", "ask": "99728.6"},
        },
        "ETH/USDT": {"symbol": "ETH/USDT", "timestamp": None, "last": 3998.41, "info": {}},
    },
)  # fmt: skip


_BINANCE_ROWS = [
    (b'{"symbol":"BTCUSDT","lastPrice":"99728.84","bidPrice":"99728.83","askPrice":"99728.85",'
     b'"openPrice":"98000.00","volume":"12345.678","closeTime":1733594400000}', RECEIVED),
    (b'{"symbol":"ETHUSDT","price":"3998.41000000"}', RECEIVED),
]  # fmt: skip
"""Rows of Binance's REST tickers (24hr and price), which the REST fallback hands the parser one by one."""


@dataclass(frozen=True)
class Venue:
    """A venue parser (a fresh one per frame sequence: parsers remember order) and real frames it reads."""

    name: str
    parser: Callable[[], Parser]
    frames: list[tuple[bytes, int]]


VENUES = [
    Venue("binance", lambda: build_parser("binance", SETTINGS), _recorded("binance")),
    Venue("binance_rest", lambda: binance_parse.BinanceParser(SETTINGS.assets), _BINANCE_ROWS),
    Venue("coinbase", lambda: build_parser("coinbase", SETTINGS), _recorded("coinbase")),
    Venue(
        "coinbase_rest",
        lambda: coinbase.CoinbaseRestParser("BTC-USD", assets=SETTINGS.assets, quotes=SETTINGS.usd_quotes),
        [(fake_coinbase.rest_ticker("67005.5", 86326522).encode(), RECEIVED)],
    ),
    Venue("kraken", lambda: build_parser("kraken", SETTINGS), _recorded("kraken")),
    Venue(
        "kraken_rest",
        lambda: kraken.KrakenRestParser(assets=SETTINGS.assets),
        [(fake_kraken.rest_answer({"XXBTZUSD": fake_kraken.rest_ticker("30500.1")}).encode(), RECEIVED)],
    ),
    Venue("coingecko", lambda: build_parser("coingecko", SETTINGS), _recorded("coingecko")),
    Venue("ccxt", lambda: build_parser("ccxt", SETTINGS), [(_CCXT_FRAME, RECEIVED)]),
]
VENUE_NAMES = [venue.name for venue in VENUES]


def _parsed_or_rejected(parser: Parser, frame: bytes, received_ns: int) -> int:
    """Ticks the frame gave (each keeping the contract), or -1 for a typed rejection; anything else raises."""
    try:
        ticks = parser.parse(frame, received_ns)
    except VenueFrameError as err:
        assert REASON.fullmatch(err.reason), err.reason
        for tick in err.ticks:
            check_tick(tick)
        return -1
    for tick in ticks:
        check_tick(tick)
    return len(ticks)


def test_every_venue_reads_its_own_frames() -> None:
    # The corpus is worth mutating only if the untouched frames parse: most give ticks (the recordings keep
    # a few bad frames a venue really sent, and those are rejected).
    for venue in VENUES:
        parser = venue.parser()
        given_ticks = [_parsed_or_rejected(parser, frame, at) for frame, at in venue.frames]
        assert given_ticks.count(-1) * 4 <= len(given_ticks) and sum(given_ticks) > 0, venue.name


@pytest.mark.parametrize("venue", VENUES, ids=VENUE_NAMES)
@FAST
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_give_ticks_or_a_venue_frame_error(venue: Venue, raw: bytes) -> None:
    _parsed_or_rejected(venue.parser(), raw, RECEIVED)


@pytest.mark.parametrize("venue", VENUES, ids=VENUE_NAMES)
@FAST
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_mutated_frames_give_contract_ticks_or_a_venue_frame_error(
    venue: Venue, data: st.DataObject, rng: random.Random
) -> None:
    frame, received_ns = data.draw(st.sampled_from(venue.frames))
    _parsed_or_rejected(venue.parser(), mutate_bytes(frame, rng), received_ns)


@pytest.mark.parametrize("venue", VENUES, ids=VENUE_NAMES)
@settings(max_examples=25, deadline=None)
@given(rng=st.randoms(use_true_random=False), share=st.floats(0.1, 0.9))
def test_a_stream_with_mutated_frames_never_breaks_its_parser(venue: Venue, rng: random.Random, share: float) -> None:
    # One parser through the whole recording, as on a live connection: its memory (order, caches) must
    # survive the bad frames, and the good frames after them still parse.
    parser = venue.parser()
    for frame, received_ns in venue.frames:
        _parsed_or_rejected(parser, mutate_bytes(frame, rng) if rng.random() < share else frame, received_ns)


def test_json_nested_past_the_decoders_limit_is_a_typed_rejection() -> None:
    # msgspec raises RecursionError (not a DecodeError) on JSON nested ~1000 deep: a frame of `[[[[...`
    # inside an unknown field once escaped every parser.
    deep = b'{"x":' + b"[" * DEEP_LEVELS + b"]" * DEEP_LEVELS + b"}"
    for venue in VENUES:
        assert _parsed_or_rejected(venue.parser(), deep, RECEIVED) == -1, venue.name
    for decoder in DECODERS:
        with pytest.raises(decoder.errors):
            decoder.decode(deep)


def test_a_binance_update_id_beyond_int64_is_rejected_and_holds_back_no_later_frame() -> None:
    # Once, u = 10**400 took the fast path: a tick whose id broke the 128-character bound, and a stream
    # that counted every later (real) update as out of order.
    parser = build_parser("binance", SETTINGS)
    book = '{{"stream":"btcusdt@bookTicker","data":{{"u":{u},"s":"BTCUSDT","b":"99728.83","a":"99728.84"}}}}'
    for u in (10**400, 2**63):
        assert _parsed_or_rejected(parser, book.format(u=u).encode(), RECEIVED) == -1
    [tick] = parser.parse(book.format(u=57123456792).encode(), RECEIVED)
    assert tick.id == "binance:BTC-USDT:b57123456792"


# --- the event decoders: what consumers read from the bus, and what clients send the gateway ------------------


@dataclass(frozen=True)
class Decoder:
    name: str
    decode: Callable[[bytes], object]
    samples: list[bytes]
    errors: type[Exception]


_LETTER = DeadLetter(service="validator", subject="md.tick.x.BTC-USD", reason="r", detail="d", payload=b"\x00", ts=TS)
_STATUS = SourceStatus(source="binance", state="connected", transport="websocket", detail="ok", frames=3, ts=TS)
_COMMAND = control.SourceCommand(action="pause", by="admin", ts=TS)
_RESULT = control.SourceCommandResult(source="binance", known=True, paused=True)
_FIRED = AlertFired(
    id=7, alert_id=3, user="alice", symbol="BTC", alert_type="change_pct", pct=Decimal("5"), window_s=300,
    note="n", price=Decimal("47000.5"), reference_price=Decimal("44000"), change_pct=Decimal("6.82"), price_seq=12,
    price_timestamp="2024-12-07T18:00:00.000Z", fired_at="2024-12-07T18:00:00.010Z",
)  # fmt: skip
_PROGRESS = ProjectionStatus(
    projection="cache-db-ticks", stream="TICKS", store="postgres", applied_seq=90, stream_last_seq=100, lag=10,
    store_up=True, written=90, rejected=0, retried=1, ts=TS,
)  # fmt: skip
_REQUESTS = [
    b'{"type":"subscribe","symbols":["BTC","ETH"]}', b'{"type":"unsubscribe","symbol":"BTC"}',
    b'{"type":"join_room","room":"prices"}', b'{"type":"get_price","symbol":"BTC"}', b'{"type":"ping"}',
    b'{"type":"auth","token":"eyJhbGciOiJIUzI1NiJ9.e30.x"}',
    b'{"type":"price_alert","data":{"symbol":"BTC","alert_type":"above","target_price":"50000"}}',
]  # fmt: skip

DECODERS = [
    # A consumer decodes and then checks: both halves may only reject.
    Decoder("tick", lambda b: check_tick(decode_tick(b)), [encode(make_tick()), encode(make_tick(kind="poll"))],
            RejectedInput),
    Decoder("price", lambda b: check_price(decode_price(b), subject="md.price.BTC"), [encode(make_price())],
            RejectedInput),
    Decoder("dead_letter", decode_dead_letter, [encode(_LETTER)], RejectedInput),
    Decoder("source_status", decode_source_status, [encode(_STATUS)], RejectedInput),
    Decoder("source_command", control.decode_command, [control.encode(_COMMAND)], RejectedInput),
    # The collector's answer to the gateway's admin pause/resume, off core NATS.
    Decoder("source_command_result", control.decode_result, [control.encode(_RESULT)], RejectedInput),
    # A firing on md.alert.<user>, which the gateway forwards to the user's sockets.
    Decoder("alert_fired", decode_fired, [encode_fired(_FIRED)], RejectedInput),
    # The cache_writer's progress report in Redis, which GET /api/v1/status reads.
    Decoder("projection_status", decode_status, [encode_status(_PROGRESS)], RejectedInput),
    Decoder("ws_request", decode_request, _REQUESTS, RequestError),
    Decoder("alert_create", decode_alert_create, [b'{"symbol":"BTC","alert_type":"change_pct","pct":"5",'
            b'"window_s":3600,"webhook_url":"http://127.0.0.1:9/hook","note":"n"}'], RequestError),
    Decoder("portfolio_put", decode_portfolio_put, [b'{"holdings":[{"symbol":"BTC","amount":"2.0"}]}'],
            RequestError),
]  # fmt: skip
DECODER_NAMES = [decoder.name for decoder in DECODERS]


def test_every_decoder_reads_its_own_samples() -> None:
    for decoder in DECODERS:
        for sample in decoder.samples:
            decoder.decode(sample)


def _decoded_or_rejected(decoder: Decoder, payload: bytes) -> None:
    with contextlib.suppress(decoder.errors):
        decoder.decode(payload)


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_NAMES)
@FAST
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_the_decoders_typed_error(decoder: Decoder, raw: bytes) -> None:
    _decoded_or_rejected(decoder, raw)


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_NAMES)
@FAST
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_mutated_events_decode_or_raise_the_decoders_typed_error(
    decoder: Decoder, data: st.DataObject, rng: random.Random
) -> None:
    _decoded_or_rejected(decoder, mutate_bytes(data.draw(st.sampled_from(decoder.samples)), rng))


@FAST
@given(rng=st.randoms(use_true_random=False), text=st.text(max_size=200))
def test_a_websocket_text_frame_decodes_or_is_a_request_error(rng: random.Random, text: str) -> None:
    # aiohttp hands the gateway text frames as str: the decoder takes them as they come.
    for frame in (text, mutate_text(rng.choice(_REQUESTS).decode(), rng)):
        with contextlib.suppress(RequestError):
            decode_request(frame)


# --- over a real NATS: every bad frame of a burst is a dead letter, every good one a tick ----------------------

BURST_GOOD = 40
BURST_BAD = 40


@dataclass(frozen=True)
class Burst:
    frames: list[str]
    ticks: list[str]
    """Tick ids the good frames give, in order."""
    reasons: list[str]
    """The reason of each bad frame's dead letter, in order."""
    bad: list[str]


def _burst(seed: int) -> Burst:
    """Coinbase ticker frames in sequence with mutated copies among them, each classified by a reference
    parser that reads them in the same order as the collector will: a good frame gives one tick, a bad
    one a rejection with no tick (mutations that still parse, or give a tick, are left out)."""
    rng = random.Random(seed)
    reference = build_parser("coinbase", SETTINGS)
    frames: list[str] = []
    ticks: list[str] = []
    reasons: list[str] = []
    bad: list[str] = []
    sequence = 1000
    while len(ticks) < BURST_GOOD or len(bad) < BURST_BAD:
        sequence += 1
        product = rng.choice(["BTC-USD", "ETH-USD"])
        price = f"{(67000 if product == 'BTC-USD' else 3500) + rng.randint(0, 999) / 100:.2f}"
        good = fake_coinbase.ticker(product, sequence, price)
        if len(bad) < BURST_BAD and (len(ticks) >= BURST_GOOD or rng.random() < 0.5):
            candidate = mutate_text(good, rng)
            try:
                reference.parse(candidate.encode(), RECEIVED)
            except VenueFrameError as err:
                if not err.ticks:
                    frames.append(candidate)
                    reasons.append(err.reason)
                    bad.append(candidate)
            continue
        if len(ticks) < BURST_GOOD:
            [tick] = reference.parse(good.encode(), RECEIVED)
            frames.append(good)
            ticks.append(tick.id)
    return Burst(frames, ticks, reasons, bad)


async def test_a_burst_of_mutated_frames_ends_as_dead_letters_and_the_good_frames_as_ticks(
    nats_url: str, nc: NATS
) -> None:
    burst = _burst(seed=8)
    assert len(set(burst.reasons)) >= 3  # the mutations break frames in several distinct ways
    script: list[Step] = [*(Send(frame) for frame in burst.frames), Silence()]
    ticks_sub = await nc.subscribe(f"{subjects.TICK_ROOT}.coinbase.>")
    letters_sub = await nc.subscribe(subjects.dead_letter("collector"))
    base = replace(SETTINGS, nats_url=nats_url, feed="live", assets=("BTC", "ETH"))
    live = replace(base.live, sources=("coinbase",), watchdog_s=30.0, backoff_initial_s=0.05)
    async with fake_coinbase.FakeCoinbase([script]) as fake:
        async with collector(replace(base, live=replace(live, coinbase_ws_url=fake.url))):
            ticks = [(await ticks_sub.next_msg(timeout=15)).data for _ in burst.ticks]
            letters = [decode_dead_letter((await letters_sub.next_msg(timeout=15)).data) for _ in burst.bad]
        assert fake.connections == 1  # no bad frame cost the connection

    assert [decode_tick(tick).id for tick in ticks] == burst.ticks
    assert [(letter.subject, letter.reason) for letter in letters] == [("venue.coinbase", r) for r in burst.reasons]
    assert [letter.payload for letter in letters] == [frame.encode() for frame in burst.bad]
    # Nothing else was published: the log holds exactly one outcome per frame sent.
    js = nc.jetstream()
    stored_ticks = (await js.stream_info(subjects.TICKS_STREAM)).state.messages
    stored_letters = (await js.stream_info(subjects.DLQ_STREAM)).state.messages
    assert (stored_ticks, stored_letters) == (len(burst.ticks), len(burst.bad))
    assert stored_ticks + stored_letters == len(burst.frames)
    assert Decimal(decode_tick(ticks[-1]).price) > 0


def _mutants(
    goods: list[bytes], accepts: Callable[[bytes], object], seed: int
) -> tuple[list[tuple[bytes, str]], list[bytes], list[str]]:
    """Each good payload followed by a mutant of it that `accepts` (the service's own check) rejects:
    (payload, msg id) in publish order, the mutants and their reasons in the same order."""
    rng = random.Random(seed)
    sent: list[tuple[bytes, str]] = []
    bad: list[bytes] = []
    reasons: list[str] = []
    for n, good in enumerate(goods):
        sent.append((good, f"good-{seed}-{n}"))
        while True:
            mutant = mutate_text(good.decode(), rng).encode() if n % 2 else mutate_bytes(good, rng)
            try:
                accepts(mutant)
            except RejectedInput as err:
                sent.append((mutant, f"bad-{seed}-{n}"))
                bad.append(mutant)
                reasons.append(err.reason)
                break
    return sent, bad, reasons


async def test_mutated_ticks_on_the_bus_each_end_as_a_validator_dead_letter(nats_url: str, nc: NATS) -> None:
    now_ns = time.time_ns()
    goods = [
        encode(make_tick(id=f"{source}:BTC-USDT:{n}", source=source, price=Decimal(47000 + n % 7), bid=None,
                         ask=None, ts_exchange=received, ts_received=received))
        for n in range(BURST_GOOD)
        for source, received in [(("sim-a", "sim-b")[n % 2], now_ns - (BURST_GOOD - n) * 1_000_000)]
    ]  # fmt: skip
    # Classified as the validator checks a tick: decoded, then the contract with the configured assets.
    sent, bad, reasons = _mutants(goods, lambda b: check_tick(decode_tick(b), assets=SETTINGS.assets, now_ns=now_ns), 5)
    assert len(set(reasons)) >= 3
    settings = replace(SETTINGS, nats_url=nats_url, validator=replace(SETTINGS.validator, heartbeat_s=1.0))
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    subject = subjects.tick("sim-a", "BTC", "USDT")
    for payload, msg_id in sent:
        await js.publish(subject, payload, headers={MSG_ID_HEADER: msg_id})
    letters_sub = await js.pull_subscribe(subjects.dead_letter("validator"), stream=subjects.DLQ_STREAM)
    prices_sub = await js.pull_subscribe(subjects.price("BTC"), stream=subjects.PRICES_STREAM)
    stop = asyncio.Event()
    service = asyncio.create_task(validator_run(settings, stop))
    try:
        letters: list[DeadLetter] = []
        while len(letters) < len(bad):
            letters += [decode_dead_letter(m.data) for m in await letters_sub.fetch(len(bad) - len(letters), 15)]
        # The good ticks between them were decided: a consensus of both venues came out.
        [first_price] = await prices_sub.fetch(1, timeout=15)
        info = await eventually(
            lambda: js.consumer_info(subjects.TICKS_STREAM, "validator"),
            lambda i: (i.num_pending, i.num_ack_pending) == (0, 0),
            what="every tick settled",
        )
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=30)

    assert decode_price(first_price.data).asset == "BTC" and not service.exception()
    assert [letter.payload for letter in letters] == bad
    assert [letter.reason for letter in letters] == reasons
    assert info.delivered.stream_seq == len(sent)  # every message delivered, each settled once
    dead = (await js.stream_info(subjects.DLQ_STREAM)).state.messages
    assert dead == len(bad) and len(sent) - dead == BURST_GOOD


async def test_mutated_ticks_and_prices_each_end_as_one_cache_writer_dead_letter(
    nats_url: str, nc: NATS, redis_url: str, database_url: str, pg: asyncpg.Connection
) -> None:
    settings = replace(SETTINGS, nats_url=nats_url, redis_url=redis_url, database_url=database_url)
    assets = settings.assets
    now_ns = time.time_ns()
    good_ticks = [encode(make_tick(id=f"t-{n}", price=Decimal(47000 + n), ts_exchange=TS + n)) for n in range(30)]
    good_prices = [encode(make_price(seq=n + 1, ts=TS + n)) for n in range(30)]
    ticks_sent, bad_ticks, tick_reasons = _mutants(
        good_ticks, lambda b: check_tick(decode_tick(b), assets=assets, now_ns=now_ns), seed=11
    )
    prices_sent, bad_prices, price_reasons = _mutants(
        good_prices, lambda b: records.check_price(decode_price(b), subject="md.price.BTC", assets=assets), seed=12
    )
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    for subject, sent in ((subjects.tick("sim-a", "BTC", "USDT"), ticks_sent), (subjects.price("BTC"), prices_sent)):
        for payload, msg_id in sent:
            await js.publish(subject, payload, headers={MSG_ID_HEADER: msg_id})
    letters_sub = await js.pull_subscribe(subjects.dead_letter("cache_writer"), stream=subjects.DLQ_STREAM)
    stop = asyncio.Event()
    service = asyncio.create_task(cache_writer_run(settings, stop))
    try:
        letters: list[DeadLetter] = []
        expected = len(bad_ticks) + len(bad_prices)
        while len(letters) < expected:
            letters += [decode_dead_letter(m.data) for m in await letters_sub.fetch(expected - len(letters), 15)]

        async def stored() -> tuple[int, int]:
            return (int(await pg.fetchval("SELECT count(*) FROM ticks")),
                    int(await pg.fetchval("SELECT count(*) FROM prices")))  # fmt: skip

        rows = await eventually(stored, lambda n: n == (len(good_ticks), len(good_prices)), what="the good rows")
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=30)

    by_subject = {
        kind: [(letter.payload, letter.reason) for letter in letters if letter.subject.startswith(kind)]
        for kind in ("md.tick.", "md.price.")
    }
    assert by_subject["md.tick."] == list(zip(bad_ticks, tick_reasons, strict=True))
    # Both projections read PRICES and refuse the same mutant: it is still one dead letter.
    assert by_subject["md.price."] == list(zip(bad_prices, price_reasons, strict=True))
    dead = (await js.stream_info(subjects.DLQ_STREAM)).state.messages
    assert dead + sum(rows) == len(ticks_sent) + len(prices_sent)
