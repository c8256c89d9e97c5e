"""Binance spot frames to ticks: pure, no I/O.

What it reads (Binance spot API docs):
- combined-stream frames `{"stream": "<symbol>@<name>", "data": {...}}` of the `<symbol>@ticker` stream
  (event `24hrTicker`: `E` event time ms, `s`, `c` last price, `o` open price, `v` base volume,
  `b`/`a` best bid/ask) and the `<symbol>@bookTicker` stream (`u` order book update id, `s`,
  `b`/`B` best bid price/qty, `a`/`A` best ask price/qty; no event time on spot);
- one row of the REST `GET /api/v3/ticker/24hr` answer (`symbol`, `lastPrice`, `bidPrice`,
  `askPrice`, `openPrice`, `volume`, `closeTime`), which the REST fallback hands over row by row;
- one row of the REST `GET /api/v3/ticker/price` answer (`symbol`, `price`: no time, no book), handed
  over the same way: a price-only tick stamped with its receipt (id `binance:<SYMBOL>:p<received ms>`);
- control frames: subscription results `{"result": null, "id": 1}` (no ticks) and error frames
  `{"code": 2, "msg": "...", "id": 1}` or `{"error": {"code": .., "msg": ..}, "id": ..}` (reason `venue_error`).

Fast by design (bench/parse.py holds it against cryptofeed's handler on bookTicker frames): one msgspec
decode into a small Struct built once, the stream's route from a dict, and each (bid, ask) pair of price
strings checked and turned into exact Decimals (with their mid) once, then looked up: quotes repeat.
Ticker frames and anything unusual take a second, fully checked path.

Order, per stream (or REST symbol): a parser remembers the last `u` of each bookTicker stream, the last
`E` of each ticker stream and the last `closeTime` of each REST row. An older one is `out_of_order`
(a late update, say from a connection being handed over); an equal one passes, since its tick id is
the same and the bus stores it once. A replay or a bench pass therefore needs a fresh parser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal

import msgspec

from pricewire_collector.sources.base import VenueFrameError
from pricewire_collector.sources.binance_fields import (
    KNOWN_QUOTES,
    NS_PER_MS,
    check_places,
    plain,
    price,
    required,
    split_symbol,
    ts_ns,
    volume,
)
from pricewire_common.events import Tick

__all__ = ["KNOWN_QUOTES", "NAME", "BinanceParser", "split_symbol"]

NAME = "binance"

_EXACT = Context(prec=60)  # (bid + ask) / 2 of two 30-digit prices stays exact
_TWO = Decimal(2)
_QUOTE_CACHE = 65_536
_MAX_UPDATE_ID = 2**63 - 1
"""Binance's update ids are int64: a larger `u` is corrupt, and remembered as the last it would hold back every
later frame of its stream as `out_of_order` (and its tick id would break the 128-character bound)."""
"""(bid, ask) string pairs (and their strings) remembered, then forgotten all at once: a few MB at most."""


class _Data(msgspec.Struct, gc=False):
    """`data` of a stream frame, as far as the fast path reads it: a `@bookTicker` (or the start of a `@ticker`)."""

    s: str
    b: str
    a: str
    update_id: int | None = msgspec.field(name="u", default=None)
    event_time: int | None = msgspec.field(name="E", default=None)


class _Stream(msgspec.Struct, gc=False):
    """A combined-stream frame as the fast path decodes it."""

    stream: str | None = None
    data: _Data | None = None


class _TickerData(msgspec.Struct, gc=False):
    """`data` of a `@ticker` frame (event `24hrTicker`): what a tick takes from it."""

    s: str
    b: str
    a: str
    c: str
    o: str
    v: str
    event_time: int = msgspec.field(name="E")


class _TickerFrame(msgspec.Struct, gc=False):
    data: _TickerData


class _Error(msgspec.Struct, gc=False):
    code: int | None = None
    msg: str | None = None


class _Other(msgspec.Struct, gc=False):
    """Every other top-level shape: a control frame, an error, a REST ticker row."""

    stream: str | None = None
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
    price: str | None = None


_STREAM = msgspec.json.Decoder(_Stream)
_TICKER = msgspec.json.Decoder(_TickerFrame)
_OTHER = msgspec.json.Decoder(_Other)


@dataclass(slots=True)
class _Route:
    """What one stream (or REST symbol) becomes: the venue symbol, canonical names, the tick id prefix;
    and `last`, the sequence (`u`, `E` or `closeTime`) of its latest tick, which the next may not go below."""

    venue_symbol: str
    book: bool
    symbol: str
    base: str
    quote: str
    prefix: str
    last: int = 0


def _in_order(route: _Route, sequence: int, what: str) -> None:
    if sequence < route.last:
        detail = f"{route.symbol} {what} {sequence} arrived after {route.last}"
        raise VenueFrameError(detail, reason="out_of_order")


def _decode_error(exc: msgspec.DecodeError | RecursionError) -> VenueFrameError:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        reason = "missing_field" if text.startswith("Object missing required field") else "malformed_frame"
        return VenueFrameError(f"binance frame: {text}", reason=reason)
    return VenueFrameError(f"binance frame is not JSON: {text}", reason="malformed_frame")


class BinanceParser:
    """Parses Binance spot frames of the configured assets into ticks."""

    def __init__(self, assets: Iterable[str]) -> None:
        self._assets = frozenset(a.upper() for a in assets)
        self._streams: dict[str | None, _Route] = {}
        self._books: dict[str | None, _Route] = {}
        self._rest: dict[str, _Route] = {}
        self._price_rows: dict[str, _Route] = {}
        self._quotes: dict[str, dict[str, tuple[Decimal, Decimal, Decimal]]] = {}
        self._prices: dict[str, Decimal] = {}

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        """The ticks of one frame (none for a control frame); raises VenueFrameError."""
        try:
            decoded = _STREAM.decode(frame)
        # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _decode_error(exc) from None
        data = decoded.data
        if data is None:
            return self._other(frame, received_ns)
        # The hot path: a bookTicker of a known stream whose (bid, ask) strings were seen before. Quotes
        # repeat, so each pair is checked and converted once, with its mid, then looked up. Only short
        # plain strings are kept (their mid is exact in the default 28-digit context); anything else,
        # and every 24hrTicker, takes the spelled-out path.
        route = self._books.get(decoded.stream)
        update_id = data.update_id
        if (
            route is None
            or update_id is None
            or not route.last <= update_id <= _MAX_UPDATE_ID
            or route.venue_symbol != data.s
        ):
            return [self._slow(decoded.stream, frame, data, received_ns)]
        b, a = data.b, data.a
        by_ask = self._quotes.get(b)
        quote = None if by_ask is None else by_ask.get(a)
        if quote is None:
            quote = self._quote(b, a)
            if quote is None:
                return [self._slow(decoded.stream, frame, data, received_ns)]
        bid, ask, mid = quote
        event_time = data.event_time
        tick = Tick(
            id=f"{route.prefix}{update_id}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=mid,
            bid=bid,
            ask=ask,
            ts_exchange=received_ns if event_time is None else ts_ns(event_time, "E"),
            ts_received=received_ns,
        )
        route.last = update_id
        return [tick]

    def _quote(self, b: str, a: str) -> tuple[Decimal, Decimal, Decimal] | None:
        """(bid, ask, mid) of two short plain price strings within bounds, remembered; None for anything else."""
        prices = self._prices
        bid = prices.get(b) or plain(b)
        ask = prices.get(a) or plain(a)
        if bid is None or ask is None:
            return None
        if len(prices) >= _QUOTE_CACHE:
            prices.clear()
            self._quotes.clear()
        prices[b], prices[a] = bid, ask
        quote = (bid, ask, (bid + ask) / _TWO)  # exact: two strings this short sum to under 20 digits
        self._quotes.setdefault(b, {})[a] = quote
        return quote

    def _slow(self, stream: str | None, frame: bytes, data: _Data, received_ns: int) -> Tick:
        """A stream frame off the hot path: every figure checked."""
        route = self._streams.get(stream)
        if route is None or route.venue_symbol != data.s:
            route = self._stream_route(stream, data.s)
        if route.book:
            return self._book_checked(route, data, received_ns)
        return self._ticker(route, frame, received_ns)

    def _stream_route(self, stream: str | None, venue_symbol: str) -> _Route:
        if stream is None:
            raise VenueFrameError("stream frame without its stream name", reason="missing_field")
        name, _, kind = stream.partition("@")
        if kind not in ("bookTicker", "ticker"):
            raise VenueFrameError(f"not a subscribed stream: {stream[:60]!r}", reason="malformed_frame")
        if name.upper() != venue_symbol or name != name.lower():
            raise VenueFrameError(f"stream {stream[:60]!r} carries {venue_symbol[:40]!r}", reason="malformed_frame")
        base, quote = self._pair(venue_symbol)
        tag = "b" if kind == "bookTicker" else "t"
        route = _Route(venue_symbol, tag == "b", f"{base}-{quote}", base, quote, f"{NAME}:{base}-{quote}:{tag}")
        self._streams[stream] = route
        if route.book:
            self._books[stream] = route
        return route

    def _pair(self, venue_symbol: str) -> tuple[str, str]:
        pair = split_symbol(venue_symbol)
        if pair is None or pair[0] not in self._assets or venue_symbol != venue_symbol.upper():
            raise VenueFrameError(f"symbol {venue_symbol[:40]!r} is not a configured pair", reason="unknown_symbol")
        return pair

    def _other(self, frame: bytes, received_ns: int) -> list[Tick]:
        """A frame without stream data: a control frame, an error, or a REST ticker row."""
        try:
            decoded = _OTHER.decode(frame)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _decode_error(exc) from None
        if decoded.stream is not None:
            raise VenueFrameError("stream frame without data", reason="missing_field")
        if decoded.symbol is not None:
            if decoded.price is not None:
                return [self._price_row(decoded.symbol, decoded.price, received_ns)]
            return [self._rest_row(decoded, received_ns)]
        error = decoded.error
        if decoded.code is not None or error is not None:
            code = decoded.code if error is None else error.code
            msg = decoded.msg if error is None else error.msg
            raise VenueFrameError(f"binance error {code}: {msg}", reason="venue_error")
        if decoded.id is not None:
            return []  # the answer to a SUBSCRIBE / LIST_SUBSCRIPTIONS request
        raise VenueFrameError("not a Binance stream, control or ticker frame", reason="malformed_frame")

    @staticmethod
    def _book_checked(route: _Route, data: _Data, received_ns: int) -> Tick:
        """The bookTicker path with every check spelled out (long, odd, bad or late figures)."""
        update_id = data.update_id
        if update_id is None:
            raise VenueFrameError("bookTicker without its update id u", reason="missing_field")
        if not 0 <= update_id <= _MAX_UPDATE_ID:
            raise VenueFrameError(f"bookTicker update id u is not an int64 >= 0: {update_id}", reason="malformed_frame")
        bid = price(data.b, "bid")
        ask = price(data.a, "ask")
        mid = _EXACT.divide(_EXACT.add(bid, ask), _TWO)
        check_places(mid, str(mid), "mid price", "invalid_price")
        event_time = data.event_time
        ts_exchange = received_ns if event_time is None else ts_ns(event_time, "E")
        _in_order(route, update_id, "update id")
        route.last = update_id
        return Tick(
            id=f"{route.prefix}{update_id}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=mid,
            bid=bid,
            ask=ask,
            ts_exchange=ts_exchange,
            ts_received=received_ns,
        )

    @staticmethod
    def _ticker(route: _Route, frame: bytes, received_ns: int) -> Tick:
        try:
            data = _TICKER.decode(frame).data  # a second, complete decode: ticker frames are the rare ones
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _decode_error(exc) from None
        tick = Tick(
            id=f"{route.prefix}{data.event_time}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=price(data.c, "last price"),
            bid=price(data.b, "bid"),
            ask=price(data.a, "ask"),
            volume_24h=volume(data.v),
            open_24h=price(data.o, "open price"),
            ts_exchange=ts_ns(data.event_time, "E"),
            ts_received=received_ns,
        )
        _in_order(route, data.event_time, "event time E")
        route.last = data.event_time
        return tick

    def _rest_row(self, row: _Other, received_ns: int) -> Tick:
        symbol = row.symbol or ""
        route = self._rest.get(symbol)
        if route is None:
            base, quote = self._pair(symbol)
            prefix = f"{NAME}:{base}-{quote}:r"
            route = self._rest[symbol] = _Route(symbol, False, f"{base}-{quote}", base, quote, prefix)
        close_time = row.closeTime
        if close_time is None:
            raise VenueFrameError("ticker row without closeTime", reason="missing_field")
        tick = Tick(
            id=f"{route.prefix}{close_time}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=price(required(row.lastPrice, "lastPrice"), "last price"),
            bid=price(required(row.bidPrice, "bidPrice"), "bid"),
            ask=price(required(row.askPrice, "askPrice"), "ask"),
            volume_24h=volume(required(row.volume, "volume")),
            open_24h=price(required(row.openPrice, "openPrice"), "open price"),
            ts_exchange=ts_ns(close_time, "closeTime"),
            ts_received=received_ns,
        )
        _in_order(route, close_time, "closeTime")
        route.last = close_time
        return tick

    def _price_row(self, symbol: str, text: str, received_ns: int) -> Tick:
        """A `ticker/price` row: the last price alone, at the time it was received (the venue gives none)."""
        route = self._price_rows.get(symbol)
        if route is None:
            base, quote = self._pair(symbol)
            prefix = f"{NAME}:{base}-{quote}:p"
            route = self._price_rows[symbol] = _Route(symbol, False, f"{base}-{quote}", base, quote, prefix)
        return Tick(
            id=f"{route.prefix}{received_ns // NS_PER_MS}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=price(text, "price"),
            ts_exchange=ts_ns(received_ns // NS_PER_MS, "received time"),
            ts_received=received_ns,
        )
