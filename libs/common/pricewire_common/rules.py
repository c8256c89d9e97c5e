"""The contract's rules for a tick, beyond what its schema says: checked by producer and consumers."""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal

from pricewire_common import subjects
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Tick


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
