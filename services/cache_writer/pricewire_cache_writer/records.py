"""Rows of the `ticks` and `prices` tables, built from events by pure functions.

Everything that could make PostgreSQL refuse a row (a NUL in a text, a number beyond
`numeric`'s range, a timestamp beyond `bigint`) is caught here as InvalidEvent, so a
batch insert fails only when the database does, never because of one bad event.
Timestamps stay integer ns here; the insert derives the `timestamptz` columns from them.
"""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal
from typing import NamedTuple

import msgspec

from pricewire_common import rules
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Price, Tick

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
# PostgreSQL numeric: up to 131072 digits before the decimal point, 16383 after.
_MAX_INTEGER_DIGITS = 131_072
_MAX_SCALE = 16_383

_SOURCES_ENCODER = msgspec.json.Encoder()


class TickRecord(NamedTuple):
    """One row of `ticks`, less the `timestamptz` columns the insert derives from `*_ns`."""

    id: str
    source: str
    symbol: str
    base: str
    quote: str
    price: Decimal
    bid: Decimal | None
    ask: Decimal | None
    volume_24h: Decimal | None
    open_24h: Decimal | None
    ts_exchange_ns: int
    ts_received_ns: int
    stream_seq: int


class PriceRecord(NamedTuple):
    """One row of `prices`, less `ts` (derived from `ts_ns`); `sources` is JSON text."""

    asset: str
    seq: int
    price: Decimal
    currency: str
    confidence: Decimal
    status: str
    n_sources: int
    n_used: int
    sources: str
    volume_24h: Decimal | None
    change_24h: Decimal | None
    change_pct_24h: Decimal | None
    ts_ns: int
    ts_tick_ns: int
    stream_seq: int
    method: str = "median"
    cv_pct: Decimal | None = None
    anomaly: bool = False
    z_score: Decimal | None = None


def _unstorable(detail: str) -> InvalidEvent:
    return InvalidEvent(detail, reason="unstorable")


def _text(name: str, value: str) -> str:
    if "\x00" in value:
        raise _unstorable(f"{name} holds a NUL character")
    return value


def _decimal(name: str, value: Decimal) -> Decimal:
    if not value.is_finite():
        raise InvalidEvent(f"{name} is not finite: {value}", reason="invalid_number")
    exponent = value.as_tuple().exponent
    scale = -exponent if isinstance(exponent, int) else 0
    if value.adjusted() >= _MAX_INTEGER_DIGITS or scale > _MAX_SCALE:
        raise _unstorable(f"{name} is beyond the range of numeric")
    return value


def _optional(name: str, value: Decimal | None) -> Decimal | None:
    return None if value is None else _decimal(name, value)


def _integer(name: str, value: int, *, low: int, high: int) -> int:
    if not low <= value <= high:
        raise _unstorable(f"{name} {value} is outside [{low}, {high}]")
    return value


def _timestamp(name: str, ts_ns: int) -> int:
    return _integer(name, ts_ns, low=0, high=MAX_BIGINT)


def tick_record(tick: Tick, *, stream_seq: int) -> TickRecord:
    """The `ticks` row of a tick that already passed `rules.check_tick`.

    Its numbers need no check of their own: the rule's bounds (prices below 1e12, volumes below 1e20, at
    most 18 decimals each) lie well inside what `numeric` stores.
    """
    return TickRecord(
        id=_text("id", tick.id),
        source=_text("source", tick.source),
        symbol=_text("symbol", tick.symbol),
        base=_text("base", tick.base),
        quote=_text("quote", tick.quote),
        price=tick.price,
        bid=tick.bid,
        ask=tick.ask,
        volume_24h=tick.volume_24h,
        open_24h=tick.open_24h,
        ts_exchange_ns=_timestamp("ts_exchange", tick.ts_exchange),
        ts_received_ns=_timestamp("ts_received", tick.ts_received),
        stream_seq=stream_seq,
    )


def check_price(price: Price, *, subject: str, assets: Collection[str]) -> Price:
    """Return the price if it keeps the contract and PostgreSQL can store it, else raise InvalidEvent.

    `assets` is the set this deployment prices: any other asset is rejected as `unknown_asset`.
    """
    rules.check_price(price, subject=subject, assets=assets)
    _decimal("price", price.price)
    _decimal("confidence", price.confidence)
    _integer("seq", price.seq, low=0, high=MAX_BIGINT)
    return price


def price_record(price: Price, *, stream_seq: int) -> PriceRecord:
    """The `prices` row of a price that already passed `check_price`."""
    for quote in price.sources:
        _text("sources.source", quote.source)
        _text("sources.symbol", quote.symbol)
        _text("sources.reason", quote.reason or "")
    return PriceRecord(
        asset=price.asset,
        seq=_integer("seq", price.seq, low=0, high=MAX_BIGINT),
        price=_decimal("price", price.price),
        currency=_text("currency", price.currency),
        confidence=_decimal("confidence", price.confidence),
        status=price.status,
        n_sources=_integer("n_sources", price.n_sources, low=0, high=MAX_INT),
        n_used=_integer("n_used", price.n_used, low=0, high=MAX_INT),
        sources=_SOURCES_ENCODER.encode(price.sources).decode(),
        volume_24h=_optional("volume_24h", price.volume_24h),
        change_24h=_optional("change_24h", price.change_24h),
        change_pct_24h=_optional("change_pct_24h", price.change_pct_24h),
        ts_ns=_timestamp("ts", price.ts),
        ts_tick_ns=_timestamp("ts_tick", price.ts_tick),
        stream_seq=stream_seq,
        method=_text("method", price.method),
        cv_pct=_optional("cv_pct", price.cv_pct),
        anomaly=price.anomaly,
        z_score=_optional("z_score", price.z_score),
    )
