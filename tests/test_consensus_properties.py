"""Properties of the consensus core (`evaluate_quotes`, `ConsensusBook`, `publish_due`) for every method.

Generated markets: venues quoting around a base price (most close together, some far off), with or
without a book (symmetric, lopsided, locked or crossed), volumes, 24h opens, streamed or polled, fresh,
exactly at their max age, past it or a little ahead of the clock, in USD or not. Each property is a
sentence of the rule in consensus.py's docstring; none relies on how the core computes it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Context, Decimal
from functools import reduce

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.config import ConsensusMethod
from pricewire_common.events import Price, SourceQuote, Status, Tick, TickKind
from pricewire_common.rules import check_tick
from pricewire_validator.aggregation import EXACT, finest
from pricewire_validator.consensus import (
    ConsensusBook,
    ConsensusRule,
    Evaluation,
    evaluate_quotes,
    median,
    publish_due,
)

NOW = 1_700_000_000_000_000_000
METHODS: tuple[ConsensusMethod, ...] = ("weighted_median", "median", "mean", "vwap")
RULE = ConsensusRule()  # 30 s streams, 120 s polls, 5 %, MAD k=5 over 1 %, min 2 sources, 5 s heartbeat
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Each example is checked under every method: drawing markets costs more than evaluating them."""
USD = ("USD", "USDT", "USDC")
_ids = itertools.count()


def make(
    source: str,
    price: Decimal,
    *,
    age_ns: int = NS_PER_S,
    kind: TickKind = "stream",
    quote: str = "USD",
    bid: Decimal | None = None,
    ask: Decimal | None = None,
    volume: Decimal | None = None,
    open_24h: Decimal | None = None,
) -> Tick:
    received = NOW - age_ns
    return Tick(
        id=f"p-{next(_ids)}",
        source=source,
        symbol=f"BTC-{quote}",
        base="BTC",
        quote=quote,
        price=price,
        bid=bid,
        ask=ask,
        volume_24h=volume,
        open_24h=open_24h,
        ts_exchange=received - NS_PER_MS,
        ts_received=received,
        kind=kind,
    )


def retick(t: Tick, **changes: object) -> Tick:
    """`t` with `changes`, under an id of its own (a different tick, not a redelivery)."""
    return msgspec.structs.replace(t, id=f"p-{next(_ids)}", **changes)


def rule_for(method: ConsensusMethod, **changes: object) -> ConsensusRule:
    return replace(RULE, method=method, **changes)  # type: ignore[arg-type]


def evaluate(ticks: Sequence[Tick], rule: ConsensusRule, last: Price | None = None) -> Evaluation | None:
    return evaluate_quotes("BTC", ticks, now_ns=NOW, rule=rule, last=last)


def age_of(t: Tick) -> int:
    return NOW - t.ts_received


def is_stale(t: Tick, rule: ConsensusRule) -> bool:
    return age_of(t) > rule.max_age(t.kind)


def admitted(evaluation: Evaluation, ticks: Sequence[Tick]) -> list[Tick]:
    return [t for t in ticks if t.source in evaluation.used]


def quotes_of(evaluation: Evaluation) -> dict[str, SourceQuote]:
    return {q.source: q for q in evaluation.sources}


# --- generated markets -------------------------------------------------------------------------------

BASES = [Decimal("0.001234"), Decimal("0.5"), Decimal(1), Decimal("3000.25"), Decimal("47000.5"), Decimal(250_000)]


def around(base: Decimal, bps: int, digits: int) -> Decimal:
    """`base` moved by `bps` and rounded to `digits` significant digits, as a venue would quote it."""
    return Context(prec=digits).plus(base * (10_000 + bps) / 10_000)


offsets = st.one_of(
    st.integers(min_value=-20, max_value=20),  # venues agreeing to a few bps
    st.integers(min_value=-20, max_value=20),
    st.integers(min_value=-400, max_value=400),  # a percent or so apart
    st.sampled_from([-300, -150, 150, 300]),  # the MAD test's prey when the others agree
    st.integers(min_value=-9_000, max_value=40_000),  # a venue gone wrong
)


def ages(kind: TickKind) -> st.SearchStrategy[int]:
    """Fresh, exactly at the kind's max age, just or far past it, or a little ahead of the clock."""
    max_age = RULE.max_age(kind)
    return st.one_of(
        st.integers(min_value=0, max_value=max_age),
        st.integers(min_value=0, max_value=max_age // 10),
        st.just(max_age),
        st.integers(min_value=max_age + 1, max_value=max_age + 2 * NS_PER_S),
        st.integers(min_value=max_age + 1, max_value=10 * max_age),
        st.integers(min_value=-2 * NS_PER_S, max_value=0),
    )


AGES = {kind: ages(kind) for kind in ("stream", "poll")}
FRESH_AGES = {kind: st.integers(min_value=0, max_value=RULE.max_age(kind)) for kind in ("stream", "poll")}


@st.composite
def venue(draw: st.DrawFn, source: str, base: Decimal, *, fresh: bool = False, usd: bool = False) -> Tick:
    digits = draw(st.integers(min_value=5, max_value=12))
    price = around(base, draw(offsets), digits)
    book = draw(st.sampled_from(["none", "none", "none", "symmetric", "symmetric", "lopsided", "locked", "crossed"]))
    bid = ask = None
    if book == "symmetric":
        half = draw(st.integers(min_value=1, max_value=40))
        bid, ask = around(price, -half, 14), around(price, half, 14)
    elif book == "lopsided":
        bid = around(price, -draw(st.integers(min_value=0, max_value=60)), 14)
        ask = around(price, draw(st.integers(min_value=0, max_value=60)), 14)
    elif book == "locked":
        bid = ask = price
    elif book == "crossed":
        bid, ask = around(price, 5, 14), around(price, -5, 14)
    volume = draw(
        st.none() | st.just(Decimal(0)) | st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(10**7), places=4)
    )
    open_24h = draw(st.none() | st.integers(min_value=-2_000, max_value=2_000).map(lambda b: around(price, b, 10)))
    kind: TickKind = draw(st.sampled_from(["stream", "poll"]))
    age = draw(FRESH_AGES[kind] if fresh else AGES[kind])
    quote = draw(st.sampled_from(USD if usd else (*USD, "USD", "USDT", "EUR")))
    tick = make(source, price, age_ns=age, kind=kind, quote=quote, bid=bid, ask=ask, volume=volume, open_24h=open_24h)
    check_tick(tick)  # what reaches the core has passed the contract
    return tick


@st.composite
def markets(draw: st.DrawFn, *, min_size: int = 1, max_size: int = 7) -> list[Tick]:
    base = draw(st.sampled_from(BASES))
    n = draw(st.integers(min_value=min_size, max_value=max_size))
    return [draw(venue(f"v{i}", base)) for i in range(n)]


@st.composite
def last_prices(draw: st.DrawFn) -> Price | None:
    """None, or a price the asset published earlier (what a stale consensus repeats)."""
    if draw(st.booleans()):
        return None
    base = draw(st.sampled_from(BASES))
    earlier = evaluate([make("x", base, volume=Decimal(3)), make("y", base)], RULE)
    assert earlier is not None
    return earlier.to_price(draw(st.integers(min_value=1, max_value=1_000)))


# --- order and determinism ---------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_the_order_quotes_are_given_in_never_changes_the_evaluation(data: st.DataObject) -> None:
    ticks = data.draw(markets())
    last = data.draw(last_prices())
    shuffled = data.draw(st.permutations(ticks))
    for method in METHODS:
        rule = rule_for(method)
        assert evaluate(shuffled, rule, last) == evaluate(ticks, rule, last), method


@st.composite
def histories(draw: st.DrawFn) -> list[list[Tick]]:
    """Per venue, its ticks oldest first (strictly increasing receive times), some of them spikes."""
    base = draw(st.sampled_from(BASES))
    result = []
    for i in range(draw(st.integers(min_value=1, max_value=5))):
        ticks = [draw(venue(f"v{i}", base))]
        for _ in range(draw(st.integers(min_value=0, max_value=3))):
            newer = ticks[0]
            step = draw(st.integers(min_value=1, max_value=20 * NS_PER_S))
            moved = draw(st.sampled_from([0, 3, -40, 2_500, -3_000, 6_000]))  # bps; 25 % and more are jumps
            older = retick(
                newer,
                price=around(newer.price, moved, 12),
                bid=None,
                ask=None,
                ts_received=newer.ts_received - step,
                ts_exchange=newer.ts_exchange - step,
            )
            ticks.insert(0, older)
        result.append(ticks)
    return result


def interleave(history: list[list[Tick]], order: Sequence[int]) -> list[Tick]:
    """The ticks of `history` in the order of venues named by `order`, each venue's ticks in its own order."""
    cursors = [iter(ticks) for ticks in history]
    return [next(cursors[i]) for i in order]


@st.composite
def arrivals(draw: st.DrawFn) -> list[Tick]:
    """The ticks of a `histories` as the bus could deliver them: venues interleaved at random."""
    history = draw(histories())
    slots = [i for i, ticks in enumerate(history) for _ in ticks]
    return interleave(history, draw(st.permutations(slots)))


def fed(rule: ConsensusRule, ticks: Sequence[Tick], last: Price | None = None) -> ConsensusBook:
    book = ConsensusBook(rule)
    if last is not None:
        book.seed(last)
    for t in ticks:
        book.update(t)
    return book


def by_venue(ticks: Sequence[Tick]) -> dict[str, list[Tick]]:
    venues: dict[str, list[Tick]] = {}
    for t in ticks:
        venues.setdefault(t.source, []).append(t)
    return venues


@FAST
@given(data=st.data())
def test_the_order_venues_interleave_in_never_changes_the_book(data: st.DataObject) -> None:
    # Each venue's own ticks keep their order (a venue's history is what `jump` reads); what the bus
    # mixes is the interleaving of venues, and that must not matter.
    one = data.draw(arrivals())
    history = list(by_venue(one).values())
    slots = [i for i, ticks in enumerate(history) for _ in ticks]
    other = interleave(history, data.draw(st.permutations(slots)))
    for method in METHODS:
        books = [fed(rule_for(method), order) for order in (one, other)]
        held = [sorted(book.quotes("BTC"), key=lambda t: t.source) for book in books]
        assert held[0] == held[1]
        assert books[0].evaluate("BTC", NOW) == books[1].evaluate("BTC", NOW), method
        assert books[0].propose("BTC", NOW) == books[1].propose("BTC", NOW), method


_SPIKE = [
    make("a", Decimal(100), age_ns=2 * NS_PER_S),
    make("a", Decimal(70), age_ns=NS_PER_S),  # -30 %: a jump, held out
]


@FAST
@example(ticks=_SPIKE, again=1)
@given(ticks=arrivals(), again=st.integers(min_value=0))
def test_a_late_or_repeated_tick_never_changes_the_book(ticks: list[Tick], again: int) -> None:
    # A nak'd batch comes back, and JetStream redelivers what it did not see acked: applying any tick
    # the book has already seen again, after the fact, must leave every decision as it was.
    for method in METHODS:
        book = fed(rule_for(method), ticks)
        before = book.evaluate("BTC", NOW)
        book.update(ticks[again % len(ticks)])
        assert book.evaluate("BTC", NOW) == before, method


@FAST
@given(ticks=markets(), last=last_prices())
def test_the_same_input_gives_the_same_output_whichever_way_it_comes(ticks: list[Tick], last: Price | None) -> None:
    for method in METHODS:
        rule = rule_for(method)
        first = evaluate(ticks, rule, last)
        assert evaluate(list(ticks), rule, last) == first
        # A book holding these quotes (one per venue, no history) decides as the pure function does.
        book = fed(rule, ticks, last)
        assert book.evaluate("BTC", NOW) == first, method
        proposed = book.propose("BTC", NOW)
        assert proposed == fed(rule, ticks, last).propose("BTC", NOW)
        if first is not None:
            # Always news here: the venues differ from those of `last`, or there was no `last`.
            assert proposed is not None
            assert (proposed.price, proposed.status, proposed.sources) == (first.price, first.status, first.sources)


# --- where the price lies ----------------------------------------------------------------------------


def exact_mean(prices: Sequence[Decimal]) -> Decimal:
    total = reduce(EXACT.add, prices)
    return EXACT.divide(total, Decimal(len(prices))).quantize(finest(prices, extra=2), context=EXACT)


def methods_own(method: ConsensusMethod, used: Sequence[Tick]) -> set[Decimal]:
    """The prices `method` may answer with for the admitted quotes `used` (one, but for the weighted median)."""
    prices = [t.price for t in used]
    if method == "median":
        return {median(prices)}
    with_volume = [t for t in used if t.volume_24h]
    if method == "mean" or (method == "vwap" and not with_volume):
        return {exact_mean(prices)}
    if method == "vwap":
        notional = reduce(EXACT.add, (EXACT.multiply(t.price, t.volume_24h or 0) for t in with_volume))
        volume = reduce(EXACT.add, (t.volume_24h or Decimal(0) for t in with_volume))
        return {EXACT.divide(notional, volume).quantize(finest(prices, extra=2), context=EXACT)}
    # A venue's own digits, or the exact mean of the two prices either side of the half weight: neighbours
    # among the venues that weigh something, which a weightless venue (volume 0) may stand between.
    ordered = sorted(set(prices))
    return set(prices) | {EXACT.divide(EXACT.add(a, b), 2) for a, b in itertools.combinations(ordered, 2)}


@FAST
@given(ticks=markets(), last=last_prices())
def test_the_price_lies_within_the_admitted_prices_and_is_the_methods_own(
    ticks: list[Tick], last: Price | None
) -> None:
    for method in METHODS:
        result = evaluate(ticks, rule_for(method), last)
        if result is None:
            assert last is None
            continue
        used = admitted(result, ticks)
        if not used:
            assert last is not None
            assert (result.price, result.status) == (last.price, "stale")
            continue
        prices = [t.price for t in used]
        assert min(prices) <= result.price <= max(prices), method
        assert result.price in methods_own(method, used), method
        assert result.method == method


def test_a_weightless_venue_between_the_halves_is_stepped_over() -> None:
    # Found by the property above: v1's zero volume gives it no weight, so the half weight falls between
    # v2 and v0, and the weighted median is their mean, not a mean with v1's price.
    ticks = [
        make("v0", Decimal("0.001234")),
        make("v1", Decimal("0.0012339"), volume=Decimal(0)),
        make("v2", Decimal("0.0012336")),
    ]
    result = evaluate(ticks, rule_for("weighted_median"))
    assert result is not None
    assert result.price == Decimal("0.0012338")
    assert quotes_of(result)["v1"].weight == 0


def reach(t: Tick, price: Decimal) -> Decimal:
    """How far from `price` the quote `t` reaches: its distance plus half its bid-ask spread, exactly."""
    book = Decimal(0) if t.bid is None or t.ask is None else EXACT.divide(EXACT.subtract(t.ask, t.bid), 2)
    return EXACT.add(EXACT.abs(EXACT.subtract(t.price, price)), book)


@FAST
@given(ticks=markets(), last=last_prices())
def test_the_confidence_is_the_narrowest_band_around_the_price_holding_every_admitted_book(
    ticks: list[Tick], last: Price | None
) -> None:
    for method in METHODS:
        result = evaluate(ticks, rule_for(method), last)
        if result is None:
            continue
        used = admitted(result, ticks)
        if not used:
            assert last is not None
            assert result.confidence == last.confidence
            continue
        price = result.price
        assert result.confidence == max(reach(t, price) for t in used), method
        low, high = price - result.confidence, price + result.confidence
        for t in used:
            assert low <= t.price <= high
            if t.bid is not None and t.ask is not None and t.ask - t.price == t.price - t.bid:
                assert low <= t.bid and t.ask <= high  # a book centred on its price lies inside the band


# --- who counts --------------------------------------------------------------------------------------


@FAST
@given(ticks=markets(), last=last_prices())
def test_a_quote_past_its_kinds_max_age_never_counts_and_one_within_it_is_never_stale(
    ticks: list[Tick], last: Price | None
) -> None:
    for method in METHODS:
        result = evaluate(ticks, rule_for(method), last)
        if result is None:
            continue
        quotes = quotes_of(result)
        for t in ticks:
            q = quotes[t.source]
            if is_stale(t, RULE):
                assert q.reason is not None
                assert q.weight == 0
                assert t.source not in result.used
            else:
                assert q.reason != "stale"  # exactly max_age old, or stamped a little ahead, is fresh
            assert q.age_ms == max(0, age_of(t) // NS_PER_MS)
            assert q.kind == t.kind


@FAST
@given(data=st.data())
def test_adding_a_stale_quote_never_changes_the_consensus(data: st.DataObject) -> None:
    ticks = data.draw(markets(max_size=6))
    last = data.draw(last_prices())
    late = data.draw(venue("late", data.draw(st.sampled_from(BASES)), usd=True))  # any price: too old to matter
    age = data.draw(st.integers(min_value=RULE.max_age(late.kind) + 1, max_value=20 * RULE.max_age(late.kind)))
    late = retick(late, bid=None, ask=None, ts_received=NOW - age, ts_exchange=NOW - age - NS_PER_MS)
    for method in METHODS:
        rule = rule_for(method)
        before, after = evaluate(ticks, rule, last), evaluate([*ticks, late], rule, last)
        if before is None:
            assert after is None
            continue
        assert after is not None
        assert (quotes_of(after)["late"].reason, quotes_of(after)["late"].weight) == ("stale", Decimal(0))
        assert (after.price, after.confidence, after.status, after.n_used, after.used) == (
            before.price,
            before.confidence,
            before.status,
            before.n_used,
            before.used,
        ), method
        assert (after.volume_24h, after.change_24h, after.change_pct_24h, after.cv_pct) == (
            before.volume_24h,
            before.change_24h,
            before.change_pct_24h,
            before.cv_pct,
        ), method
        assert [q for q in after.sources if q.source != "late"] == list(before.sources)
        assert after.n_sources == before.n_sources + 1


@FAST
@given(ticks=markets(), last=last_prices())
def test_the_admitted_share_the_weight_and_the_excluded_have_none(ticks: list[Tick], last: Price | None) -> None:
    for method in METHODS:
        result = evaluate(ticks, rule_for(method), last)
        if result is None:
            continue
        used = [q for q in result.sources if q.reason is None]
        for q in result.sources:
            assert q.weight >= 0
            if q.reason is not None:
                assert q.weight == 0
            assert q.outlier == (q.reason in ("outlier", "outlier_mad"))
        if used:
            # Each share is rounded to 4 decimals: the sum is 1 within half a unit of the 4th per venue.
            total = sum((q.weight for q in used), Decimal(0))
            assert abs(total - 1) <= Decimal("0.00005") * len(used), method


@FAST
@given(ticks=markets(), last=last_prices(), min_sources=st.integers(min_value=1, max_value=4))
def test_the_status_follows_the_admitted_count(ticks: list[Tick], last: Price | None, min_sources: int) -> None:
    for method in METHODS:
        result = evaluate(ticks, rule_for(method, min_sources=min_sources), last)
        if result is None:
            assert last is None
            continue
        assert result.n_used == len(result.used) == sum(q.reason is None for q in result.sources)
        assert result.n_sources == len(ticks)
        expected: Status = "ok" if result.n_used >= min_sources else "degraded" if result.n_used else "stale"
        assert result.status == expected, method
        if result.status == "stale":
            assert last is not None
            assert result.price == last.price


# --- one outlier -------------------------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    spreads=st.lists(st.integers(min_value=-40, max_value=40), min_size=3, max_size=7),
    liar_bps=st.one_of(
        st.integers(min_value=-300, max_value=300),  # near enough to be admitted, or caught by MAD
        st.integers(min_value=-9_990, max_value=1_000_000),  # anywhere at all
    ),
)
def test_one_outlier_among_three_or_more_moves_the_consensus_by_at_most_the_admitted_spread(
    data: st.DataObject, spreads: list[int], liar_bps: int
) -> None:
    # Honest venues within +-0.4 % of one another: inside the MAD test's 1 % floor, so whatever the
    # liar does to the median, every honest quote stays admitted. Volumes, kinds and ages are drawn.
    base = data.draw(st.sampled_from(BASES))
    honest = [
        retick(data.draw(venue(f"h{i}", base, fresh=True, usd=True)), price=around(base, s, 12), bid=None, ask=None)
        for i, s in enumerate(spreads)
    ]
    liar = retick(data.draw(venue("liar", base, fresh=True, usd=True)), price=around(base, liar_bps, 12))
    liar = retick(liar, bid=None, ask=None)
    honest_sources = {t.source for t in honest}
    honest_prices = [t.price for t in honest]
    for method in METHODS:
        rule = rule_for(method)
        alone, attacked = evaluate(honest, rule), evaluate([*honest, liar], rule)
        assert alone is not None and attacked is not None
        assert alone.used == honest_sources
        assert attacked.used >= honest_sources
        prices = [t.price for t in admitted(attacked, [*honest, liar])]
        assert abs(attacked.price - alone.price) <= max(prices) - min(prices), method
        if "liar" not in attacked.used:
            assert quotes_of(attacked)["liar"].reason in ("outlier", "outlier_mad")
            assert attacked.price == alone.price, method  # an excluded quote moves nothing
        if method == "median":
            # The median of the honest and one more moves at most to a neighbouring honest quote.
            assert abs(attacked.price - alone.price) <= max(honest_prices) - min(honest_prices)


# --- publish policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    price: Decimal
    status: Status
    used: frozenset[str]
    ts: int


@FAST
@given(
    base=st.sampled_from(BASES),
    deviation=st.decimals(min_value=Decimal("0.1"), max_value=Decimal(200), places=1),
    fraction=st.decimals(min_value=Decimal(0), max_value=Decimal("0.9999"), places=4),
    beyond=st.decimals(min_value=Decimal(1), max_value=Decimal(5), places=3),
    down=st.booleans(),
    elapsed=st.integers(min_value=0, max_value=RULE.heartbeat_ns - 1),
)
def test_a_move_under_deviation_bps_is_never_due_before_the_heartbeat_and_one_at_or_over_it_always_is(
    *, base: Decimal, deviation: Decimal, fraction: Decimal, beyond: Decimal, down: bool, elapsed: int
) -> None:
    last_eval = evaluate([make("a", base), make("b", base)], RULE)
    assert last_eval is not None
    last = last_eval.to_price(7)
    sign = -1 if down else 1

    def moved(bps: Decimal) -> Candidate:
        price = EXACT.add(last.price, EXACT.multiply(last.price, EXACT.divide(sign * bps, 10_000)))
        return Candidate(price=price, status=last.status, used=last_eval.used, ts=last.ts + elapsed)

    def due(candidate: Candidate) -> bool:
        return publish_due(candidate, last, heartbeat_ns=RULE.heartbeat_ns, deviation_bps=float(deviation))

    still = moved(deviation * fraction)
    assert not due(still)
    assert due(moved(deviation))  # exactly deviation_bps
    assert due(moved(deviation * beyond))
    # Whatever the move: a new status, a new admitted set, or the heartbeat is always news.
    assert due(replace(still, status="degraded"))
    assert due(replace(still, used=still.used | {"c"}))
    assert due(replace(still, ts=last.ts + RULE.heartbeat_ns))


@FAST
@given(
    base=st.sampled_from(BASES),
    n=st.integers(min_value=2, max_value=5),
    deviation=st.integers(min_value=1, max_value=100),
    move=st.integers(min_value=-300, max_value=300),
    elapsed=st.integers(min_value=0, max_value=RULE.heartbeat_ns - 1),
)
def test_the_book_holds_back_a_small_move_and_proposes_a_large_one(
    base: Decimal, n: int, deviation: int, move: int, elapsed: int
) -> None:
    # Every venue quotes the same price, then all move by `move` bps together: every method's price
    # moves by exactly that, and the set of venues and the status stay as they were.
    sources = [f"v{i}" for i in range(n)]
    to = EXACT.add(base, EXACT.multiply(base, EXACT.divide(Decimal(move), 10_000)))
    for method in METHODS:
        book = ConsensusBook(rule_for(method, deviation_bps=float(deviation)))
        for source in sources:
            book.update(make(source, base, age_ns=2 * NS_PER_S))
        first = book.propose("BTC", NOW - NS_PER_S)
        assert first is not None
        book.commit(first)
        for source in sources:
            book.update(make(source, to, age_ns=NS_PER_S // 2))
        proposed = book.propose("BTC", first.ts + elapsed)
        if abs(move) >= deviation:
            assert proposed is not None, method
            assert (proposed.price, proposed.status, proposed.seq) == (to, first.status, first.seq + 1)
        else:
            assert proposed is None, method
            heartbeat = book.propose("BTC", first.ts + RULE.heartbeat_ns)
            assert heartbeat is not None
            assert heartbeat.price == to
