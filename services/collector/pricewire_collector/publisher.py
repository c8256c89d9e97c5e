"""Publishes ticks to JetStream: checked, de-duplicated by id, retried, bounded.

Every tick is first checked with `rules.check_tick`; a tick that breaks the contract goes to the
dead-letter subject `md.dlq.collector` with its reason and is never published as a tick. Good
ticks wait, in order, in a bounded in-memory buffer; a sender task publishes them in windows of
up to `max_in_flight` (JetStream publishes acked asynchronously, `js_publish`, each with header
`Nats-Msg-Id` = tick id) and
waits for the acks. A tick whose publish fails (ack timeout, no responders, connection lost) goes
back to the front of the buffer and is sent again after a backoff, with the SAME id, so JetStream
stores it once even when the lost ack hid a stored message.

Overflow policy: when the buffer holds `max_buffer` unsent ticks, the OLDEST unsent ticks are
dropped (a price feed's newest quote is worth the most), counted in `stats.dropped` and logged
(`ticks_dropped`, on the first drop of a run of drops and then every `DROP_LOG_EVERY`). Ticks
still unsent when `close` gives up are counted and logged the same way. Nothing goes silently.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from types import TracebackType

import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import PubAck
from opentelemetry.trace import Span

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import InvalidEvent
from pricewire_common.events import Tick, encode
from pricewire_common.js_publish import AckedPublisher
from pricewire_common.rules import check_tick
from pricewire_common.tracing import Tracing, end_all, with_traceparent
from pricewire_common.waits import wait_event

__all__ = ["DROP_LOG_EVERY", "Publisher", "PublisherStats"]

log = structlog.get_logger(__name__)

DROP_LOG_EVERY = 1000
"""While the buffer overflows, log one `ticks_dropped` line per this many drops."""

# Failures after which the same tick is worth sending again: the bus is slow, away or reconnecting.
_RETRYABLE: tuple[type[BaseException], ...] = (NatsError, TimeoutError)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherStats:
    """Counters of one publisher since it started."""

    published: int
    """Ticks JetStream acknowledged (including duplicates)."""
    duplicates: int
    """Acks that said the id was already stored (`PubAck.duplicate`)."""
    retries: int
    """Publish attempts beyond each tick's first."""
    dropped: int
    """Good ticks never published: buffer overflow, or still unsent at close."""
    rejected: int
    """Ticks that broke the contract and went to the dead-letter subject."""
    buffered: int
    """Ticks waiting or in flight now."""


@dataclass(frozen=True, slots=True)
class _Outgoing:
    tick: Tick
    subject: str
    payload: bytes
    headers: dict[str, str]
    span: Span | None = None
    """The `publish` span of a sampled tick, ended by its ack."""


class Publisher:
    """Checks ticks and publishes them to JetStream in order; use as `async with`, or start/close."""

    def __init__(
        self,
        nc: NATS,
        *,
        dead_letters: DeadLetters,
        assets: Collection[str] | None = None,
        max_buffer: int = 10_000,
        max_in_flight: int = 256,
        ack_timeout_s: float = 2.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        flush_timeout_s: float = 5.0,
        observe: Callable[[Tick], None] | None = None,
        acked: Callable[[Tick], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if max_buffer < 1 or max_in_flight < 1:
            raise ValueError("max_buffer and max_in_flight must be positive")
        self._jetstream = AckedPublisher(nc)
        self._dead_letters = dead_letters
        self._assets = assets
        self._max_buffer = max_buffer
        self._max_in_flight = max_in_flight
        self._ack_timeout_s = ack_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._flush_timeout_s = flush_timeout_s
        self._observe = observe
        """Told of every good tick as it is queued (the service's metrics: latency per venue)."""
        self._acked = acked
        """Told of every tick JetStream acknowledged, duplicates included (the fault tests' ledger)."""
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._buffer: deque[_Outgoing] = deque()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed = asyncio.Condition()
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        self._published = 0
        self._duplicates = 0
        self._retries = 0
        self._dropped = 0
        self._drops_in_a_row = 0

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        return PublisherStats(
            published=self._published,
            duplicates=self._duplicates,
            retries=self._retries,
            dropped=self._dropped,
            rejected=self._dead_letters.total,
            buffered=len(self._buffer) + self._in_flight,
        )

    def check(self) -> None:
        """Re-raise the error that stopped the sender task, if one did."""
        if self._sender is not None and self._sender.done() and not self._sender.cancelled():
            error = self._sender.exception()
            if error is not None:
                raise error

    async def wait_failed(self) -> None:
        """Return when the sender task has stopped, re-raising the error that stopped it."""
        if self._sender is not None:
            await asyncio.wait({self._sender})
        self.check()

    def start(self) -> None:
        """Start the sender task."""
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_forever(), name="collector-publisher")

    async def __aenter__(self) -> Publisher:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def submit(self, tick: Tick) -> None:
        """Check `tick` and queue it for publishing, or dead-letter it when it breaks the contract.

        Raises whatever the bus raises when a dead letter cannot be stored (the caller's boundary
        decides); a good tick never waits on the bus here.
        """
        if self._closed:
            raise RuntimeError("the publisher is closed")
        try:
            check_tick(tick, assets=self._assets)
            subject = subjects.tick(tick.source, tick.base, tick.quote)
        except InvalidEvent as err:
            payload = encode(tick)
            # The letter names the subject the tick would have had, even when that is not a valid one.
            await self._dead_letters.reject(
                err, subject=f"{subjects.TICK_ROOT}.{tick.source}.{tick.symbol}", payload=payload
            )
            await self._notify()
            return
        # A tick of a sampled frame (the current span) gets a `publish` span and carries its traceparent.
        span = None if self._tracing is None else self._tracing.publish(subject, message_id=tick.id)
        self._buffer.append(
            _Outgoing(tick, subject, encode(tick), with_traceparent({MSG_ID_HEADER: tick.id}, span), span)
        )
        if self._observe is not None:
            self._observe(tick)
        self._trim()
        self._idle.clear()
        self._wakeup.set()

    async def wait_for(self, predicate: Callable[[PublisherStats], bool], *, timeout: float) -> PublisherStats:
        """Wait until the counters satisfy `predicate` (raises TimeoutError after `timeout` s).

        The predicate is re-read after every window of acks and every rejection.
        """
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.stats))
            return self.stats

    async def flush(self, *, timeout: float) -> bool:
        """Wait until every queued tick is acknowledged; False when `timeout` s pass first."""
        return await wait_event(self._idle, timeout)

    async def close(self, *, timeout: float | None = None) -> None:
        """Refuse new ticks, flush for at most `timeout` s (default `flush_timeout_s`), stop the sender.

        Ticks still unsent then are counted as dropped and logged.
        """
        if self._closed:
            return
        self._closed = True
        flushed = await self.flush(timeout=self._flush_timeout_s if timeout is None else timeout)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self._jetstream.close()
        unsent = len(self._buffer) + self._in_flight
        self._buffer.clear()
        self._in_flight = 0
        if unsent:
            self._dropped += unsent
            log.warning("ticks_dropped", cause="unsent_at_close", count=unsent, dropped_total=self._dropped)
        log.info("publisher_closed", flushed=flushed, **asdict(self.stats))

    def _trim(self) -> None:
        """Drop the oldest unsent ticks beyond `max_buffer`."""
        excess = len(self._buffer) - self._max_buffer
        if excess <= 0:
            self._drops_in_a_row = 0
            return
        for _ in range(excess):
            dropped = self._buffer.popleft()
            if dropped.span is not None:
                end_all([dropped.span], BufferError("dropped: the publisher's buffer was full"))
        self._dropped += excess
        before = self._drops_in_a_row
        self._drops_in_a_row += excess
        if before == 0 or before // DROP_LOG_EVERY != self._drops_in_a_row // DROP_LOG_EVERY:
            log.warning(
                "ticks_dropped",
                cause="buffer_full",
                max_buffer=self._max_buffer,
                in_a_row=self._drops_in_a_row,
                dropped_total=self._dropped,
            )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _send_forever(self) -> None:
        backoff = self._backoff_initial_s
        while True:
            if not self._buffer:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            window = [self._buffer.popleft() for _ in range(min(self._max_in_flight, len(self._buffer)))]
            self._in_flight = len(window)
            try:
                failed = await self._send(window)
            finally:
                self._in_flight = 0
            if failed:
                # Back to the front, in order, to go again with the same ids.
                self._buffer.extendleft(reversed(failed))
                self._retries += len(failed)
                self._trim()
            await self._notify()
            if failed:
                await asyncio.sleep(backoff)  # a retry backoff, not a poll: the bus is away
                backoff = min(self._backoff_max_s, backoff * 2)
            else:
                backoff = self._backoff_initial_s

    def _count_acked(self, out: _Outgoing, ack: PubAck) -> None:
        self._published += 1
        if ack.duplicate:
            self._duplicates += 1
        if self._acked is not None:
            self._acked(out.tick)
        if out.span is not None:
            out.span.end()

    async def _send(self, window: list[_Outgoing]) -> list[_Outgoing]:
        """Publish a window and wait for its acks; return the ticks that must be sent again, in order."""
        pending: list[tuple[_Outgoing, asyncio.Future[PubAck]]] = []
        unsent: list[_Outgoing] = []
        error: BaseException | None = None
        for i, out in enumerate(window):
            try:
                future = await self._jetstream.publish(out.subject, out.payload, headers=out.headers)
            except _RETRYABLE as exc:
                error, unsent = exc, window[i:]
                break
            pending.append((out, future))
        if pending:
            try:
                await asyncio.wait([f for _, f in pending], timeout=self._ack_timeout_s)
            finally:
                for _, future in pending:
                    # Frees the client's slot of a late ack; the tick goes again with its id.
                    future.cancel()
        failed: list[_Outgoing] = []
        for out, future in pending:
            if future.cancelled():
                failed.append(out)
                error = error or TimeoutError(f"no ack within {self._ack_timeout_s} s")
                continue
            failure = future.exception()
            if failure is not None:
                if not isinstance(failure, _RETRYABLE):
                    raise failure  # a bug, not the bus: the sender stops and `check` re-raises it
                failed.append(out)
                error = error or failure
                continue
            self._count_acked(out, future.result())
        failed += unsent
        if failed:
            log.warning(
                "publish_failed",
                error=repr(error),
                failed=len(failed),
                window=len(window),
                retries_total=self._retries + len(failed),
            )
        return failed
