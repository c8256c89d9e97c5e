"""The figures of Binance frames, checked: prices and volumes as exact Decimals within the contract's
bounds, times in ms since the epoch, symbols split by their known quote assets. Pure helpers of
`binance_parse`; each raises `VenueFrameError` with the reason a bad figure gets."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from pricewire_collector.sources.base import VenueFrameError
from pricewire_common.rules import MAX_PLACES, MAX_PRICE, MAX_TS_NS, MAX_VOLUME, MIN_PRICE

__all__ = [
    "KNOWN_QUOTES",
    "NS_PER_MS",
    "check_places",
    "plain",
    "price",
    "required",
    "split_symbol",
    "ts_ns",
    "volume",
]

KNOWN_QUOTES = (
    "FDUSD", "USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "USD",
    "EUR", "GBP", "TRY", "BRL", "JPY", "AUD",
    "BTC", "ETH", "BNB",
)  # fmt: skip
"""Quote assets a Binance symbol may end with, tried longest first."""

_QUOTES_LONGEST_FIRST = tuple(sorted(KNOWN_QUOTES, key=len, reverse=True))
NS_PER_MS = 1_000_000
_SHORT = 19
"""A plain decimal string this short has at most 18 places, so only longer ones need counting."""


def split_symbol(venue_symbol: str) -> tuple[str, str] | None:
    """`BTCUSDT` -> (`BTC`, `USDT`) by the known quote assets; None when no known quote ends it."""
    upper = venue_symbol.upper()
    for quote in _QUOTES_LONGEST_FIRST:
        if upper.endswith(quote) and len(upper) > len(quote):
            base = upper[: -len(quote)]
            if base.isascii() and base.isalnum():
                return base, quote
    return None


def price(text: str, what: str) -> Decimal:
    """The venue's decimal string as an exact Decimal within the contract's bounds, else invalid_price."""
    try:
        value = Decimal(text)
        ok = MIN_PRICE <= value < MAX_PRICE  # raises InvalidOperation for NaN
    except InvalidOperation:
        ok = False
    if not ok:
        detail = f"{what} is not a price in [{MIN_PRICE}, {MAX_PRICE}): {text[:40]!r}"
        raise VenueFrameError(detail, reason="invalid_price")
    if len(text) >= _SHORT or "e" in text or "E" in text:
        check_places(value, text, what, "invalid_price")
    return value


def volume(text: str) -> Decimal:
    try:
        value = Decimal(text)
        ok = 0 <= value < MAX_VOLUME
    except InvalidOperation:
        ok = False
    if not ok:
        raise VenueFrameError(f"volume is not in [0, {MAX_VOLUME}): {text[:40]!r}", reason="invalid_volume")
    if len(text) >= _SHORT or "e" in text or "E" in text:
        check_places(value, text, "volume", "invalid_volume")
    return value


def plain(text: str) -> Decimal | None:
    """A short plain price string within bounds as a Decimal; None for anything else."""
    if len(text) >= _SHORT - 1 or "e" in text or "E" in text:
        return None
    try:
        value = Decimal(text)
        return value if MIN_PRICE <= value < MAX_PRICE else None  # NaN raises
    except InvalidOperation:
        return None


def check_places(value: Decimal, text: str, what: str, reason: str) -> None:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -MAX_PLACES:
        raise VenueFrameError(f"{what} has more than {MAX_PLACES} decimals: {text[:40]!r}", reason=reason)


def ts_ns(ms: int, what: str) -> int:
    ns = ms * NS_PER_MS
    if not 0 < ns < MAX_TS_NS:
        raise VenueFrameError(f"{what} is not a time in ms since the epoch: {ms}", reason="malformed_frame")
    return ns


def required(value: str | None, what: str) -> str:
    if value is None:
        raise VenueFrameError(f"missing field {what}", reason="missing_field")
    return value
