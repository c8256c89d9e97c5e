"""A fake Coinbase Exchange WebSocket feed on loopback, speaking the documented protocol.

A client must send `{"type": "subscribe", "product_ids": [...], "channels": [...ticker...]}` first
(within 5 s, as the real feed demands); anything else is answered with an `error` frame and a close.
A subscribed client gets a `subscriptions` frame, then the script of its connection: connection i
plays `scripts[i]` (later connections get none). A script sends frames, pauses, drops the TCP
connection without a close frame, or goes silent (the connection stays open, nothing is sent).
A script that ends leaves its connection open and quiet, too. Pings are answered throughout; with
`ping_every_s` the fake also pings the client at that pace, as a venue's keep-alive does (data or not).
With `refuse_handshakes=n` the first n handshakes are answered HTTP 503 (the feed is down).

The same server answers the REST fallback's `GET /products/{product_id}/ticker` (at `rest_url`) with
`rest_tickers[product_id]` (see `rest_ticker`), or 404 `{"message":"NotFound"}` for another product;
the first `rest_rate_limited` requests get HTTP 429 with `Retry-After: rest_retry_after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes.script import Drop, Pause, Send, Step
from tests.fakes.server import serve

PATH = "/"


def _compact(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"))


def ticker(
    product_id: str,
    sequence: int,
    price: str,
    *,
    time: str = "2022-10-19T23:28:22.061769Z",
    open_24h: str | None = None,
    volume_24h: str = "245532.79269678",
    best_bid: str | None = None,
    best_ask: str | None = None,
    trade_id: int | None = None,
) -> str:
    """A `ticker` frame as documented (every field, strings for decimals)."""
    value = Decimal(price)
    return _compact(
        {
            "type": "ticker",
            "sequence": sequence,
            "product_id": product_id,
            "price": price,
            "open_24h": open_24h or str(value - Decimal("25.57")),
            "volume_24h": volume_24h,
            "low_24h": str(value - Decimal("30.1")),
            "high_24h": str(value + Decimal("28.58")),
            "volume_30d": "9788783.60117027",
            "best_bid": best_bid or str(value - Decimal("0.18")),
            "best_bid_size": "0.46688654",
            "best_ask": best_ask or str(value + Decimal("0.05")),
            "best_ask_size": "1.56637040",
            "side": "buy",
            "time": time,
            "trade_id": trade_id if trade_id is not None else sequence // 100,
            "last_size": "11.4396987",
        }
    )


def rest_ticker(
    price: str,
    trade_id: int,
    *,
    time: str = "2020-03-20T00:22:57.833Z",
    volume: str = "53602.03940154",
    bid: str | None = None,
    ask: str | None = None,
) -> str:
    """A `GET /products/{product_id}/ticker` answer as documented (decimals as strings, `trade_id` a number)."""
    value = Decimal(price)
    return _compact(
        {
            "ask": ask or str(value + Decimal("0.01")),
            "bid": bid or str(value - Decimal("0.01")),
            "volume": volume,
            "trade_id": trade_id,
            "price": price,
            "size": "0.00698254",
            "time": time,
        }
    )


def heartbeat(product_id: str, sequence: int, *, time: str = "2022-10-19T23:28:23.000000Z") -> str:
    """A `heartbeat` channel frame."""
    return _compact(
        {
            "type": "heartbeat",
            "sequence": sequence,
            "last_trade_id": sequence // 100,
            "product_id": product_id,
            "time": time,
        }
    )


def subscriptions(product_ids: Sequence[str], channels: Sequence[str]) -> str:
    """The `subscriptions` frame that confirms a subscribe."""
    return _compact(
        {"type": "subscriptions", "channels": [{"name": c, "product_ids": list(product_ids)} for c in channels]}
    )


def error(message: str, reason: str) -> str:
    """An `error` frame."""
    return _compact({"type": "error", "message": message, "reason": reason})


@dataclass(slots=True)
class Subscribed:
    """What one connection subscribed to."""

    product_ids: list[str]
    channels: list[str]


def _subscription(text: str) -> Subscribed | str:
    """The subscribe request, or why it is not one."""
    try:
        request = json.loads(text)
    except ValueError:
        return "malformed JSON"
    if not isinstance(request, dict) or request.get("type") != "subscribe":
        return "type must be subscribe"
    products = request.get("product_ids")
    if not isinstance(products, list) or not products or not all(isinstance(p, str) and p for p in products):
        return "product_ids must be a list of products"
    channels = [
        c if isinstance(c, str) else c.get("name") if isinstance(c, dict) else None
        for c in request.get("channels") or []
    ]
    if "ticker" not in channels:
        return "channels must include ticker"
    return Subscribed(list(products), [c for c in channels if isinstance(c, str)])


@dataclass
class FakeCoinbase:
    """The fake feed; `async with FakeCoinbase(scripts) as fake:` then point the source at `fake.url`."""

    scripts: Sequence[Sequence[Step]] = ()
    connections: int = 0
    subscribed: list[Subscribed] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Why each refused subscribe was refused."""
    opened_s: list[float] = field(default_factory=list)
    """When each connection subscribed (event loop time, s)."""
    ping_every_s: float | None = None
    refuse_handshakes: int = 0
    handshakes_s: list[float] = field(default_factory=list)
    """When each handshake arrived, refused or not (event loop time, s)."""
    rest_tickers: dict[str, str] = field(default_factory=dict)
    """The REST ticker answer per product."""
    rest_rate_limited: int = 0
    rest_retry_after: str = "1"
    rest_requests: list[tuple[str, float]] = field(default_factory=list)
    """Each REST ticker request: (product id, event loop time in s)."""
    _runner: web.AppRunner | None = None
    _port: int = 0
    _sockets: set[web.WebSocketResponse] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> FakeCoinbase:
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        app.router.add_get("/products/{product_id}/ticker", self._rest_ticker)
        self._runner, self._port = await serve(app)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_connections(self, count: int, *, timeout: float = 10.0) -> None:
        """Until `count` connections have subscribed."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.subscribed) >= count)

    async def wait_rest_requests(self, count: int, *, timeout: float = 10.0) -> None:
        """Until `count` REST ticker requests have arrived."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.rest_requests) >= count)

    async def _rest_ticker(self, request: web.Request) -> web.Response:
        product_id = request.match_info["product_id"]
        async with self._changed:
            self.rest_requests.append((product_id, asyncio.get_running_loop().time()))
            self._changed.notify_all()
        if len(self.rest_requests) <= self.rest_rate_limited:
            return web.json_response(
                {"message": "Public rate limit exceeded"}, status=429, headers={"Retry-After": self.rest_retry_after}
            )
        body = self.rest_tickers.get(product_id)
        if body is None:
            return web.json_response({"message": "NotFound"}, status=404)
        return web.Response(text=body, content_type="application/json")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes_s.append(asyncio.get_running_loop().time())
        if len(self.handshakes_s) <= self.refuse_handshakes:
            return web.Response(status=503, text="down for maintenance")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        index = self.connections
        self.connections += 1
        self._sockets.add(ws)
        try:
            await self._serve(ws, request, index)
        finally:
            self._sockets.discard(ws)
        return ws

    async def _serve(self, ws: web.WebSocketResponse, request: web.Request, index: int) -> None:
        try:
            first = await ws.receive(timeout=5.0)
        except TimeoutError:
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no subscribe within 5 s")
            return
        subscribed = _subscription(first.data) if first.type is WSMsgType.TEXT else "expected a text frame"
        if isinstance(subscribed, str):
            self.refused.append(subscribed)
            await ws.send_str(error("Failed to subscribe", subscribed))
            await ws.close()
            return
        await ws.send_str(subscriptions(subscribed.product_ids, subscribed.channels))
        async with self._changed:
            self.subscribed.append(subscribed)
            self.opened_s.append(asyncio.get_running_loop().time())
            self._changed.notify_all()
        reader = asyncio.create_task(_read_until_closed(ws))
        pinger = asyncio.create_task(_ping(ws, self.ping_every_s)) if self.ping_every_s else None
        try:
            for step in self.scripts[index] if index < len(self.scripts) else ():
                if reader.done():
                    return
                if isinstance(step, Send):
                    await ws.send_str(step.frame)
                elif isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                elif isinstance(step, Drop):
                    if request.transport is not None:
                        request.transport.abort()
                    return
                else:
                    break
            await reader
        finally:
            for task in (reader, pinger):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    """Reads (so pings are answered and the client's close is seen) until the connection ends."""
    async for _ in ws:
        pass


async def _ping(ws: web.WebSocketResponse, every_s: float) -> None:
    """WebSocket pings at the venue's pace until the connection ends."""
    with contextlib.suppress(ConnectionError):
        while not ws.closed:
            await asyncio.sleep(every_s)
            await ws.ping()
