"""Wire schemas of per-user data: alert and portfolio REST bodies, and the `alert_triggered` and
`portfolio_update` WebSocket frames. Decimals leave as JSON numbers with their exact digits, as in messages.py.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec

from pricewire_gateway.alerts import AlertFired, AlertKind
from pricewire_gateway.errors import BadParameter

# --- requests ----------------------------------------------------------------------------------


class AlertCreate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /api/v1/alerts`: the seed 004 fields, plus `pct`/`window_s` for `change_pct`."""

    symbol: str
    alert_type: str
    target_price: Decimal | None = None
    pct: Decimal | None = None
    window_s: int | None = None
    webhook_url: str | None = None
    note: str | None = None


class HoldingIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    symbol: str
    amount: Decimal


class PortfolioPut(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`PUT /api/v1/portfolio`: every holding, as seed 002 has it: `{"holdings":[{"symbol":"BTC","amount":"2.0"}]}`."""

    holdings: list[HoldingIn]


# --- bodies ------------------------------------------------------------------------------------


class AlertView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    symbol: str
    alert_type: AlertKind
    target_price: Decimal | None
    pct: Decimal | None
    window_s: int | None
    webhook_url: str | None
    note: str | None
    armed: bool
    """False after firing, until the price comes back past the hysteresis band."""
    fired_count: int
    created_at: str
    last_fired_at: str | None


class AlertList(msgspec.Struct, frozen=True, kw_only=True):
    alerts: list[AlertView]


class AlertHistory(msgspec.Struct, frozen=True, kw_only=True):
    events: list[AlertFired]


class HoldingValue(msgspec.Struct, frozen=True, kw_only=True):
    """One holding valued at the latest consensus; `price` and what follows are null without one."""

    symbol: str
    amount: Decimal
    price: Decimal | None
    value: Decimal | None
    change_24h: Decimal | None
    """Change of this holding's value over 24 h (amount x the asset's 24h change)."""
    change_percent_24h: Decimal | None


class Valuation(msgspec.Struct, frozen=True, kw_only=True):
    """The `data` of `portfolio_update` and the body of `GET /api/v1/portfolio` (seed 002's fields first)."""

    total_value: Decimal
    total_change_24h: Decimal | None
    total_change_percent_24h: Decimal | None
    holdings: list[HoldingValue]
    unpriced: list[str] = msgspec.field(default_factory=list)
    """Held assets with no price yet: left out of the totals."""


# --- frames ------------------------------------------------------------------------------------


class AlertTriggered(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="alert_triggered"):
    data: AlertFired
    timestamp: str


class AlertCreated(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="alert_created"):
    """The answer to the WebSocket `price_alert`."""

    data: AlertView


class PortfolioUpdate(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="portfolio_update"):
    data: Valuation
    timestamp: str


_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")
_ALERT_CREATE: Final = msgspec.json.Decoder(AlertCreate)
_PORTFOLIO_PUT: Final = msgspec.json.Decoder(PortfolioPut)


def encode(
    body: AlertView | AlertList | AlertHistory | Valuation | AlertTriggered | AlertCreated | PortfolioUpdate,
) -> bytes:
    return _ENCODER.encode(body)


def decode_alert_create(payload: bytes) -> AlertCreate:
    """The create request, or BadParameter with msgspec's path to the bad field."""
    try:
        return _ALERT_CREATE.decode(payload)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadParameter("body", f"bad alert: {exc}") from exc


def decode_portfolio_put(payload: bytes) -> PortfolioPut:
    try:
        return _PORTFOLIO_PUT.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadParameter("body", f"bad portfolio: {exc}") from exc
