"""The consensus engine's rules beyond the median: kinds, sanity, jumps, MAD, weights, methods, policy."""

from __future__ import annotations

import itertools
from dataclasses import replace
from decimal import Decimal

import msgspec
import pytest

from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.events import Tick
from pricewire_validator.aggregation import spread_factor, weighted_median, weights
from pricewire_validator.consensus import ConsensusBook, ConsensusRule, Evaluation, evaluate_quotes, publish_due

NOW = 1_700_000_000_000_000_000
RULE = ConsensusRule()  # weighted median, 30 s streams, 120 s polls, 5 %, MAD k=5 over 1 %, jump 20 %
_ids = itertools.count()


def tick(source: str, price: str, *, age_s: float = 1.0, **changes: object) -> Tick:
    received = NOW - round(age_s * NS_PER_S)
    fields: dict[str, object] = {
        "id": f"e-{next(_ids)}",
        "source": source,
        "symbol": "BTC-USD",
        "base": "BTC",
        "quote": "USD",
        "price": Decimal(price),
        "ts_exchange": received - NS_PER_MS,
        "ts_received": received,
    }
    fields.update(changes)
    return Tick(**fields)  # type: ignore[arg-type]


def evaluate(*ticks: Tick, rule: ConsensusRule = RULE) -> Evaluation:
    evaluation = evaluate_quotes("BTC", ticks, now_ns=NOW, rule=rule)
    assert evaluation is not None
    return evaluation


def reasons(evaluation: Evaluation) -> dict[str, str | None]:
    return {q.source: q.reason for q in evaluation.sources}


# --- freshness by kind and sanity --------------------------------------------------------------------


def test_a_polled_quote_has_its_own_max_age() -> None:
    result = evaluate(tick("ws", "100", age_s=60), tick("rest", "100", age_s=60, kind="poll"), tick("live", "100"))
    assert reasons(result) == {"live": None, "rest": None, "ws": "stale"}
    kinds = {q.source: q.kind for q in result.sources}
    assert kinds == {"live": "stream", "rest": "poll", "ws": "stream"}
    assert reasons(evaluate(tick("rest", "100", age_s=121, kind="poll"), tick("live", "100")))["rest"] == "stale"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"price": Decimal(0)}, "invalid"),
        ({"price": Decimal(-5)}, "invalid"),
        ({"price": Decimal("NaN")}, "invalid"),
        ({"price": Decimal("Infinity")}, "invalid"),
        ({"bid": Decimal(0), "ask": Decimal("100.1")}, "invalid"),
        ({"bid": Decimal("100.2"), "ask": Decimal("100.1")}, "crossed"),
        ({"quote": "EUR", "symbol": "BTC-EUR"}, "not_usd"),
    ],
)
def test_a_quote_that_cannot_be_right_is_excluded_with_its_reason(changes: dict[str, object], reason: str) -> None:
    bad = msgspec.structs.replace(tick("bad", "100"), **changes)
    result = evaluate(bad, tick("a", "100"), tick("b", "100.02"))
    assert reasons(result) == {"a": None, "b": None, "bad": reason}
    assert result.status == "ok" and result.n_used == 2


def test_a_locked_book_is_not_crossed() -> None:
    assert reasons(evaluate(tick("a", "100", bid=Decimal(100), ask=Decimal(100))))["a"] is None


# --- jumps ---------------------------------------------------------------------------------------------

ONE_VENUE = ConsensusRule(min_sources=1)


def feed(book: ConsensusBook, *prices: str, source: str = "a", start_s: float = 10.0) -> list[str | None]:
    """Each price one 100 ms after the other, published as due; the venue's reason after each."""
    seen = []
    for i, price in enumerate(prices):
        book.update(tick(source, price, age_s=start_s - i * 0.1))
        event = book.propose("BTC", NOW)
        if event is not None:
            book.commit(event)
        last = book.last("BTC")
        assert last is not None
        seen.append(next(q.reason for q in last.sources if q.source == source))
    return seen


def test_a_one_quote_spike_is_held_out_and_the_quote_after_it_is_taken() -> None:
    assert feed(ConsensusBook(ONE_VENUE), "100", "130", "100.5") == [None, "jump", None]


def test_a_move_the_next_quote_confirms_is_taken() -> None:
    book = ConsensusBook(ONE_VENUE)
    assert feed(book, "100", "130", "131") == [None, "jump", None]
    evaluation = book.evaluate("BTC", NOW)
    assert evaluation is not None and evaluation.price == Decimal(131)


def test_a_move_within_the_jump_limit_or_after_a_long_silence_is_no_jump() -> None:
    assert feed(ConsensusBook(ONE_VENUE), "100", "119") == [None, None]
    book = ConsensusBook(replace(ONE_VENUE, max_age_ns=3 * NS_PER_S))
    book.update(tick("a", "100", age_s=20))
    assert feed(book, "150", start_s=1) == [None]  # 19 s later: the old quote says nothing about this one


def test_while_a_venue_jumps_the_last_price_stands_as_stale() -> None:
    book = ConsensusBook(ONE_VENUE)
    assert feed(book, "100", "300") == [None, "jump"]
    held = book.last("BTC")
    assert held is not None and (held.status, held.price, held.seq) == ("stale", Decimal(100), 2)


# --- outliers: the fixed threshold and the MAD test ------------------------------------------------------


def test_the_mad_test_sees_a_quote_the_fixed_threshold_lets_through() -> None:
    tight = [tick(f"v{i}", p) for i, p in enumerate(["100.00", "100.02", "99.99", "100.01"])]
    result = evaluate(*tight, tick("off", "102"))
    assert reasons(result)["off"] == "outlier_mad"
    assert next(q for q in result.sources if q.source == "off").outlier
    assert result.n_used == 4
    # Two quotes have no MAD to speak of; and under the 1 % floor nobody is a MAD outlier.
    assert reasons(evaluate(tight[0], tick("off", "102")))["off"] is None
    assert reasons(evaluate(*tight, tick("near", "100.9")))["near"] is None


def test_spread_out_honest_venues_are_not_mad_outliers() -> None:
    result = evaluate(tick("a", "99.2"), tick("b", "100"), tick("c", "100.8"), tick("d", "100.3"))
    assert set(reasons(result).values()) == {None}


# --- aggregation and weights -----------------------------------------------------------------------------


def test_the_weighted_median_leans_to_volume_and_tight_books() -> None:
    small, big = Decimal(1), Decimal(100)  # sqrt: 100 weighs 10 times as much as 1
    result = evaluate(
        tick("a", "100", volume_24h=small), tick("b", "101", volume_24h=small), tick("c", "102", volume_24h=big)
    )
    assert result.price == Decimal(102)
    assert {q.source: q.weight for q in result.sources} == {
        "a": Decimal("0.0833"),
        "b": Decimal("0.0833"),
        "c": Decimal("0.8333"),
    }
    assert evaluate(tick("a", "100"), tick("b", "101"), tick("c", "102")).price == Decimal(101)  # no volume: median

    wide = tick("a", "100", bid=Decimal("99"), ask=Decimal("101"))  # 200 bps: 1/21 of the weight of no spread
    tight = tick("b", "101", bid=Decimal("100.9999"), ask=Decimal("101.0001"))
    assert evaluate(wide, tight).price == Decimal(101)


def test_equal_halves_of_the_weight_give_the_exact_mean_of_the_two() -> None:
    assert evaluate(tick("a", "100.1"), tick("b", "100.25")).price == Decimal("100.175")
    assert weighted_median([Decimal(1), Decimal(3)], [1.0, 1.0], ["x", "y"]) == Decimal(2)
    assert weighted_median([Decimal(1), Decimal(3)], [1.0, 1.5], ["x", "y"]) == Decimal(3)


def test_weights_fill_in_a_missing_volume_with_the_median_and_zero_volumes_weigh_alike() -> None:
    assert weights([4.0, None, 2.0], [1.0, 1.0, 0.5]) == [4.0, 3.0, 1.0]
    assert weights([0.0, 0.0], [1.0, 0.5]) == [1.0, 1.0]
    assert weights([None, None], [0.5, 0.25]) == [0.5, 0.25]
    assert spread_factor(tick("a", "100", bid=Decimal("99.95"), ask=Decimal("100.05")), 10.0) == pytest.approx(0.5)
    assert spread_factor(tick("a", "100"), 10.0) == 0.5


@pytest.mark.parametrize(
    ("method", "expected"),
    [("median", "101"), ("mean", "101.3333"), ("vwap", "100.2500"), ("weighted_median", "100.00")],
)
def test_every_method_has_its_own_exact_answer(method: str, expected: str) -> None:
    rule = replace(RULE, method=method)  # type: ignore[arg-type]
    quotes = [
        tick("a", "100.00", volume_24h=Decimal(300)),
        tick("b", "101", volume_24h=Decimal(100)),
        tick("c", "103", volume_24h=Decimal(0)),
    ]
    result = evaluate(*quotes, rule=rule)
    assert str(result.price) == expected
    assert result.method == method
    shares = [q.weight for q in result.sources]  # what each quote counted for in this method
    assert (
        shares
        == {
            "median": [Decimal("0.3333")] * 3,
            "mean": [Decimal("0.3333")] * 3,
            "vwap": [Decimal("0.75"), Decimal("0.25"), Decimal(0)],
            "weighted_median": [Decimal("0.6340"), Decimal("0.3660"), Decimal(0)],
        }[method]
    )
    assert result.to_price(1).method == method


# --- confidence, dispersion, 24h figures ------------------------------------------------------------------


def test_confidence_covers_every_admitted_venues_book() -> None:
    result = evaluate(
        tick("a", "100", bid=Decimal("99.9"), ask=Decimal("100.1")),
        tick("b", "100.4", bid=Decimal("100.35"), ask=Decimal("100.45")),
        tick("c", "100.2"),
    )
    assert result.price == Decimal("100.2")
    assert result.confidence == Decimal("0.30")  # a: |100 - 100.2| + 0.1; b: 0.2 + 0.05; c: 0
    assert result.cv_pct == Decimal("0.1996")  # stdev 0.2 over a mean of 100.2


def test_the_24h_open_is_volume_weighted() -> None:
    result = evaluate(
        tick("a", "110", open_24h=Decimal("100"), volume_24h=Decimal(3)),
        tick("b", "110", open_24h=Decimal("104"), volume_24h=Decimal(1)),
    )
    assert (result.change_24h, result.change_pct_24h, result.volume_24h) == (Decimal(9), Decimal("8.9109"), Decimal(4))
    unweighted = evaluate(tick("a", "110", open_24h=Decimal("100")), tick("b", "110", open_24h=Decimal("104")))
    assert unweighted.change_24h == Decimal(8)


# --- publish policy --------------------------------------------------------------------------------------


def test_a_move_under_deviation_bps_waits_for_the_heartbeat() -> None:
    rule = replace(RULE, deviation_bps=1.0)
    book = ConsensusBook(rule)
    book.update(tick("a", "10000"))
    book.update(tick("b", "10000"))
    first = book.propose("BTC", NOW)
    assert first is not None
    book.commit(first)
    book.update(tick("a", "10000.9", age_s=0.5))
    book.update(tick("b", "10000.9", age_s=0.5))
    assert book.propose("BTC", NOW) is None  # 0.9 bps
    assert book.propose("BTC", NOW + rule.heartbeat_ns) is not None
    book.update(tick("a", "10001", age_s=0.4))
    book.update(tick("b", "10001", age_s=0.4))
    moved = book.propose("BTC", NOW)  # 1 bp
    assert moved is not None and moved.price == Decimal(10001)


def test_status_and_admission_changes_are_published_whatever_the_move() -> None:
    last = evaluate(tick("a", "100"), tick("b", "100")).to_price(1)
    degraded = evaluate(tick("a", "100"), tick("b", "100", age_s=31))
    assert publish_due(degraded, last, heartbeat_ns=RULE.heartbeat_ns, deviation_bps=50)
    swapped = evaluate(tick("a", "100"), tick("c", "100"))
    assert publish_due(swapped, last, heartbeat_ns=RULE.heartbeat_ns, deviation_bps=50)
    same = evaluate(tick("a", "100.01"), tick("b", "100.01"))
    assert not publish_due(same, last, heartbeat_ns=RULE.heartbeat_ns, deviation_bps=50)


# --- thresholds decided exactly, whatever floats say ---------------------------------------------------

NO_MAD = replace(RULE, mad_min_pct=Decimal(100))


@pytest.mark.parametrize(
    ("prices", "reasons_"),
    [
        (("0.3", "0.3", "0.315"), [None, None, None]),  # exactly 5 %: the rule excludes only above it
        (("0.3", "0.3", "0.31500001"), [None, None, "outlier"]),
        (("2185.2185", "2415.2415"), [None, None]),  # each exactly 5 % from their mean
    ],
)
def test_a_quote_exactly_on_the_outlier_threshold_is_admitted(prices: tuple[str, ...], reasons_: list[str]) -> None:
    result = evaluate(*(tick(f"v{i}", p) for i, p in enumerate(prices)), rule=NO_MAD)
    assert list(reasons(result).values()) == reasons_
    assert abs(result.sources[-1].deviation_pct) >= Decimal(5)  # the evidence says 5.0000 (or above)


def test_a_move_of_exactly_the_jump_limit_is_no_jump() -> None:
    # 0.57 -> 0.684 is exactly +20 %; in floats 0.684 / 0.57 - 1 comes out above 0.2.
    assert 0.684 / 0.57 - 1 > 0.2
    assert feed(ConsensusBook(ONE_VENUE), "0.57", "0.684") == [None, None]
    assert feed(ConsensusBook(ONE_VENUE), "0.57", "0.68400001") == [None, "jump"]


def test_a_venue_of_no_weight_never_sets_a_tied_weighted_median() -> None:
    quotes = [
        tick("a", "100", volume_24h=Decimal(4)),
        tick("b", "100.5", volume_24h=Decimal(0)),
        tick("c", "101", volume_24h=Decimal(4)),
    ]
    result = evaluate(*quotes)
    assert result.price == Decimal("100.5")  # the mean of a and c, the two equal halves
    assert {q.source: q.weight for q in result.sources}["b"] == 0


def test_an_aggregators_market_volume_neither_weighs_nor_adds_up() -> None:
    venues = [tick("kraken", "100", volume_24h=Decimal(4)), tick("binance", "101", volume_24h=Decimal(9))]
    gecko = tick("coingecko", "102", volume_24h=Decimal(1_000_000), kind="poll")
    result = evaluate(*venues, gecko)
    assert result.volume_24h == Decimal(13)  # the venues' own, not the market's on top
    shares = {q.source: q.weight for q in result.sources}
    assert shares["coingecko"] < Decimal("0.5")  # weighs like a venue of median volume: sqrt(4)..sqrt(9)
    counted = evaluate(*venues, gecko, rule=replace(RULE, aggregators=frozenset()))
    assert counted.volume_24h == Decimal(1_000_013)
    assert {q.source: q.weight for q in counted.sources}["coingecko"] > Decimal("0.9")


def test_a_quote_without_volume_weighs_like_the_median_of_the_venues_that_trade() -> None:
    # A venue reporting no trades weighs nothing; one reporting no volume gets the median of those trading.
    assert weights([0.0, 0.0, 3.0, None], [1.0, 1.0, 1.0, 1.0]) == [0.0, 0.0, 3.0, 3.0]
