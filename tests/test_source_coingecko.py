"""CoinGecko: the `/simple/price` parser on documented bodies, and the collector polling a fake CoinGecko."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_collector.publisher import Publisher
from pricewire_collector.service import run
from pricewire_collector.sources.base import VenueFrameError
from pricewire_collector.sources.coingecko import COINGECKO_IDS, CoinGeckoParser, build, build_parser, rate_limit
from pricewire_collector.sources.polling import retry_after_s
from pricewire_collector.sources.runtime import CollectorSink
from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.config import DEFAULT_ASSETS, LiveSettings, Settings, StreamSettings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import (
    DeadLetter,
    SourceStatus,
    Tick,
    decode_dead_letter,
    decode_source_status,
    decode_tick,
)
from pricewire_common.rules import check_tick
from tests.fakes.coingecko import Answer, FakeCoinGecko, rate_limited, simple_price_body
from tests.sourcing import collector

FIXTURE = Path(__file__).parent / "fixtures" / "coingecko.ndjson"
RECEIVED = 1_711_356_301_000_000_000
T = TypeVar("T")

# The example of CoinGecko's documentation (https://docs.coingecko.com/v3.0.1/reference/simple-price).
DOCUMENTED = (
    b'{"bitcoin": {"usd": 67187.3358936566, "usd_market_cap": 1317802988326.25, "usd_24h_vol": 31260929299.5248,'
    b' "usd_24h_change": 3.63727894677354, "last_updated_at": 1711356300}}'
)


def parser() -> CoinGeckoParser:
    parsed = build_parser(Settings())
    assert isinstance(parsed, CoinGeckoParser)
    return parsed


def test_the_documented_answer_becomes_one_exact_tick() -> None:
    (tick,) = parser().parse(DOCUMENTED, RECEIVED)
    assert tick == Tick(
        id="coingecko:BTC-USD:1711356300",
        source="coingecko",
        symbol="BTC-USD",
        base="BTC",
        quote="USD",
        price=Decimal("67187.3358936566"),
        # 31260929299.5248 USD / 67187.3358936566 USD per BTC, to 8 decimals
        volume_24h=Decimal("465280.08416652"),
        # 67187.3358936566 / 1.0363727894677354, to the price's 10 decimals
        open_24h=Decimal("64829.3129426555"),
        ts_exchange=1_711_356_300_000_000_000,
        ts_received=RECEIVED,
        kind="poll",
    )
    assert str(tick.price) == "67187.3358936566"
    assert tick.bid is None and tick.ask is None


def test_every_configured_coin_of_a_body_is_a_tick_and_a_null_change_has_no_open() -> None:
    body = simple_price_body(
        {
            "ethereum": {
                "usd": "3448.2711345",
                "usd_24h_vol": "0",
                "usd_24h_change": None,
                "last_updated_at": 1711356287,
            },
            "cardano": {"usd": "0.6512", "last_updated_at": 1711356340},
            "polkadot": {},  # CoinGecko has nothing on it now
        }
    )
    eth, ada = parser().parse(body, RECEIVED)
    assert (eth.symbol, eth.price, eth.volume_24h, eth.open_24h) == (
        "ETH-USD",
        Decimal("3448.2711345"),
        Decimal(0),
        None,
    )
    assert (ada.symbol, ada.price, ada.volume_24h, ada.open_24h) == ("ADA-USD", Decimal("0.6512"), None, None)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>502 Bad Gateway</html>", "malformed_frame"),
        (b'{"bitcoin": [1, 2]}', "malformed_frame"),
        (b'{"status": {"error_code": 429, "error_message": "You\'ve exceeded the Rate Limit."}}', "venue_error"),
        (b'{"error": "coin not found"}', "venue_error"),
        (b'{"dogwifhat": {"usd": 2.5, "last_updated_at": 1711356300}}', "unknown_symbol"),
        (b'{"bitcoin": {"usd_24h_vol": 5, "last_updated_at": 1711356300}}', "missing_field"),
        (b'{"bitcoin": {"usd": 67187.3}}', "missing_field"),
        (b'{"bitcoin": {"usd": 0, "last_updated_at": 1711356300}}', "invalid_price"),
        (b'{"bitcoin": {"usd": -1.5, "last_updated_at": 1711356300}}', "invalid_price"),
        (b'{"bitcoin": {"usd": 1e400, "last_updated_at": 1711356300}}', "invalid_price"),
        (b'{"bitcoin": {"usd": 5, "usd_24h_change": -100, "last_updated_at": 1711356300}}', "invalid_price"),
        (b'{"bitcoin": {"usd": 5, "usd_24h_vol": -3, "last_updated_at": 1711356300}}', "invalid_volume"),
        (b'{"bitcoin": {"usd": 5, "last_updated_at": 0}}', "bad_timestamp"),
    ],
)
def test_bad_bodies_are_rejected_with_their_reason(body: bytes, reason: str) -> None:
    with pytest.raises(VenueFrameError) as caught:
        parser().parse(body, RECEIVED)
    assert caught.value.reason == reason


def test_one_bad_coin_keeps_the_other_coins_ticks_and_rejects_the_body() -> None:
    body = simple_price_body(
        {
            "bitcoin": {"usd": "67187.3358936566", "last_updated_at": 1711356300},
            "ethereum": {"usd": 0, "last_updated_at": 1711356287},
            "solana": {"usd": "171.25", "last_updated_at": 1711356290},
        }
    )
    with pytest.raises(VenueFrameError) as caught:
        parser().parse(body, RECEIVED)
    assert caught.value.reason == "invalid_price"
    assert "ETH" in caught.value.detail
    assert [(t.symbol, t.price) for t in caught.value.ticks] == [
        ("BTC-USD", Decimal("67187.3358936566")),
        ("SOL-USD", Decimal("171.25")),
    ]


def test_assets_without_a_coingecko_id_are_not_asked_for() -> None:
    only = replace(Settings(), assets=("BTC", "NOTACOIN"))
    assert build_parser(only).parse(DOCUMENTED, RECEIVED)[0].base == "BTC"
    with pytest.raises(VenueFrameError):
        build_parser(replace(only, assets=("ETH",))).parse(DOCUMENTED, RECEIVED)


def test_the_capture_file_holds_documented_bodies_and_one_venue_error() -> None:
    outcomes: list[int | str] = []
    for line in FIXTURE.read_text().splitlines():
        record = json.loads(line)
        assert record["source"] == "coingecko"
        try:
            outcomes.append(len(parser().parse(record["frame"].encode(), record["received_ns"])))
        except VenueFrameError as err:
            outcomes.append(err.reason)
    assert outcomes == [2, 3, 2, "venue_error"]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_s({"Retry-After": "7"}) == 7
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now_s=1445412470) == 10
    assert retry_after_s({}, default=3) == 3
    assert retry_after_s({"Retry-After": "soon"}, default=3) == 3


_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["null", '"12.5"', "true", "[]", "{}", "1e400", "-0", "1E-30"]),
)
_fields = st.dictionaries(
    st.sampled_from(["usd", "usd_24h_vol", "usd_24h_change", "last_updated_at", "usd_market_cap", "eur"]),
    _numbers,
    max_size=6,
)
_bodies = st.dictionaries(
    st.sampled_from([*list(COINGECKO_IDS.values())[:6], "status", "dogwifhat", ""]), _fields, max_size=4
).map(
    lambda coins: (
        "{"
        + ", ".join(
            f"{json.dumps(coin)}: {{{', '.join(f'{json.dumps(k)}: {v}' for k, v in fields.items())}}}"
            for coin, fields in coins.items()
        )
        + "}"
    ).encode()
)


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(_bodies, st.binary(max_size=200)), cut=st.integers(min_value=0, max_value=400))
def test_any_body_gives_contract_ticks_or_a_venue_frame_error(body: bytes, cut: int) -> None:
    for frame in (body, body[:cut], DOCUMENTED[:cut]):
        try:
            ticks = parser().parse(frame, RECEIVED)
        except VenueFrameError as err:
            assert err.reason
            continue
        for tick in ticks:
            check_tick(tick, assets=Settings().assets)


# ---- the collector against a fake CoinGecko and a real NATS -------------------------------------------------

GOOD = Answer(
    simple_price_body(
        {
            "bitcoin": {
                "usd": "67187.3358936566",
                "usd_24h_vol": "31260929299.5248",
                "usd_24h_change": "3.63727894677354",
                "last_updated_at": 1711356300,
            },
            "ethereum": {"usd": "3448.2711345", "usd_24h_vol": "14213410012.9241", "last_updated_at": 1711356287},
        }
    )
)


def live_settings(nats_url: str, fake: FakeCoinGecko, **live: float) -> Settings:
    return replace(
        Settings(),
        nats_url=nats_url,
        feed="live",
        live=replace(
            LiveSettings(),
            sources=("coingecko",),
            coingecko_rest_url=fake.url,
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            **live,  # type: ignore[arg-type]
        ),
    )


class Watch:
    """Core subscriptions to the collector's ticks, states and dead letters, decoded as they arrive."""

    def __init__(self) -> None:
        self.ticks: asyncio.Queue[Tick] = asyncio.Queue()
        self.states: asyncio.Queue[SourceStatus] = asyncio.Queue()
        self.letters: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def start(self, nc: NATS, source: str) -> None:
        async def on_tick(msg: Msg) -> None:
            await self.ticks.put(decode_tick(msg.data))

        async def on_state(msg: Msg) -> None:
            await self.states.put(decode_source_status(msg.data))

        async def on_letter(msg: Msg) -> None:
            await self.letters.put(decode_dead_letter(msg.data))

        await nc.subscribe(f"{subjects.TICK_ROOT}.{source}.>", cb=on_tick)
        await nc.subscribe(subjects.source_status(source), cb=on_state)
        await nc.subscribe(subjects.dead_letter("collector"), cb=on_letter)
        await nc.flush()

    async def state(self, wanted: str, *, timeout: float = 5.0) -> list[str]:
        """The states seen until `wanted` (included)."""
        seen: list[str] = []
        async with asyncio.timeout(timeout):
            while not seen or seen[-1] != wanted:
                seen.append((await self.states.get()).state)
        return seen


@pytest.fixture
async def watch(nc: NATS) -> Watch:
    watching = Watch()
    await watching.start(nc, "coingecko")
    return watching


async def test_polled_prices_arrive_as_exact_ticks(nats_url: str, watch: Watch) -> None:
    async with FakeCoinGecko(default=GOOD) as fake, collector(live_settings(nats_url, fake, coingecko_poll_s=0.05)):
        assert await watch.state("connected") == ["connecting", "connected"]
        ticks: dict[str, Tick] = {}
        async with asyncio.timeout(5):
            while len(ticks) < 2:
                tick = await watch.ticks.get()
                ticks[tick.symbol] = tick
        query = fake.requests[0].query
    btc = ticks["BTC-USD"]
    assert (btc.source, btc.price, btc.volume_24h, btc.open_24h) == (
        "coingecko",
        Decimal("67187.3358936566"),
        Decimal("465280.08416652"),
        Decimal("64829.3129426555"),
    )
    assert str(btc.price) == "67187.3358936566"
    assert btc.id == "coingecko:BTC-USD:1711356300"
    assert ticks["ETH-USD"].price == Decimal("3448.2711345")
    assert query["ids"].split(",") == ["bitcoin", "ethereum", "solana", "cardano", "polkadot"]
    assert query["vs_currencies"] == "usd"
    assert query["precision"] == "full"
    assert all(query[f] == "true" for f in ("include_24hr_vol", "include_24hr_change", "include_last_updated_at"))


@pytest.mark.parametrize("calls_per_min", [1, 6, 30, 50])
def test_the_rate_limit_holds_in_every_minute_and_gives_the_whole_limit(calls_per_min: int) -> None:
    bucket = rate_limit(calls_per_min)
    calls, now = [], 0.0
    while now < 600:  # a caller taking every call it may, for ten minutes
        wait = bucket.delay(1, now)
        if wait > 0:
            now = max(now + wait, math.nextafter(now, math.inf))  # a real clock always moves on
            continue
        assert bucket.take(1, now)
        calls.append(now)
    # Every 60 s window, starting anywhere (1 µs spared for the float sums), holds at most the limit...
    assert max(sum(start <= t < start + 60 - 1e-6 for t in calls) for start in calls) == calls_per_min
    # ...and the first minute already has its whole limit, no more.
    assert sum(t < 60 - 1e-6 for t in calls) == calls_per_min


async def test_requests_stay_within_the_calls_per_minute(nats_url: str, watch: Watch) -> None:
    async with FakeCoinGecko(default=GOOD) as fake:
        limited = live_settings(nats_url, fake, coingecko_poll_s=0.05, coingecko_calls_per_min=6)
        started = time.monotonic()
        async with collector(limited):
            await fake.wait_requests(1, timeout=5)  # one call at once...
            with pytest.raises(TimeoutError):
                await fake.wait_requests(2, timeout=1.5)  # ...the next one 10 s later, at 6 a minute
            elapsed = time.monotonic() - started
            assert len(fake.requests) <= 1 + 6 / 60 * elapsed


async def test_a_restarted_source_keeps_its_rate_limit(nats_url: str, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    dead_letters = DeadLetters(js, service="collector")
    async with (
        FakeCoinGecko(default=GOOD) as fake,
        Publisher(nc, dead_letters=dead_letters, assets=DEFAULT_ASSETS) as publisher,
    ):
        sink = CollectorSink(js, publisher, dead_letters)
        source = build(live_settings(nats_url, fake, coingecko_poll_s=0.05, coingecko_calls_per_min=6))
        for attempt in range(2):  # the supervisor restarts the same source object after a failure
            stop = asyncio.Event()
            task = asyncio.create_task(source.run(sink, stop))
            try:
                if attempt == 0:
                    await fake.wait_requests(1, timeout=5)
                else:
                    with pytest.raises(TimeoutError):
                        await fake.wait_requests(2, timeout=1.5)  # the restart has no fresh calls to spend
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=5)
    assert len(fake.requests) == 1


async def test_a_429_retry_after_is_honoured_without_a_reconnect(nats_url: str, watch: Watch) -> None:
    fake = FakeCoinGecko(default=GOOD, script=[rate_limited(retry_after="1")])
    async with fake, collector(live_settings(nats_url, fake, coingecko_poll_s=0.05, coingecko_calls_per_min=600)):
        tick = await asyncio.wait_for(watch.ticks.get(), timeout=5)
        first, second = fake.requests[:2]
        states = [s.state for s in await _drain(watch.states)]
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0
    assert tick.source == "coingecko"
    assert "reconnecting" not in states


async def test_a_garbage_body_is_dead_lettered_and_polling_goes_on(nats_url: str, watch: Watch) -> None:
    garbage = Answer(b'{"bitcoin": {"usd": "not a price", "last_updated_at": 1711356300}')
    fake = FakeCoinGecko(default=GOOD, script=[garbage])
    async with fake, collector(live_settings(nats_url, fake, coingecko_poll_s=0.05)):
        letter = await asyncio.wait_for(watch.letters.get(), timeout=5)
        tick = await asyncio.wait_for(watch.ticks.get(), timeout=5)
    assert (letter.service, letter.subject, letter.reason) == ("collector", "venue.coingecko", "malformed_frame")
    assert letter.payload == garbage.body
    assert tick.price in (Decimal("67187.3358936566"), Decimal("3448.2711345"))


async def test_a_bad_coin_is_dead_lettered_and_the_good_coins_are_published(nats_url: str, watch: Watch) -> None:
    mixed = Answer(
        simple_price_body(
            {
                "bitcoin": {"usd": "67187.3358936566", "last_updated_at": 1711356300},
                "ethereum": {"usd": 0, "last_updated_at": 1711356287},
            }
        )
    )
    async with FakeCoinGecko(default=mixed) as fake, collector(live_settings(nats_url, fake, coingecko_poll_s=0.05)):
        tick = await asyncio.wait_for(watch.ticks.get(), timeout=5)
        letter = await asyncio.wait_for(watch.letters.get(), timeout=5)
    assert (tick.symbol, tick.price) == ("BTC-USD", Decimal("67187.3358936566"))
    assert (letter.subject, letter.reason, letter.payload) == ("venue.coingecko", "invalid_price", mixed.body)


async def test_a_stop_cancels_a_slow_request_and_nothing_is_delivered_after_it(
    nats_url: str, nc: NATS, watch: Watch
) -> None:
    fake = FakeCoinGecko(default=GOOD, script=[replace(GOOD, delay_s=5.0)])
    async with fake:
        stop = asyncio.Event()
        task = asyncio.create_task(run(live_settings(nats_url, fake, coingecko_poll_s=0.05), stop))
        await fake.wait_requests(1, timeout=5)  # the request is in flight; its answer is 5 s away
        stop.set()
        stopped_at = time.monotonic()
        await asyncio.wait_for(task, timeout=10)
        took_s = time.monotonic() - stopped_at
    assert took_s < 1.0
    assert await watch.state("stopped") == ["connecting", "stopped"]
    assert (await nc.jetstream().stream_info(subjects.TICKS_STREAM)).state.messages == 0


async def test_a_venue_that_goes_down_is_reconnected_when_it_comes_back(nats_url: str, watch: Watch) -> None:
    fake = FakeCoinGecko(default=GOOD)
    async with fake, collector(live_settings(nats_url, fake, coingecko_poll_s=0.05)):
        assert await watch.state("connected") == ["connecting", "connected"]
        await fake.down()
        assert await watch.state("reconnecting") == ["reconnecting"]
        await fake.up()
        assert await watch.state("connected") == ["connected"]
        await _drain(watch.ticks)
        tick = await asyncio.wait_for(watch.ticks.get(), timeout=5)
    assert tick.source == "coingecko"
    assert (await watch.state("stopped"))[-1] == "stopped"


async def test_a_server_error_is_a_reconnect_too(nats_url: str, watch: Watch) -> None:
    fake = FakeCoinGecko(default=GOOD, script=[Answer(b"upstream timeout", status=503)])
    async with fake, collector(live_settings(nats_url, fake, coingecko_poll_s=0.05)):
        assert await watch.state("connected") == ["connecting", "reconnecting", "connected"]
    reconnecting = [r for r in fake.requests if r.status == 503]
    assert len(reconnecting) == 1


async def _drain(queue: asyncio.Queue[T]) -> list[T]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
