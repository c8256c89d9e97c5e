"""How admitted quotes become one price: weights, the weighted median and its alternatives, exactly.

Pure: no I/O. Prices are Decimals and the result is always a venue's own digits or an exact (then
rounded) combination of them; weights are floats (evidence about a quote, never a price).

Weight of an admitted quote (README "Consensus"):

    w = volume_factor x spread_factor
    volume_factor = sqrt(volume_24h)             the venue's 24h volume, damped so one venue cannot
                                                 outvote all others; a quote without volume gets the
                                                 median of the positive factors (1 when none)
    spread_factor = 1 / (1 + spread_bps / ref)   spread_bps = (ask - bid) / mid x 10^4; a quote without
                                                 a book counts as spread_bps = ref (factor 1/2)

When every weight is 0 (all volumes 0) the quotes weigh the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from functools import reduce

from pricewire_common.config import ConsensusMethod
from pricewire_common.events import Tick

__all__ = [
    "EXACT",
    "aggregate",
    "finest",
    "median",
    "spread_factor",
    "volume_factor",
    "weighted_median",
    "weights",
]

# Wide enough that sums, halves and quotients of venue prices are exact or rounded far below the
# published places, whatever the process-wide decimal context says; anything odd raises instead of
# turning into NaN.
EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])
_TWO = Decimal(2)
_HALF_TOLERANCE = 1e-12
"""Cumulative weight within this (relative) of half the total counts as exactly half: a tie."""


def median(values: Sequence[Decimal]) -> Decimal:
    """The median, exact: the middle value as given, or the exact mean of the two middle ones."""
    if not values:
        raise ValueError("median of no values")
    # Ties in value are ordered by exponent so the result never depends on input order.
    ordered = sorted(values, key=lambda d: (d, d.as_tuple().exponent))
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return EXACT.divide(EXACT.add(ordered[mid - 1], ordered[mid]), _TWO)


def finest(values: Sequence[Decimal], *, extra: int = 0) -> Decimal:
    """The quantum of the most precise of `values`, `extra` places finer (`0.01` for 100.5 and 100.25)."""
    exponent = min(_exponent(v) for v in values)
    return Decimal(1).scaleb(exponent - extra)


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return min(exponent, 0) if isinstance(exponent, int) else 0


def spread_factor(tick: Tick, ref_bps: float) -> float:
    """`1 / (1 + spread_bps / ref_bps)`; a quote without a usable book counts as `spread_bps = ref_bps`."""
    bid, ask = tick.bid, tick.ask
    if bid is None or ask is None or not (bid.is_finite() and ask.is_finite()) or bid <= 0 or ask < bid:
        return 0.5
    fbid, fask = float(bid), float(ask)
    spread_bps = (fask - fbid) / ((fask + fbid) / 2) * 1e4
    return 1.0 / (1.0 + spread_bps / ref_bps) if math.isfinite(spread_bps) else 0.5


def volume_factor(tick: Tick) -> float | None:
    """`sqrt(volume_24h)`, or None when the quote reports no usable volume."""
    volume = tick.volume_24h
    if volume is None or not volume.is_finite() or volume < 0:
        return None
    factor = math.sqrt(float(volume))
    return factor if math.isfinite(factor) else None


def weights(volume_factors: Sequence[float | None], spread_factors: Sequence[float]) -> list[float]:
    """Each quote's weight from its two factors (see the module docstring); same order as given."""
    known = sorted(f for f in volume_factors if f is not None and f > 0)
    if not known:
        neutral = 1.0
    else:
        mid = len(known) // 2
        neutral = known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2
    raw = [(neutral if v is None else v) * s for v, s in zip(volume_factors, spread_factors, strict=True)]
    if not any(w > 0 for w in raw):
        return [1.0] * len(raw)
    return raw


def weighted_median(prices: Sequence[Decimal], weights_: Sequence[float], keys: Sequence[str]) -> Decimal:
    """The lower weighted median of `prices`: the first price, in ascending order (ties by `keys`),
    at which the cumulative weight reaches half the total; the exact mean of it and the next one when
    it reaches exactly half (two equal halves). Always a venue's own digits, or the mean of two."""
    ranked = sorted(zip(prices, keys, weights_, strict=True))
    total = math.fsum(weights_)
    half = total / 2
    cumulative = 0.0
    for rank, (price, _, weight) in enumerate(ranked):
        cumulative += weight
        if cumulative >= half * (1 - _HALF_TOLERANCE):
            if abs(cumulative - half) <= half * _HALF_TOLERANCE:
                # Two equal halves: the mean of this price and the next one that weighs anything
                # (a venue of weight 0 between them must not set the price).
                above = next((p for p, _, w in ranked[rank + 1 :] if w > 0), None)
                if above is not None:
                    return EXACT.divide(EXACT.add(price, above), _TWO)
            return price
    return ranked[-1][0]


def _mean(prices: Sequence[Decimal]) -> Decimal:
    total = reduce(EXACT.add, prices)
    return EXACT.divide(total, Decimal(len(prices))).quantize(finest(prices, extra=2), context=EXACT)


def _vwap(prices: Sequence[Decimal], ticks: Sequence[Tick]) -> Decimal:
    pairs = [(p, t.volume_24h) for p, t in zip(prices, ticks, strict=True) if t.volume_24h and t.volume_24h > 0]
    if not pairs:
        return _mean(prices)
    notional = reduce(EXACT.add, (EXACT.multiply(p, v) for p, v in pairs))
    volume = reduce(EXACT.add, (v for _, v in pairs))
    return EXACT.divide(notional, volume).quantize(finest(prices, extra=2), context=EXACT)


def aggregate(method: ConsensusMethod, ticks: Sequence[Tick], weights_: Sequence[float]) -> Decimal:
    """The consensus of the admitted `ticks` by `method`:

    `weighted_median` (default)  see `weighted_median`, with `weights`
    `median`                     the plain median
    `mean`                       the arithmetic mean, rounded half-even to two places finer than the finest price
    `vwap`                       sum(volume x price) / sum(volume) over quotes with a volume, rounded
                                 the same way (the mean when none has one)
    """
    prices = [t.price for t in ticks]
    if method == "weighted_median":
        return weighted_median(prices, weights_, [t.source for t in ticks])
    if method == "median":
        return median(prices)
    if method == "mean":
        return _mean(prices)
    return _vwap(prices, ticks)
