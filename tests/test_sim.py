"""The collector's simulated feed, a pure core: deterministic, realistic, and always within the contract."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricewire_collector.sim import KNOWN_ASSETS, SimFeed, venue_name, venue_quote
from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.config import DEFAULT_ASSETS
from pricewire_common.events import Tick
from pricewire_common.rules import check_tick

T0 = 1_700_000_000 * NS_PER_S
PLACES = {"BTC": 2, "ETH": 2, "SOL": 2, "ADA": 4, "DOT": 3}
NOMINAL = {"BTC": 67_000, "ETH": 3_500, "SOL": 150, "ADA": 0.45, "DOT": 7}


def run_feed(feed: SimFeed, *, calls: int, step_ns: int = 10 * NS_PER_MS) -> list[tuple[int, Tick | None]]:
    return [(T0 + i * step_ns, feed.next_tick(T0 + i * step_ns)) for i in range(calls)]


def ticks_of(feed: SimFeed, *, calls: int, step_ns: int = 10 * NS_PER_MS) -> list[Tick]:
    return [tick for _, tick in run_feed(feed, calls=calls, step_ns=step_ns) if tick is not None]


def calm(
    seed: int = 3,
    *,
    assets: tuple[str, ...] = DEFAULT_ASSETS,
    venues: int = 3,
    outlier_probability: float = 0.0,
    quiet_rate: float = 0.0,
) -> SimFeed:
    """A feed with no outliers and no quiet spells unless asked for."""
    return SimFeed(
        assets,
        venues=venues,
        seed=seed,
        outlier_probability=outlier_probability,
        quiet_rate=quiet_rate,
    )


def places(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return -exponent


def test_same_seed_and_times_give_the_same_ticks() -> None:
    first = run_feed(SimFeed(DEFAULT_ASSETS, venues=4, seed=42), calls=2_000)
    again = run_feed(SimFeed(DEFAULT_ASSETS, venues=4, seed=42), calls=2_000)
    assert first == again
    other = ticks_of(SimFeed(DEFAULT_ASSETS, venues=4, seed=43), calls=200)
    assert [t.price for _, t in first[:200] if t] != [t.price for t in other]


def test_ticks_are_realistic_quotes_of_the_configured_assets() -> None:
    ticks = ticks_of(calm(venues=4), calls=3_000)
    assert len(ticks) == 3_000
    for tick in ticks:
        assert check_tick(tick, assets=DEFAULT_ASSETS) is tick
        assert tick.bid is not None and tick.ask is not None
        assert tick.volume_24h is not None and tick.open_24h is not None
        assert tick.bid < tick.ask
        assert tick.bid <= tick.price <= tick.ask
        spread_bps = (tick.ask - tick.bid) / tick.price * 10_000
        assert spread_bps < 15
        for value in (tick.price, tick.bid, tick.ask, tick.open_24h):
            assert isinstance(value, Decimal)
            assert places(value) == PLACES[tick.base]
        assert abs(float(tick.price) / NOMINAL[tick.base] - 1) < 0.05
        assert 1_000_000 < float(tick.volume_24h) * NOMINAL[tick.base] < 1e10
        assert 0 < tick.ts_received - tick.ts_exchange < NS_PER_S
        assert tick.symbol == f"{tick.base}-{tick.quote}"
    quotes = {(t.source, t.quote) for t in ticks}
    assert quotes == {("sim-a", "USDT"), ("sim-b", "USD"), ("sim-c", "USDC"), ("sim-d", "USDT")}
    assert len({t.id for t in ticks}) == len(ticks)


def test_every_pair_takes_its_turn_and_ts_received_is_now() -> None:
    feed = calm(venues=3)
    calls = run_feed(feed, calls=feed.pairs)
    assert {(t.source, t.base) for _, t in calls if t} == {
        (v, a) for v in ("sim-a", "sim-b", "sim-c") for a in DEFAULT_ASSETS
    }
    assert all(t is not None and t.ts_received == now for now, t in calls)


def test_venue_names_and_quote_currencies_rotate() -> None:
    assert [venue_name(i) for i in (0, 1, 2, 25, 26, 27)] == [
        "sim-a", "sim-b", "sim-c", "sim-z", "sim-aa", "sim-ab",
    ]  # fmt: skip
    assert [venue_quote(i) for i in range(5)] == ["USDT", "USD", "USDC", "USDT", "USDT"]


def test_an_unknown_asset_gets_a_price_fixed_by_the_seed() -> None:
    first = ticks_of(calm(seed=5, assets=("FOO", "BTC")), calls=6)
    again = ticks_of(calm(seed=5, assets=("FOO", "BTC")), calls=6)
    other = ticks_of(calm(seed=6, assets=("FOO", "BTC")), calls=6)
    foo = [t for t in first if t.base == "FOO"]
    assert [t.price for t in foo] == [t.price for t in again if t.base == "FOO"]
    assert foo[0].price != next(t for t in other if t.base == "FOO").price
    assert Decimal("0.01") < foo[0].price < Decimal(1_000)
    assert all(2 <= places(t.price) <= 8 for t in foo)


def test_every_tick_is_an_outlier_at_probability_one_and_none_at_zero() -> None:
    normal = ticks_of(calm(seed=9), calls=1_500)
    wild = ticks_of(calm(seed=9, outlier_probability=1.0), calls=1_500)
    for quiet, odd in zip(normal, wild, strict=True):
        off = abs(float(odd.price) / float(quiet.price) - 1)
        assert 0.079 < off < 0.251
    by_asset: dict[str, list[Decimal]] = defaultdict(list)
    for tick in normal:
        by_asset[tick.base].append(tick.price)
    for prices in by_asset.values():
        middle = statistics.median(prices)
        assert all(abs(p / middle - 1) < Decimal("0.02") for p in prices)


def test_a_quiet_venue_sends_nothing_for_its_quiet_window() -> None:
    feed = calm(venues=3, assets=("BTC",), quiet_rate=1000.0)  # silent again at once
    calls = run_feed(feed, calls=6_000, step_ns=50 * NS_PER_MS)  # 300 s of simulated time
    seen: dict[str, list[int]] = defaultdict(list)
    for now, tick in calls:
        if tick is not None:
            seen[tick.source].append(now)
    assert sum(tick is None for _, tick in calls) > 5_900
    for venue in ("sim-a", "sim-b", "sim-c"):
        times = seen[venue]
        assert len(times) >= 5  # every window ends and the venue speaks again
        gaps_s = [(b - a) / NS_PER_S for a, b in itertools.pairwise(times)]
        # The first gap is the venue's first two ticks (no time had passed before the first to go quiet in).
        assert all(20 <= gap <= 60.2 for gap in gaps_s[1:]), gaps_s


def test_venues_keep_quoting_when_nothing_goes_quiet() -> None:
    calls = run_feed(calm(), calls=1_000)
    assert all(tick is not None for _, tick in calls)


def test_the_true_price_moves_with_crypto_volatility() -> None:
    feed = calm(seed=11, assets=("BTC",), venues=1)
    prices = [float(t.price) for t in ticks_of(feed, calls=3_000, step_ns=60 * NS_PER_S)]
    returns = [math.log(b / a) for a, b in itertools.pairwise(prices)]
    annualised = statistics.stdev(returns) * math.sqrt(365.25 * 24 * 60)
    assert 0.35 < annualised < 0.9  # BTC's sigma is 0.55, plus a little venue noise


def test_time_running_backwards_does_not_break_the_feed() -> None:
    feed = calm()
    ticks = [feed.next_tick(now) for now in (T0, T0 - NS_PER_S, T0 + NS_PER_S, T0, 5)]
    assert all(t is not None and check_tick(t) for t in ticks)


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="venue"):
        SimFeed(DEFAULT_ASSETS, venues=0)
    with pytest.raises(ValueError, match="outlier_probability"):
        SimFeed(DEFAULT_ASSETS, outlier_probability=1.5)
    with pytest.raises(ValueError, match="asset"):
        SimFeed(())


ASSET_CODES = st.lists(st.sampled_from([*KNOWN_ASSETS, "FOO", "X1", "ZZZZZZ"]), min_size=1, max_size=6, unique=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**64),
    venues=st.integers(min_value=1, max_value=30),
    assets=ASSET_CODES,
    outlier_p=st.floats(min_value=0.0, max_value=1.0),
    quiet_rate=st.floats(min_value=0.0, max_value=100.0),
    start=st.integers(min_value=1, max_value=4 * 10**18),
    steps=st.lists(st.integers(min_value=0, max_value=3 * 86_400 * NS_PER_S), min_size=1, max_size=120),
)
def test_every_tick_keeps_the_contract(
    *,
    seed: int,
    venues: int,
    assets: list[str],
    outlier_p: float,
    quiet_rate: float,
    start: int,
    steps: list[int],
) -> None:
    feed = SimFeed(assets, venues=venues, seed=seed, outlier_probability=outlier_p, quiet_rate=quiet_rate)
    quotes = {venue_name(i): venue_quote(i) for i in range(venues)}
    now = start
    for step in steps:
        now += step
        tick = feed.next_tick(now)
        if tick is None:
            continue
        check_tick(tick, assets=assets)
        assert tick.bid is not None and tick.ask is not None and tick.open_24h is not None
        assert tick.bid < tick.ask
        assert tick.bid <= tick.price <= tick.ask
        assert places(tick.price) == places(tick.bid) == places(tick.ask) == places(tick.open_24h)
        assert tick.quote == quotes[tick.source]
        assert tick.ts_received == now
        assert 0 < tick.ts_exchange <= now


def test_the_24h_open_is_a_day_of_the_same_walk_back_and_the_same_on_every_venue() -> None:
    # The move over a day has sigma / sqrt(365) spread (a few %), not the few seconds since start.
    moves = []
    for seed in range(200):
        feed = calm(seed=seed, venues=3, assets=("BTC",))
        ticks = [t for _, t in run_feed(feed, calls=3) if t is not None]
        opens = [t.open_24h for t in ticks if t.open_24h is not None]
        assert len(opens) == len(ticks)
        assert max(opens) / min(opens) - 1 < Decimal("0.003")  # venues differ only by their bias
        moves.append(abs(float(ticks[0].price) / float(opens[0]) - 1))
    typical = statistics.median(moves)
    assert 0.005 < typical < 0.06, typical
