"""The contract's rules for ticks and prices, beyond what their schemas say: checked by producers and consumers."""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal

from pricewire_common import subjects
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Price, Tick


def _positive(name: str, value: Decimal) -> None:
    if not value.is_finite():
        raise InvalidEvent(f"{name} is not finite: {value}", reason="invalid_price")
    if value <= 0:
        raise InvalidEvent(f"{name} is not positive: {value}", reason="invalid_price")


def check_tick(tick: Tick, *, assets: Collection[str] | None = None) -> Tick:
    """Return the tick if it keeps the contract, else raise InvalidEvent with a reason code.

    `assets`, when given, is the set of base assets this deployment prices.
    """
    subjects.check_source(tick.source)
    if tick.symbol != subjects.symbol(tick.base, tick.quote):
        raise InvalidEvent(
            f"symbol {tick.symbol!r} is not {tick.base}-{tick.quote}", reason="bad_symbol"
        )
    if not tick.id or len(tick.id) > 128:
        raise InvalidEvent("id must hold 1 to 128 characters", reason="bad_id")
    _positive("price", tick.price)
    for name in ("bid", "ask", "open_24h"):
        value = getattr(tick, name)
        if value is not None:
            _positive(name, value)
    if tick.volume_24h is not None and (not tick.volume_24h.is_finite() or tick.volume_24h < 0):
        raise InvalidEvent(f"volume_24h is invalid: {tick.volume_24h}", reason="invalid_volume")
    if tick.ts_exchange <= 0 or tick.ts_received <= 0:
        raise InvalidEvent("timestamps must be positive ns since the epoch", reason="bad_timestamp")
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
