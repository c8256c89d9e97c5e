"""Binance spot: the combined WebSocket stream of `<symbol>@ticker` and `<symbol>@bookTicker`, with the
REST `GET /api/v3/ticker/24hr` as fallback while the circuit breaker is open.

Resilience:
- a stream with no data frame for `watchdog_s` is closed and reconnected (server pings, answered by
  aiohttp's autoping, do not count as data);
- reconnects wait a jittered exponential `Backoff`;
- Binance ends a connection at 24 h, so one older than `max_connection_age_s` is replaced with no gap:
  the new connection opens beside the old, takes over at its first frame, then the old one is closed
  (a frame both delivered has one tick id, so it is stored once);
- a `CircuitBreaker` counts failed connection attempts and streams that died; OPEN moves the source to
  REST polling (state `fallback`), within a `TokenBucket` of `binance_weight_per_min` request weight;
  HALF_OPEN tries the WebSocket again. A 429/418 answer drains the bucket for its Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

import aiohttp
import msgspec
import structlog

from pricewire_collector.sources.base import Parser, Sink, Source, VenueFrameError
from pricewire_collector.sources.binance_parse import NAME, BinanceParser, sequence_of
from pricewire_collector.sources.resilience import Backoff, BreakerState, CircuitBreaker, TokenBucket
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.events import SourceState

__all__ = ["NAME", "REST_POLL_S", "BinanceSource", "build", "build_parser", "ticker_24hr_weight"]

log = structlog.get_logger(__name__)

QUOTE = "USDT"
"""Binance's deepest USD-equivalent books are the USDT pairs."""
REST_POLL_S = 2.0
"""How often the REST fallback polls."""
DEFAULT_RETRY_AFTER_S = 10.0
"""How long a 429/418 without a usable Retry-After header holds the requests back."""
CLOSE_TIMEOUT_S = 2.0
REST_TIMEOUT_S = 10.0
_QUEUE_SIZE = 1024

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)
_ROWS = msgspec.json.Decoder(list[msgspec.Raw])
_DATA = (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY)


def ticker_24hr_weight(symbols: int) -> int:
    """Request weight of `GET /api/v3/ticker/24hr?symbols=...` (Binance: 2 for 1-20, 40 for 21-100, else 80)."""
    if 1 <= symbols <= 20:
        return 2
    if 21 <= symbols <= 100:
        return 40
    return 80


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

    def __init__(self, settings: Settings, *, poll_s: float = REST_POLL_S, clock: Clock = wall_clock) -> None:
        live = settings.live
        self._parser = BinanceParser(settings.assets)
        self._symbols = [f"{asset}{QUOTE}" for asset in settings.assets]
        streams = [f"{s.lower()}@{kind}" for s in self._symbols for kind in ("ticker", "bookTicker")]
        self.url = f"{live.binance_ws_url}/stream?streams=" + "/".join(streams)
        self.rest_url = f"{live.binance_rest_url}/api/v3/ticker/24hr"
        self._rest_params = {"symbols": json.dumps(self._symbols, separators=(",", ":"))}
        self.weight = ticker_24hr_weight(len(self._symbols))
        self._watchdog_s = live.watchdog_s
        self._max_age_s = live.max_connection_age_s
        self._poll_s = poll_s
        self._clock = clock
        self.backoff = Backoff(live.backoff_initial_s, live.backoff_max_s)
        self.breaker = CircuitBreaker(live.breaker_failures, live.breaker_reset_s)
        self.bucket = TokenBucket.per_minute(live.binance_weight_per_min)
        self._last_seq: dict[str, int] = {}
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
                await self._fallback(session, sink, stop)
                continue
            detail = await self._websocket(session, sink)
            self.breaker.record_failure(loop.time())
            if self.breaker.state is BreakerState.OPEN:
                log.warning("source_breaker_open", source=NAME, failures=self.breaker.consecutive, detail=detail)
                await self._state(sink, "breaker_open", "websocket", f"{self.breaker.consecutive} failures: {detail}")
                continue
            await self._state(sink, "reconnecting", "websocket", detail)
            await _pause(stop, self.backoff.next_delay())

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
        received_ns = self._clock()
        sink.frame(NAME, raw, received_ns)
        try:
            ticks = self._parser.parse(raw, received_ns)
            for tick in ticks:
                key, seq = sequence_of(tick)
                last = self._last_seq.get(key)
                if last is not None and seq < last:  # an equal one is a duplicate: its id dedupes it
                    raise VenueFrameError(f"{key}{seq} arrived after {key}{last}", reason="out_of_order")
                self._last_seq[key] = seq
        except VenueFrameError as err:
            await sink.reject(err, source=NAME, frame=raw)
            return
        for tick in ticks:
            await sink.tick(tick)

    # --- REST fallback ---------------------------------------------------------------------------

    async def _fallback(self, session: aiohttp.ClientSession, sink: Sink, stop: asyncio.Event) -> None:
        """Poll the REST ticker until the breaker lets a WebSocket try through (or `stop`)."""
        loop = asyncio.get_running_loop()
        await self._state(sink, "fallback", "rest", f"websocket retried in {self.breaker.retry_in(loop.time()):.1f} s")
        next_poll = loop.time()
        while not stop.is_set():
            now = loop.time()
            if self.breaker.allows(now):
                await self._state(sink, "connecting", "websocket", "breaker half-open")
                return
            wait = max(next_poll - now, self.bucket.delay(self.weight, now))
            if wait <= 0 and self.bucket.take(self.weight, now):
                await self._poll(session, sink)
                next_poll = now + self._poll_s
                continue
            await _pause(stop, min(max(wait, 0.001), self.breaker.retry_in(now)))

    async def _poll(self, session: aiohttp.ClientSession, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with session.get(
                self.rest_url, params=self._rest_params, timeout=aiohttp.ClientTimeout(total=REST_TIMEOUT_S)
            ) as response:
                body = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except _NETWORK_ERRORS as exc:
            log.warning("binance_rest_failed", error=repr(exc))
            return
        if status in (418, 429):
            hold_s = _seconds(retry_after)
            self.bucket.drain(loop.time(), for_s=hold_s)
            log.warning("binance_rate_limited", status=status, retry_after_s=hold_s)
            return
        if status != 200:
            log.warning("binance_rest_failed", status=status, body=body[:200].decode(errors="replace"))
            if 400 <= status < 500:
                error = VenueFrameError(f"HTTP {status} from ticker/24hr", reason="venue_error")
                await sink.reject(error, source=NAME, frame=body)
            return
        try:
            rows = _ROWS.decode(body)
        except msgspec.DecodeError as exc:
            sink.frame(NAME, body, self._clock())
            error = VenueFrameError(f"ticker/24hr answer is not a JSON array: {exc}", reason="malformed_frame")
            await sink.reject(error, source=NAME, frame=body)
            return
        for row in rows:
            await self._rest_row(bytes(row), sink)

    async def _rest_row(self, raw: bytes, sink: Sink) -> None:
        received_ns = self._clock()
        sink.frame(NAME, raw, received_ns)
        try:
            ticks = self._parser.parse(raw, received_ns)
        except VenueFrameError as err:
            await sink.reject(err, source=NAME, frame=raw)
            return
        for tick in ticks:
            await sink.tick(tick)


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
        self._last_frame = self._handover_at = 0.0

    async def start(self) -> None:
        """Open the first connection (raises what the connection attempt raised)."""
        number = self._source.next_number()
        self._connections[number] = await self._source.connect(self._session, self._queue, number)
        self._current = number
        self._last_frame = self._loop.time()
        self._handover_at = self._last_frame + self._max_age_s

    async def run(self, sink: Sink) -> str:
        """Deliver frames until the stream is lost; returns why."""
        first = True
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
            if first:
                first = False
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


async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` unless `stop` is set first; True when it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()


def _seconds(header: str | None) -> float:
    """A Retry-After header in seconds (Binance sends seconds), or the default when missing or odd."""
    try:
        value = float(header) if header is not None else DEFAULT_RETRY_AFTER_S
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    return value if 0 < value < 24 * 3600 else DEFAULT_RETRY_AFTER_S
