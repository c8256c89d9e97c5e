"""The first consensus rule: a median of venue quotes in USD, with outliers and stale quotes set aside.

Pure: no I/O, no clock (time comes in as `now_ns`). For one asset the book holds each venue's latest
tick (ticks that passed `rules.check_tick`). At time `now`:

1. A quote is **excluded** when its quote currency is not in `usd_quotes` (reason `not_usd`: USD, USDT
   and USDC count as USD), else when `now - ts_received > max_age` (reason `stale`). The rest are
   **eligible**. `age_ms = (now - ts_received) // 1e6`, floored at 0 (a collector clock slightly ahead).
2. `m` = median of the eligible prices. Every quote gets `deviation_pct = (p - m) / m * 100`, rounded
   half-even to 4 decimals (when nothing is eligible, `m` is the asset's last published price). An
   eligible quote with `|deviation_pct| > outlier_pct` is an **outlier** (reason `outlier`); the rule
   reads the published 4-decimal figure, so anyone can re-check it from the event.
3. The **used** quotes are the eligible non-outliers. `price` = median of the used prices; for an even
   count the mean of the two middle ones. Decimal arithmetic, exact: no float anywhere.
4. `confidence`, a half-width in USD around `price`:
       n_used >= 2:  max |p_i - price| over the used quotes (every used quote lies in price ± confidence)
       n_used == 1:  (ask - bid) / 2 of that quote when it reports both, else 0
5. `status`: `ok` when n_used >= min_sources, `degraded` when 0 < n_used < min_sources, `stale` when
   n_used == 0. A stale consensus repeats the asset's last published price (and its confidence, volume
   and 24h figures) with status `stale`; an asset that never had a price gets no event.
6. `volume_24h` = sum of the used quotes' volume_24h (None when none reports it). With `o` = median of
   the used quotes' open_24h: `change_24h = price - o`, `change_pct_24h = change_24h / o * 100` (4 dp);
   both None when no used quote reports open_24h.
7. `n_sources` = quotes known for the asset (all of them), `n_used` = used ones, `sources` sorted by
   venue, `ts = now`, `ts_tick` = newest `ts_received` among the asset's quotes.
8. Every published decimal is in plain notation: a value with a positive exponent (`1E+2`, from a
   venue's `1E+2` or a difference like `0E+2`) is written with its integer digits (`100`, `0`).

Publish policy: a new Price is due when there was none, or the price, the status or the set of used
venues changed, or `heartbeat` has passed since the asset's last publish. `seq` counts the asset's
published events: last seq + 1, committed only once the event is stored.

Anomaly (`anomaly.RollingZScore`): a non-stale event carries the z-score of its price against the asset's
last `anomaly_window` published prices and `anomaly` when |z| > `anomaly_z`, and is published all the same.
Stale events and repeats of the last price stay out of the window (a run of heartbeats would flatten it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from functools import reduce

from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.config import DEFAULT_USD_QUOTES, Settings
from pricewire_common.events import Price, SourceQuote, Status, Tick
from pricewire_validator.anomaly import DEFAULT_THRESHOLD, DEFAULT_WINDOW, RollingZScore, published

__all__ = [
    "ConsensusBook",
    "ConsensusRule",
    "Evaluation",
    "closest_first",
    "evaluate_quotes",
    "median",
    "plain",
    "publish_due",
    "used_sources",
]

# Wide enough that sums, halves and quotients of venue prices are exact or rounded far below 4 dp,
# whatever the process-wide decimal context says; anything odd raises instead of turning into NaN.
_EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])
_PCT_PLACES = Decimal("0.0001")
_HUNDRED = Decimal(100)
_TWO = Decimal(2)
_ZERO = Decimal(0)
_ONE = Decimal(1)

NOT_USD = "not_usd"
STALE = "stale"
OUTLIER = "outlier"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusRule:
    """The thresholds of the rule (times in ns)."""

    usd_quotes: frozenset[str] = frozenset(DEFAULT_USD_QUOTES)
    max_age_ns: int = 30 * NS_PER_S
    outlier_pct: Decimal = Decimal(5)
    min_sources: int = 2
    heartbeat_ns: int = 5 * NS_PER_S
    anomaly_window: int = DEFAULT_WINDOW
    anomaly_z: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        RollingZScore(self.anomaly_window, self.anomaly_z)  # a window it cannot use fails here, not at a commit

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsensusRule:
        v = settings.validator
        return cls(
            usd_quotes=frozenset(settings.usd_quotes),
            max_age_ns=round(v.max_age_s * NS_PER_S),
            outlier_pct=v.outlier_pct,
            min_sources=v.min_sources,
            heartbeat_ns=round(v.heartbeat_s * NS_PER_S),
            anomaly_window=v.anomaly_window,
            anomaly_z=v.anomaly_z,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """The consensus of one asset at one instant: a Price without its seq."""

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
        )


def median(values: Sequence[Decimal]) -> Decimal:
    """The median, exact: the middle value as given, or the exact mean of the two middle ones."""
    if not values:
        raise ValueError("median of no values")
    # Ties in value are ordered by exponent so the result never depends on input order.
    ordered = sorted(values, key=lambda d: (d, d.as_tuple().exponent))
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return _EXACT.divide(_EXACT.add(ordered[mid - 1], ordered[mid]), _TWO)


def plain(value: Decimal) -> Decimal:
    """`value` without a positive exponent (`1E+2` -> `100`), so its text has no exponent; digits otherwise kept."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:
        return value.quantize(_ONE, context=_EXACT)
    return value


def _plain_or_none(value: Decimal | None) -> Decimal | None:
    return None if value is None else plain(value)


def _pct(part: Decimal, whole: Decimal) -> Decimal:
    return _EXACT.multiply(_EXACT.divide(part, whole), _HUNDRED).quantize(_PCT_PLACES, context=_EXACT)


def _half_spread(tick: Tick) -> Decimal:
    if tick.bid is None or tick.ask is None or tick.ask < tick.bid:
        return _ZERO
    return _EXACT.divide(_EXACT.subtract(tick.ask, tick.bid), _TWO)


def _confidence(price: Decimal, used: Sequence[Tick]) -> Decimal:
    if len(used) == 1:
        return _half_spread(used[0])
    return max(_EXACT.abs(_EXACT.subtract(t.price, price)) for t in used)


def _status(n_used: int, min_sources: int) -> Status:
    if n_used >= min_sources:
        return "ok"
    return "degraded" if n_used > 0 else "stale"


def evaluate_quotes(
    asset: str,
    quotes: Iterable[Tick],
    *,
    now_ns: int,
    rule: ConsensusRule,
    last: Price | None = None,
) -> Evaluation | None:
    """The consensus of `asset` from its venues' latest `quotes` (one each), or None when there is nothing to say.

    `last` is the asset's last published price, repeated (status stale) when no quote is usable.
    """
    ticks = sorted(quotes, key=lambda t: t.source)
    if len({t.source for t in ticks}) != len(ticks):
        raise ValueError(f"{asset}: more than one quote per venue")
    excluded: dict[str, str] = {}
    for t in ticks:
        if t.quote not in rule.usd_quotes:
            excluded[t.source] = NOT_USD
        elif now_ns - t.ts_received > rule.max_age_ns:
            excluded[t.source] = STALE
    eligible = [t for t in ticks if t.source not in excluded]

    reference = median([t.price for t in eligible]) if eligible else last.price if last else None
    deviations: dict[str, Decimal] = {}
    if reference is not None:
        deviations = {t.source: _pct(_EXACT.subtract(t.price, reference), reference) for t in ticks}
    for t in eligible:
        if _EXACT.abs(deviations[t.source]) > rule.outlier_pct:
            excluded[t.source] = OUTLIER
    used = [t for t in eligible if t.source not in excluded]

    status: Status
    if used:
        price = median([t.price for t in used])
        confidence = _confidence(price, used)
        status = _status(len(used), rule.min_sources)
        volumes = [t.volume_24h for t in used if t.volume_24h is not None]
        volume = reduce(_EXACT.add, volumes) if volumes else None
        opens = [t.open_24h for t in used if t.open_24h is not None]
        open_24h = median(opens) if opens else None
        change = None if open_24h is None else _EXACT.subtract(price, open_24h)
        change_pct = None if change is None or open_24h is None else _pct(change, open_24h)
    elif last is not None:
        price, confidence, status = last.price, last.confidence, "stale"
        volume, change, change_pct = last.volume_24h, last.change_24h, last.change_pct_24h
    else:
        return None

    sources = tuple(
        SourceQuote(
            source=t.source,
            symbol=t.symbol,
            price=plain(t.price),
            deviation_pct=plain(deviations.get(t.source, _ZERO)),
            age_ms=max(0, (now_ns - t.ts_received) // NS_PER_MS),
            outlier=excluded.get(t.source) == OUTLIER,
            reason=excluded.get(t.source),
        )
        for t in ticks
    )
    return Evaluation(
        asset=asset,
        price=plain(price),
        confidence=plain(confidence),
        status=status,
        n_sources=len(ticks),
        n_used=len(used),
        sources=sources,
        volume_24h=_plain_or_none(volume),
        change_24h=_plain_or_none(change),
        change_pct_24h=_plain_or_none(change_pct),
        ts=now_ns,
        ts_tick=max((t.ts_received for t in ticks), default=last.ts_tick if last else now_ns),
    )


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
        return sorted(arrival, key=lambda t: _EXACT.abs(_EXACT.subtract(t.price, middle)))
    except ArithmeticError:
        return arrival


def used_sources(price: Price) -> frozenset[str]:
    """The venues whose quotes made a published price."""
    return frozenset(q.source for q in price.sources if q.reason is None)


def publish_due(evaluation: Evaluation, last: Price | None, *, heartbeat_ns: int) -> bool:
    """Whether `evaluation` deserves an event, given the asset's last published price."""
    if last is None:
        return True
    return (
        evaluation.price != last.price
        or evaluation.status != last.status
        or evaluation.used != used_sources(last)
        or evaluation.ts - last.ts >= heartbeat_ns
    )


class ConsensusBook:
    """Latest quote per (asset, venue) and last published price per asset; proposes the events due."""

    def __init__(self, rule: ConsensusRule) -> None:
        self.rule = rule
        self._quotes: dict[str, dict[str, Tick]] = {}
        self._last: dict[str, Price] = {}
        self._history: dict[str, RollingZScore] = {}

    @property
    def assets(self) -> tuple[str, ...]:
        """Every asset with a quote or a published price, sorted."""
        return tuple(sorted(self._quotes.keys() | self._last.keys()))

    def update(self, tick: Tick) -> bool:
        """Keep `tick` as its venue's quote for its asset; False when a newer one is already held.

        Redelivered ticks can arrive after newer ones; the newest `ts_received` wins, so applying a
        tick twice, or late, never moves the book backwards. That is why a tick stamped in the future
        must be refused before it gets here (`check_tick(now_ns=...)`): it would shadow its venue.
        """
        venues = self._quotes.setdefault(tick.base, {})
        held = venues.get(tick.source)
        if held is not None and held.ts_received > tick.ts_received:
            return False
        venues[tick.source] = tick
        return True

    def quotes(self, asset: str) -> tuple[Tick, ...]:
        return tuple(self._quotes.get(asset, {}).values())

    def rebuild(self, asset: str, ticks: Iterable[Tick], *, now_ns: int) -> list[Tick]:
        """Replace `asset`'s quotes by `ticks` applied in order, leaving out each tick whose arrival makes
        the asset's evaluation raise (ArithmeticError); returns the ticks left out.

        The way back from a consensus that cannot be computed: given the quotes held before a batch and
        then the batch's ticks, it names the poison quote instead of failing the whole asset forever.
        """
        venues: dict[str, Tick] = {}
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

    def evaluate(self, asset: str, now_ns: int) -> Evaluation | None:
        return evaluate_quotes(asset, self.quotes(asset), now_ns=now_ns, rule=self.rule, last=self._last.get(asset))

    def propose(self, asset: str, now_ns: int) -> Price | None:
        """The event due for `asset` now (seq = last + 1), or None; nothing changes until `commit`."""
        evaluation = self.evaluate(asset, now_ns)
        last = self._last.get(asset)
        if evaluation is None or not publish_due(evaluation, last, heartbeat_ns=self.rule.heartbeat_ns):
            return None
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
