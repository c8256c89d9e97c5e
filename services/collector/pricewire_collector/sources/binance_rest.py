"""Binance's REST fallback, polled while the WebSocket's circuit breaker is open.

Each poll asks `GET /api/v3/ticker/24hr?symbols=[...]` (weight 2 for 1-20 symbols): last price,
bid/ask, 24 h open and volume, one tick per row keyed by its `closeTime`. When that endpoint answers an
HTTP error other than 429/418 (a 4xx or a 5xx: it is down or refuses the request while the venue still
answers), the same poll asks `GET /api/v3/ticker/price?symbols=[...]` (weight 4) instead: price-only
ticks, stamped with their receipt, ids `binance:<BASE>-<QUOTE>:p<received ms>`. A connection that fails
(refused, timed out) tries no second endpoint: the host is what is down.

Every request spends its documented weight from one `TokenBucket` of `binance_weight_per_min` (the
venue's limit is per IP, over all endpoints), so the weight used over any span stays within the
bucket's capacity plus its refill. A poll starts once the bucket holds the weight it will likely need:
24hr's alone, or 24hr's and ticker/price's while 24hr keeps failing (so ticker/price is not starved).
A 429 or 418 answer drains the bucket for its `Retry-After` (seconds or an HTTP date;
`DEFAULT_RETRY_AFTER_S` without one): no request of either endpoint goes out before then. An error
answer's body is dead-lettered when it is a 4xx (reason `venue_error`), logged when a 5xx.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import msgspec
import structlog

from pricewire_collector.sources.base import Parser, Polled, Sink, VenueFrameError, count_request, deliver
from pricewire_collector.sources.binance_parse import NAME
from pricewire_collector.sources.polling import retry_after_s, wait_or_stop
from pricewire_collector.sources.resilience import CircuitBreaker, TokenBucket
from pricewire_common.clock import Clock
from pricewire_common.config import Settings

__all__ = [
    "DEFAULT_RETRY_AFTER_S",
    "REST_POLL_S",
    "TICKER_24HR",
    "TICKER_PRICE",
    "TICKER_PRICE_WEIGHT",
    "RestFallback",
    "ticker_24hr_weight",
]

log = structlog.get_logger(__name__)

TICKER_24HR = "/api/v3/ticker/24hr"
TICKER_PRICE = "/api/v3/ticker/price"
REST_POLL_S = 2.0
"""How often the REST fallback polls."""
DEFAULT_RETRY_AFTER_S = 10.0
"""How long a 429/418 without a usable Retry-After header holds the requests back."""
TICKER_PRICE_WEIGHT = 4
"""Request weight of `GET /api/v3/ticker/price?symbols=[...]` (2 only for a single `symbol=`, never sent here)."""
REQUEST_TIMEOUT_S = 10.0

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)
_ROWS = msgspec.json.Decoder(list[msgspec.Raw])


def ticker_24hr_weight(symbols: int) -> int:
    """Request weight of `GET /api/v3/ticker/24hr?symbols=...` (Binance: 2 for 1-20, 40 for 21-100, else 80)."""
    if 1 <= symbols <= 20:
        return 2
    if 21 <= symbols <= 100:
        return 40
    return 80


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]


class RestFallback:
    """Polls the REST tickers within the request-weight bucket; see the module doc."""

    def __init__(self, settings: Settings, parser: Parser, *, symbols: list[str], poll_s: float, clock: Clock) -> None:
        base = settings.live.binance_rest_url
        self.url_24hr = f"{base}{TICKER_24HR}"
        self.url_price = f"{base}{TICKER_PRICE}"
        self._params = {"symbols": json.dumps(symbols, separators=(",", ":"))}
        self.weight_24hr = ticker_24hr_weight(len(symbols))
        self.weight_price = TICKER_PRICE_WEIGHT
        self._round_weight = self.weight_24hr
        self.bucket = TokenBucket.per_minute(settings.live.binance_weight_per_min)
        self._polled = Polled(parser)
        self._poll_s = poll_s
        self._clock = clock

    async def run(
        self, session: aiohttp.ClientSession, sink: Sink, stop: asyncio.Event, breaker: CircuitBreaker
    ) -> None:
        """Poll until `breaker` lets a WebSocket try through (or `stop`)."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while not stop.is_set():
            now = loop.time()
            if breaker.allows(now):
                return
            wait = max(next_poll - now, self.bucket.delay(self._round_weight, now))
            if wait <= 0:
                await self.poll(session, sink)
                next_poll = now + self._poll_s
                continue
            await wait_or_stop(stop, min(wait, breaker.retry_in(now)))

    async def poll(self, session: aiohttp.ClientSession, sink: Sink) -> None:
        """One poll: ticker/24hr, or ticker/price when 24hr answers an error other than 429/418."""
        answer = await self._get(session, self.url_24hr, self.weight_24hr, sink)
        failing = answer is not None and answer.status != 200
        self._round_weight = self.weight_24hr + (self.weight_price if failing else 0)
        if answer is not None and failing:
            await self._failed(answer, TICKER_24HR, sink)
            answer = await self._get(session, self.url_price, self.weight_price, sink)
            if answer is not None and answer.status != 200:
                await self._failed(answer, TICKER_PRICE, sink)
                return
        if answer is not None:
            await self._rows(answer.body, sink)

    async def _get(self, session: aiohttp.ClientSession, url: str, weight: int, sink: Sink) -> _Answer | None:
        """The venue's answer, its weight spent; None when none came, the bucket had no room, or 429/418."""
        loop = asyncio.get_running_loop()
        if not self.bucket.take(weight, loop.time()):
            log.info("binance_rest_deferred", url=url, weight=weight)
            return None
        try:
            async with session.get(
                url, params=self._params, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            ) as response:
                answer = _Answer(response.status, await response.read(), response.headers)
        except _NETWORK_ERRORS as exc:
            count_request(sink, NAME, "failed")
            log.warning("binance_rest_failed", url=url, error=repr(exc))
            return None
        rate_limited = answer.status in (418, 429)
        count_request(sink, NAME, "ok" if answer.status == 200 else "rate_limited" if rate_limited else "failed")
        if rate_limited:
            hold_s = retry_after_s(answer.headers, default=DEFAULT_RETRY_AFTER_S)
            self.bucket.drain(loop.time(), for_s=hold_s)
            log.warning("binance_rate_limited", status=answer.status, retry_after_s=hold_s)
            return None
        return answer

    async def _failed(self, answer: _Answer, endpoint: str, sink: Sink) -> None:
        body = answer.body[:200].decode(errors="replace")
        log.warning("binance_rest_failed", endpoint=endpoint, status=answer.status, body=body)
        if 400 <= answer.status < 500:
            error = VenueFrameError(f"HTTP {answer.status} from {endpoint}", reason="venue_error")
            await sink.reject(error, source=NAME, frame=answer.body)

    async def _rows(self, body: bytes, sink: Sink) -> None:
        """Each row of a ticker answer through the parser, as one frame of its own."""
        received_ns = self._clock()
        try:
            rows = _ROWS.decode(body)
        # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
        except (msgspec.DecodeError, RecursionError) as exc:
            sink.frame(NAME, body, received_ns)
            error = VenueFrameError(f"ticker answer is not a JSON array: {exc}", reason="malformed_frame")
            await sink.reject(error, source=NAME, frame=body)
            return
        for row in rows:
            await deliver(NAME, self._polled, sink, bytes(row), received_ns)
