"""Binance spot frames to ticks: pure, no I/O.

What it reads (Binance spot API docs):
- combined-stream frames `{"stream": "<symbol>@<name>", "data": {...}}` of the `<symbol>@ticker` stream
  (event `24hrTicker`: `E` event time ms, `s`, `c` last price, `o` open price, `v` base volume,
  `b`/`a` best bid/ask) and the `<symbol>@bookTicker` stream (`u` order book update id, `s`,
  `b`/`B` best bid price/qty, `a`/`A` best ask price/qty; no event time on spot);
- one row of the REST `GET /api/v3/ticker/24hr` answer (`symbol`, `lastPrice`, `bidPrice`,
  `askPrice`, `openPrice`, `volume`, `closeTime`), which the REST fallback hands over row by row;
- control frames: subscription results `{"result": null, "id": 1}` (no ticks) and error frames
  `{"code": 2, "msg": "...", "id": 1}` or `{"error": {"code": .., "msg": ..}, "id": ..}` (reason `venue_error`).

Fast by design (a benchmark holds it against cryptofeed's handler): one msgspec decode into a Struct
built once, a dict lookup for the symbol, Decimal straight from the venue's strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation

import msgspec

from pricewire_collector.sources.base import VenueFrameError
from pricewire_common.events import Tick
from pricewire_common.rules import MAX_PLACES, MAX_PRICE, MAX_TS_NS, MAX_VOLUME, MIN_PRICE

__all__ = ["KNOWN_QUOTES", "NAME", "BinanceParser", "Sequenced", "split_symbol"]

NAME = "binance"

KNOWN_QUOTES = (
    "FDUSD", "USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "USD",
    "EUR", "GBP", "TRY", "BRL", "JPY", "AUD",
    "BTC", "ETH", "BNB",
)  # fmt: skip
"""Quote assets a Binance symbol may end with, tried longest first."""

_QUOTES_LONGEST_FIRST = tuple(sorted(KNOWN_QUOTES, key=len, reverse=True))
_NS_PER_MS = 1_000_000
_EXACT = Context(prec=60)  # (bid + ask) / 2 of two 30-digit prices stays exact
_TWO = Decimal(2)
_SHORT = 19
"""A plain decimal string this short has at most 18 places, so only longer ones need counting."""


class _Data(msgspec.Struct):
    """`data` of a `@ticker` or `@bookTicker` frame: the fields either stream may carry."""

    s: str
    b: str
    a: str
    event_time: int | None = msgspec.field(name="E", default=None)
    update_id: int | None = msgspec.field(name="u", default=None)
    c: str | None = None
    o: str | None = None
    v: str | None = None


class _Error(msgspec.Struct):
    code: int | None = None
    msg: str | None = None


class _Frame(msgspec.Struct):
    """Every top-level shape at once: a stream frame, a control frame, an error, a REST ticker row."""

    stream: str | None = None
    data: _Data | None = None
    id: int | str | None = None
    code: int | None = None
    msg: str | None = None
    error: _Error | None = None
    symbol: str | None = None
    lastPrice: str | None = None  # the venue's field names
    bidPrice: str | None = None
    askPrice: str | None = None
    openPrice: str | None = None
    volume: str | None = None
    closeTime: int | None = None


_DECODER = msgspec.json.Decoder(_Frame)


@dataclass(frozen=True, slots=True)
class _Route:
    """What a venue symbol becomes: canonical names and the id prefixes of its three tick kinds."""

    symbol: str
    base: str
    quote: str
    ticker_prefix: str
    book_prefix: str
    rest_prefix: str


Sequenced = tuple[str, int, Tick]
"""(ordering key, sequence number, tick): the key names one symbol's stream, the number grows along it."""


def split_symbol(venue_symbol: str) -> tuple[str, str] | None:
    """`BTCUSDT` -> (`BTC`, `USDT`) by the known quote assets; None when no known quote ends it."""
    upper = venue_symbol.upper()
    for quote in _QUOTES_LONGEST_FIRST:
        if upper.endswith(quote) and len(upper) > len(quote):
            base = upper[: -len(quote)]
            if base.isascii() and base.isalnum():
                return base, quote
    return None


def _price(text: str, what: str) -> Decimal:
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
        _check_places(value, text, what, "invalid_price")
    return value


def _volume(text: str) -> Decimal:
    try:
        value = Decimal(text)
        ok = 0 <= value < MAX_VOLUME
    except InvalidOperation:
        ok = False
    if not ok:
        raise VenueFrameError(f"volume is not in [0, {MAX_VOLUME}): {text[:40]!r}", reason="invalid_volume")
    if len(text) >= _SHORT or "e" in text or "E" in text:
        _check_places(value, text, "volume", "invalid_volume")
    return value


def _check_places(value: Decimal, text: str, what: str, reason: str) -> None:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -MAX_PLACES:
        raise VenueFrameError(f"{what} has more than {MAX_PLACES} decimals: {text[:40]!r}", reason=reason)


def _may_be_long(text: str) -> bool:
    """Could this string hold 18 decimal places (so its half may hold 19)?"""
    return len(text) >= _SHORT - 1 or "e" in text or "E" in text


def _ts_ns(ms: int, what: str) -> int:
    ns = ms * _NS_PER_MS
    if not 0 < ns < MAX_TS_NS:
        raise VenueFrameError(f"{what} is not a time in ms since the epoch: {ms}", reason="malformed_frame")
    return ns


def _required(value: str | None, what: str) -> str:
    if value is None:
        raise VenueFrameError(f"missing field {what}", reason="missing_field")
    return value


class BinanceParser:
    """Parses Binance spot frames of the configured assets into ticks."""

    def __init__(self, assets: Iterable[str]) -> None:
        self._assets = frozenset(a.upper() for a in assets)
        self._routes: dict[str, _Route] = {}

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        """The ticks of one frame (none for a control frame); raises VenueFrameError."""
        item = self.parse_sequenced(frame, received_ns)
        return [] if item is None else [item[2]]

    def parse_sequenced(self, frame: bytes, received_ns: int) -> Sequenced | None:
        """The frame's tick with its ordering key and sequence number, or None for a control frame."""
        try:
            decoded = _DECODER.decode(frame)
        except msgspec.ValidationError as exc:
            text = str(exc)
            reason = "missing_field" if text.startswith("Object missing required field") else "malformed_frame"
            raise VenueFrameError(f"binance frame: {text}", reason=reason) from None
        except msgspec.DecodeError as exc:
            raise VenueFrameError(f"binance frame is not JSON: {exc}", reason="malformed_frame") from None
        data = decoded.data
        if data is not None:
            stream = decoded.stream
            if stream is None:
                raise VenueFrameError("stream frame without its stream name", reason="missing_field")
            route = self._routes.get(data.s) or self._route(data.s)
            if stream.endswith("@bookTicker"):
                return self._book(route, data, received_ns)
            if stream.endswith("@ticker"):
                return self._ticker(route, data, received_ns)
            raise VenueFrameError(f"not a subscribed stream: {stream[:60]!r}", reason="malformed_frame")
        if decoded.stream is not None:
            raise VenueFrameError("stream frame without data", reason="missing_field")
        if decoded.symbol is not None:
            return self._rest_row(decoded, received_ns)
        error = decoded.error
        if decoded.code is not None or error is not None:
            code = decoded.code if error is None else error.code
            msg = decoded.msg if error is None else error.msg
            raise VenueFrameError(f"binance error {code}: {msg}", reason="venue_error")
        if decoded.id is not None:
            return None  # the answer to a SUBSCRIBE / LIST_SUBSCRIPTIONS request
        raise VenueFrameError("not a Binance stream, control or ticker frame", reason="malformed_frame")

    def _route(self, venue_symbol: str) -> _Route:
        pair = split_symbol(venue_symbol)
        if pair is None or pair[0] not in self._assets or venue_symbol != venue_symbol.upper():
            raise VenueFrameError(f"symbol {venue_symbol[:40]!r} is not a configured pair", reason="unknown_symbol")
        base, quote = pair
        symbol = f"{base}-{quote}"
        route = _Route(symbol, base, quote, f"{NAME}:{symbol}:t", f"{NAME}:{symbol}:b", f"{NAME}:{symbol}:r")
        self._routes[venue_symbol] = route
        return route

    @staticmethod
    def _book(route: _Route, data: _Data, received_ns: int) -> Sequenced:
        update_id = data.update_id
        if update_id is None:
            raise VenueFrameError("bookTicker without its update id u", reason="missing_field")
        bid = _price(data.b, "bid")
        ask = _price(data.a, "ask")
        mid = _EXACT.divide(_EXACT.add(bid, ask), _TWO)
        if _may_be_long(data.b) or _may_be_long(data.a):  # halving adds a decimal place
            _check_places(mid, str(mid), "mid price", "invalid_price")
        event_time = data.event_time
        key = route.book_prefix
        tick = Tick(
            id=f"{key}{update_id}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=mid,
            bid=bid,
            ask=ask,
            ts_exchange=received_ns if event_time is None else _ts_ns(event_time, "E"),
            ts_received=received_ns,
        )
        return key, update_id, tick

    @staticmethod
    def _ticker(route: _Route, data: _Data, received_ns: int) -> Sequenced:
        event_time = data.event_time
        if event_time is None:
            raise VenueFrameError("24hrTicker without its event time E", reason="missing_field")
        key = route.ticker_prefix
        tick = Tick(
            id=f"{key}{event_time}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=_price(_required(data.c, "c"), "last price"),
            bid=_price(data.b, "bid"),
            ask=_price(data.a, "ask"),
            volume_24h=_volume(_required(data.v, "v")),
            open_24h=_price(_required(data.o, "o"), "open price"),
            ts_exchange=_ts_ns(event_time, "E"),
            ts_received=received_ns,
        )
        return key, event_time, tick

    def _rest_row(self, row: _Frame, received_ns: int) -> Sequenced:
        symbol = row.symbol or ""
        route = self._routes.get(symbol) or self._route(symbol)
        close_time = row.closeTime
        if close_time is None:
            raise VenueFrameError("ticker row without closeTime", reason="missing_field")
        key = route.rest_prefix
        tick = Tick(
            id=f"{key}{close_time}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=_price(_required(row.lastPrice, "lastPrice"), "last price"),
            bid=_price(_required(row.bidPrice, "bidPrice"), "bid"),
            ask=_price(_required(row.askPrice, "askPrice"), "ask"),
            volume_24h=_volume(_required(row.volume, "volume")),
            open_24h=_price(_required(row.openPrice, "openPrice"), "open price"),
            ts_exchange=_ts_ns(close_time, "closeTime"),
            ts_received=received_ns,
        )
        return key, close_time, tick
