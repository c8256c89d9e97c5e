"""Kraken WebSocket v2: the `ticker` channel (a snapshot, then an update per trade), with the
`heartbeat` and `status` channels Kraken sends on its own.

After connecting we send `{"method": "subscribe", "params": {"channel": "ticker", "symbol": [...]}}` for
`<ASSET>/USD` of every configured asset; Kraken acknowledges each symbol (`"success": true`), or answers
`"success": false` with an error, which is dead-lettered as `venue_error`. Ticker data carries its
figures as JSON numbers; they are decoded into Decimal from their text, digit for digit. The 24h open is
`last - change`. v2 names Bitcoin `BTC`, v1 named it `XBT` (and Dogecoin `XDG`): both are accepted.

An update older than the last one seen for its pair (by the venue's `timestamp`) is out of order and
rejected; an equal one passes (its tick id dedupes it). A snapshot with one bad pair still delivers the
good ones, and the frame is dead-lettered. The parser stays pure: it keeps the exchange's last `status`,
and the live source's `StatusLog` logs each change.

REST fallback (`ws_fallback`): while the circuit breaker is open, every ~2 s the source asks
`GET {kraken_rest_url}/0/public/Ticker?pair=XBTUSD,ETHUSD,...` (one request for every pair, within the
public limit of about one a second). `KrakenRestParser` maps the answer's keys back to assets, legacy
names (`XXBTZUSD`, `XETHZUSD`) and plain ones (`SOLUSD`) alike: price `c[0]`, bid `b[0]`, ask `a[0]`,
24h volume `v[1]`. `open_24h` is left empty: Kraken's `o` is the price at 00:00 UTC today, not 24 h
ago, and a change computed from it would not be a 24 h change. The answer carries no time, so
`ts_exchange` is the receive time and the id is `kraken:<SYMBOL>:r<received ms>`. A non-empty `error`
list is dead-lettered as `venue_error`.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Literal

import msgspec
import structlog

from pricewire_collector.sources.base import Parser, Source, VenueFrameError, checked, venue_time
from pricewire_collector.sources.resilience import TokenBucket
from pricewire_collector.sources.ws_fallback import Endpoint, RestFallback
from pricewire_collector.sources.wsconnection import WebSocketSource
from pricewire_common.config import Settings
from pricewire_common.events import Tick

__all__ = [
    "ALIASES",
    "NAME",
    "KrakenParser",
    "KrakenRestParser",
    "KrakenStatus",
    "StatusLog",
    "build",
    "build_fallback",
    "build_parser",
    "rest_pairs",
    "subscribe_message",
    "venue_symbols",
]

log = structlog.get_logger(__name__)

NAME = "kraken"
QUOTE = "USD"
ALIASES = {"XBT": "BTC", "XDG": "DOGE"}
"""Kraken's legacy asset codes and their common names."""
LEGACY = {common: legacy for legacy, common in ALIASES.items()}
REST_TICKER = "/0/public/Ticker"
REST_REQUESTS_PER_S = 1
"""Kraken's public REST limit: about one request a second."""

# Room for every digit of `last - change` whatever their exponents: the result is checked by the rules after.
_EXACT = decimal.Context(prec=80, Emax=999_999, Emin=-999_999)


class _Envelope(msgspec.Struct):
    channel: str | None = None
    type: str | None = None
    method: str | None = None
    success: bool | None = None
    error: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    """Left undecoded until the channel is known; empty when absent."""


class _Ticker(msgspec.Struct):
    symbol: str
    last: Decimal
    bid: Decimal | None = None
    ask: Decimal | None = None
    volume: Decimal | None = None
    change: Decimal | None = None
    timestamp: str | None = None


class KrakenStatus(msgspec.Struct, frozen=True):
    """The exchange's state, from the `status` channel."""

    system: str | None = None
    api_version: str | None = None
    version: str | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_TICKERS = msgspec.json.Decoder(list[_Ticker])
_STATUSES = msgspec.json.Decoder(list[KrakenStatus])


class _Params(msgspec.Struct, kw_only=True):
    channel: Literal["ticker"] = "ticker"
    symbol: list[str]


class _Subscribe(msgspec.Struct, kw_only=True):
    method: Literal["subscribe"] = "subscribe"
    params: _Params


def venue_symbols(settings: Settings) -> list[str]:
    """Kraken's v2 pairs for the configured assets: `<ASSET>/USD`."""
    return [f"{asset}/{QUOTE}" for asset in settings.assets]


def subscribe_message(settings: Settings) -> str:
    """The subscribe frame sent after connecting."""
    return msgspec.json.encode(_Subscribe(params=_Params(symbol=venue_symbols(settings)))).decode()


def _invalid(what: str, exc: msgspec.DecodeError | RecursionError) -> VenueFrameError:
    if isinstance(exc, msgspec.ValidationError) and "missing required field" in str(exc):
        return VenueFrameError(f"{what}: {exc}", reason="missing_field")
    return VenueFrameError(f"{what}: {exc}")


class KrakenParser:
    """Kraken v2 frames to ticks; remembers the last timestamp per pair and the exchange's status (no I/O)."""

    def __init__(self, *, assets: tuple[str, ...], quotes: tuple[str, ...]) -> None:
        self._assets = assets
        self._quotes = quotes
        self._last_ts: dict[str, int] = {}
        self.status: KrakenStatus | None = None
        """The last status the exchange sent (None before the first)."""

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            envelope = _ENVELOPE.decode(frame)
        # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _invalid("not a Kraken v2 message", exc) from exc
        if envelope.success is False:
            raise VenueFrameError(f"{envelope.method}: {envelope.error}", reason="venue_error")
        if envelope.method is not None:
            return []  # acks of subscribe / unsubscribe, pong
        if envelope.channel == "ticker":
            return self._tickers(envelope, received_ns)
        if envelope.channel == "status":
            self._status(envelope)
            return []
        if envelope.channel is None:
            raise VenueFrameError("neither a method answer nor a channel message")
        return []  # heartbeats, and channels we never subscribed to

    def _status(self, envelope: _Envelope) -> None:
        try:
            statuses = _STATUSES.decode(envelope.data) if envelope.data else []
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _invalid("status", exc) from exc
        if statuses:
            self.status = statuses[-1]

    def _tickers(self, envelope: _Envelope, received_ns: int) -> list[Tick]:
        if envelope.type not in ("snapshot", "update"):
            raise VenueFrameError(f"ticker message of type {envelope.type!r}")
        if not envelope.data:
            raise VenueFrameError("ticker message without data", reason="missing_field")
        try:
            tickers = _TICKERS.decode(envelope.data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _invalid("ticker data", exc) from exc
        good: list[Tick] = []
        bad: list[VenueFrameError] = []
        for ticker in tickers:
            try:
                good.append(self._tick(ticker, received_ns))
            except VenueFrameError as err:
                bad.append(err)
        if not bad:
            return good
        # One bad pair does not cost the others their ticks: they go out, and the frame is dead-lettered.
        first = bad[0]
        detail = first.detail if len(tickers) == 1 else f"{len(bad)} of {len(tickers)} pairs rejected: {first.detail}"
        raise VenueFrameError(detail, reason=first.reason, ticks=good)

    def _tick(self, ticker: _Ticker, received_ns: int) -> Tick:
        base, slash, quote = ticker.symbol.partition("/")
        base = ALIASES.get(base, base)
        if not slash or base not in self._assets or quote not in self._quotes:
            raise VenueFrameError(f"pair {ticker.symbol!r} is not subscribed", reason="unknown_symbol")
        symbol = f"{base}-{quote}"
        ts_exchange = received_ns
        if ticker.timestamp is not None:
            ts_exchange = venue_time(ticker.timestamp, what="ticker timestamp")
        open_24h = None
        if ticker.change is not None:
            try:
                open_24h = _EXACT.subtract(ticker.last, ticker.change)
            except ArithmeticError as exc:  # NaN or infinite figures
                raise VenueFrameError(
                    f"{symbol}: last {ticker.last} - change {ticker.change}", reason="invalid_price"
                ) from exc
        tick = Tick(
            id=f"{NAME}:{symbol}:{ts_exchange}",
            source=NAME,
            symbol=symbol,
            base=base,
            quote=quote,
            price=ticker.last,
            bid=ticker.bid,
            ask=ticker.ask,
            volume_24h=ticker.volume,
            open_24h=open_24h,
            ts_exchange=ts_exchange,
            ts_received=received_ns,
        )
        checked(tick, assets=self._assets)
        # Only the venue's own timestamps are ordered: our receive time is another clock.
        if ticker.timestamp is not None:
            last = self._last_ts.get(symbol)
            if last is not None and ts_exchange < last:
                raise VenueFrameError(
                    f"{symbol}: timestamp {ticker.timestamp} is older than the last", reason="out_of_order"
                )
            self._last_ts[symbol] = ts_exchange
        return tick


class StatusLog:
    """The live source's parser: a `KrakenParser` whose status changes are logged (the I/O, outside the core)."""

    def __init__(self, parser: KrakenParser) -> None:
        self._parser = parser
        self._logged: KrakenStatus | None = None

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        ticks = self._parser.parse(frame, received_ns)
        status = self._parser.status
        if status is not None and status != self._logged:
            self._logged = status
            event = "venue_status" if status.system == "online" else "venue_status_not_online"
            log.info(event, source=NAME, system=status.system, api_version=status.api_version, version=status.version)
        return ticks


class _RestTicker(msgspec.Struct):
    """One pair of `GET /0/public/Ticker`: `[price, whole lot volume, lot volume]` asks and bids,
    `[price, lot volume]` last trade, `[today, last 24 h]` volume; `o` today's (00:00 UTC) open."""

    a: list[Decimal]
    b: list[Decimal]
    c: list[Decimal]
    v: list[Decimal]
    o: Decimal | None = None


class _RestAnswer(msgspec.Struct):
    error: list[str]
    result: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)


_REST_ANSWER = msgspec.json.Decoder(_RestAnswer)
_REST_TICKER = msgspec.json.Decoder(_RestTicker)


def rest_pairs(settings: Settings) -> list[str]:
    """The `pair=` names of the REST ticker: Kraken's codes (`XBTUSD`, `ETHUSD`, `XDGUSD`)."""
    return [f"{LEGACY.get(asset, asset)}{QUOTE}" for asset in settings.assets]


def _rest_keys(assets: tuple[str, ...]) -> dict[str, str]:
    """Every name a REST answer may give an asset's USD pair: `XBTUSD`, `XXBTZUSD`, `BTCUSD`, `SOLUSD`..."""
    keys: dict[str, str] = {}
    for asset in assets:
        for code in {asset, LEGACY.get(asset, asset)}:
            keys[f"{code}{QUOTE}"] = asset
            keys[f"X{code}Z{QUOTE}"] = asset
    return keys


def _first(values: list[Decimal], what: str, key: str) -> Decimal:
    if not values:
        raise VenueFrameError(f"{key}: {what} is empty", reason="missing_field")
    return values[0]


class KrakenRestParser:
    """`GET /0/public/Ticker` answers to ticks (no I/O); see the module doc."""

    def __init__(self, *, assets: tuple[str, ...]) -> None:
        self._assets = assets
        self._keys = _rest_keys(assets)

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            answer = _REST_ANSWER.decode(frame)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _invalid("not a Kraken REST answer", exc) from exc
        if answer.error:
            raise VenueFrameError("; ".join(answer.error), reason="venue_error")
        good: list[Tick] = []
        bad: list[VenueFrameError] = []
        for key, raw in answer.result.items():
            try:
                good.append(self._tick(key, raw, received_ns))
            except VenueFrameError as err:
                bad.append(err)
        if not bad:
            return good
        first = bad[0]
        count = len(answer.result)
        detail = first.detail if count == 1 else f"{len(bad)} of {count} pairs rejected: {first.detail}"
        raise VenueFrameError(detail, reason=first.reason, ticks=good)

    def _tick(self, key: str, raw: msgspec.Raw, received_ns: int) -> Tick:
        base = self._keys.get(key)
        if base is None:
            raise VenueFrameError(f"pair {key!r} is not subscribed", reason="unknown_symbol")
        try:
            ticker = _REST_TICKER.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _invalid(key, exc) from exc
        if len(ticker.v) < 2:
            raise VenueFrameError(f"{key}: v has no 24 h volume", reason="missing_field")
        symbol = f"{base}-{QUOTE}"
        tick = Tick(
            id=f"{NAME}:{symbol}:r{received_ns // 1_000_000}",
            source=NAME,
            symbol=symbol,
            base=base,
            quote=QUOTE,
            price=_first(ticker.c, "c", key),
            bid=_first(ticker.b, "b", key),
            ask=_first(ticker.a, "a", key),
            volume_24h=ticker.v[1],
            open_24h=None,  # `o` is today's open (00:00 UTC), not the price 24 h ago
            ts_exchange=received_ns,
            ts_received=received_ns,
        )
        return checked(tick, assets=self._assets)


def build_fallback(settings: Settings) -> RestFallback:
    """The REST polling used while the breaker is open: every pair in one request, one request a second at most."""
    endpoint = Endpoint(
        url=settings.live.kraken_rest_url + REST_TICKER,
        parser=KrakenRestParser(assets=settings.assets),
        params={"pair": ",".join(rest_pairs(settings))},
    )
    return RestFallback(
        name=NAME,
        endpoints=[endpoint],
        bucket=TokenBucket(rate=REST_REQUESTS_PER_S, capacity=REST_REQUESTS_PER_S),
    )


def build_parser(settings: Settings) -> Parser:
    return KrakenParser(assets=settings.assets, quotes=settings.usd_quotes)


def build(settings: Settings) -> Source:
    return WebSocketSource.from_live(
        settings.live,
        name=NAME,
        url=settings.live.kraken_ws_url,
        parser=StatusLog(KrakenParser(assets=settings.assets, quotes=settings.usd_quotes)),
        subscribe=[subscribe_message(settings)],
        fallback=build_fallback(settings),
    )
