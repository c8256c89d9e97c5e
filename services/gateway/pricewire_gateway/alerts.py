"""Alert rules, pure: when an alert fires, and when a fired one re-arms. No I/O.

An alert is armed when created. An armed alert fires on the first price that meets its condition,
and is then disarmed: it fires again only after the price has come back past a hysteresis band (it
re-arms) and then meets the condition anew. So a price hovering at the threshold fires once, not on
every wiggle.

- `above`: fires when price >= target; re-arms when price < target x (1 - band/100).
- `below`: fires when price <= target; re-arms when price > target x (1 + band/100).
- `change_pct`: change = (price - reference) / reference x 100, the reference being the consensus
  `window_s` seconds earlier (after a gap in the prices, the oldest one since: alert_store.py). With
  `pct` > 0 it fires when change >= pct and re-arms when change < pct - band; with `pct` < 0, when
  change <= pct, re-arming when change > pct + band (the band in percentage points). Without a
  reference (no price in the window) nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal

import msgspec

from pricewire_common.errors import DecodeError
from pricewire_gateway.errors import BadParameter

AlertKind = Literal["above", "below", "change_pct"]
ALERT_KINDS: Final[tuple[AlertKind, ...]] = ("above", "below", "change_pct")
MAX_WINDOW_S: Final = 7 * 86_400
"""The longest change window: the PRICES stream's default retention, and far past any live use."""
_HUNDRED: Final = Decimal(100)


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """What an alert watches for on one asset's consensus price."""

    kind: AlertKind
    target_price: Decimal | None = None
    pct: Decimal | None = None
    window_s: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one price for one alert."""

    fire: bool
    armed: bool
    change_pct: Decimal | None = None


def decide(rule: Rule, *, armed: bool, price: Decimal, reference: Decimal | None, band_pct: Decimal) -> Decision:
    """Whether `price` fires the alert, and its armed state after it."""
    change: Decimal | None = None
    if rule.kind == "change_pct":
        if reference is None or reference <= 0 or rule.pct is None:
            return Decision(fire=False, armed=armed)
        change = (price - reference) / reference * _HUNDRED
        pct = rule.pct
        if pct > 0:
            met, back = change >= pct, change < pct - band_pct
        else:
            met, back = change <= pct, change > pct + band_pct
    else:
        target = rule.target_price
        if target is None:
            return Decision(fire=False, armed=armed)
        if rule.kind == "above":
            met, back = price >= target, price < target * (1 - band_pct / _HUNDRED)
        else:
            met, back = price <= target, price > target * (1 + band_pct / _HUNDRED)
    if armed and met:
        return Decision(fire=True, armed=False, change_pct=change)
    if not armed and back:
        return Decision(fire=False, armed=True, change_pct=change)
    return Decision(fire=False, armed=armed, change_pct=change)


def checked_rule(kind: str, *, target_price: Decimal | None, pct: Decimal | None, window_s: int | None) -> Rule:
    """The rule of a create request, or BadParameter naming what is wrong."""
    if kind in ("above", "below"):
        if target_price is None:
            raise BadParameter("target_price", f"alert_type {kind!r} needs target_price")
        if not target_price.is_finite() or target_price <= 0:
            raise BadParameter("target_price", "target_price must be a positive number")
        if pct is not None or window_s is not None:
            raise BadParameter("pct", f"alert_type {kind!r} takes target_price only, not pct or window_s")
        return Rule(kind="above" if kind == "above" else "below", target_price=target_price)
    if kind == "change_pct":
        if pct is None or window_s is None:
            raise BadParameter("pct", "alert_type 'change_pct' needs pct (signed %, e.g. 5 or -5) and window_s")
        if not pct.is_finite() or pct == 0 or abs(pct) > 1000:
            raise BadParameter("pct", "pct must be a non-zero number of % between -1000 and 1000")
        if not 1 <= window_s <= MAX_WINDOW_S:
            raise BadParameter("window_s", f"window_s must be between 1 and {MAX_WINDOW_S} seconds")
        if target_price is not None:
            raise BadParameter("target_price", "alert_type 'change_pct' takes pct and window_s, not target_price")
        return Rule(kind="change_pct", pct=pct, window_s=window_s)
    raise BadParameter("alert_type", f"alert_type must be one of {', '.join(ALERT_KINDS)}, not {kind!r}")


# --- the firing, as delivered (NATS `md.alert.<user>`, WebSocket, webhook) and kept in the history ---

ALERT_FIRED_VERSION: Final = 1


class AlertFired(msgspec.Struct, frozen=True, kw_only=True):
    """One firing of one alert; `id` is unique and stable, so a redelivered copy can be told apart."""

    v: int = ALERT_FIRED_VERSION
    id: int
    alert_id: int
    user: str
    symbol: str
    alert_type: AlertKind
    target_price: Decimal | None = None
    pct: Decimal | None = None
    window_s: int | None = None
    note: str | None = None
    price: Decimal
    reference_price: Decimal | None = None
    """`change_pct` alerts: the consensus `window_s` before `price_timestamp`."""
    change_pct: Decimal | None = None
    price_seq: int
    """The consensus event's per-asset `seq`."""
    price_timestamp: str
    fired_at: str


_FIRED_ENCODER: Final = msgspec.json.Encoder()
_FIRED_DECODER: Final = msgspec.json.Decoder(AlertFired)


def encode_fired(fired: AlertFired) -> bytes:
    """The NATS payload of a firing (Decimals as strings, as every bus event)."""
    return _FIRED_ENCODER.encode(fired)


def decode_fired(payload: bytes) -> AlertFired:
    """Decode a firing; DecodeError if it is not one."""
    try:
        return _FIRED_DECODER.decode(payload)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"alert fired: {exc}") from exc
