"""Coinbase Exchange WebSocket feed: the `ticker` and `heartbeat` channels.

After connecting we send `{"type": "subscribe", "product_ids": [...], "channels": ["ticker", "heartbeat"]}`
for `<ASSET>-USD` of every configured asset. The feed answers with a `subscriptions` frame, then sends a
`ticker` frame per match (price, 24h open and volume, best bid/ask, `sequence`, ISO 8601 `time`) and a
`heartbeat` frame per product every second, which keeps the watchdog quiet on a slow market.

A ticker whose `sequence` is not above the last one seen for its product is out of order (or a
duplicate) and is rejected; Coinbase's sequences run on across connections, so the parser keeps them
for the source's whole life.

REST fallback (`ws_fallback`): while the circuit breaker is open, every ~2 s the source asks
`GET {coinbase_rest_url}/products/<ASSET>-USD/ticker` for each product (answer: `ask`, `bid`, `volume`,
`price`, `size`, `time` as strings, `trade_id` a number), within the public limit of 10 requests a second.
`CoinbaseRestParser` makes one tick per answer: 24h volume from `volume`, no 24h open (the endpoint has
none), id `coinbase:<SYMBOL>:r<trade_id>` (the `r` keeps it apart from the feed's sequence ids; a poll
that sees the same last trade again gives the same id, so it is stored once).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

from pricewire_collector.sources.base import Parser, Source, VenueFrameError, checked, venue_time
from pricewire_collector.sources.resilience import TokenBucket
from pricewire_collector.sources.ws_fallback import Endpoint, RestFallback
from pricewire_collector.sources.wsconnection import WebSocketSource
from pricewire_common.config import Settings
from pricewire_common.events import Tick

__all__ = [
    "NAME",
    "CoinbaseParser",
    "CoinbaseRestParser",
    "build",
    "build_fallback",
    "build_parser",
    "product_ids",
    "subscribe_message",
]

NAME = "coinbase"
QUOTE = "USD"
CHANNELS = ("ticker", "heartbeat")
REST_TICKER = "/products/{product_id}/ticker"
REST_REQUESTS_PER_S = 10
"""Coinbase Exchange's public REST limit: about 10 requests a second per IP."""


class _Ticker(msgspec.Struct, tag_field="type", tag="ticker"):
    sequence: int
    product_id: str
    price: Decimal
    time: str
    open_24h: Decimal | None = None
    volume_24h: Decimal | None = None
    best_bid: Decimal | None = None
    best_ask: Decimal | None = None
    trade_id: int | None = None


class _Heartbeat(msgspec.Struct, tag_field="type", tag="heartbeat"):
    pass


class _Subscriptions(msgspec.Struct, tag_field="type", tag="subscriptions"):
    pass


class _Error(msgspec.Struct, tag_field="type", tag="error"):
    message: str = ""
    reason: str = ""


class _Envelope(msgspec.Struct):
    type: str


_Frame = _Ticker | _Heartbeat | _Subscriptions | _Error
_DECODER: msgspec.json.Decoder[_Frame] = msgspec.json.Decoder(_Frame)
_ENVELOPE = msgspec.json.Decoder(_Envelope)
_KNOWN_TYPES = frozenset({"ticker", "heartbeat", "subscriptions", "error"})


class _Subscribe(msgspec.Struct, kw_only=True):
    type: Literal["subscribe"] = "subscribe"
    product_ids: list[str]
    channels: list[str]


def product_ids(settings: Settings) -> list[str]:
    """The Coinbase products of the configured assets: `<ASSET>-USD`."""
    return [f"{asset}-{QUOTE}" for asset in settings.assets]


def subscribe_message(settings: Settings) -> str:
    """The subscribe frame sent after connecting."""
    message = _Subscribe(product_ids=product_ids(settings), channels=list(CHANNELS))
    return msgspec.json.encode(message).decode()


def _decode(frame: bytes) -> _Frame | None:
    """The frame as one of the documented shapes; None for a type this parser does not use."""
    try:
        return _DECODER.decode(frame)
    except msgspec.ValidationError as exc:
        try:
            envelope = _ENVELOPE.decode(frame)
        # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
        except (msgspec.DecodeError, RecursionError):
            raise VenueFrameError(f"not a Coinbase message: {exc}") from exc
        if envelope.type not in _KNOWN_TYPES:
            return None  # "New message types can be added at any time": the feed's own rule is to ignore them
        reason = "missing_field" if "missing required field" in str(exc) else "malformed_frame"
        raise VenueFrameError(f"{envelope.type}: {exc}", reason=reason) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise VenueFrameError(f"not JSON: {exc}") from exc


class CoinbaseParser:
    """Coinbase frames to ticks; remembers the last `sequence` per product (no I/O)."""

    def __init__(self, *, assets: tuple[str, ...], quotes: tuple[str, ...]) -> None:
        self._assets = assets
        self._quotes = quotes
        self._last_sequence: dict[str, int] = {}

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        message = _decode(frame)
        if isinstance(message, _Ticker):
            return [self._tick(message, received_ns)]
        if isinstance(message, _Error):
            raise VenueFrameError(f"{message.message}: {message.reason}", reason="venue_error")
        return []  # subscriptions, heartbeats, and types the feed added later

    def _tick(self, ticker: _Ticker, received_ns: int) -> Tick:
        base, dash, quote = ticker.product_id.partition("-")
        if not dash or base not in self._assets or quote not in self._quotes:
            raise VenueFrameError(f"product {ticker.product_id!r} is not subscribed", reason="unknown_symbol")
        symbol = f"{base}-{quote}"
        ts_exchange = venue_time(ticker.time, what="ticker time")
        tick = Tick(
            id=f"{NAME}:{symbol}:{ticker.sequence}",
            source=NAME,
            symbol=symbol,
            base=base,
            quote=quote,
            price=ticker.price,
            bid=ticker.best_bid,
            ask=ticker.best_ask,
            volume_24h=ticker.volume_24h,
            open_24h=ticker.open_24h,
            ts_exchange=ts_exchange,
            ts_received=received_ns,
        )
        checked(tick, assets=self._assets)
        last = self._last_sequence.get(symbol)
        if last is not None and ticker.sequence <= last:
            raise VenueFrameError(f"{symbol}: sequence {ticker.sequence} after {last}", reason="out_of_order")
        self._last_sequence[symbol] = ticker.sequence
        return tick


class _RestTicker(msgspec.Struct):
    """`GET /products/{product_id}/ticker`: the last trade, best bid/ask, 24h volume."""

    trade_id: int
    price: Decimal
    time: str
    bid: Decimal | None = None
    ask: Decimal | None = None
    volume: Decimal | None = None
    size: Decimal | None = None


class _RestError(msgspec.Struct):
    message: str


_REST_DECODER = msgspec.json.Decoder(_RestTicker)
_REST_ERROR = msgspec.json.Decoder(_RestError)


class CoinbaseRestParser:
    """One product's REST ticker answers to ticks (no I/O): the answer does not name its product, the parser does."""

    def __init__(self, product_id: str, *, assets: tuple[str, ...], quotes: tuple[str, ...]) -> None:
        base, dash, quote = product_id.partition("-")
        if not dash or base not in assets or quote not in quotes:
            raise ValueError(f"product {product_id!r} is not one of the configured assets")
        self.product_id = product_id
        self._base = base
        self._quote = quote
        self._assets = assets

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            ticker = _REST_DECODER.decode(frame)
        except (msgspec.DecodeError, RecursionError) as exc:
            try:
                message = _REST_ERROR.decode(frame).message
            except (msgspec.DecodeError, RecursionError):
                reason = "missing_field" if "missing required field" in str(exc) else "malformed_frame"
                raise VenueFrameError(f"{self.product_id} ticker: {exc}", reason=reason) from exc
            raise VenueFrameError(f"{self.product_id} ticker: {message}", reason="venue_error") from exc
        symbol = f"{self._base}-{self._quote}"
        ts_exchange = venue_time(ticker.time, what="ticker time")
        tick = Tick(
            id=f"{NAME}:{symbol}:r{ticker.trade_id}",
            source=NAME,
            symbol=symbol,
            base=self._base,
            quote=self._quote,
            price=ticker.price,
            bid=ticker.bid,
            ask=ticker.ask,
            volume_24h=ticker.volume,
            open_24h=None,
            ts_exchange=ts_exchange,
            ts_received=received_ns,
        )
        return [checked(tick, assets=self._assets)]


def build_fallback(settings: Settings) -> RestFallback:
    """The REST polling used while the breaker is open: one ticker request per product, 10 a second at most."""
    endpoints = [
        Endpoint(
            url=settings.live.coinbase_rest_url + REST_TICKER.format(product_id=product),
            parser=CoinbaseRestParser(product, assets=settings.assets, quotes=settings.usd_quotes),
        )
        for product in product_ids(settings)
    ]
    return RestFallback(
        name=NAME,
        endpoints=endpoints,
        bucket=TokenBucket(rate=REST_REQUESTS_PER_S, capacity=REST_REQUESTS_PER_S),
    )


def build_parser(settings: Settings) -> Parser:
    return CoinbaseParser(assets=settings.assets, quotes=settings.usd_quotes)


def build(settings: Settings) -> Source:
    return WebSocketSource.from_live(
        settings.live,
        name=NAME,
        url=settings.live.coinbase_ws_url,
        parser=build_parser(settings),
        subscribe=[subscribe_message(settings)],
        fallback=build_fallback(settings),
    )
