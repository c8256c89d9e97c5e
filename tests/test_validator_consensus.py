"""The consensus rule and the publish policy, as pure functions: no servers."""

from __future__ import annotations

import itertools
from dataclasses import replace
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError
from pricewire_common.events import Price, Tick, decode_price, encode
from pricewire_common.rules import check_tick
from pricewire_validator.consensus import (
    ConsensusBook,
    ConsensusRule,
    Evaluation,
    evaluate_quotes,
    median,
    publish_due,
)

NOW = 1_700_000_000_000_000_000
RULE = ConsensusRule()  # USD/USDT/USDC, 30 s, 5 %, 2 sources, 5 s heartbeat
_ids = itertools.count()


def tick(
    source: str,
    price: str | Decimal,
    *,
    base: str = "BTC",
    quote: str = "USDT",
    age_s: float = 1.0,
    **changes: object,
) -> Tick:
    received = NOW - round(age_s * NS_PER_S)
    fields: dict[str, object] = {
        "id": f"t-{next(_ids)}",
        "source": source,
        "symbol": f"{base}-{quote}",
        "base": base,
        "quote": quote,
        "price": Decimal(price),
        "ts_exchange": received - NS_PER_MS,
        "ts_received": received,
    }
    fields.update(changes)
    return Tick(**fields)  # type: ignore[arg-type]


def evaluate(*ticks: Tick, last: Price | None = None, rule: ConsensusRule = RULE) -> Evaluation:
    evaluation = evaluate_quotes("BTC", ticks, now_ns=NOW, rule=rule, last=last)
    assert evaluation is not None
    return evaluation


def by_source(evaluation: Evaluation) -> dict[str, tuple[Decimal, bool, str | None]]:
    return {q.source: (q.deviation_pct, q.outlier, q.reason) for q in evaluation.sources}


# --- median ---------------------------------------------------------------------------------------


def test_median_of_an_odd_count_is_the_middle_value_with_its_digits() -> None:
    result = median([Decimal("47001.7"), Decimal("47000.50"), Decimal("47002")])
    assert str(result) == "47001.7"


def test_median_of_an_even_count_is_the_exact_mean_of_the_middle_two() -> None:
    assert str(median([Decimal("47000.50"), Decimal("47000.61")])) == "47000.555"
    assert median([Decimal(1), Decimal(2), Decimal(9), Decimal(100)]) == Decimal("5.5")
    # 18 significant digits and a half: beyond float, within Decimal.
    pair = [Decimal("123456789.12345678"), Decimal("123456789.12345679")]
    assert str(median(pair)) == "123456789.123456785"


def test_median_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        median([])


# --- exclusions ------------------------------------------------------------------------------------


def test_outlier_is_marked_with_its_signed_deviation_and_left_out() -> None:
    result = evaluate(tick("a", "100"), tick("b", "101"), tick("c", "120"))
    assert by_source(result) == {
        "a": (Decimal("-0.9901"), False, None),  # (100 - 101) / 101 * 100
        "b": (Decimal("0.0000"), False, None),
        "c": (Decimal("18.8119"), True, "outlier"),
    }
    assert result.price == Decimal("100.5")
    assert (result.n_sources, result.n_used, result.status) == (3, 2, "ok")


def test_a_deviation_of_exactly_the_threshold_is_not_an_outlier() -> None:
    without_mad = replace(RULE, mad_min_pct=Decimal(100))
    result = evaluate(tick("a", "100"), tick("b", "100"), tick("c", "105"), rule=without_mad)
    assert by_source(result)["c"] == (Decimal("5.0000"), False, None)
    assert result.n_used == 3


def test_stale_quote_is_excluded_and_its_age_reported() -> None:
    result = evaluate(tick("a", "100", age_s=2.5), tick("b", "102"), tick("c", "90", age_s=31))
    quotes = {q.source: q for q in result.sources}
    assert quotes["c"].reason == "stale"
    assert not quotes["c"].outlier
    assert quotes["c"].age_ms == 31_000
    assert quotes["a"].age_ms == 2_500
    assert result.price == Decimal(101)
    assert result.n_used == 2


def test_a_quote_exactly_max_age_old_is_still_fresh() -> None:
    assert evaluate(tick("a", "100", age_s=30), tick("b", "100")).n_used == 2


def test_age_is_never_negative_when_the_collector_clock_runs_ahead() -> None:
    result = evaluate(tick("a", "100", age_s=-0.5), tick("b", "100"))
    assert [q.age_ms for q in result.sources] == [0, 1000]


def test_non_usd_quote_is_excluded_while_usdt_usdc_and_usd_count_as_usd() -> None:
    result = evaluate(
        tick("a", "100", quote="USD"),
        tick("b", "101", quote="USDC"),
        tick("c", "102", quote="USDT"),
        tick("d", "93", quote="EUR"),
    )
    assert by_source(result)["d"][2] == "not_usd"
    assert result.price == Decimal(101)
    assert (result.n_sources, result.n_used) == (4, 3)


# --- quorum and status -----------------------------------------------------------------------------


def test_status_follows_the_number_of_used_quotes() -> None:
    assert evaluate(tick("a", "100"), tick("b", "101")).status == "ok"
    one = evaluate(tick("a", "100"), tick("b", "100", age_s=60))
    assert (one.status, one.n_used, one.price) == ("degraded", 1, Decimal(100))
    three = ConsensusRule(min_sources=3)
    assert evaluate(tick("a", "100"), tick("b", "101"), rule=three).status == "degraded"


def test_one_quote_per_venue_is_a_precondition() -> None:
    with pytest.raises(ValueError, match="one quote per venue"):
        evaluate_quotes("BTC", [tick("a", "1"), tick("a", "2")], now_ns=NOW, rule=RULE)


def test_without_usable_quotes_and_no_history_there_is_nothing_to_publish() -> None:
    assert evaluate_quotes("BTC", [tick("a", "100", age_s=60)], now_ns=NOW, rule=RULE) is None
    assert evaluate_quotes("BTC", [], now_ns=NOW, rule=RULE) is None


def test_without_usable_quotes_the_last_price_is_repeated_as_stale() -> None:
    book = ConsensusBook(RULE)
    book.update(tick("a", "100", volume_24h=Decimal(5), open_24h=Decimal(90)))
    book.update(tick("b", "102", volume_24h=Decimal(7)))
    first = book.propose("BTC", NOW)
    assert first is not None
    book.commit(first)

    later = NOW + 40 * NS_PER_S  # both quotes are now older than 30 s
    stale = book.propose("BTC", later)
    assert stale is not None
    assert (stale.status, stale.seq, stale.n_used, stale.n_sources) == ("stale", 2, 0, 2)
    assert (stale.price, stale.confidence) == (first.price, first.confidence)
    assert (stale.volume_24h, stale.change_24h) == (first.volume_24h, first.change_24h)
    assert {q.reason for q in stale.sources} == {"stale"}
    assert stale.ts == later
    assert stale.ts_tick == first.ts_tick


def test_sources_that_all_disagree_leave_the_last_price_standing() -> None:
    last = evaluate(tick("a", "100"), tick("b", "100")).to_price(1)
    # Two venues 20 % apart: each is an outlier against their mean, so no quote is trusted.
    result = evaluate(tick("a", "90"), tick("b", "110"), last=last)
    assert result.status == "stale"
    assert result.price == Decimal(100)
    assert all(q.outlier for q in result.sources)


# --- confidence and figures ------------------------------------------------------------------------


def test_confidence_is_the_widest_distance_of_a_used_quote_from_the_price() -> None:
    result = evaluate(tick("a", "100.10"), tick("b", "100.40"), tick("c", "101.00"))
    assert result.price == Decimal("100.40")
    assert result.confidence == Decimal("0.60")


def test_confidence_of_a_single_quote_is_half_its_spread_or_zero() -> None:
    quoted = evaluate(tick("a", "100", bid=Decimal("99.90"), ask=Decimal("100.30")))
    assert quoted.confidence == Decimal("0.20")
    assert evaluate(tick("a", "100")).confidence == 0
    assert evaluate(tick("a", "100", bid=Decimal(99))).confidence == 0


def test_volume_and_24h_change_come_from_the_used_quotes() -> None:
    result = evaluate(
        tick("a", "110", volume_24h=Decimal("1.5"), open_24h=Decimal("100")),
        tick("b", "110", volume_24h=Decimal("2.25"), open_24h=Decimal("104")),
        tick("c", "110"),
        tick("d", "200", volume_24h=Decimal(1000), open_24h=Decimal(1)),  # outlier: none of it counts
    )
    assert result.volume_24h == Decimal("3.75")
    assert result.change_24h == Decimal("7.60")  # 110 - (100 x 1.5 + 104 x 2.25) / 3.75
    assert result.change_pct_24h == Decimal("7.4219")  # 7.60 / 102.40 * 100, 4 dp
    bare = evaluate(tick("a", "110"), tick("b", "111"))
    assert (bare.volume_24h, bare.change_24h, bare.change_pct_24h) == (None, None, None)


def test_identity_fields_and_source_order() -> None:
    result = evaluate(tick("zeta", "100", age_s=3), tick("alpha", "100", age_s=1), tick("mid", "100", age_s=50))
    assert [q.source for q in result.sources] == ["alpha", "mid", "zeta"]
    assert result.ts == NOW
    assert result.ts_tick == NOW - 1 * NS_PER_S  # newest receive time, stale quote included
    assert result.used == {"alpha", "zeta"}


def test_a_price_event_survives_the_wire_exactly() -> None:
    price = evaluate(tick("a", "47000.50"), tick("b", "47000.61")).to_price(7)
    decoded = decode_price(encode(price))
    assert decoded == price
    assert str(decoded.price) == "47000.555"


def test_rule_reads_the_validator_settings() -> None:
    environ = {
        "PRICEWIRE_USD_QUOTES": "USD",
        "PRICEWIRE_MAX_AGE_S": "2.5",
        "PRICEWIRE_MAX_AGE_POLL_S": "40",
        "PRICEWIRE_OUTLIER_PCT": "1.5",
        "PRICEWIRE_OUTLIER_MAD_K": "3.5",
        "PRICEWIRE_OUTLIER_MAD_MIN_PCT": "0.25",
        "PRICEWIRE_JUMP_PCT": "12",
        "PRICEWIRE_CONSENSUS_METHOD": "vwap",
        "PRICEWIRE_SPREAD_REF_BPS": "4",
        "PRICEWIRE_MIN_SOURCES": "3",
        "PRICEWIRE_DEVIATION_BPS": "0.5",
        "PRICEWIRE_HEARTBEAT_S": "0.5",
    }
    rule = ConsensusRule.from_settings(Settings.from_env(environ))
    assert rule == ConsensusRule(
        usd_quotes=frozenset({"USD"}),
        max_age_ns=2_500_000_000,
        max_age_poll_ns=40_000_000_000,
        outlier_pct=Decimal("1.5"),
        mad_k=3.5,
        mad_min_pct=Decimal("0.25"),
        jump_pct=Decimal(12),
        method="vwap",
        spread_ref_bps=4.0,
        min_sources=3,
        deviation_bps=0.5,
        heartbeat_ns=500_000_000,
    )
    assert (rule.outlier_frac, rule.mad_min_frac, rule.jump_frac) == (0.015, 0.0025, 0.12)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PRICEWIRE_CONSENSUS_METHOD", "average"),
        ("PRICEWIRE_DEVIATION_BPS", "-1"),
        ("PRICEWIRE_OUTLIER_MAD_MIN_PCT", "nan"),
        ("PRICEWIRE_JUMP_PCT", "0"),
        ("PRICEWIRE_MAX_AGE_POLL_S", "inf"),
    ],
)
def test_unusable_consensus_settings_fail_at_start(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_published_decimals_never_carry_a_positive_exponent() -> None:
    assert str(evaluate(tick("a", "100"), tick("b", "100")).price) == "100"
    # A venue writing 1E+2 (valid: no decimals, one digit): its median, differences and sums stay plain.
    result = evaluate(
        tick("a", "1E+2", volume_24h=Decimal("1E+3"), open_24h=Decimal("1E+2")),
        tick("b", "1E+2", volume_24h=Decimal("2E+3"), open_24h=Decimal("1E+2")),
    )
    price = result.to_price(1)
    figures = [price.price, price.confidence, price.volume_24h, price.change_24h, price.change_pct_24h]
    figures += [d for q in price.sources for d in (q.price, q.deviation_pct)]
    assert [str(d) for d in figures] == ["100", "0", "3000", "0.00", "0.0000", "100", "0.0000", "100", "0.0000"]
    assert b"E" not in encode(price)
    # A stale consensus repeats a last price recorded before this rule, also in plain form.
    old = msgspec.structs.replace(price, price=Decimal("1E+2"), confidence=Decimal("0E+2"))
    stale = evaluate(tick("a", "100", age_s=60), last=old)
    assert (str(stale.price), str(stale.confidence), stale.status) == ("100", "0", "stale")


# --- quotes the arithmetic cannot take -------------------------------------------------------------


def test_a_quote_past_the_tick_bounds_makes_the_consensus_raise() -> None:
    # Why check_tick bounds prices: a 1e60 quote makes the 4-decimal deviation exceed the exact context.
    with pytest.raises(ArithmeticError):
        evaluate(tick("a", "47000"), tick("b", "47001"), tick("c", "1e60"))
    with pytest.raises(ArithmeticError):
        evaluate(tick("a", "47000", open_24h=Decimal("1e-60")))


def test_rebuild_leaves_out_the_quote_that_makes_the_consensus_raise() -> None:
    book = ConsensusBook(RULE)
    a, b, poison = tick("a", "47000"), tick("b", "47001"), tick("c", "1e60")
    a_later = tick("a", "47002", age_s=0.5)
    assert book.rebuild("BTC", [a, b, poison, a_later], now_ns=NOW) == [poison]
    assert set(book.quotes("BTC")) == {a_later, b}
    assert book.evaluate("BTC", NOW) is not None

    book.update(poison)  # got in some other way: the asset's own quotes are sorted out by arrival
    assert book.set_aside_unprocessable("BTC", now_ns=NOW) == [poison]
    assert set(book.quotes("BTC")) == {a_later, b}
    # A poison quote replacing its venue's older one gives the older one back.
    newer_poison = tick("a", "47000", age_s=0.1, open_24h=Decimal("1e-60"))
    assert book.rebuild("BTC", [*book.quotes("BTC"), newer_poison], now_ns=NOW) == [newer_poison]
    assert set(book.quotes("BTC")) == {a_later, b}
    with pytest.raises(ValueError, match="cannot rebuild"):
        book.rebuild("ETH", [a], now_ns=NOW)


extremes = st.sampled_from(
    [Decimal("1e-12"), Decimal("0.000000000001000000"), Decimal("999999999999.999999999999999999")]
)
bounded_prices = extremes | st.decimals(min_value=Decimal("1e-12"), max_value=Decimal("1e12") - 1, places=18)


@given(
    st.lists(
        st.tuples(
            bounded_prices, st.none() | bounded_prices, st.sampled_from(["USDT", "EUR"]), st.sampled_from([0.0, 45.0])
        ),
        min_size=1,
        max_size=6,
    ),
    st.none() | bounded_prices,
)
def test_no_quote_within_the_tick_bounds_makes_the_consensus_raise(
    quotes: list[tuple[Decimal, Decimal | None, str, float]], last_price: Decimal | None
) -> None:
    ticks = [
        tick(f"v{i}", p, open_24h=o, quote=q, age_s=age, volume_24h=Decimal("99999999999999999999.999999999999999999"))
        for i, (p, o, q, age) in enumerate(quotes)
    ]
    for t in ticks:
        assert check_tick(t) is t
    last = None if last_price is None else evaluate(tick("z", last_price)).to_price(1)
    result = evaluate_quotes("BTC", ticks, now_ns=NOW, rule=RULE, last=last)
    if result is not None:
        assert b"E+" not in encode(result.to_price(2))  # below 1e-6, str() has to write E-


# --- the book and the publish policy ---------------------------------------------------------------


def test_the_book_keeps_the_newest_quote_per_venue() -> None:
    book = ConsensusBook(RULE)
    newer = tick("a", "101", age_s=1)
    assert book.update(newer)
    assert not book.update(tick("a", "99", age_s=2))  # a late redelivery
    assert not book.update(newer)  # the same tick again (a redelivery) changes nothing
    assert book.quotes("BTC") == (newer,)
    assert book.assets == ("BTC",)


def test_publish_policy_changes_and_heartbeat() -> None:
    book = ConsensusBook(RULE)
    book.update(tick("a", "100"))
    book.update(tick("b", "100"))
    first = book.propose("BTC", NOW)
    assert first is not None
    assert first.seq == 1
    assert book.propose("BTC", NOW) == first  # nothing committed: the same seq is proposed again
    book.commit(first)

    assert book.propose("BTC", NOW + NS_PER_S) is None  # nothing changed, heartbeat not due
    heartbeat = book.propose("BTC", NOW + RULE.heartbeat_ns)
    assert heartbeat is not None
    assert (heartbeat.seq, heartbeat.price) == (2, first.price)
    book.commit(heartbeat)

    book.update(tick("a", "100", age_s=-10))  # same price, newer tick: not news
    assert book.propose("BTC", NOW + RULE.heartbeat_ns) is None
    book.update(tick("b", "101", age_s=-10))  # a new price is
    moved = book.propose("BTC", NOW + RULE.heartbeat_ns)
    assert moved is not None
    assert (moved.seq, moved.price) == (3, Decimal("100.5"))


def test_publish_policy_sees_status_and_used_venue_changes() -> None:
    last = evaluate(tick("a", "100"), tick("b", "100"), tick("c", "100")).to_price(4)
    same = evaluate(tick("a", "100"), tick("b", "100"), tick("c", "100"))
    assert not publish_due(same, last, heartbeat_ns=RULE.heartbeat_ns)
    swapped = evaluate(tick("a", "100"), tick("b", "100"), tick("d", "100"))
    assert publish_due(swapped, last, heartbeat_ns=RULE.heartbeat_ns)
    degraded = evaluate(tick("a", "100"), tick("b", "100", age_s=60))
    assert degraded.price == last.price
    assert publish_due(degraded, last, heartbeat_ns=RULE.heartbeat_ns)
    assert publish_due(same, None, heartbeat_ns=RULE.heartbeat_ns)


def test_a_seeded_book_continues_the_recovered_seq() -> None:
    recovered = evaluate(tick("a", "100"), tick("b", "100")).to_price(41)
    book = ConsensusBook(RULE)
    book.seed(recovered)
    assert book.assets == ("BTC",)
    assert book.last("BTC") == recovered
    book.update(tick("a", "101", age_s=0))
    book.update(tick("b", "101", age_s=0))
    proposed = book.propose("BTC", NOW)
    assert proposed is not None
    assert proposed.seq == 42
    book.commit(proposed)
    with pytest.raises(ValueError, match="does not follow"):
        book.commit(proposed)


# --- properties ------------------------------------------------------------------------------------

prices = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("1e9"), places=8)
venues = [f"v{i}" for i in range(8)]


@st.composite
def quote_sets(draw: st.DrawFn) -> list[Tick]:
    n = draw(st.integers(min_value=1, max_value=len(venues)))
    return [
        tick(
            venue,
            draw(prices),
            quote=draw(st.sampled_from(["USDT", "USD", "USDC", "EUR"])),
            age_s=draw(st.sampled_from([0.0, 5.0, 45.0])),
        )
        for venue in venues[:n]
    ]


@given(quote_sets())
def test_consensus_lies_within_the_used_prices_and_covers_them(ticks: list[Tick]) -> None:
    result = evaluate_quotes("BTC", ticks, now_ns=NOW, rule=RULE)
    if result is None:
        return
    used = [t.price for t in ticks if t.source in result.used]
    assert used
    assert min(used) <= result.price <= max(used)
    assert result.confidence >= 0
    if len(used) >= 2:
        assert all(abs(p - result.price) <= result.confidence for p in used)
    assert result.n_used == len(used)
    assert result.n_sources == len(ticks)
    for q in result.sources:
        assert (q.reason is None) == (q.source in result.used)
        assert q.outlier == (q.reason in ("outlier", "outlier_mad"))  # README: outlier is either kind
        if q.reason is None:
            assert abs(q.deviation_pct) <= RULE.outlier_pct


@given(st.data())
def test_the_order_ticks_arrive_in_does_not_change_the_result(data: st.DataObject) -> None:
    ticks = data.draw(quote_sets())
    shuffled = data.draw(st.permutations(ticks))
    books = [ConsensusBook(RULE), ConsensusBook(RULE)]
    for book, order in zip(books, (ticks, shuffled), strict=True):
        for t in order:
            book.update(t)
    assert books[0].evaluate("BTC", NOW) == books[1].evaluate("BTC", NOW)


@given(
    base=st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e8"), places=2),
    spreads=st.lists(st.integers(min_value=-40, max_value=40), min_size=3, max_size=7),
    factor=st.sampled_from([Decimal("0.001"), Decimal("0.5"), Decimal(2), Decimal(1000)]),
)
def test_one_far_outlier_never_moves_a_consensus_of_three_or_more_honest_quotes(
    base: Decimal, spreads: list[int], factor: Decimal
) -> None:
    # Honest quotes within ±0.4 % of `base` (inside the MAD test's 1 % floor, so the median's shift
    # when the liar joins admits the same ones); the liar is off by at least a factor of two.
    honest = [tick(f"h{i}", base + base * s / 10_000) for i, s in enumerate(spreads)]
    liar = tick("liar", base * factor)
    alone = evaluate(*honest)
    attacked = evaluate(*honest, liar)
    assert attacked.price == alone.price
    assert attacked.used == alone.used == {t.source for t in honest}
    assert by_source(attacked)["liar"][1:] == (True, "outlier")
