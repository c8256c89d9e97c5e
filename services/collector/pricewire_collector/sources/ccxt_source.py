"""Any exchange the `ccxt` library supports, polled over REST with `fetch_tickers`: the tertiary fallback.

One poll loop per exchange in `settings.live.ccxt_exchanges`; each reports its own state on
`md.source.<exchange>`, and its ticks have `source = <exchange id>`. ccxt's own rate limiter is on
(`enableRateLimit`), and a poll runs at most every `ccxt_poll_s`. ccxt's errors and network errors are
venue trouble (`reconnecting`, retried with backoff); any other exception is a bug: the exchange's own
`runtime.supervise` logs it with the traceback, reports it `stopped`, and starts it again after a backoff.

The frame of one poll is what ccxt made of the venue's answer, in JSON:
`{"exchange": "bitstamp", "tickers": [{"symbol": "BTC/USD", "timestamp": <ms>, "last": ..., "bid": ...,
"ask": ..., "baseVolume": ..., "open": ..., "info": {<the venue's raw ticker>}}]}`.

Exactness: ccxt turns every figure into a float. The parser takes each figure's digits from the venue's raw
ticker (`info`) instead, when a raw value there is the same number (Bitstamp's `"last": "26216.50"`);
only when none is does it fall back to `Decimal(str(float))`, the shortest text of the float, which for a
venue's decimal quote of up to 15 significant digits is that quote.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
import ccxt.async_support as ccxt_async  # type: ignore[import-untyped]
import msgspec
import structlog

from pricewire_collector.sources.base import Parser, Sink, Source, VenueFrameError, checked
from pricewire_collector.sources.polling import PollFailed, RateLimited, poll, retry_after_s
from pricewire_collector.sources.resilience import Backoff, TokenBucket
from pricewire_collector.sources.runtime import supervise
from pricewire_common.clock import NS_PER_MS
from pricewire_common.config import Settings
from pricewire_common.events import Tick

__all__ = ["NAME", "CcxtParser", "CcxtSource", "ExchangeSource", "build", "build_parser", "encode_frame", "point_at"]

log = structlog.get_logger(__name__)

NAME = "ccxt"
TRANSPORT = "rest"
_FIELDS = ("symbol", "timestamp", "last", "bid", "ask", "baseVolume", "open", "info")


class _Ticker(msgspec.Struct, frozen=True, rename={"base_volume": "baseVolume"}):
    symbol: str
    timestamp: int | None = None
    last: Decimal | None = None
    bid: Decimal | None = None
    ask: Decimal | None = None
    base_volume: Decimal | None = None
    open: Decimal | None = None
    info: dict[str, Any] = msgspec.field(default_factory=dict)


class _Frame(msgspec.Struct, frozen=True):
    exchange: str
    tickers: list[_Ticker]


# float_hook: raw numbers inside `info` keep their JSON digits too.
_DECODER = msgspec.json.Decoder(_Frame, float_hook=Decimal)
_ENCODER = msgspec.json.Encoder()


def encode_frame(exchange: str, tickers: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The frame of one `fetch_tickers` answer (see the module doc)."""
    rows = [{name: ticker.get(name) for name in _FIELDS} for ticker in tickers.values()]
    return _ENCODER.encode({"exchange": exchange, "tickers": rows})


def _raw_numbers(info: Mapping[str, Any]) -> dict[float, Decimal]:
    """The venue's own numbers in a raw ticker, by their float value."""
    found: dict[float, Decimal] = {}
    for value in info.values():
        if isinstance(value, bool) or not isinstance(value, str | Decimal | int):
            continue
        try:
            number = Decimal(value)
        except InvalidOperation:
            continue
        if number.is_finite():
            found.setdefault(float(number), number)
    return found


def _exact(value: Decimal, raw: Mapping[float, Decimal]) -> Decimal:
    """The venue's own digits of `value`, when its raw ticker holds the same number."""
    return raw.get(float(value), value) if value.is_finite() else value


def _exact_or_none(value: Decimal | None, raw: Mapping[float, Decimal]) -> Decimal | None:
    return None if value is None else _exact(value, raw)


class CcxtParser:
    """Parses ccxt frames into ticks of the configured assets quoted in a USD-equivalent."""

    def __init__(self, *, assets: Collection[str], quotes: Collection[str]) -> None:
        self._assets = frozenset(assets)
        self._quotes = frozenset(quotes)

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            decoded = _DECODER.decode(frame)
        # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
        except (msgspec.DecodeError, RecursionError) as exc:
            raise VenueFrameError(f"ccxt: {exc}", reason="malformed_frame") from exc
        ticks: list[Tick] = []
        bad: list[VenueFrameError] = []
        for ticker in decoded.tickers:
            try:
                ticks.append(self._tick(decoded.exchange, ticker, received_ns))
            except VenueFrameError as err:
                bad.append(err)
        if bad:
            # One bad ticker must not cost the exchange's others their quotes: they go out, the frame is dead-lettered.
            raise VenueFrameError("; ".join(err.detail for err in bad), reason=bad[0].reason, ticks=ticks)
        return ticks

    def _tick(self, exchange: str, ticker: _Ticker, received_ns: int) -> Tick:
        base, _, quote = ticker.symbol.partition(":")[0].partition("/")
        if base not in self._assets or quote not in self._quotes:
            raise VenueFrameError(f"{exchange}: unexpected symbol {ticker.symbol!r}", reason="unknown_symbol")
        if ticker.last is None:
            raise VenueFrameError(f"{exchange}: {ticker.symbol} has no last price", reason="missing_field")
        raw = _raw_numbers(ticker.info)
        symbol = f"{base}-{quote}"
        if ticker.timestamp is None:
            # Some venues send no time: the poll's own receive time stands in (and makes the id).
            ts_exchange, stamp = received_ns, f"r{received_ns}"
        else:
            ts_exchange, stamp = ticker.timestamp * NS_PER_MS, str(ticker.timestamp)
        tick = Tick(
            id=f"{exchange}:{symbol}:{stamp}",
            source=exchange,
            symbol=symbol,
            base=base,
            quote=quote,
            price=_exact(ticker.last, raw),
            bid=_exact_or_none(ticker.bid, raw),
            ask=_exact_or_none(ticker.ask, raw),
            volume_24h=_exact_or_none(ticker.base_volume, raw),
            open_24h=_exact_or_none(ticker.open, raw),
            ts_exchange=ts_exchange,
            ts_received=received_ns,
            kind="poll",
        )
        return checked(tick)


def build_parser(settings: Settings) -> Parser:
    return CcxtParser(assets=settings.assets, quotes=settings.usd_quotes)


def point_at(urls: Any, base_url: str) -> Any:
    """`urls` (a str or nested dict of ccxt's `urls['api']`) with every http(s) URL's origin replaced by
    `base_url`; paths are kept, so `https://www.bitstamp.net/api` becomes `<base_url>/api`."""
    if isinstance(urls, str):
        if not urls.startswith(("http://", "https://")):
            return urls
        _, _, rest = urls.partition("://")
        _, slash, path = rest.partition("/")
        return f"{base_url.rstrip('/')}{slash}{path}"
    if isinstance(urls, dict):
        return {key: point_at(value, base_url) for key, value in urls.items()}
    return urls


class _Exchange:
    """One ccxt exchange: picks the symbols of the configured assets once, then fetches their tickers."""

    def __init__(self, exchange: Any, *, assets: tuple[str, ...], quotes: tuple[str, ...]) -> None:
        self._exchange = exchange
        self._assets = assets
        self._quotes = quotes
        self._symbols: list[str] | None = None

    def _pick_symbols(self) -> list[str]:
        markets: Mapping[str, Mapping[str, Any]] = self._exchange.markets or {}
        symbols, missing = [], []
        for asset in self._assets:
            for quote in self._quotes:
                market = markets.get(f"{asset}/{quote}")
                if market is not None and market.get("spot") and market.get("active") is not False:
                    symbols.append(f"{asset}/{quote}")
                    break
            else:
                missing.append(asset)
        if missing:
            log.warning("ccxt_assets_skipped", exchange=self._exchange.id, assets=missing, reason="no_usd_market")
        return symbols

    async def fetch(self) -> bytes:
        """One poll: the frame of `fetch_tickers` (markets are loaded on the first)."""
        try:
            if self._symbols is None:
                await self._exchange.load_markets()
                symbols = self._pick_symbols()
                if not symbols:
                    raise PollFailed(f"{self._exchange.id} lists none of {', '.join(self._assets)}")
                self._symbols = symbols
            tickers = await self._exchange.fetch_tickers(self._symbols)
        except (ccxt_async.RateLimitExceeded, ccxt_async.DDoSProtection) as exc:
            headers = self._exchange.last_response_headers or {}
            status = 418 if type(exc) is ccxt_async.DDoSProtection else 429
            raise RateLimited(status, retry_after_s(headers)) from exc
        except ccxt_async.BaseError as exc:
            # ccxt's own errors: network trouble, the venue's error answers, its maintenance...
            raise PollFailed(repr(exc)) from exc
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # ccxt wraps these as NetworkError; one that escapes it is still the network's trouble.
            raise PollFailed(repr(exc)) from exc
        # Anything else (a TypeError inside ccxt...) is a bug: retrying it as venue trouble would only hide
        # it. It goes up to `runtime.supervise`, which logs it with the traceback and restarts the exchange.
        return encode_frame(self._exchange.id, tickers)


class CcxtSource:
    """Polls every exchange of `settings.live.ccxt_exchanges` concurrently, each under its own supervisor."""

    name = NAME

    def __init__(self, settings: Settings) -> None:
        parser = build_parser(settings)
        self._live = settings.live
        self._exchanges = [ExchangeSource(name, settings, parser) for name in settings.live.ccxt_exchanges]

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            for exchange in self._exchanges:
                backoff = Backoff(self._live.backoff_initial_s, self._live.backoff_max_s)
                group.create_task(supervise(exchange, sink, stop, backoff=backoff), name=f"ccxt-{exchange.name}")


class ExchangeSource:
    """One ccxt exchange as a `Source` of its own: a bug met polling it restarts that exchange alone."""

    def __init__(self, exchange_id: str, settings: Settings, parser: Parser) -> None:
        self._id = exchange_id
        self._settings = settings
        self._parser = parser
        self._bucket: TokenBucket | None = None
        """Kept across runs: a restart must not forget a venue's Retry-After."""

    @property
    def name(self) -> str:
        return self._id

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        live = self._settings.live
        if self._id not in ccxt_async.exchanges:
            log.error("ccxt_exchange_unknown", exchange=self._id)
            await sink.state(self._id, "stopped", transport=TRANSPORT, detail="ccxt has no such exchange")
            return
        async with aiohttp.ClientSession() as session:
            exchange = getattr(ccxt_async, self._id)({"enableRateLimit": True, "session": session})
            try:
                if live.ccxt_api_url is not None:
                    exchange.urls["api"] = point_at(exchange.urls["api"], live.ccxt_api_url)
                polled = _Exchange(exchange, assets=self._settings.assets, quotes=self._settings.usd_quotes)
                if self._bucket is None:
                    # ccxt paces its own requests; this bucket only carries a venue's Retry-After.
                    rate = 1000 / max(float(exchange.rateLimit), 1.0)
                    self._bucket = TokenBucket(rate=rate, capacity=max(1.0, math.ceil(rate)))
                await poll(
                    name=self._id,
                    request=polled.fetch,
                    parser=self._parser,
                    sink=sink,
                    stop=stop,
                    interval_s=live.ccxt_poll_s,
                    bucket=self._bucket,
                    backoff=Backoff(live.backoff_initial_s, live.backoff_max_s),
                )
            finally:
                await exchange.close()


def build(settings: Settings) -> Source:
    return CcxtSource(settings)
