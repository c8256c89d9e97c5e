"""The contract's rules for ticks and prices, beyond what their schemas say: checked by producers and consumers."""

from __future__ import annotations

import functools
from collections.abc import Collection
from decimal import Decimal

from pricewire_common import subjects
from pricewire_common.clock import NS_PER_S
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Price, Tick

# Bounds that keep every figure derived from a tick (sums, medians, deviations in %) exact within
# the validator's 60-digit decimal context: 1e-12..1e12 with 18 decimals needs 30 digits, and a
# deviation of the largest price from the smallest stays below 1e27 %. A quote outside them is a
# venue error, not a market; let in, it would make the consensus arithmetic raise.
MIN_PRICE = Decimal("1e-12")
MAX_PRICE = Decimal("1e12")
MAX_VOLUME = Decimal("1e20")
MAX_PLACES = 18
MAX_DIGITS = 30
MAX_TS_NS = 2**63
"""Timestamps are signed 64-bit ns in every store (PostgreSQL bigint), so anything larger is corrupt."""
MAX_FUTURE_NS = 5 * NS_PER_S
"""How far ahead of the checker's clock a `ts_received` may be: collectors' clocks drift a little."""


def decimal_places(value: Decimal) -> int:
    """Digits after the decimal point of finite `value` (0 for an integer or a positive exponent)."""
    # str() costs an eighth of as_tuple() (which builds a digit tuple and a named tuple), and this runs
    # four times a tick on the validator's hot path; str() has no exponent for the usual quotes.
    text = str(value)
    if "E" in text:
        exponent = value.as_tuple().exponent
        return -exponent if isinstance(exponent, int) and exponent < 0 else 0
    point = text.find(".")
    return 0 if point < 0 else len(text) - point - 1


# MIN_PRICE and MAX_PRICE are powers of ten, so a positive value lies in [MIN_PRICE, MAX_PRICE) exactly when
# its adjusted exponent (that of its leading digit) lies in these bounds: two integer comparisons, where
# comparing Decimals costs several times more.
_MIN_PRICE_ADJUSTED = MIN_PRICE.adjusted()
_MAX_PRICE_ADJUSTED = MAX_PRICE.adjusted() - 1
_MAX_VOLUME_ADJUSTED = MAX_VOLUME.adjusted() - 1


def _positive(name: str, value: Decimal) -> None:
    if not value.is_finite():
        raise InvalidEvent(f"{name} is not finite: {value}", reason="invalid_price")
    if value <= 0:
        raise InvalidEvent(f"{name} is not positive: {value}", reason="invalid_price")


def _check_price(name: str, value: Decimal) -> None:
    if (
        value.is_finite()
        and not value.is_signed()
        and not value.is_zero()
        and _MIN_PRICE_ADJUSTED <= value.adjusted() <= _MAX_PRICE_ADJUSTED
    ):
        # Below MAX_PRICE (at most 12 digits before the point), at most MAX_PLACES decimals means at most
        # MAX_DIGITS digits: the decimal places cover both.
        if decimal_places(value) <= MAX_PLACES:
            return
        raise InvalidEvent(
            f"{name} has more than {MAX_PLACES} decimals or {MAX_DIGITS} digits: {value}", reason="invalid_price"
        )
    _positive(name, value)
    raise InvalidEvent(f"{name} is outside [{MIN_PRICE}, {MAX_PRICE}): {value}", reason="invalid_price")


def _check_volume(value: Decimal) -> None:
    in_range = value.is_zero() or (not value.is_signed() and value.adjusted() <= _MAX_VOLUME_ADJUSTED)
    if value.is_finite() and in_range and decimal_places(value) <= MAX_PLACES:
        return
    raise InvalidEvent(
        f"volume_24h is not in [0, {MAX_VOLUME}) with at most {MAX_PLACES} decimals: {value}",
        reason="invalid_volume",
    )


def _check_timestamps(tick: Tick, now_ns: int | None, max_future_ns: int) -> None:
    for name, value in (("ts_exchange", tick.ts_exchange), ("ts_received", tick.ts_received)):
        if not 0 < value < MAX_TS_NS:
            raise InvalidEvent(f"{name} is not positive 64-bit ns since the epoch: {value}", reason="bad_timestamp")
    if now_ns is not None and tick.ts_received > now_ns + max_future_ns:
        raise InvalidEvent(f"ts_received is {tick.ts_received - now_ns} ns in the future", reason="bad_timestamp")


@functools.lru_cache(maxsize=4096)
def _check_names(source: str, symbol: str, base: str, quote: str) -> None:
    """Raise InvalidEvent unless the names are valid and agree; a pure function of few distinct values,
    remembered, since every tick of a pair repeats them (a bad one raises and is never remembered)."""
    subjects.check_source(source)
    if symbol != subjects.symbol(base, quote):
        raise InvalidEvent(f"symbol {symbol!r} is not {base}-{quote}", reason="bad_symbol")


def check_tick(
    tick: Tick,
    *,
    assets: Collection[str] | None = None,
    now_ns: int | None = None,
    max_future_ns: int = MAX_FUTURE_NS,
) -> Tick:
    """Return the tick if it keeps the contract, else raise InvalidEvent with a reason code.

    `assets`, when given, is the set of base assets this deployment prices. `now_ns`, when given, is
    the checker's clock: a tick received more than `max_future_ns` after it is refused (reason
    `bad_timestamp`), since consumers keep each venue's newest quote and one from the future would
    shadow every real quote of that venue until the clock caught up with it.
    """
    _check_names(tick.source, tick.symbol, tick.base, tick.quote)
    if not tick.id or len(tick.id) > 128:
        raise InvalidEvent("id must hold 1 to 128 characters", reason="bad_id")
    _check_price("price", tick.price)
    for name, value in (("bid", tick.bid), ("ask", tick.ask), ("open_24h", tick.open_24h)):
        if value is not None:
            _check_price(name, value)
    if tick.volume_24h is not None:
        _check_volume(tick.volume_24h)
    _check_timestamps(tick, now_ns, max_future_ns)
    if assets is not None and tick.base not in assets:
        raise InvalidEvent(f"asset {tick.base} is not configured", reason="unknown_asset")
    return tick


def _finite(name: str, value: Decimal | None) -> None:
    # JSON has no NaN or Infinity, and a projection could not store them as the number they claim to be.
    if value is not None and not value.is_finite():
        raise InvalidEvent(f"{name} is not finite: {value}", reason="invalid_number")


def check_price(price: Price, *, subject: str, assets: Collection[str] | None = None) -> Price:
    """Return the consensus event if it keeps the contract, else raise InvalidEvent with a reason code.

    The asset names Redis keys and WebSocket topics, so it must be a valid code and the one of its
    subject; `assets`, when given, is the set of assets this deployment prices.
    """
    asset = subjects.asset_of_price_subject(subject)
    subjects.check_asset(price.asset)
    if price.asset != asset:
        raise InvalidEvent(f"asset {price.asset} arrived on {subject}", reason="asset_mismatch")
    if assets is not None and price.asset not in assets:
        raise InvalidEvent(f"asset {price.asset} is not configured", reason="unknown_asset")
    _positive("price", price.price)
    for name in ("confidence", "volume_24h", "change_24h", "change_pct_24h"):
        _finite(name, getattr(price, name))
    if price.confidence < 0:
        raise InvalidEvent(f"confidence is negative: {price.confidence}", reason="invalid_number")
    for quote in price.sources:
        _finite(f"sources[{quote.source}].price", quote.price)
        _finite(f"sources[{quote.source}].deviation_pct", quote.deviation_pct)
    if price.seq < 0:
        raise InvalidEvent(f"seq is negative: {price.seq}", reason="bad_seq")
    if price.ts <= 0:
        raise InvalidEvent("ts must be positive ns since the epoch", reason="bad_timestamp")
    return price
