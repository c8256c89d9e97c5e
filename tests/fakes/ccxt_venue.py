"""A fake Bitstamp on loopback: exactly the two public endpoints ccxt's `bitstamp` calls to poll tickers.

`load_markets` calls `GET /api/v2/markets/` (markets and currencies both come from it); `fetch_tickers` calls
`GET /api/v2/ticker/` (every pair's ticker, each naming its `pair`). Shapes as in Bitstamp's API
documentation (https://www.bitstamp.net/api/), quoted in ccxt's own source. Point ccxt at it with
`ccxt_api_url = fake.url` (ccxt then requests `<url>/api/v2/...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from tests.fakes.server import serve


@dataclass(frozen=True, slots=True)
class Logged:
    at: float
    path: str
    status: int


def market(base: str, quote: str, *, trading: str = "Enabled") -> dict[str, object]:
    """One entry of `/api/v2/markets/`, as Bitstamp documents it."""
    return {
        "name": f"{base}/{quote}",
        "market_symbol": f"{base.lower()}{quote.lower()}",
        "base_currency": base,
        "base_decimals": 8,
        "counter_currency": quote,
        "counter_decimals": 2,
        "minimum_order_value": "10",
        "trading": trading,
        "instant_order_counter_decimals": 2,
        "instant_and_market_orders": "Enabled",
        "description": f"{base} / {quote}",
        "market_type": "SPOT",
    }


def ticker(
    pair: str, *, last: str | None, bid: str, ask: str, volume: str, open_: str, timestamp: str
) -> dict[str, str | None]:
    """One entry of `/api/v2/ticker/`, as Bitstamp documents it (every figure a string; `last` None: null)."""
    return {
        "timestamp": timestamp,
        "high": last,
        "last": last,
        "bid": bid,
        "vwap": last,
        "volume": volume,
        "low": bid,
        "ask": ask,
        "open": open_,
        "open_24": open_,
        "percent_change_24": "1.24",
        "pair": pair,
    }


class FakeBitstamp:
    """Use as `async with FakeBitstamp(markets=[...], tickers=[...]) as fake:`."""

    def __init__(self, *, markets: list[dict[str, object]], tickers: list[dict[str, str | None]]) -> None:
        self.markets: object = markets
        """The `/api/v2/markets/` answer (anything JSON: a test may make it one ccxt cannot read)."""
        self.tickers = tickers
        self.ticker_errors: deque[int] = deque()
        """HTTP statuses to answer the next ticker requests with, before the tickers again."""
        self.retry_after: str | None = None
        """The Retry-After header of those error answers."""
        self.delay_s: dict[str, float] = {}
        """Seconds the fake takes to answer a path (cut short when it shuts down): a slow venue."""
        self.drops: deque[str] = deque()
        """Paths whose next requests get the connection closed with no answer at all (status 0 in the log)."""
        self.requests: list[Logged] = []
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def _log(self, request: web.Request, status: int) -> None:
        self.requests.append(Logged(time.monotonic(), request.path, status))
        async with self._changed:
            self._changed.notify_all()
        delay_s = self.delay_s.get(request.path, 0.0)
        if delay_s > 0:
            # Shutting down ends the wait, so the server's cleanup never waits on a slow answer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=delay_s)

    def _dropped(self, request: web.Request) -> bool:
        """Close the connection with no answer when `drops` says so for this path."""
        if not self.drops or self.drops[0] != request.path or request.transport is None:
            return False
        self.drops.popleft()
        request.transport.close()
        return True

    async def _markets(self, request: web.Request) -> web.StreamResponse:
        if self._dropped(request):
            await self._log(request, 0)
            raise web.HTTPInternalServerError  # never sent: the connection is already closed
        await self._log(request, 200)
        return web.json_response(self.markets)

    async def _tickers(self, request: web.Request) -> web.StreamResponse:
        if self._dropped(request):
            await self._log(request, 0)
            raise web.HTTPInternalServerError  # never sent: the connection is already closed
        if self.ticker_errors:
            status = self.ticker_errors.popleft()
            await self._log(request, status)
            headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
            return web.Response(text=f"HTTP {status}", status=status, headers=headers)
        await self._log(request, 200)
        return web.json_response(self.tickers)

    async def wait_requests(self, path: str, count: int, *, timeout: float) -> list[Logged]:
        """Wait until `count` requests for `path` have arrived."""

        def enough() -> bool:
            return sum(r.path == path for r in self.requests) >= count

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(enough)
            return [r for r in self.requests if r.path == path]

    async def __aenter__(self) -> FakeBitstamp:
        app = web.Application()
        app.router.add_get("/api/v2/markets/", self._markets)
        app.router.add_get("/api/v2/ticker/", self._tickers)
        self._runner, self._port = await serve(app)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
