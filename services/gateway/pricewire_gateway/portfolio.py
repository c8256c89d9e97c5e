"""Portfolio valuation, pure: holdings times the latest consensus prices. No I/O.

- value = amount x price; change_24h = amount x the asset's 24h change (when the consensus has one).
- total_value sums the priced holdings; a holding with no price yet is listed in `unpriced`.
- total_change_percent_24h = total_change_24h / (value 24 h ago) x 100, over the holdings whose 24h
  change is known, where value 24 h ago = value - change_24h; null when none is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Final

import msgspec

from pricewire_common.events import Price
from pricewire_gateway.user_messages import HoldingValue, Valuation

PERCENT_PLACES: Final = Decimal("0.0001")
MAX_HOLDINGS: Final = 100


class Holding(msgspec.Struct, frozen=True, kw_only=True):
    """An amount of one asset (a configured asset code)."""

    asset: str
    amount: Decimal


def _pct(change: Decimal, base: Decimal) -> Decimal | None:
    if base <= 0:
        return None
    return (change / base * 100).quantize(PERCENT_PLACES)


def value(holdings: Sequence[Holding], prices: Mapping[str, Price]) -> Valuation:
    """The valuation of `holdings` at `prices` (by asset), holdings in their given order."""
    total = Decimal(0)
    change_total = Decimal(0)
    base_total = Decimal(0)
    known_change = False
    rows: list[HoldingValue] = []
    unpriced: list[str] = []
    for holding in holdings:
        price = prices.get(holding.asset)
        if price is None:
            unpriced.append(holding.asset)
            rows.append(
                HoldingValue(
                    symbol=holding.asset,
                    amount=holding.amount,
                    price=None,
                    value=None,
                    change_24h=None,
                    change_percent_24h=None,
                )
            )
            continue
        worth = holding.amount * price.price
        total += worth
        change = None if price.change_24h is None else holding.amount * price.change_24h
        if change is not None:
            known_change = True
            change_total += change
            base_total += worth - change
        rows.append(
            HoldingValue(
                symbol=holding.asset,
                amount=holding.amount,
                price=price.price,
                value=worth,
                change_24h=change,
                change_percent_24h=price.change_pct_24h,
            )
        )
    return Valuation(
        total_value=total,
        total_change_24h=change_total if known_change else None,
        total_change_percent_24h=_pct(change_total, base_total) if known_change else None,
        holdings=rows,
        unpriced=unpriced,
    )
