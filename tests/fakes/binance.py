"""A fake Binance spot venue on loopback: the combined stream and the REST tickers, per the documented shapes.

`/stream?streams=btcusdt@ticker/btcusdt@bookTicker/...` is the combined WebSocket stream. One pacer
task plays the market: every `interval_s` the global update id grows by one and every open connection
gets, for each subscribed symbol, a `bookTicker` frame with that id (and every `ticker_every` steps a
`24hrTicker` frame), all wrapped as `{"stream": ..., "data": ...}`. Two connections open at once get
the very same frames, as from the real venue. The server pings every `ping_s` (the client must pong).

Connection i follows `plans[i]` (later ones the default plan): refuse the handshake (HTTP 503), drop
the TCP connection after N frames, or stay silent. `inject` sends raw text to every live connection.

`GET /api/v3/ticker/24hr` and `/api/v3/ticker/price` answer for `symbols=[...]` (or `symbol=`), with
the first `rate_limited` calls answered `limit_status` (429, or 418 as when Binance bans an IP) with a
Retry-After, and every call of a path in `failing` answered with that HTTP status and Binance's error
body; every call is recorded with its time and the request weight Binance documents for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any

from aiohttp import web

from tests.fakes.server import serve


def _compact(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Plan:
    """How one WebSocket connection behaves."""

    refuse: bool = False
    drop_after: int | None = None
    """Cut the TCP connection (no close frame) after this many frames."""
    silent: bool = False


@dataclass(slots=True)
class Connection:
    """What the fake saw of one WebSocket connection (loop times)."""

    number: int
    streams: tuple[str, ...]
    opened_at: float
    first_frame_at: float | None = None
    closed_at: float | None = None
    frames: int = 0


@dataclass(frozen=True, slots=True)
class RestCall:
    path: str
    at: float
    weight: int
    status: int


@dataclass
class _Live:
    record: Connection
    ws: web.WebSocketResponse
    request: web.Request
    plan: Plan


def ticker_24hr_weight(symbols: int | None) -> int:
    """Binance's documented weight of ticker/24hr: 2 for 1-20 symbols, 40 for 21-100, 80 beyond or for all."""
    if symbols is None:
        return 80
    return 2 if symbols <= 20 else 40 if symbols <= 100 else 80


@dataclass
class FakeBinance:
    """The venue; `async with FakeBinance(...) as fake:` serves on `fake.ws_url` / `fake.rest_url`."""

    symbols: Sequence[str] = ("BTCUSDT", "ETHUSDT")
    interval_s: float = 0.02
    ticker_every: int = 5
    ping_s: float | None = 0.1
    plans: list[Plan] = field(default_factory=list)
    default_plan: Plan = field(default_factory=Plan)
    rate_limited: int = 0
    limit_status: int = 429
    retry_after_s: int = 1
    failing: dict[str, int] = field(default_factory=dict)
    """Path -> the HTTP status every call of it gets (e.g. {"/api/v3/ticker/24hr": 503})."""
    connections: list[Connection] = field(default_factory=list)
    rest_calls: list[RestCall] = field(default_factory=list)
    update_id: int = 400_900_000
    steps: int = 0

    def __post_init__(self) -> None:
        self._live: list[_Live] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._pacer: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._last_event_ms = 0
        self.port = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def weight_used(self) -> int:
        return sum(call.weight for call in self.rest_calls)

    async def __aenter__(self) -> FakeBinance:
        app = web.Application()
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/api/v3/ticker/24hr", self._ticker_24hr)
        app.router.add_get("/api/v3/ticker/price", self._ticker_price)
        self._runner, self.port = await serve(app)
        self._pacer = asyncio.create_task(self._pace(), name="fake-binance-pacer")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            await asyncio.wait([self._pacer])
        for live in list(self._live):
            await live.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds; re-checked on every change the fake sees."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def inject(self, frame: str) -> None:
        """Send raw text to every live, non-silent connection."""
        for live in list(self._live):
            if not live.plan.silent and not live.ws.closed:
                await live.ws.send_str(frame)

    # --- the market ---------------------------------------------------------------------------

    def book_frame(self, symbol: str, update_id: int) -> str:
        bid = Decimal(60000 if symbol.startswith("BTC") else 3000) + Decimal(update_id % 1000) / 100
        data = {"u": update_id, "s": symbol, "b": f"{bid:.8f}", "B": "1.50000000", "a": f"{bid + Decimal('0.02'):.8f}"}
        data["A"] = "2.25000000"
        return _compact({"stream": f"{symbol.lower()}@bookTicker", "data": data})

    def ticker_frame(self, symbol: str, event_ms: int) -> str:
        last = Decimal(60000 if symbol.startswith("BTC") else 3000) + Decimal(self.steps % 1000) / 100
        data = {
            "e": "24hrTicker", "E": event_ms, "s": symbol, "p": "12.50000000", "P": "0.021",
            "w": f"{last:.8f}", "x": f"{last:.8f}", "c": f"{last + Decimal('0.01'):.8f}", "Q": "0.01000000",
            "b": f"{last:.8f}", "B": "1.00000000", "a": f"{last + Decimal('0.02'):.8f}", "A": "1.00000000",
            "o": f"{last - Decimal('12.5'):.8f}", "h": f"{last + 100:.8f}", "l": f"{last - 100:.8f}",
            "v": "12345.67800000", "q": "740000000.00000000", "O": event_ms - 86_400_000, "C": event_ms,
            "F": 1, "L": 1000, "n": 1000,
        }  # fmt: skip
        return _compact({"stream": f"{symbol.lower()}@ticker", "data": data})

    async def _pace(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)  # the venue's own pace
            self.steps += 1
            self.update_id += 1
            frames = [(f"{s.lower()}@bookTicker", self.book_frame(s, self.update_id)) for s in self.symbols]
            if self.steps % self.ticker_every == 0:
                event_ms = max(time.time_ns() // 1_000_000, self._last_event_ms + 1)
                self._last_event_ms = event_ms
                frames += [(f"{s.lower()}@ticker", self.ticker_frame(s, event_ms)) for s in self.symbols]
            for live in list(self._live):
                await self._send(live, [frame for stream, frame in frames if stream in live.record.streams])
            await self._notify()

    async def _send(self, live: _Live, frames: list[str]) -> None:
        if live.plan.silent or live.ws.closed:
            return
        loop = asyncio.get_running_loop()
        for frame in frames:
            if live.plan.drop_after is not None and live.record.frames >= live.plan.drop_after:
                if live.request.transport is not None:
                    live.request.transport.abort()
                return
            with contextlib.suppress(ConnectionError):
                await live.ws.send_str(frame)
            live.record.frames += 1
            if live.record.first_frame_at is None:
                live.record.first_frame_at = loop.time()

    # --- handlers -------------------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        number = len(self.connections)
        plan = self.plans[number] if number < len(self.plans) else self.default_plan
        streams = tuple(request.query.get("streams", "").split("/"))
        record = Connection(number, streams, opened_at=loop.time())
        self.connections.append(record)
        if plan.refuse:
            record.closed_at = loop.time()
            await self._notify()
            return web.Response(status=503, text="Service Unavailable")
        ws = web.WebSocketResponse(heartbeat=self.ping_s, autoping=True)
        await ws.prepare(request)
        live = _Live(record, ws, request, plan)
        self._live.append(live)
        await self._notify()
        try:
            async for _ in ws:  # subscriptions over the socket are not needed by the client under test
                pass
        finally:
            self._live.remove(live)
            record.closed_at = loop.time()
            await self._notify()
        return ws

    def _requested(self, request: web.Request) -> list[str] | None:
        if "symbols" in request.query:
            return [str(s) for s in json.loads(request.query["symbols"])]
        if "symbol" in request.query:
            return [request.query["symbol"]]
        return None

    async def _rest(
        self, request: web.Request, weight: int, rows: Callable[[list[str]], list[dict[str, Any]]]
    ) -> web.Response:
        loop = asyncio.get_running_loop()
        requested = self._requested(request) or list(self.symbols)
        limited = sum(1 for call in self.rest_calls if call.status in (418, 429)) < self.rate_limited
        status = self.limit_status if limited else self.failing.get(request.path, 200)
        self.rest_calls.append(RestCall(request.path, loop.time(), weight, status))
        await self._notify()
        if limited:
            body = {
                "code": -1003,
                "msg": "Too much request weight used; current limit is 6000 request weight per 1 MINUTE.",
            }
            return web.json_response(body, status=status, headers={"Retry-After": str(self.retry_after_s)})
        if status != 200:
            body = {"code": -1001, "msg": "Internal error; unable to process your request. Please try again."}
            return web.json_response(body, status=status)
        return web.Response(text=_compact(rows(requested)), content_type="application/json")

    @staticmethod
    def _level(symbol: str) -> Decimal:
        return Decimal(60000 if symbol.startswith("BTC") else 3000)

    async def _ticker_24hr(self, request: web.Request) -> web.Response:
        requested = self._requested(request)
        weight = ticker_24hr_weight(None if requested is None else len(requested))

        def rows(symbols: list[str]) -> list[dict[str, Any]]:
            close_ms = time.time_ns() // 1_000_000
            out = []
            for symbol in symbols:
                last = Decimal(60000 if symbol.startswith("BTC") else 3000) + Decimal(self.steps % 1000) / 100
                out.append({
                    "symbol": symbol, "priceChange": "12.50000000", "priceChangePercent": "0.021",
                    "weightedAvgPrice": f"{last:.8f}", "prevClosePrice": f"{last:.8f}",
                    "lastPrice": f"{last:.8f}", "lastQty": "0.01000000", "bidPrice": f"{last - Decimal('0.01'):.8f}",
                    "bidQty": "1.00000000", "askPrice": f"{last + Decimal('0.01'):.8f}", "askQty": "1.00000000",
                    "openPrice": f"{last - Decimal('12.5'):.8f}", "highPrice": f"{last + 100:.8f}",
                    "lowPrice": f"{last - 100:.8f}", "volume": "12345.67800000", "quoteVolume": "740000000.00000000",
                    "openTime": close_ms - 86_400_000, "closeTime": close_ms,
                    "firstId": 1, "lastId": 1000, "count": 1000,
                })  # fmt: skip
            return out

        return await self._rest(request, weight, rows)

    async def _ticker_price(self, request: web.Request) -> web.Response:
        requested = self._requested(request)
        weight = 2 if requested is not None and "symbol" in request.query else 4

        def rows(symbols: list[str]) -> list[dict[str, Any]]:
            return [{"symbol": s, "price": f"{self._level(s) + Decimal(self.steps % 1000) / 100:.8f}"} for s in symbols]

        return await self._rest(request, weight, rows)
