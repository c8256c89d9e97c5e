"""A reusable WebSocket stream loop for venues that push frames over one connection.

`WebSocketSource` connects, sends the venue's subscribe messages (none for venues that subscribe by
URL), and hands every frame to the sink and to the venue's pure `Parser`. A connection that delivers
no frame for `watchdog_s` (data or the venue's own heartbeats) is closed and opened again; every
lost connection is retried after a `Backoff` delay that starts small again once a connection has
delivered ticks. States go to the sink: `connecting`, `connected`, `reconnecting` (with why),
`stopped`. Venue trouble never escapes `run`; a failing sink (the bus refusing a dead letter) does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog

from pricewire_collector.sources.base import Parser, Sink, VenueFrameError
from pricewire_collector.sources.resilience import Backoff
from pricewire_common.clock import Clock, wall_clock

__all__ = ["TRANSPORT", "WebSocketSource"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

TRANSPORT = "websocket"
_CLOSE_WAIT_S = 2.0
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
# What a connection attempt or an open stream can fail with, short of a bug: the venue is away,
# refuses the handshake, resets the socket, or answers too slowly.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


@dataclass(slots=True)
class _Ended:
    """Why one connection ended, and whether it delivered ticks before it did."""

    reason: str
    delivered: bool


class WebSocketSource:
    """One venue's stream: implements `base.Source`."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        parser: Parser,
        subscribe: Sequence[str] = (),
        watchdog_s: float,
        backoff: Backoff,
        heartbeat_s: float | None = None,
        connect_timeout_s: float = 10.0,
        clock: Clock = wall_clock,
    ) -> None:
        self._name = name
        self._url = url
        # One parser for the source's life: a venue's sequence numbers run on across reconnects.
        self._parser = parser
        self._subscribe = tuple(subscribe)
        self._watchdog_s = watchdog_s
        self._backoff = backoff
        self._heartbeat_s = heartbeat_s
        self._connect_timeout_s = connect_timeout_s
        self._clock = clock

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._url

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Stream until `stop` is set, reconnecting on every loss; reports `stopped` at the end."""
        try:
            timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await sink.state(self._name, "connecting", transport=TRANSPORT, detail=self._url)
                while not stop.is_set():
                    ended = await _until_stopped(self._connection(session, sink), stop)
                    if ended is None:
                        break
                    if ended.delivered:
                        self._backoff.reset()
                    delay = self._backoff.next_delay()
                    log.warning(
                        "venue_connection_lost", source=self._name, reason=ended.reason, retry_in_s=round(delay, 3)
                    )
                    await sink.state(self._name, "reconnecting", transport=TRANSPORT, detail=ended.reason)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            await sink.state(self._name, "stopped", transport=TRANSPORT)

    async def _connection(self, session: aiohttp.ClientSession, sink: Sink) -> _Ended:
        """One connection, from handshake to loss; returns why it ended."""
        delivered = False
        try:
            async with session.ws_connect(
                self._url,
                heartbeat=self._heartbeat_s,
                autoping=True,
                # A venue that does not answer our close frame is not waited for long.
                timeout=aiohttp.ClientWSTimeout(ws_close=min(self._connect_timeout_s, _CLOSE_WAIT_S)),
                max_msg_size=16 * 1024 * 1024,
            ) as ws:
                for message in self._subscribe:
                    await ws.send_str(message)
                await sink.state(self._name, "connected", transport=TRANSPORT, detail=self._url)
                while True:
                    try:
                        msg = await ws.receive(timeout=self._watchdog_s)
                    except TimeoutError:
                        return _Ended(f"watchdog: no frame for {self._watchdog_s} s", delivered)
                    if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                        data = msg.data
                        raw = data.encode() if isinstance(data, str) else bytes(data)
                        delivered = await self._deliver(raw, sink) or delivered
                    elif msg.type in _CLOSED:
                        return _Ended(f"closed by the venue (code {ws.close_code})", delivered)
                    elif msg.type is aiohttp.WSMsgType.ERROR:
                        return _Ended(f"stream error: {ws.exception()!r}", delivered)
        except _CONNECTION_ERRORS as exc:
            return _Ended(f"connection failed: {exc!r}", delivered)

    async def _deliver(self, raw: bytes, sink: Sink) -> bool:
        """Hand one frame to the sink and the parser; True when it carried ticks."""
        received_ns = self._clock()
        sink.frame(self._name, raw, received_ns)
        try:
            ticks = self._parser.parse(raw, received_ns)
        except VenueFrameError as err:
            await sink.reject(err, source=self._name, frame=raw)
            return False
        for tick in ticks:
            await sink.tick(tick)
        return bool(ticks)


async def _until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """Run `work` to its end (its result), or until `stop` is set first (None; `work` is cancelled)."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            pending.cancel()
        # Lets a cancelled connection close its socket; a failure of `work` is re-raised below.
        await asyncio.gather(task, stopper, return_exceptions=True)
    return None if task.cancelled() else task.result()
