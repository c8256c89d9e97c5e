"""Binance spot: the combined WebSocket stream of `<symbol>@ticker` and `<symbol>@bookTicker`, with the
REST `GET /api/v3/ticker/24hr` and `GET /api/v3/ticker/price` as fallback while the circuit breaker is
open (`binance_rest`: 24hr each poll; ticker/price when 24hr answers an error other than 429/418).

Resilience:
- a stream with no data frame for `watchdog_s` is closed and reconnected (server pings, answered by
  aiohttp's autoping, do not count as data);
- reconnects wait a jittered exponential `Backoff`;
- a stream counts as a success (the breaker closes, the backoff starts over) only once it has stayed up
  for `stable_s` (default `watchdog_s`) and delivered a frame past that point; a stream that ends sooner
  is a failure like a refused connection, so a venue that sends a frame and drops cannot make us
  reconnect in a tight loop: the backoff grows and the breaker opens;
- Binance ends a connection at 24 h, so one older than `max_connection_age_s` is replaced with no gap:
  the new connection opens beside the old, takes over at its first frame, then the old one is closed
  (a frame both delivered has one tick id, so it is stored once);
- a `CircuitBreaker` counts failed connection attempts and streams that died; OPEN moves the source to
  REST polling (state `fallback`), within a `TokenBucket` of `binance_weight_per_min` request weight;
  HALF_OPEN tries the WebSocket again. A 429/418 answer drains the bucket for its Retry-After.

Frames go through `base.deliver`; the parser keeps each stream's order (a late one is `out_of_order`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
import structlog

from pricewire_collector.sources.base import Parser, Sink, Source, deliver
from pricewire_collector.sources.binance_parse import NAME, BinanceParser
from pricewire_collector.sources.binance_rest import REST_POLL_S, RestFallback, ticker_24hr_weight
from pricewire_collector.sources.polling import wait_or_stop
from pricewire_collector.sources.resilience import Backoff, BreakerState, CircuitBreaker
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.events import SourceState

__all__ = ["NAME", "REST_POLL_S", "BinanceSource", "build", "build_parser", "ticker_24hr_weight"]

log = structlog.get_logger(__name__)

QUOTE = "USDT"
"""Binance's deepest USD-equivalent books are the USDT pairs."""
CLOSE_TIMEOUT_S = 2.0
_QUEUE_SIZE = 1024

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)
_DATA = (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY)


def build_parser(settings: Settings) -> Parser:
    return BinanceParser(settings.assets)


def build(settings: Settings) -> Source:
    return BinanceSource(settings)


@dataclass(slots=True)
class _Connection:
    """One open WebSocket and the task that moves its messages onto the shared queue."""

    number: int
    ws: aiohttp.ClientWebSocketResponse
    reader: asyncio.Task[None]

    async def close(self) -> None:
        await self.ws.close()  # the reader sees the close and ends
        self.reader.cancel()  # unless it waits on a full queue
        await asyncio.wait([self.reader])


_Item = tuple[int, aiohttp.WSMessage | None]
"""(connection number, message); None when that connection ended or could not open."""


class BinanceSource:
    """Implements `base.Source` for Binance spot."""

    def __init__(
        self,
        settings: Settings,
        *,
        poll_s: float = REST_POLL_S,
        stable_s: float | None = None,
        clock: Clock = wall_clock,
    ) -> None:
        live = settings.live
        self._parser = BinanceParser(settings.assets)
        symbols = [f"{asset}{QUOTE}" for asset in settings.assets]
        streams = [f"{s.lower()}@{kind}" for s in symbols for kind in ("ticker", "bookTicker")]
        self.url = f"{live.binance_ws_url}/stream?streams=" + "/".join(streams)
        self.rest = RestFallback(settings, self._parser, symbols=symbols, poll_s=poll_s, clock=clock)
        self._watchdog_s = live.watchdog_s
        self.stable_s = live.watchdog_s if stable_s is None else stable_s
        """How long a stream must stay up (and deliver) before it counts as a success."""
        self._max_age_s = live.max_connection_age_s
        self._clock = clock
        self.backoff = Backoff(live.backoff_initial_s, live.backoff_max_s)
        self.breaker = CircuitBreaker(live.breaker_failures, live.breaker_reset_s)
        self._connections = 0

    @property
    def name(self) -> str:
        return NAME

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Stream (or poll) until `stop` is set; venue trouble is handled here, never raised."""
        self._transport = "websocket"
        async with aiohttp.ClientSession() as session:
            work = asyncio.create_task(self._work(session, sink, stop), name="binance-source")
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                work.cancel()  # a blocked receive or request ends here, its connections closed on the way out
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        await sink.state(NAME, "stopped", transport=self._transport)

    async def _state(self, sink: Sink, state: SourceState, transport: str, detail: str | None = None) -> None:
        self._transport = transport
        await sink.state(NAME, state, transport=transport, detail=detail)

    async def _work(self, session: aiohttp.ClientSession, sink: Sink, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        await self._state(sink, "connecting", "websocket")
        while not stop.is_set():
            if not self.breaker.allows(loop.time()):
                retry_s = self.breaker.retry_in(loop.time())
                await self._state(sink, "fallback", "rest", f"websocket retried in {retry_s:.1f} s")
                await self.rest.run(session, sink, stop, self.breaker)
                if not stop.is_set():
                    await self._state(sink, "connecting", "websocket", "breaker half-open")
                continue
            detail = await self._websocket(session, sink)
            self.breaker.record_failure(loop.time())  # a stream that stayed up was a success first: this is 1
            if self.breaker.state is BreakerState.OPEN:
                log.warning("source_breaker_open", source=NAME, failures=self.breaker.consecutive, detail=detail)
                await self._state(sink, "breaker_open", "websocket", f"{self.breaker.consecutive} failures: {detail}")
                continue
            await self._state(sink, "reconnecting", "websocket", detail)
            await wait_or_stop(stop, self.backoff.next_delay())

    # --- WebSocket -------------------------------------------------------------------------------

    def next_number(self) -> int:
        """A number for the next connection, so its messages can be told from its predecessor's."""
        self._connections += 1
        return self._connections

    async def connect(self, session: aiohttp.ClientSession, queue: asyncio.Queue[_Item], number: int) -> _Connection:
        """Open the combined stream; its messages go onto `queue` tagged with `number`."""
        async with asyncio.timeout(self._watchdog_s):  # a handshake that never answers
            ws = await session.ws_connect(
                self.url, autoping=True, heartbeat=None, timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S)
            )
        reader = asyncio.create_task(_read(number, ws, queue), name=f"binance-ws-{number}")
        return _Connection(number, ws, reader)

    async def _websocket(self, session: aiohttp.ClientSession, sink: Sink) -> str:
        """Connect and stream, handing over to a fresh connection before `max_connection_age_s`.

        Returns why the stream ended (a failed attempt, a close, the watchdog)."""
        stream = _Stream(self, session, watchdog_s=self._watchdog_s, max_age_s=self._max_age_s)
        try:
            await stream.start()
        except _NETWORK_ERRORS as exc:
            log.warning("source_connect_failed", source=NAME, error=repr(exc))
            await stream.close()
            return f"connect failed: {exc!r}"
        try:
            await self._state(sink, "connected", "websocket")
            return await stream.run(sink)
        finally:
            await stream.close()

    async def handle_frame(self, raw: bytes, sink: Sink) -> None:
        """Count, parse and deliver one raw frame; a bad or out-of-order one goes to the dead letters."""
        await deliver(NAME, self._parser, sink, raw, self._clock())


class _Stream:
    """One stream's life: its current connection, and the successor that replaces it before Binance's 24 h cut."""

    def __init__(
        self, source: BinanceSource, session: aiohttp.ClientSession, *, watchdog_s: float, max_age_s: float
    ) -> None:
        self._source = source
        self._session = session
        self._watchdog_s = watchdog_s
        self._max_age_s = max_age_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(_QUEUE_SIZE)
        self._connections: dict[int, _Connection] = {}
        self._current = 0
        self._successor: int | None = None
        self._opening: asyncio.Task[None] | None = None
        self._last_frame = self._handover_at = self._stable_at = 0.0

    async def start(self) -> None:
        """Open the first connection (raises what the connection attempt raised)."""
        number = self._source.next_number()
        self._connections[number] = await self._source.connect(self._session, self._queue, number)
        self._current = number
        self._last_frame = self._loop.time()
        self._handover_at = self._last_frame + self._max_age_s
        self._stable_at = self._last_frame + self._source.stable_s

    async def run(self, sink: Sink) -> str:
        """Deliver frames until the stream is lost; returns why."""
        stable = False
        while True:
            item = await self._next()
            if isinstance(item, str):
                return item
            number, msg = item
            if number == self._successor:
                if not await self._take_over(number, msg):
                    continue
            elif number != self._current:
                continue  # a handed-over connection: its frames also come on the current one
            if msg is None or msg.type not in _DATA:
                ws = self._connections[self._current].ws
                log.warning("source_stream_closed", source=NAME, close_code=ws.close_code, error=repr(ws.exception()))
                return f"stream closed (code {ws.close_code}, error {ws.exception()!r})"
            self._last_frame = self._loop.time()
            if not stable and self._last_frame >= self._stable_at:
                stable = True  # up for stable_s and still delivering: only now is the venue trusted again
                self._source.breaker.record_success()
                self._source.backoff.reset()
            data = msg.data
            await self._source.handle_frame(data.encode() if isinstance(data, str) else data, sink)

    async def _next(self) -> _Item | str:
        """The next message of any connection, or the watchdog's verdict; starts the hand-over when due."""
        while True:
            deadline = self._last_frame + self._watchdog_s
            if self._successor is None:
                deadline = min(deadline, self._handover_at)
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._queue.get()
            except TimeoutError:
                if self._loop.time() >= self._last_frame + self._watchdog_s:
                    log.warning("source_watchdog", source=NAME, silent_s=self._watchdog_s)
                    return f"watchdog: no frame for {self._watchdog_s} s"
            self._successor = self._source.next_number()
            log.info("planned_reconnect_started", source=NAME, connection=self._successor)
            self._opening = asyncio.create_task(self._open_successor(self._successor))

    async def _open_successor(self, number: int) -> None:
        try:
            connection = await self._source.connect(self._session, self._queue, number)
        except _NETWORK_ERRORS as exc:
            log.warning("planned_reconnect_failed", source=NAME, error=repr(exc))
            await self._queue.put((number, None))
            return
        self._connections[number] = connection

    async def _take_over(self, number: int, msg: aiohttp.WSMessage | None) -> bool:
        """The successor's first data frame switches to it and closes the old connection; True then."""
        if msg is None:  # it never came up: keep the old connection, try again later
            self._successor = self._opening = None
            self._handover_at = self._loop.time() + self._source.backoff.next_delay()
            return False
        if msg.type not in _DATA:
            return False
        old = self._connections.pop(self._current)
        self._current, self._successor, self._opening = number, None, None
        self._handover_at = self._loop.time() + self._max_age_s
        await old.close()
        log.info("planned_reconnect_done", source=NAME, old=old.number, new=number)
        return True

    async def close(self) -> None:
        """Close every connection this stream opened."""
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.wait([self._opening])
        for connection in list(self._connections.values()):
            await connection.close()
        self._connections.clear()


async def _read(number: int, ws: aiohttp.ClientWebSocketResponse, queue: asyncio.Queue[_Item]) -> None:
    """Move one connection's messages onto the shared queue; None marks its end."""
    try:
        async for msg in ws:
            await queue.put((number, msg))
    except _NETWORK_ERRORS as exc:
        log.info("source_read_failed", source=NAME, connection=number, error=repr(exc))
    finally:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait((number, None))
