"""Temporal anomaly: the rolling z-score alone, in the consensus book, and on a real NATS JetStream."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from pricewire_common.bus import ensure_streams
from pricewire_common.clock import NS_PER_S
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.errors import ConfigError
from pricewire_common.events import Price, Tick, decode_price, encode
from pricewire_validator.anomaly import MIN_STDEV, RollingZScore, published
from pricewire_validator.consensus import ConsensusBook, ConsensusRule
from tests.test_validator_service import PriceReader, make_tick, publish_tick, validator

NOW = 1_700_000_000_000_000_000
_steps = itertools.count()


def filled(values: list[float], *, window: int = 20, threshold: float = 3.0) -> RollingZScore:
    rolling = RollingZScore(window, threshold)
    for value in values:
        rolling.add(Decimal(repr(value)))
    return rolling


def reference_z(prices: list[float], new: float, window: int) -> float | None:
    """The z-score worked out plainly: the last `window` log returns, statistics' mean and sample stdev."""
    returns = [math.log(b / a) for a, b in itertools.pairwise(prices)][-window:]
    if len(returns) < max(2, window // 2):
        return None
    spread = max(statistics.stdev(returns), MIN_STDEV)
    return (math.log(new / prices[-1]) - statistics.mean(returns)) / spread


def walk(moves: list[float], start: float = 100.0) -> list[float]:
    """Prices that make the given log returns."""
    prices = [start]
    for r in moves:
        prices.append(prices[-1] * math.exp(r))
    return prices


# Moves of +1 % and -1 % in turn: mean 0, sample stdev 1 % * sqrt(20 / 19).
UNIT_MOVES = walk([0.01, -0.01] * 10)
UNIT_STDEV = 0.01 * math.sqrt(20 / 19)


def test_a_move_of_ten_sigma_is_an_anomaly() -> None:
    rolling = filled(UNIT_MOVES)
    z = rolling.score(Decimal(repr(UNIT_MOVES[-1] * math.exp(10 * UNIT_STDEV))))
    assert z is not None
    assert z == pytest.approx(10.0)
    assert rolling.is_anomaly(z)
    assert rolling.is_anomaly(rolling.score(Decimal(repr(UNIT_MOVES[-1] * math.exp(-10 * UNIT_STDEV)))))


def test_a_move_within_the_threshold_is_not() -> None:
    rolling = filled(UNIT_MOVES)
    z = rolling.score(Decimal(repr(UNIT_MOVES[-1] * math.exp(2.5 * UNIT_STDEV))))
    assert z == pytest.approx(2.5)
    assert not rolling.is_anomaly(z)
    assert rolling.score(Decimal(repr(UNIT_MOVES[-1]))) == pytest.approx(0.0)


def test_a_trending_random_walk_is_rarely_flagged() -> None:
    # Levels drift: a z-score of price levels flagged about 3 % of such a walk; its moves are what is usual.
    rng = random.Random(42)
    rolling = RollingZScore()
    price = 47000.0
    scores = []
    for _ in range(2000):
        price *= math.exp(rng.gauss(0.0002, 0.0008))  # a trend and noise
        scores.append(rolling.observe(Decimal(f"{price:.2f}")))
    flagged = [z for z in scores if rolling.is_anomaly(z)]
    assert sum(z is not None for z in scores) == 2000 - 11  # scored from the 12th price (10 moves) on
    # Gaussian moves pass |z| > 3 about 0.3 % of the time (a little more against a 20-move sample).
    assert len(flagged) <= 20, len(flagged)


def test_scores_are_the_plain_formula_over_the_last_moves() -> None:
    rng = random.Random(7)
    prices = walk([rng.gauss(0, 0.002) for _ in range(40)])
    rolling = RollingZScore(window=8)
    for i, price in enumerate(prices):
        expected = reference_z(prices[:i], price, 8) if i else None
        got = rolling.observe(Decimal(repr(price)))
        assert (got is None) == (expected is None), i
        if got is not None:
            assert got == pytest.approx(expected, rel=1e-9), i
    assert len(rolling) == 8


def test_no_score_until_half_the_window_is_filled() -> None:
    rolling = RollingZScore(window=20)
    for i in range(10):  # 10 prices: 9 moves
        assert rolling.observe(Decimal(100 + i % 2)) is None
    assert rolling.score(Decimal(100)) is None
    assert len(rolling) == 9  # a score never changes the window; only add (or observe) does
    rolling.add(Decimal(101))
    assert rolling.score(Decimal(100)) is not None


def test_a_flat_window_takes_a_one_basis_point_spread() -> None:
    rolling = filled([1.0] * 21)  # a stablecoin that has not moved
    assert rolling.score(Decimal(1)) == 0.0
    tick = rolling.score(Decimal("1.0001"))  # the smallest move: about one sigma, not a thousand
    assert tick == pytest.approx(math.log(1.0001) / MIN_STDEV)
    assert not rolling.is_anomaly(tick)
    assert rolling.is_anomaly(rolling.score(Decimal("0.97")))  # a depeg is
    assert not rolling.is_anomaly(None)


@pytest.mark.parametrize(("window", "threshold"), [(1, 3.0), (0, 3.0), (20, 0.0), (20, -1.0), (20, math.inf)])
def test_unusable_windows_are_refused(window: int, threshold: float) -> None:
    with pytest.raises(ValueError):
        RollingZScore(window, threshold)
    with pytest.raises(ValueError):
        ConsensusRule(anomaly_window=window, anomaly_z=threshold)


_ANY_POSITIVE = st.decimals(
    min_value=Decimal("1e-400"), max_value=Decimal("1e400"), allow_nan=False, allow_infinity=False
).filter(lambda d: d > 0)


@given(prices=st.lists(_ANY_POSITIVE, min_size=1, max_size=60), window=st.integers(min_value=2, max_value=25))
def test_a_score_is_finite_or_none_for_any_positive_prices(prices: list[Decimal], window: int) -> None:
    rolling = RollingZScore(window)
    for price in prices:
        z = rolling.observe(price)
        assert z is None or math.isfinite(z)
        assert published(z) is None or published(z) == Decimal(format(z, ".2f"))
        assert len(rolling) <= window


def test_the_event_carries_z_with_two_decimals() -> None:
    assert published(None) is None
    assert str(published(63.24555320336759)) == "63.25"
    assert str(published(-2.1213203435596424)) == "-2.12"
    assert str(published(-0.001)) == "0.00"  # never -0.00


# The consensus book: a single venue, so each tick is the consensus.

RULE = ConsensusRule(min_sources=1, anomaly_window=6, max_age_ns=30 * NS_PER_S)


def venue_tick(price: str) -> Tick:
    step = next(_steps)
    received = NOW - NS_PER_S + step * 1000  # each a microsecond later than the one before
    return Tick(
        id=f"a-{step}",
        source="a",
        symbol="BTC-USD",
        base="BTC",
        quote="USD",
        price=Decimal(price),
        ts_exchange=received,
        ts_received=received,
    )


def publish_all(book: ConsensusBook, prices: list[str], *, now_ns: int = NOW) -> list[Price]:
    events = []
    for price in prices:
        book.update(venue_tick(price))
        event = book.propose("BTC", now_ns)
        assert event is not None
        book.commit(event)
        events.append(event)
    return events


def test_the_book_flags_a_jump_and_still_proposes_it() -> None:
    book = ConsensusBook(RULE)
    quoted = ["100", "101", "99", "100.5", "99.5", "115"]
    events = publish_all(book, quoted)
    prices = [float(p) for p in quoted]
    # A window of 6 moves scores from its 3rd move on: the 5th price.
    assert [e.z_score for e in events[:4]] == [None] * 4
    for i in (4, 5):
        assert events[i].z_score == published(reference_z(prices[:i], prices[i], 6))
    assert events[5].z_score is not None and events[5].z_score > 8
    assert [e.anomaly for e in events] == [False] * 5 + [True]
    assert events[-1].price == Decimal(115)
    assert events[-1].status == "ok"
    assert book.last("BTC") == events[-1]


def test_repeats_and_stale_events_stay_out_of_the_window() -> None:
    plain = ConsensusBook(RULE)
    publish_all(plain, ["100", "101", "99", "100.5"])

    book = ConsensusBook(RULE)
    publish_all(book, ["100", "101", "99", "100.5"])
    for beat in range(1, 4):  # heartbeats repeat the price
        repeat = book.propose("BTC", NOW + beat * RULE.heartbeat_ns)
        assert repeat is not None
        assert repeat.price == Decimal("100.5")
        assert repeat.z_score is not None
        book.commit(repeat)
    stale_at = NOW + RULE.max_age_ns + NS_PER_S
    stale = book.propose("BTC", stale_at)
    assert stale is not None
    assert (stale.status, stale.anomaly, stale.z_score) == ("stale", False, None)
    book.commit(stale)

    book.update(venue_tick("115"))
    plain.update(venue_tick("115"))
    expected = plain.propose("BTC", NOW)
    after = book.propose("BTC", NOW)
    assert expected is not None
    assert after is not None
    assert after.z_score == expected.z_score
    assert after.anomaly


def test_a_recovered_price_starts_the_window() -> None:
    book = ConsensusBook(RULE)
    (first,) = publish_all(ConsensusBook(RULE), ["100"])
    book.seed(first)
    events = publish_all(book, ["101", "99", "100.5", "99.5"])
    # The moves from 100 (recovered): three of them score the fourth.
    assert [e.z_score for e in events[:3]] == [None] * 3
    assert events[3].z_score == published(reference_z([100, 101, 99, 100.5], 99.5, 6))


def test_a_price_without_the_new_fields_still_decodes() -> None:
    (event,) = publish_all(ConsensusBook(RULE), ["100"])
    older = msgspec.json.decode(encode(event))
    del older["anomaly"], older["z_score"]
    decoded = decode_price(msgspec.json.encode(older))
    assert (decoded.anomaly, decoded.z_score) == (False, None)
    flagged = replace_price(event, z_score=Decimal("-4.50"), anomaly=True)
    assert decode_price(encode(flagged)) == flagged
    assert b'"z_score":"-4.50"' in encode(flagged)


def replace_price(price: Price, **changes: object) -> Price:
    return msgspec.structs.replace(price, **changes)


def test_the_settings_read_the_anomaly_variables() -> None:
    assert (Settings.from_env({}).validator.anomaly_window, Settings.from_env({}).validator.anomaly_z) == (20, 3.0)
    validator_settings = Settings.from_env({"PRICEWIRE_ANOMALY_WINDOW": "50", "PRICEWIRE_ANOMALY_Z": "2.5"}).validator
    assert (validator_settings.anomaly_window, validator_settings.anomaly_z) == (50, 2.5)
    rule = ConsensusRule.from_settings(replace(Settings(), validator=validator_settings))
    assert (rule.anomaly_window, rule.anomaly_z) == (50, 2.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [("PRICEWIRE_ANOMALY_WINDOW", "1"), ("PRICEWIRE_ANOMALY_WINDOW", "x"), ("PRICEWIRE_ANOMALY_Z", "0")],
)
def test_unusable_anomaly_settings_fail_at_start(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert err.value.name == name


# The service on NATS.


@pytest.fixture
def settings(nats_url: str) -> Settings:
    """One venue is the consensus; a short window; a long heartbeat so only ticks publish."""
    validator_settings = replace(ValidatorSettings(), min_sources=1, heartbeat_s=60.0, anomaly_window=6)
    return replace(Settings(), nats_url=nats_url, validator=validator_settings)


def priced(quoted: str) -> Callable[[Price], bool]:
    return lambda price: price.price == Decimal(quoted)


async def test_a_sudden_jump_is_published_flagged(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    reader = await PriceReader.open(js)
    events: list[Price] = []
    async with validator(settings):
        for quoted in ("100", "101", "99", "100.5", "99.5", "115", "100"):
            await publish_tick(js, make_tick("sim-a", quoted))
            events.append(await reader.next(priced(quoted)))
    await reader.close()

    assert [e.price for e in events] == [Decimal(p) for p in ("100", "101", "99", "100.5", "99.5", "115", "100")]
    assert [e.seq for e in events] == list(range(1, 8))
    assert [e.anomaly for e in events] == [False] * 5 + [True, False]
    assert events[5].z_score == published(reference_z([100, 101, 99, 100.5, 99.5], 115, 6))
    assert events[5].status == "ok"
    assert events[0].z_score is None
    assert events[6].z_score is not None
    assert abs(events[6].z_score) < 3
