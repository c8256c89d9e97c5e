"""`GET /api/v1/stream`: the live price stream as Server-Sent Events, for clients that cannot hold a WebSocket.

Each event is the WebSocket's `price_update` frame:

    event: price_update
    id: BTC-1042
    data: {"type":"price_update","data":{...},"timestamp":"..."}

A stream follows the assets of `?symbols=BTC,ETH` (all configured assets without it), starts with their
latest prices, and sends a `: heartbeat` comment when quiet. It shares the hub's fan-out: a price is
offered to its conflating mailbox without awaiting, so a slow reader gets the latest value per asset
and a reader that leaves one event unread too long is dropped.
"""

from __future__ import annotations

import asyncio
import socket

import structlog
from aiohttp import web

from pricewire_gateway.appkeys import HUB, LATEST, RESOLVER
from pricewire_gateway.auth import require_price_reader
from pricewire_gateway.errors import BadParameter, GatewayError
from pricewire_gateway.limits import STREAM_LIMITS, StreamLimits
from pricewire_gateway.mailbox import Mailbox
from pricewire_gateway.symbols import MAX_SYMBOLS
from pricewire_gateway.ws import SEND_BUFFER_BYTES

log = structlog.get_logger(__name__)

HEARTBEAT = b": heartbeat\n\n"


class PriceStream:
    """One SSE reader: what it follows and its conflating mailbox (a hub Watcher)."""

    def __init__(self, assets: frozenset[str]) -> None:
        self._assets = assets
        self.mailbox = Mailbox()
        self.ready = asyncio.Event()
        self.ended = False

    def follows(self, asset: str) -> bool:
        return asset in self._assets

    def offer(self, asset: str, seq: int, frame: bytes) -> None:
        if self.mailbox.offer(asset, seq, frame):
            self.ready.set()

    def end(self) -> None:
        self.ended = True
        self.ready.set()


def event_bytes(asset: str, seq: int, frame: bytes) -> bytes:
    """One SSE event; the frame is one line of JSON (msgspec writes no newlines)."""
    return b"event: price_update\nid: %s-%d\ndata: %s\n\n" % (asset.encode(), seq, frame)


def _assets(request: web.Request) -> list[str]:
    resolver = request.app[RESOLVER]
    for name in request.query:
        if name not in ("symbols", "token"):
            raise BadParameter(name, f"unknown parameter {name!r}; this endpoint takes `symbols` (and `token`)")
    values = request.query.getall("symbols", [])
    if len(values) > 1:
        raise BadParameter("symbols", "give `symbols` once, comma-separated: symbols=BTC,ETH")
    if not values:
        return list(resolver.assets)
    names = [name for name in values[0].split(",") if name.strip()]
    if not names or len(names) > MAX_SYMBOLS:
        raise BadParameter("symbols", f"`symbols` takes 1 to {MAX_SYMBOLS} comma-separated assets, e.g. BTC,ETH")
    unknown = [name for name in names if resolver.asset(name) is None]
    if unknown:
        raise BadParameter(
            "symbols", f"not configured assets: {', '.join(unknown)} (assets: {', '.join(resolver.assets)})"
        )
    return list(dict.fromkeys(resolver.require(name) for name in names))


async def stream_prices(request: web.Request) -> web.StreamResponse:
    """Serve price events to one reader until it goes or the gateway stops."""
    require_price_reader(request, token_param=True)  # before the 200 starts the stream: a refusal is a plain 401
    app = request.app
    hub, limits = app[HUB], app.get(STREAM_LIMITS, StreamLimits())
    assets = _assets(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:  # fixed, as for a WebSocket: what a stalled reader can cost before it conflates
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    stream = PriceStream(frozenset(assets))
    hub.watch(stream)  # before the snapshot: an update that lands meanwhile is kept (the mailbox orders by seq)
    log.info("sse_connected", assets=assets, peer=request.remote)
    try:
        for served in await app[LATEST].get_many(assets):
            stream.offer(served.price.asset, served.price.seq, hub.frame(served.price, stale=served.stale))
        await response.write(b"retry: 2000\n\n")
        while not stream.ended:
            try:
                async with asyncio.timeout(limits.heartbeat_s):
                    await stream.ready.wait()
            except TimeoutError:
                await _write(response, HEARTBEAT, limits)
                continue
            stream.ready.clear()
            for asset, seq, frame in stream.mailbox.take_keyed():
                await _write(response, event_bytes(asset, seq, frame), limits)
    except ConnectionError as exc:
        log.info("sse_ended", error=str(exc))
    except _TooSlow:
        log.info("sse_slow_client_dropped", after_s=limits.slow_client_s, conflated=stream.mailbox.conflated)
        if request.transport is not None:
            request.transport.abort()  # its unsent data would hold a graceful close forever
    finally:
        hub.unwatch(stream)
    return response


class _TooSlow(GatewayError):
    """The reader left a write pending past the limit (internal: ends the stream)."""


async def _write(response: web.StreamResponse, data: bytes, limits: StreamLimits) -> None:
    try:
        async with asyncio.timeout(limits.slow_client_s):
            await response.write(data)
    except TimeoutError as exc:
        raise _TooSlow from exc
