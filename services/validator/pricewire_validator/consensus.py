"""The consensus of each asset in USD from its venues' latest quotes: who is admitted, why not, and the price.

Pure: no I/O, no clock (time comes in as `now_ns`). For one asset the book holds each venue's latest
quote. At time `now`, in this order, a quote is **excluded** with the first reason that applies:

1. `not_usd`   its quote currency is not in `usd_quotes` (USD, USDT, USDC by default).
2. `invalid`   its price (or bid/ask) is not a finite positive number.
3. `crossed`   its bid is above its ask.
4. `stale`     `now - ts_received` exceeds the max age of its kind (`stream` or `poll`).
5. `jump`      it moved more than `jump_pct` from both the venue's previous quote and its last admitted-
               able one (a one-quote spike is held out; a move the next quote confirms is taken).
The rest are **eligible**; `m` is the median of their prices. An eligible quote is then
6. `outlier`      when |p - m| / m > `outlier_pct` %, or
7. `outlier_mad`  when there are 3 eligible quotes or more and |p - m| > `mad_k` x 1.4826 x MAD (MAD = median
                  of |p_i - m|) and |p - m| / m > `mad_min_pct` %: a robust test that sees a 2 % quote
                  among venues agreeing to 0.05 %, which the fixed threshold would let through.
The **admitted** quotes make the price, by `method` (`aggregation.aggregate`: weighted median by default,
weights from 24h volume and the quote's own spread).

`confidence` is a half-width in USD: the smallest band around the price that holds every admitted
venue's bid-ask (its price alone when it has no book):

    confidence = max over admitted i of ( |p_i - price| + (ask_i - bid_i) / 2 )

`status` is `ok` with at least `min_sources` admitted, `degraded` with fewer, `stale` with none: a stale
consensus repeats the asset's last published price (confidence, volume and 24h figures too); an asset
that never had a price gets no event. `cv_pct` = sample stdev / mean of the admitted prices x 100.
`volume_24h` = sum of the admitted volumes; the 24h open is the volume-weighted mean of the admitted
quotes' `open_24h` (equal weights unless each reports a volume), `change_24h = price - open`.

Each quote's `deviation_pct` = (p - m) / m x 100 with m exact, rounded half-even to 4 decimals (when
nothing is eligible, m is the last published price). The outlier tests read the unrounded figure.
Every published decimal is in plain notation (`plain`).

Publish policy (`publish_due`): a new Price is due when there was none, or the price moved at least
`deviation_bps` from the last published one, or the status or the set of admitted venues changed, or
`heartbeat` has passed. `seq` counts the asset's published events: committed only once stored.

Anomaly (`anomaly.RollingZScore`): a non-stale event carries the z-score of its price against the asset's
last `anomaly_window` published prices and `anomaly` when |z| > `anomaly_z`, and is published all the same.
Stale events and repeats of the last price stay out of the window (a run of heartbeats would flatten it).

Speed: a quote's arrival costs only the jump test; what it says about itself (reasons 1-3, its weight
factors) is worked out once, the first time an evaluation looks at it (`Quote.derive`); an evaluation
decides in floats, with exact decimals only for the price, and the event's evidence (deviations, weights,
confidence) is built only when an event is due.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import reduce
from typing import Protocol

import msgspec

from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.config import DEFAULT_USD_QUOTES, ConsensusMethod, Settings
from pricewire_common.events import Price, SourceQuote, Status, Tick, TickKind
from pricewire_validator.aggregation import EXACT, aggregate, finest, median, spread_factor, volume_factor, weights
from pricewire_validator.anomaly import DEFAULT_THRESHOLD, DEFAULT_WINDOW, RollingZScore, published

__all__ = [
    "ConsensusBook",
    "ConsensusRule",
    "Decision",
    "Evaluation",
    "Quote",
    "closest_first",
    "evaluate_quotes",
    "median",
    "plain",
    "publish_due",
    "used_sources",
]

_PCT_PLACES = Decimal("0.0001")
_HUNDRED = Decimal(100)
_BPS = Decimal(10_000)
_TWO = Decimal(2)
_ZERO = Decimal(0)
_ONE = Decimal(1)
_NEAR = 1e-9
"""A float distance within this (relative) of a threshold is decided again in exact decimals."""
_MAD_SIGMA = 1.4826
"""MAD x 1.4826 estimates the standard deviation of normally distributed prices."""

NOT_USD = "not_usd"
INVALID = "invalid"
CROSSED = "crossed"
STALE = "stale"
JUMP = "jump"
OUTLIER = "outlier"
OUTLIER_MAD = "outlier_mad"
REASONS = (NOT_USD, INVALID, CROSSED, STALE, JUMP, OUTLIER, OUTLIER_MAD)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusRule:
    """The thresholds of the rule (times in ns, percentages in %)."""

    usd_quotes: frozenset[str] = frozenset(DEFAULT_USD_QUOTES)
    max_age_ns: int = 30 * NS_PER_S
    """Of a streamed quote."""
    max_age_poll_ns: int = 120 * NS_PER_S
    """Of a polled quote."""
    outlier_pct: Decimal = Decimal(5)
    mad_k: float = 5.0
    mad_min_pct: Decimal = Decimal(1)
    jump_pct: Decimal = Decimal(20)
    method: ConsensusMethod = "weighted_median"
    spread_ref_bps: float = 10.0
    aggregators: frozenset[str] = frozenset({"coingecko"})
    min_sources: int = 2
    deviation_bps: float = 1.0
    heartbeat_ns: int = 5 * NS_PER_S
    anomaly_window: int = DEFAULT_WINDOW
    anomaly_z: float = DEFAULT_THRESHOLD
    # The percentages as fractions, once: the decisions are taken in floats.
    outlier_frac: float = field(init=False, repr=False, compare=False, default=0.0)
    mad_min_frac: float = field(init=False, repr=False, compare=False, default=0.0)
    jump_frac: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        RollingZScore(self.anomaly_window, self.anomaly_z)  # a window it cannot use fails here, not at a commit
        object.__setattr__(self, "outlier_frac", float(self.outlier_pct) / 100)
        object.__setattr__(self, "mad_min_frac", float(self.mad_min_pct) / 100)
        object.__setattr__(self, "jump_frac", float(self.jump_pct) / 100)

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsensusRule:
        v = settings.validator
        return cls(
            usd_quotes=frozenset(settings.usd_quotes),
            max_age_ns=round(v.max_age_s * NS_PER_S),
            max_age_poll_ns=round(v.max_age_poll_s * NS_PER_S),
            outlier_pct=v.outlier_pct,
            mad_k=v.mad_k,
            mad_min_pct=v.mad_min_pct,
            jump_pct=v.jump_pct,
            method=v.method,
            spread_ref_bps=v.spread_ref_bps,
            aggregators=frozenset(v.aggregators),
            min_sources=v.min_sources,
            deviation_bps=v.deviation_bps,
            heartbeat_ns=round(v.heartbeat_s * NS_PER_S),
            anomaly_window=v.anomaly_window,
            anomaly_z=v.anomaly_z,
        )

    def max_age(self, kind: TickKind) -> int:
        return self.max_age_poll_ns if kind == "poll" else self.max_age_ns


class Quote:
    """A venue's latest tick as the consensus sees it.

    Arrival (`__init__`) does only what needs the venue's previous quote, the jump test, so that a book
    takes quotes fast; what the quote says about itself (reasons 1-3, weight factors) is worked out the
    first time an evaluation looks at it (`derive`), once, however many evaluations follow.
    """

    __slots__ = (
        "anchor",
        "anchor_ns",
        "anchor_price",
        "derived",
        "jumped",
        "max_age_ns",
        "plain_price",
        "reason",
        "spread_factor",
        "tick",
        "value",
        "volume_factor",
    )

    def __init__(self, tick: Tick, rule: ConsensusRule, held: Quote | None = None) -> None:
        if tick.volume_24h is not None and tick.source in rule.aggregators:
            # An aggregator's volume is the whole market's: as a weight it would outvote every venue,
            # and added to the venues' own it would count their trades twice.
            tick = msgspec.structs.replace(tick, volume_24h=None)
        self.tick = tick
        self.max_age_ns = rule.max_age_poll_ns if tick.kind == "poll" else rule.max_age_ns
        self.value = _finite_positive(tick.price)
        self.anchor: float | None = None
        """The venue's last quote that was no jump (price, receive time): what a jump is measured from."""
        self.anchor_ns = 0
        self.anchor_price = tick.price
        if held is not None:
            self.anchor, self.anchor_ns, self.anchor_price = held.anchor, held.anchor_ns, held.anchor_price
        self.jumped = self.value > 0 and held is not None and self._jumped(held, rule)
        if self.value > 0 and not self.jumped:
            self.anchor, self.anchor_ns, self.anchor_price = self.value, tick.ts_received, tick.price
        self.derived = False
        self.reason: str | None = None
        self.spread_factor = 0.5
        self.volume_factor: float | None = None
        self.plain_price = tick.price

    def _jumped(self, held: Quote, rule: ConsensusRule) -> bool:
        if self.anchor is None or self.tick.ts_received - self.anchor_ns > self.max_age_ns:
            return False  # nothing recent to measure from: a venue back from a long silence is taken
        if not _moved_beyond(self.value, self.anchor, self.tick.price, self.anchor_price, rule):
            return False
        return held.value <= 0 or _moved_beyond(self.value, held.value, self.tick.price, held.tick.price, rule)

    def derive(self, rule: ConsensusRule) -> None:
        """Reasons 1-3 and the weight factors, from the quote alone."""
        tick = self.tick
        self.reason = _own_reason(tick, self.value, rule)
        self.spread_factor = spread_factor(tick, rule.spread_ref_bps)
        self.volume_factor = volume_factor(tick)
        self.plain_price = plain(tick.price)
        self.derived = True


def _moved_beyond(value: float, base: float, price: Decimal, base_price: Decimal, rule: ConsensusRule) -> bool:
    """|price / base - 1| > jump_pct %, in floats, and in exact decimals when floats cannot tell."""
    moved = abs(value / base - 1)
    if abs(moved - rule.jump_frac) > _NEAR:
        return moved > rule.jump_frac
    distance = EXACT.abs(EXACT.subtract(price, base_price))
    return EXACT.multiply(distance, _HUNDRED) > EXACT.multiply(rule.jump_pct, base_price)


def _finite_positive(value: Decimal) -> float:
    """`value` as a float when it is a finite positive number, else 0 (which no rule admits)."""
    if not value.is_finite():
        return 0.0
    as_float = float(value)
    return as_float if 0 < as_float < math.inf else 0.0


def _own_reason(tick: Tick, value: float, rule: ConsensusRule) -> str | None:
    """Why a quote can never count, whatever the other venues say (reasons 1-3)."""
    if tick.quote not in rule.usd_quotes:
        return NOT_USD
    if value <= 0:
        return INVALID
    bid, ask = tick.bid, tick.ask
    if (bid is not None and _finite_positive(bid) <= 0) or (ask is not None and _finite_positive(ask) <= 0):
        return INVALID
    if bid is not None and ask is not None and bid > ask:
        return CROSSED
    return None


class Candidate(Protocol):
    """What the publish policy looks at."""

    @property
    def price(self) -> Decimal: ...
    @property
    def status(self) -> Status: ...
    @property
    def used(self) -> frozenset[str]: ...
    @property
    def ts(self) -> int: ...


@dataclass(slots=True, kw_only=True)  # not frozen: built on every evaluation, and a frozen init costs
class Decision:
    """The consensus of one asset at one instant, before its evidence is written out."""

    asset: str
    price: Decimal
    status: Status
    ts: int
    quotes: tuple[Quote, ...]
    """All the asset's quotes, by venue."""
    reasons: dict[str, str]
    """Venue -> why its quote was excluded."""
    admitted: tuple[Quote, ...]
    eligible: tuple[Quote, ...]
    weights: tuple[float, ...]
    """Of the admitted quotes, same order."""

    @property
    def used(self) -> frozenset[str]:
        return frozenset(q.tick.source for q in self.admitted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """The consensus of one asset at one instant with its evidence: a Price without its seq."""

    asset: str
    price: Decimal
    confidence: Decimal
    status: Status
    n_sources: int
    n_used: int
    sources: tuple[SourceQuote, ...]
    volume_24h: Decimal | None
    change_24h: Decimal | None
    change_pct_24h: Decimal | None
    cv_pct: Decimal | None
    method: str
    ts: int
    ts_tick: int

    @property
    def used(self) -> frozenset[str]:
        """The venues whose quotes made the price."""
        return frozenset(q.source for q in self.sources if q.reason is None)

    def to_price(self, seq: int, *, z_score: Decimal | None = None, anomaly: bool = False) -> Price:
        return Price(
            asset=self.asset,
            price=self.price,
            confidence=self.confidence,
            status=self.status,
            n_sources=self.n_sources,
            n_used=self.n_used,
            sources=self.sources,
            volume_24h=self.volume_24h,
            change_24h=self.change_24h,
            change_pct_24h=self.change_pct_24h,
            ts=self.ts,
            ts_tick=self.ts_tick,
            seq=seq,
            anomaly=anomaly,
            z_score=z_score,
            method=self.method,
            cv_pct=self.cv_pct,
        )


def plain(value: Decimal) -> Decimal:
    """`value` without a positive exponent (`1E+2` -> `100`), so its text has no exponent; digits otherwise kept."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:
        return value.quantize(_ONE, context=EXACT)
    return value


def _plain_or_none(value: Decimal | None) -> Decimal | None:
    return None if value is None else plain(value)


def _pct(part: Decimal, whole: Decimal) -> Decimal:
    return EXACT.multiply(EXACT.divide(part, whole), _HUNDRED).quantize(_PCT_PLACES, context=EXACT)


def _status(n_used: int, min_sources: int) -> Status:
    if n_used >= min_sources:
        return "ok"
    return "degraded" if n_used > 0 else "stale"


def _float_median(values: list[float]) -> float:
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _screen(quotes: Sequence[Quote], now_ns: int, rule: ConsensusRule, reasons: dict[str, str]) -> list[Quote]:
    """Reasons 1-5: the eligible quotes; the others' reasons go into `reasons`."""
    eligible: list[Quote] = []
    for q in quotes:
        if not q.derived:
            q.derive(rule)
        if q.reason is not None:
            reasons[q.tick.source] = q.reason
        elif now_ns - q.tick.ts_received > q.max_age_ns:
            reasons[q.tick.source] = STALE
        elif q.jumped:
            reasons[q.tick.source] = JUMP
        else:
            eligible.append(q)
    return eligible


def _admit(eligible: list[Quote], rule: ConsensusRule, reasons: dict[str, str]) -> list[Quote]:
    """Reasons 6-7: the eligible quotes that are not outliers; the outliers' reasons go into `reasons`."""
    if len(eligible) < 2:
        return eligible
    m = _float_median([q.value for q in eligible])
    limit = rule.outlier_frac * m
    distances = [abs(q.value - m) for q in eligible]
    floor = rule.mad_min_frac * m
    near = _NEAR * m
    exact: list[Decimal] = []  # the exact median, worked out only for a quote on a threshold

    def beyond(q: Quote, distance: float, limit: float, pct: Decimal) -> bool:
        """distance > limit, decided exactly (in decimals) when floats cannot tell."""
        if abs(distance - limit) > near:
            return distance > limit
        if not exact:
            exact.append(median([e.tick.price for e in eligible]))
        middle = exact[0]
        return EXACT.multiply(EXACT.abs(EXACT.subtract(q.tick.price, middle)), _HUNDRED) > EXACT.multiply(pct, middle)

    mad_limit = math.inf
    if len(eligible) >= 3:
        mad_limit = rule.mad_k * _MAD_SIGMA * _float_median(list(distances))
    admitted = []
    for q, distance in zip(eligible, distances, strict=True):
        if beyond(q, distance, limit, rule.outlier_pct):
            reasons[q.tick.source] = OUTLIER
        elif distance > mad_limit and beyond(q, distance, floor, rule.mad_min_pct):
            reasons[q.tick.source] = OUTLIER_MAD
        else:
            admitted.append(q)
    return admitted


def _method_weights(method: ConsensusMethod, admitted: Sequence[Quote]) -> list[float]:
    """What each admitted quote counts for in `method`: the shares the event shows are these."""
    if method == "weighted_median":
        return weights([q.volume_factor for q in admitted], [q.spread_factor for q in admitted])
    if method == "vwap":
        volumes = [_positive_volume(q.tick) for q in admitted]
        if any(v > 0 for v in volumes):
            return volumes
    return [1.0] * len(admitted)


def _positive_volume(tick: Tick) -> float:
    volume = tick.volume_24h
    if volume is None or not volume.is_finite() or volume <= 0:
        return 0.0
    as_float = float(volume)
    return as_float if math.isfinite(as_float) else 0.0


def decide(
    asset: str, quotes: Sequence[Quote], *, now_ns: int, rule: ConsensusRule, last: Price | None
) -> Decision | None:
    """Who is admitted and the price they make (module docstring); None when there is nothing to say."""
    reasons: dict[str, str] = {}
    eligible = _screen(quotes, now_ns, rule, reasons)
    admitted = _admit(eligible, rule, reasons)
    ws: list[float] = []
    status: Status
    if admitted:
        ws = _method_weights(rule.method, admitted)
        price = aggregate(rule.method, [q.tick for q in admitted], ws)
        status = _status(len(admitted), rule.min_sources)
    elif last is not None:
        price, status = last.price, "stale"
    else:
        return None
    return Decision(
        asset=asset,
        price=plain(price),
        status=status,
        ts=now_ns,
        quotes=tuple(quotes),
        reasons=reasons,
        admitted=tuple(admitted),
        eligible=tuple(eligible),
        weights=tuple(ws),
    )


def _confidence(price: Decimal, admitted: Sequence[Tick]) -> Decimal:
    def reach(t: Tick) -> Decimal:
        distance = EXACT.abs(EXACT.subtract(t.price, price))
        if t.bid is not None and t.ask is not None:
            distance = EXACT.add(distance, EXACT.divide(EXACT.subtract(t.ask, t.bid), _TWO))
        return distance

    return max(reach(t) for t in admitted)


def _cv_pct(admitted: Sequence[Quote]) -> Decimal | None:
    if len(admitted) < 2:
        return None
    values = [q.value for q in admitted]
    mean = math.fsum(values) / len(values)
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    cv = stdev / mean * 100
    return Decimal(format(cv, ".4f")) if math.isfinite(cv) else None


def _open_24h(admitted: Sequence[Tick]) -> Decimal | None:
    """The volume-weighted mean of the admitted quotes' 24h opens (equal weights unless each has a volume)."""
    with_open = [t for t in admitted if t.open_24h is not None]
    if not with_open:
        return None
    opens = [t.open_24h for t in with_open if t.open_24h is not None]
    volumes = [t.volume_24h for t in with_open]
    if all(v is not None and v > 0 for v in volumes):
        notional = reduce(EXACT.add, (EXACT.multiply(o, v) for o, v in zip(opens, volumes, strict=True) if v))
        total = reduce(EXACT.add, (v for v in volumes if v))
        mean = EXACT.divide(notional, total)
    else:
        mean = EXACT.divide(reduce(EXACT.add, opens), Decimal(len(opens)))
    return mean.quantize(finest(opens, extra=2), context=EXACT)


def explain(decision: Decision, *, rule: ConsensusRule, last: Price | None) -> Evaluation:
    """The decision with its evidence: every quote's deviation, admission, weight and age; the 24h figures."""
    now_ns = decision.ts
    ticks = [q.tick for q in decision.quotes]
    admitted = [q.tick for q in decision.admitted]
    eligible = [q.tick.price for q in decision.eligible]
    reference = median(eligible) if eligible else last.price if last else None
    deviations: dict[str, Decimal] = {}
    if reference is not None:
        deviations = {
            t.source: _pct(EXACT.subtract(t.price, reference), reference) for t in ticks if t.price.is_finite()
        }
    total = math.fsum(decision.weights)
    shares = {q.tick.source: w / total for q, w in zip(decision.admitted, decision.weights, strict=True)}

    price = decision.price
    if admitted:
        confidence = _confidence(price, admitted)
        volumes = [t.volume_24h for t in admitted if t.volume_24h is not None]
        volume = reduce(EXACT.add, volumes) if volumes else None
        open_24h = _open_24h(admitted)
        change = None if open_24h is None else EXACT.subtract(price, open_24h)
        change_pct = None if change is None or open_24h is None else _pct(change, open_24h)
    else:
        assert last is not None  # decide() says nothing without admitted quotes or a last price
        confidence, volume = last.confidence, last.volume_24h
        change, change_pct = last.change_24h, last.change_pct_24h

    reasons = decision.reasons
    sources = tuple(
        SourceQuote(
            source=t.source,
            symbol=t.symbol,
            price=q.plain_price,
            deviation_pct=deviations.get(t.source, _ZERO),  # 4 places: never a positive exponent
            age_ms=max(0, (now_ns - t.ts_received) // NS_PER_MS),
            outlier=reasons.get(t.source) in (OUTLIER, OUTLIER_MAD),
            reason=reasons.get(t.source),
            weight=Decimal(format(shares.get(t.source, 0.0), ".4f")),
            kind=t.kind,
        )
        for q in sorted(decision.quotes, key=lambda q: q.tick.source)
        for t in (q.tick,)
    )
    return Evaluation(
        asset=decision.asset,
        price=price,
        confidence=plain(confidence),
        status=decision.status,
        n_sources=len(ticks),
        n_used=len(admitted),
        sources=sources,
        volume_24h=_plain_or_none(volume),
        change_24h=_plain_or_none(change),
        change_pct_24h=_plain_or_none(change_pct),
        cv_pct=_cv_pct(decision.admitted),
        method=rule.method,
        ts=now_ns,
        ts_tick=max((t.ts_received for t in ticks), default=last.ts_tick if last else now_ns),
    )


def evaluate_quotes(
    asset: str,
    quotes: Iterable[Tick],
    *,
    now_ns: int,
    rule: ConsensusRule,
    last: Price | None = None,
) -> Evaluation | None:
    """The consensus of `asset` from its venues' latest `quotes` (one each, no history: no `jump`), or None
    when there is nothing to say. `last` is the asset's last published price, repeated (status stale)
    when no quote is usable."""
    ticks = sorted(quotes, key=lambda t: t.source)
    if len({t.source for t in ticks}) != len(ticks):
        raise ValueError(f"{asset}: more than one quote per venue")
    decision = decide(asset, [Quote(t, rule) for t in ticks], now_ns=now_ns, rule=rule, last=last)
    return None if decision is None else explain(decision, rule=rule, last=last)


def closest_first(ticks: Iterable[Tick]) -> list[Tick]:
    """`ticks` by distance of their price from the median of all, nearest first (ties: oldest first).

    The order `rebuild` should try quotes in when nothing says which one broke the consensus: a quote
    far from the others is the one to leave out. Prices no arithmetic can order fall back to arrival.
    """
    arrival = sorted(ticks, key=lambda t: (t.ts_received, t.source))
    if not arrival:
        return arrival
    try:
        middle = median([t.price for t in arrival])
        return sorted(arrival, key=lambda t: EXACT.abs(EXACT.subtract(t.price, middle)))
    except ArithmeticError:
        return arrival


def used_sources(price: Price) -> frozenset[str]:
    """The venues whose quotes made a published price."""
    return frozenset(q.source for q in price.sources if q.reason is None)


def publish_due(candidate: Candidate, last: Price | None, *, heartbeat_ns: int, deviation_bps: float = 0.0) -> bool:
    """Whether `candidate` deserves an event, given the asset's last published price."""
    if last is None:
        return True
    if candidate.status != last.status or candidate.ts - last.ts >= heartbeat_ns:
        return True
    if candidate.price != last.price:
        if deviation_bps <= 0:
            return True
        # Exact: a move of exactly `deviation_bps` is due, which float division would sometimes miss.
        moved = EXACT.multiply(EXACT.abs(EXACT.subtract(candidate.price, last.price)), _BPS)
        if moved >= EXACT.multiply(Decimal(repr(deviation_bps)), EXACT.abs(last.price)):
            return True
    return candidate.used != used_sources(last)


class ConsensusBook:
    """Latest quote per (asset, venue) and last published price per asset; proposes the events due."""

    def __init__(self, rule: ConsensusRule) -> None:
        self.rule = rule
        self._quotes: dict[str, dict[str, Quote]] = {}
        self._last: dict[str, Price] = {}
        self._history: dict[str, RollingZScore] = {}

    @property
    def assets(self) -> tuple[str, ...]:
        """Every asset with a quote or a published price, sorted."""
        return tuple(sorted(self._quotes.keys() | self._last.keys()))

    def update(self, tick: Tick) -> bool:
        """Keep `tick` as its venue's quote for its asset; False when a newer one, or this one, is already held.

        Redelivered ticks can arrive after newer ones; the newest `ts_received` wins, so applying a
        tick twice, or late, never moves the book backwards. That is why a tick stamped in the future
        must be refused before it gets here (`check_tick(now_ns=...)`): it would shadow its venue.
        """
        venues = self._quotes.get(tick.base)
        if venues is None:
            venues = self._quotes[tick.base] = {}
        held = venues.get(tick.source)
        if held is not None and (held.tick.ts_received > tick.ts_received or held.tick.id == tick.id):
            # A redelivery of the held tick must not replace it either: measured against its own
            # copy, a quote held out as a `jump` would look confirmed.
            return False
        venues[tick.source] = Quote(tick, self.rule, held)
        return True

    def quotes(self, asset: str) -> tuple[Tick, ...]:
        return tuple(q.tick for q in self._quotes.get(asset, {}).values())

    def rebuild(self, asset: str, ticks: Iterable[Tick], *, now_ns: int) -> list[Tick]:
        """Replace `asset`'s quotes by `ticks` applied in order, leaving out each tick whose arrival makes
        the asset's evaluation raise (ArithmeticError); returns the ticks left out.

        The way back from a consensus that cannot be computed: given the quotes held before a batch and
        then the batch's ticks, it names the poison quote instead of failing the whole asset forever.
        """
        venues: dict[str, Quote] = {}
        self._quotes[asset] = venues
        left_out: list[Tick] = []
        for tick in ticks:
            if tick.base != asset:
                raise ValueError(f"a {tick.base} tick cannot rebuild {asset}")
            held = venues.get(tick.source)
            if not self.update(tick):
                continue
            try:
                self.evaluate(asset, now_ns)
            except ArithmeticError:
                if held is None:
                    del venues[tick.source]
                else:
                    venues[tick.source] = held
                left_out.append(tick)
        if not venues:
            del self._quotes[asset]
        return left_out

    def set_aside_unprocessable(self, asset: str, *, now_ns: int) -> list[Tick]:
        """`rebuild` the asset from its own quotes, `closest_first`; returns the quotes it left out."""
        return self.rebuild(asset, closest_first(self.quotes(asset)), now_ns=now_ns)

    def last(self, asset: str) -> Price | None:
        """The asset's last published price (seeded at recovery, then committed)."""
        return self._last.get(asset)

    def seed(self, price: Price) -> None:
        """Recovery: `price` is the asset's last event in the log, so seq continues after it."""
        self._last[price.asset] = price
        if price.status != "stale":
            self._window(price.asset).add(price.price)

    def decide(self, asset: str, now_ns: int) -> Decision | None:
        """Who is admitted and the price, without the evidence (cheap)."""
        held = self._quotes.get(asset)
        quotes = list(held.values()) if held else []
        return decide(asset, quotes, now_ns=now_ns, rule=self.rule, last=self._last.get(asset))

    def evaluate(self, asset: str, now_ns: int) -> Evaluation | None:
        decision = self.decide(asset, now_ns)
        return None if decision is None else explain(decision, rule=self.rule, last=self._last.get(asset))

    def propose(self, asset: str, now_ns: int) -> Price | None:
        """The event due for `asset` now (seq = last + 1), or None; nothing changes until `commit`."""
        decision = self.decide(asset, now_ns)
        last = self._last.get(asset)
        rule = self.rule
        if decision is None or not publish_due(
            decision, last, heartbeat_ns=rule.heartbeat_ns, deviation_bps=rule.deviation_bps
        ):
            return None
        evaluation = explain(decision, rule=rule, last=last)
        seq = (last.seq if last else 0) + 1
        if evaluation.status == "stale":
            return evaluation.to_price(seq)
        window = self._history.get(asset)
        z = None if window is None else window.score(evaluation.price)
        return evaluation.to_price(seq, z_score=published(z), anomaly=window is not None and window.is_anomaly(z))

    def commit(self, price: Price) -> None:
        """Record `price` as published (stored in the log)."""
        last = self._last.get(price.asset)
        if last is not None and price.seq <= last.seq:
            raise ValueError(f"seq {price.seq} of {price.asset} does not follow {last.seq}")
        self._last[price.asset] = price
        if price.status != "stale" and (last is None or price.price != last.price):
            self._window(price.asset).add(price.price)

    def _window(self, asset: str) -> RollingZScore:
        window = self._history.get(asset)
        if window is None:
            window = self._history[asset] = RollingZScore(self.rule.anomaly_window, self.rule.anomaly_z)
        return window
