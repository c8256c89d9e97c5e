"""A fake Kraken WebSocket v2 (`/v2`) on loopback, speaking the documented protocol.

On connect it sends the `status` channel update, as Kraken does. A client must then send
`{"method": "subscribe", "params": {"channel": "ticker", "symbol": [...]}}` (within 5 s); each pair
is acknowledged on its own (`"success": true`, or `"success": false` with an error for a pair the fake
does not list). Anything else is answered with an error and a close. A subscribed client gets the script
of its connection: connection i plays `scripts[i]` (later connections get none). Steps send frames,
pause, drop the TCP connection without a close frame, or go silent. `{"method": "ping"}` gets a pong
throughout, as do WebSocket pings. With `refuse_handshakes=n` the first n handshakes are answered
HTTP 503 (the exchange is down).

The same server answers the REST fallback's `GET /0/public/Ticker?pair=...` (at `rest_url`) with
`rest_body` (see `rest_answer` and `rest_ticker`), HTTP 200 as Kraken does even for its errors.
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

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes.script import Drop, Pause, Send, Step
from tests.fakes.server import serve

PATH = "/v2"
PAIRS = frozenset({"BTC/USD", "ETH/USD", "SOL/USD", "ADA/USD", "DOT/USD", "DOGE/USD"})
TIME_IN = "2023-09-25T09:04:31.742599Z"
TIME_OUT = "2023-09-25T09:04:31.742648Z"

# Kraken v2 writes its figures as JSON numbers: Decimal digits go out as numbers, unchanged.
_ENCODER = msgspec.json.Encoder(decimal_format="number")


def _compact(document: Any) -> str:
    return _ENCODER.encode(document).decode()


def ticker(
    symbol: str,
    last: str,
    *,
    kind: str = "update",
    change: str = "-17.5",
    volume: str = "997038.98383185",
    bid: str | None = None,
    ask: str | None = None,
    timestamp: str | None = "2023-09-25T09:04:31.742648Z",
) -> str:
    """A `ticker` snapshot or update with one pair, every documented field as a JSON number."""
    pair = entry(symbol, last, change=change, volume=volume, bid=bid, ask=ask, timestamp=timestamp)
    return tickers(pair, kind=kind)


def tickers(*entries: dict[str, object], kind: str = "snapshot") -> str:
    """A `ticker` snapshot or update with several pairs (each from `entry`)."""
    return _compact({"channel": "ticker", "type": kind, "data": list(entries)})


def entry(
    symbol: str,
    last: str,
    *,
    change: str = "-17.5",
    volume: str = "997038.98383185",
    bid: str | None = None,
    ask: str | None = None,
    timestamp: str | None = "2023-09-25T09:04:31.742648Z",
) -> dict[str, object]:
    """One pair's ticker data, every documented field."""
    value = Decimal(last)
    pair: dict[str, object] = {
        "symbol": symbol,
        "bid": Decimal(bid) if bid is not None else value - Decimal("0.1"),
        "bid_qty": Decimal("740.0"),
        "ask": Decimal(ask) if ask is not None else value + Decimal("0.1"),
        "ask_qty": Decimal("1361.44813783"),
        "last": value,
        "volume": Decimal(volume),
        "vwap": value - Decimal("3.2"),
        "low": value - Decimal("120.5"),
        "high": value + Decimal("88.25"),
        "change": Decimal(change),
        "change_pct": _percent(Decimal(change), value),
    }
    if timestamp is not None:
        pair["timestamp"] = timestamp
    return pair


def _percent(change: Decimal, last: Decimal) -> Decimal:
    try:
        return (change * 100 / (last - change)).quantize(Decimal("0.01"))
    except ArithmeticError:  # a test's impossible figures (an open of 0, exponents beyond any context)
        return Decimal(0)


def heartbeat() -> str:
    return _compact({"channel": "heartbeat"})


def status(system: str = "online") -> str:
    """The `status` channel update sent on connect."""
    data = [{"api_version": "v2", "connection_id": 13834774380200032777, "system": system, "version": "2.0.0"}]
    return _compact({"channel": "status", "data": data, "type": "update"})


def subscribed(symbol: str) -> str:
    """The acknowledgement of one pair's subscription."""
    result = {"channel": "ticker", "snapshot": True, "symbol": symbol}
    return _compact(
        {"method": "subscribe", "result": result, "success": True, "time_in": TIME_IN, "time_out": TIME_OUT}
    )


def refused(message: str, *, method: str = "subscribe", symbol: str | None = None) -> str:
    """An error answer (`"success": false`)."""
    answer: dict[str, object] = {"error": message, "method": method, "success": False}
    if symbol is not None:
        answer["symbol"] = symbol
    return _compact({**answer, "time_in": TIME_IN, "time_out": TIME_OUT})


def _subscription(text: str) -> list[str] | str:
    """The pairs of a ticker subscribe request, or why it is not one."""
    try:
        request = json.loads(text)
    except ValueError:
        return "Malformed request"
    if not isinstance(request, dict) or request.get("method") != "subscribe":
        return "Method not found"
    params = request.get("params")
    if not isinstance(params, dict) or params.get("channel") != "ticker":
        return "Channel must be ticker"
    symbols = params.get("symbol")
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) for s in symbols):
        return "Field symbol must be a list of pairs"
    return symbols


def rest_ticker(last: str, *, volume_24h: str = "4412.73601799", open_today: str = "30502.80000") -> dict[str, object]:
    """One pair of a `GET /0/public/Ticker` answer as documented (every figure a string)."""
    value = Decimal(last)
    return {
        "a": [str(value + Decimal("0.1")), "1", "1.000"],
        "b": [str(value - Decimal("0.1")), "1", "1.000"],
        "c": [last, "0.00067643"],
        "v": ["4083.67001100", volume_24h],
        "p": [last, last],
        "t": [34619, 38907],
        "l": [str(value - Decimal("100")), str(value - Decimal("100"))],
        "h": [str(value + Decimal("100")), str(value + Decimal("100"))],
        "o": open_today,
    }


def rest_answer(result: dict[str, object], *, error: Sequence[str] = ()) -> str:
    """A Kraken REST answer: `{"error": [...], "result": {...}}`."""
    return json.dumps({"error": list(error), "result": result}, separators=(",", ":"))


@dataclass
class FakeKraken:
    """The fake exchange; `async with FakeKraken(scripts) as fake:` then point the source at `fake.url`."""

    scripts: Sequence[Sequence[Step]] = ()
    pairs: frozenset[str] = PAIRS
    connections: int = 0
    subscribed: list[list[str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    refuse_handshakes: int = 0
    handshakes_s: list[float] = field(default_factory=list)
    """When each handshake arrived, refused or not (event loop time, s)."""
    rest_body: str = '{"error":["EGeneral:Unavailable"]}'
    rest_requests: list[dict[str, str]] = field(default_factory=list)
    """The query of each REST ticker request."""
    _runner: web.AppRunner | None = None
    _port: int = 0
    _sockets: set[web.WebSocketResponse] = field(default_factory=set)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}{PATH}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> FakeKraken:
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        app.router.add_get("/0/public/Ticker", self._rest_ticker)
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

    async def _rest_ticker(self, request: web.Request) -> web.Response:
        async with self._changed:
            self.rest_requests.append(dict(request.query))
            self._changed.notify_all()
        return web.Response(text=self.rest_body, content_type="application/json")

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
        await ws.send_str(status())
        try:
            first = await ws.receive(timeout=5.0)
        except TimeoutError:
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no subscribe within 5 s")
            return
        symbols = _subscription(first.data) if first.type is WSMsgType.TEXT else "Malformed request"
        if isinstance(symbols, str):
            self.refused.append(symbols)
            await ws.send_str(refused(symbols))
            await ws.close()
            return
        for symbol in symbols:
            await ws.send_str(
                subscribed(symbol) if symbol in self.pairs else refused("Currency pair not supported", symbol=symbol)
            )
        async with self._changed:
            self.subscribed.append(symbols)
            self._changed.notify_all()
        reader = asyncio.create_task(_answer_until_closed(ws))
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
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _answer_until_closed(ws: web.WebSocketResponse) -> None:
    """Reads until the connection ends, answering `ping` requests (and WebSocket pings, by autoping)."""
    async for msg in ws:
        if msg.type is WSMsgType.TEXT and '"ping"' in msg.data:
            await ws.send_str(_compact({"method": "pong", "time_in": TIME_IN, "time_out": TIME_OUT}))
