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

Fast by design (bench/parse.py holds it against cryptofeed's handler on bookTicker frames): one msgspec
decode into a small Struct built once, the stream's route from a dict, and each (bid, ask) pair of price
strings checked and turned into exact Decimals (with their mid) once, then looked up: quotes repeat.
Ticker frames and anything unusual take a second, fully checked path. The ordering of updates is not
the parser's business (a replayed or re-fetched frame gives the same tick); `sequence_of` helps a source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation

import msgspec

from pricewire_collector.sources.base import VenueFrameError
from pricewire_common.events import Tick
from pricewire_common.rules import MAX_PLACES, MAX_PRICE, MAX_TS_NS, MAX_VOLUME, MIN_PRICE

__all__ = ["KNOWN_QUOTES", "NAME", "BinanceParser", "sequence_of", "split_symbol"]

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
_QUOTE_CACHE = 65_536
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


_STREAM = msgspec.json.Decoder(_Stream)
_TICKER = msgspec.json.Decoder(_TickerFrame)
_OTHER = msgspec.json.Decoder(_Other)


@dataclass(frozen=True, slots=True)
class _Route:
    """What one stream (or REST symbol) becomes: the venue symbol, canonical names, the tick id prefix."""

    venue_symbol: str
    book: bool
    symbol: str
    base: str
    quote: str
    prefix: str


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


def _plain(text: str) -> Decimal | None:
    """A short plain price string within bounds as a Decimal; None for anything else."""
    if len(text) >= _SHORT - 1 or "e" in text or "E" in text:
        return None
    try:
        value = Decimal(text)
        return value if MIN_PRICE <= value < MAX_PRICE else None  # NaN raises
    except InvalidOperation:
        return None


def _check_places(value: Decimal, text: str, what: str, reason: str) -> None:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -MAX_PLACES:
        raise VenueFrameError(f"{what} has more than {MAX_PLACES} decimals: {text[:40]!r}", reason=reason)


def _ts_ns(ms: int, what: str) -> int:
    ns = ms * _NS_PER_MS
    if not 0 < ns < MAX_TS_NS:
        raise VenueFrameError(f"{what} is not a time in ms since the epoch: {ms}", reason="malformed_frame")
    return ns


def _required(value: str | None, what: str) -> str:
    if value is None:
        raise VenueFrameError(f"missing field {what}", reason="missing_field")
    return value


def _decode_error(exc: msgspec.DecodeError) -> VenueFrameError:
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
        self._quotes: dict[str, dict[str, tuple[Decimal, Decimal, Decimal]]] = {}
        self._prices: dict[str, Decimal] = {}

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        """The ticks of one frame (none for a control frame); raises VenueFrameError."""
        try:
            decoded = _STREAM.decode(frame)
        except msgspec.DecodeError as exc:
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
        if route is None or update_id is None or route.venue_symbol != data.s:
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
        return [
            Tick(
                id=f"{route.prefix}{update_id}",
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
        ]

    def _quote(self, b: str, a: str) -> tuple[Decimal, Decimal, Decimal] | None:
        """(bid, ask, mid) of two short plain price strings within bounds, remembered; None for anything else."""
        prices = self._prices
        bid = prices.get(b) or _plain(b)
        ask = prices.get(a) or _plain(a)
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
        except msgspec.DecodeError as exc:
            raise _decode_error(exc) from None
        if decoded.stream is not None:
            raise VenueFrameError("stream frame without data", reason="missing_field")
        if decoded.symbol is not None:
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
        """The bookTicker path with every check spelled out (long, odd or bad figures)."""
        update_id = data.update_id
        if update_id is None:
            raise VenueFrameError("bookTicker without its update id u", reason="missing_field")
        bid = _price(data.b, "bid")
        ask = _price(data.a, "ask")
        mid = _EXACT.divide(_EXACT.add(bid, ask), _TWO)
        _check_places(mid, str(mid), "mid price", "invalid_price")
        event_time = data.event_time
        return Tick(
            id=f"{route.prefix}{update_id}",
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

    @staticmethod
    def _ticker(route: _Route, frame: bytes, received_ns: int) -> Tick:
        try:
            data = _TICKER.decode(frame).data  # a second, complete decode: ticker frames are the rare ones
        except msgspec.DecodeError as exc:
            raise _decode_error(exc) from None
        return Tick(
            id=f"{route.prefix}{data.event_time}",
            source=NAME,
            symbol=route.symbol,
            base=route.base,
            quote=route.quote,
            price=_price(data.c, "last price"),
            bid=_price(data.b, "bid"),
            ask=_price(data.a, "ask"),
            volume_24h=_volume(data.v),
            open_24h=_price(data.o, "open price"),
            ts_exchange=_ts_ns(data.event_time, "E"),
            ts_received=received_ns,
        )

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
        return Tick(
            id=f"{route.prefix}{close_time}",
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


def sequence_of(tick: Tick) -> tuple[str, int]:
    """(ordering key, sequence number) of a Binance tick, from its id: `binance:BTC-USDT:b123` -> (`...:b`, 123)."""
    head, _, tail = tick.id.rpartition(":")
    return f"{head}:{tail[:1]}", int(tail[1:])
