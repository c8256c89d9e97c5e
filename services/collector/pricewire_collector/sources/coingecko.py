"""CoinGecko: `GET /simple/price` polled within the free rate limit, one tick per coin.

The documented answer (https://docs.coingecko.com/v3.0.1/reference/simple-price), with
`vs_currencies=usd&include_24hr_vol=true&include_24hr_change=true&include_last_updated_at=true&precision=full`::

    {"bitcoin": {"usd": 67187.3358936566, "usd_24h_vol": 31260929299.5248,
                 "usd_24h_change": 3.63727894677354, "last_updated_at": 1711356300}}

Numbers are read as Decimal from their JSON text (never through float). CoinGecko is an aggregate quoted in
USD: `usd_24h_vol` is in USD, so the tick's base-unit volume is `usd_24h_vol / usd` (8 decimals), and the
24 h open is `usd / (1 + usd_24h_change / 100)`. Ids are `coingecko:<BASE-USD>:<last_updated_at>`, so the
repeated answers of CoinGecko's 60 s cache are stored once.
"""

from __future__ import annotations

import asyncio
import decimal
from collections.abc import Mapping
from decimal import Decimal
from functools import partial

import aiohttp
import msgspec
import structlog

from pricewire_collector.sources.base import Parser, Sink, Source, VenueFrameError, checked
from pricewire_collector.sources.polling import http_get, poll
from pricewire_collector.sources.resilience import Backoff, TokenBucket
from pricewire_common.clock import NS_PER_S
from pricewire_common.config import Settings
from pricewire_common.events import Tick
from pricewire_common.rules import MAX_PLACES, decimal_places

__all__ = [
    "COINGECKO_IDS",
    "NAME",
    "CoinGeckoParser",
    "CoinGeckoSource",
    "build",
    "build_parser",
    "query",
    "rate_limit",
]

log = structlog.get_logger(__name__)

NAME = "coingecko"
QUOTE = "USD"
PATH = "/simple/price"

COINGECKO_IDS: Mapping[str, str] = {
    "BTC": "bitcoin",
    "ETH": "ethereum",
    "SOL": "solana",
    "ADA": "cardano",
    "DOT": "polkadot",
    "XRP": "ripple",
    "DOGE": "dogecoin",
    "BNB": "binancecoin",
    "AVAX": "avalanche-2",
    "LINK": "chainlink",
    "LTC": "litecoin",
    "BCH": "bitcoin-cash",
    "TRX": "tron",
    "XLM": "stellar",
    "ATOM": "cosmos",
    "UNI": "uniswap",
    "AAVE": "aave",
    "ETC": "ethereum-classic",
    "NEAR": "near",
    "FIL": "filecoin",
    "XMR": "monero",
    "ALGO": "algorand",
    "SHIB": "shiba-inu",
    "TON": "the-open-network",
    "SUI": "sui",
    "APT": "aptos",
    "ARB": "arbitrum",
    "OP": "optimism",
    "POL": "polygon-ecosystem-token",
    "USDT": "tether",
    "USDC": "usd-coin",
}
"""CoinGecko's API ids of well-known coins (`/coins/list` has the rest)."""

_VOLUME_STEP = Decimal("1e-8")
_MIN_OPEN_PLACES = 2
# Wide enough for every derived figure of a price and volume that the contract's bounds let through.
_CONTEXT = decimal.Context(prec=60, traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow])


class _Coin(msgspec.Struct, frozen=True):
    usd: Decimal | None = None
    usd_24h_vol: Decimal | None = None
    usd_24h_change: Decimal | None = None
    last_updated_at: int | None = None


class _Status(msgspec.Struct, frozen=True):
    error_code: int | None = None
    error_message: str | None = None


class _ErrorBody(msgspec.Struct, frozen=True):
    status: _Status | None = None
    error: str | None = None


_DECODER = msgspec.json.Decoder(dict[str, _Coin])
_ERROR_DECODER = msgspec.json.Decoder(_ErrorBody)


def query(ids: list[str]) -> dict[str, str]:
    """The query string of one `/simple/price` request for `ids`."""
    return {
        "ids": ",".join(ids),
        "vs_currencies": "usd",
        "include_24hr_vol": "true",
        "include_24hr_change": "true",
        "include_last_updated_at": "true",
        "precision": "full",
    }


def _venue_error(frame: bytes) -> str | None:
    """CoinGecko's own error message, when `frame` is one of its error bodies."""
    try:
        body = _ERROR_DECODER.decode(frame)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
    except (msgspec.DecodeError, RecursionError):
        return None
    if body.status is not None and body.status.error_code is not None:
        return f"{body.status.error_code}: {body.status.error_message}"
    return body.error


class CoinGeckoParser:
    """Parses `/simple/price` bodies into ticks of the assets it was built for."""

    def __init__(self, assets_by_id: Mapping[str, str]) -> None:
        self._assets_by_id = dict(assets_by_id)

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            coins = _DECODER.decode(frame)
        except (msgspec.DecodeError, RecursionError) as exc:
            error = _venue_error(frame)
            if error is not None:
                raise VenueFrameError(f"coingecko error: {error}", reason="venue_error") from exc
            raise VenueFrameError(f"coingecko: {exc}", reason="malformed_frame") from exc
        ticks: list[Tick] = []
        bad: list[VenueFrameError] = []
        for coin_id, coin in coins.items():
            asset = self._assets_by_id.get(coin_id)
            if asset is None:
                error = _venue_error(frame)
                if error is not None:  # `{"status": {"error_code": 429, ...}}` decodes as a coin named status
                    raise VenueFrameError(f"coingecko error: {error}", reason="venue_error")
                bad.append(VenueFrameError(f"coingecko: unknown coin id {coin_id!r}", reason="unknown_symbol"))
                continue
            if coin == _Coin():
                continue  # CoinGecko has no data for this coin now: nothing to quote, nothing wrong
            try:
                ticks.append(self._tick(asset, coin, received_ns))
            except VenueFrameError as err:
                bad.append(err)
        if bad:
            # One bad coin must not cost the others their quotes: they go out, the frame is dead-lettered.
            raise VenueFrameError("; ".join(err.detail for err in bad), reason=bad[0].reason, ticks=ticks)
        return ticks

    def _tick(self, asset: str, coin: _Coin, received_ns: int) -> Tick:
        if coin.usd is None:
            raise VenueFrameError(f"coingecko: {asset} has no usd price", reason="missing_field")
        if coin.last_updated_at is None:
            raise VenueFrameError(f"coingecko: {asset} has no last_updated_at", reason="missing_field")
        price = coin.usd
        if not price.is_finite() or price <= 0:
            raise VenueFrameError(f"coingecko: {asset} price is {price}", reason="invalid_price")
        try:
            volume = None
            if coin.usd_24h_vol is not None:
                volume = _CONTEXT.divide(coin.usd_24h_vol, price).quantize(_VOLUME_STEP, context=_CONTEXT)
            open_24h = None
            if coin.usd_24h_change is not None:
                places = min(MAX_PLACES, max(_MIN_OPEN_PLACES, decimal_places(price)))
                growth = _CONTEXT.add(1, _CONTEXT.divide(coin.usd_24h_change, 100))
                open_24h = _CONTEXT.divide(price, growth).quantize(Decimal(1).scaleb(-places), context=_CONTEXT)
        except ArithmeticError as exc:
            raise VenueFrameError(
                f"coingecko: {asset} 24h figures are not numbers: {coin}", reason="invalid_price"
            ) from exc
        symbol = f"{asset}-{QUOTE}"
        tick = Tick(
            id=f"{NAME}:{symbol}:{coin.last_updated_at}",
            source=NAME,
            symbol=symbol,
            base=asset,
            quote=QUOTE,
            price=price,
            volume_24h=volume,
            open_24h=open_24h,
            ts_exchange=coin.last_updated_at * NS_PER_S,
            ts_received=received_ns,
            kind="poll",
        )
        return checked(tick)


def _ids(settings: Settings) -> dict[str, str]:
    """CoinGecko id -> asset, for the configured assets that have one."""
    return {COINGECKO_IDS[asset]: asset for asset in settings.assets if asset in COINGECKO_IDS}


def build_parser(settings: Settings) -> Parser:
    return CoinGeckoParser(_ids(settings))


def rate_limit(calls_per_min: int) -> TokenBucket:
    """CoinGecko's 'N calls per minute', kept over every 60 s window from the very first call: one call
    saved up at most, one more each 60/N s. (A bucket holding N, refilled at N a minute, lets 2N through
    in the first minute, and again after any quiet minute.)"""
    return TokenBucket(rate=calls_per_min / 60.0, capacity=1.0)


class CoinGeckoSource:
    """Polls CoinGecko's `/simple/price` every `coingecko_poll_s`, at most `coingecko_calls_per_min`."""

    name = NAME

    def __init__(self, settings: Settings) -> None:
        self._live = settings.live
        self._assets_by_id = _ids(settings)
        self._parser = CoinGeckoParser(self._assets_by_id)
        self._url = f"{settings.live.coingecko_rest_url}{PATH}"
        # Owned by the source, not by one run: a restart by the supervisor must not refill it.
        self._bucket = rate_limit(settings.live.coingecko_calls_per_min)

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        if not self._assets_by_id:
            await sink.state(NAME, "stopped", transport="rest", detail="no configured asset has a CoinGecko id")
            return
        params = query(list(self._assets_by_id))
        async with aiohttp.ClientSession() as session:
            await poll(
                name=NAME,
                request=partial(http_get, session, self._url, params=params),
                parser=self._parser,
                sink=sink,
                stop=stop,
                interval_s=self._live.coingecko_poll_s,
                bucket=self._bucket,
                backoff=Backoff(self._live.backoff_initial_s, self._live.backoff_max_s),
            )


def build(settings: Settings) -> Source:
    missing = [asset for asset in settings.assets if asset not in COINGECKO_IDS]
    if missing:
        log.warning("coingecko_assets_skipped", assets=missing, reason="no_coingecko_id")
    return CoinGeckoSource(settings)
