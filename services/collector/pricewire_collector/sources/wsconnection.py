"""A reusable WebSocket stream loop for venues that push frames over one connection.

`WebSocketSource` connects, sends the venue's subscribe messages (none for venues that subscribe by
URL), and hands every frame to `base.deliver` (the sink and the venue's pure `Parser`). A connection
that delivers no data frame for `watchdog_s` (ticks or the venue's own heartbeat messages; WebSocket
pings and pongs do not count, a venue can answer them while its feed is dead) is closed and opened
again. Every lost connection is retried after a `Backoff` delay, which starts small again only after
a healthy connection: one that delivered ticks and stayed up for `stable_s` (default `watchdog_s`),
so a venue that sends a frame and drops each time is retried ever more slowly, not in a storm.
With a `CircuitBreaker`, failed connections in a row (refused, or lost before they were healthy)
open it: no connection is tried until it lets one through (HALF_OPEN), which closes it again if
that connection turns out healthy. With a `ws_fallback.RestFallback` too, an open breaker moves the
source to REST polling (state `fallback`, transport `rest`) until the breaker lets that try through;
then it dials the WebSocket again (`connecting`, "breaker half-open"). States go to the sink:
`connecting`, `connected`, `reconnecting` (with why), `breaker_open` (with the count), `fallback`,
`stopped`. Venue trouble never escapes `run`; a failing sink (the bus refusing a dead letter) does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog

from pricewire_collector.sources.base import Parser, Sink, deliver
from pricewire_collector.sources.resilience import Backoff, CircuitBreaker
from pricewire_collector.sources.ws_fallback import TRANSPORT as REST_TRANSPORT
from pricewire_collector.sources.ws_fallback import RestFallback
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import LiveSettings
from pricewire_common.waits import wait_event

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
class _Connection:
    """What one connection did: when it opened (event loop time, s), how many ticks it delivered."""

    opened_s: float | None = None
    ticks: int = 0

    def healthy(self, now_s: float, stable_s: float) -> bool:
        """Delivered ticks and stayed up for `stable_s`: the venue works, a loss now is news."""
        return self.ticks > 0 and self.opened_s is not None and now_s - self.opened_s >= stable_s


class WebSocketSource:
    """One venue's stream: implements `base.Source`."""

    @classmethod
    def from_live(
        cls,
        live: LiveSettings,
        *,
        name: str,
        url: str,
        parser: Parser,
        subscribe: Sequence[str] = (),
        fallback: RestFallback | None = None,
    ) -> WebSocketSource:
        """A venue stream with the watchdog, backoff and breaker that `settings.live` configures."""
        return cls(
            name=name,
            url=url,
            parser=parser,
            subscribe=subscribe,
            watchdog_s=live.watchdog_s,
            heartbeat_s=live.watchdog_s,
            backoff=Backoff(live.backoff_initial_s, live.backoff_max_s),
            breaker=CircuitBreaker(live.breaker_failures, live.breaker_reset_s),
            fallback=fallback,
        )

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
        stable_s: float | None = None,
        breaker: CircuitBreaker | None = None,
        connect_timeout_s: float = 10.0,
        fallback: RestFallback | None = None,
        clock: Clock = wall_clock,
    ) -> None:
        if fallback is not None and breaker is None:
            raise ValueError("a REST fallback runs while the breaker is open: it needs a breaker")
        self._name = name
        self._url = url
        # One parser for the source's life: a venue's sequence numbers run on across reconnects.
        self._parser = parser
        self._subscribe = tuple(subscribe)
        self._watchdog_s = watchdog_s
        self._backoff = backoff
        self._heartbeat_s = heartbeat_s
        self._stable_s = watchdog_s if stable_s is None else stable_s
        self._breaker = breaker
        self._connect_timeout_s = connect_timeout_s
        self._fallback = fallback
        self._clock = clock

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._url

    @property
    def fallback(self) -> RestFallback | None:
        return self._fallback

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Stream until `stop` is set, reconnecting on every loss; reports `stopped` at the end."""
        loop = asyncio.get_running_loop()
        try:
            timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await sink.state(self._name, "connecting", transport=TRANSPORT, detail=self._url)
                reason = ""
                while not stop.is_set():
                    breaker = self._breaker
                    if breaker is not None and not breaker.allows(loop.time()):
                        wait_s = breaker.retry_in(loop.time())
                        log.warning(
                            "venue_breaker_open",
                            source=self._name,
                            failures=breaker.consecutive,
                            reason=reason,
                            retry_in_s=round(wait_s, 3),
                        )
                        detail = f"{breaker.consecutive} failed connections in a row, last: {reason}"
                        await sink.state(self._name, "breaker_open", transport=TRANSPORT, detail=detail)
                        if self._fallback is None:
                            await _pause(stop, wait_s)
                            continue
                        await sink.state(
                            self._name,
                            "fallback",
                            transport=REST_TRANSPORT,
                            detail=f"websocket retried in {wait_s:.1f} s",
                        )
                        # A request in flight when `stop` comes is cancelled, not waited for.
                        await _until_stopped(self._fallback.run(session, sink, stop, breaker), stop)
                        if stop.is_set():
                            break
                        await sink.state(self._name, "connecting", transport=TRANSPORT, detail="breaker half-open")
                        continue
                    seen = _Connection()
                    ended = await _until_stopped(self._connection(session, sink, seen), stop)
                    if ended is None:
                        break
                    reason = ended
                    now_s = loop.time()
                    if seen.healthy(now_s, self._stable_s):
                        self._backoff.reset()
                        if breaker is not None:
                            breaker.record_success()
                    elif breaker is not None:
                        breaker.record_failure(now_s)
                        if not breaker.allows(now_s):
                            continue  # the breaker's wait replaces the backoff's
                    delay = self._backoff.next_delay()
                    log.warning("venue_connection_lost", source=self._name, reason=reason, retry_in_s=round(delay, 3))
                    await sink.state(self._name, "reconnecting", transport=TRANSPORT, detail=reason)
                    await _pause(stop, delay)
        finally:
            await sink.state(self._name, "stopped", transport=TRANSPORT)

    async def _connection(self, session: aiohttp.ClientSession, sink: Sink, seen: _Connection) -> str:
        """One connection, from handshake to loss, noting what it did in `seen`; returns why it ended."""
        loop = asyncio.get_running_loop()
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
                seen.opened_s = loop.time()
                await sink.state(self._name, "connected", transport=TRANSPORT, detail=self._url)
                # One deadline for the data, not `receive(timeout=)`: aiohttp restarts that timeout on every
                # ping and pong it answers, so a venue that pings but sends nothing would never trip it.
                deadline = loop.time() + self._watchdog_s
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            msg = await ws.receive()
                    except TimeoutError:
                        return f"watchdog: no data for {self._watchdog_s} s"
                    if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                        deadline = loop.time() + self._watchdog_s
                        data = msg.data
                        raw = data.encode() if isinstance(data, str) else bytes(data)
                        seen.ticks += await deliver(self._name, self._parser, sink, raw, self._clock())
                    elif msg.type in _CLOSED:
                        return f"closed by the venue (code {ws.close_code})"
                    elif msg.type is aiohttp.WSMsgType.ERROR:
                        return f"stream error: {ws.exception()!r}"
                    # Anything else is not data: the deadline stands.
        except aiohttp.WSServerHandshakeError as exc:
            return f"handshake refused: HTTP {exc.status} {exc.message}"
        except _CONNECTION_ERRORS as exc:
            return f"connection failed: {exc!r}"


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` is set."""
    await wait_event(stop, seconds)


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
