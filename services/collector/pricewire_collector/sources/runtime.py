"""The collector's side of the `Sink`: ticks to the publisher, rejected frames to the DLQ with their
reason, state changes onto `md.source.<source>`; and a supervisor that restarts a source that fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from pricewire_collector.publisher import Publisher
from pricewire_collector.sources.base import RequestOutcome, Sink, Source
from pricewire_collector.sources.resilience import Backoff
from pricewire_collector.switches import SourceSwitches, run_stop, wait_while_paused
from pricewire_common import subjects
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.events import SourceState, SourceStatus, Tick, encode
from pricewire_common.tracing import Tracing
from pricewire_common.waits import wait_event

log = structlog.get_logger(__name__)

FrameTap = Callable[[str, bytes, int], None]
BACKPRESSURE_AT = 5_000
"""Unsent ticks at which a source is held back until the publisher has caught up to half of it."""
BACKPRESSURE_WAIT_S = 5.0


@dataclass(slots=True)
class SourceCounts:
    """What one source has delivered since the collector started."""

    frames: int = 0
    ticks: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    state: SourceState = "connecting"
    transport: str = ""


class CollectorSink:
    """Implements `base.Sink` for the collector service."""

    def __init__(
        self,
        js: JetStreamContext,
        publisher: Publisher,
        dead_letters: DeadLetters,
        *,
        clock: Clock = wall_clock,
        tap: FrameTap | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._js = js
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._clock = clock
        self._tap = tap
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        """Read by `base.deliver`: each frame's root span, when sampled."""
        self.counts: dict[str, SourceCounts] = {}
        self.requests: Counter[tuple[str, RequestOutcome]] = Counter()
        """REST requests per source and outcome (`base.RequestLog`)."""

    def _of(self, source: str) -> SourceCounts:
        counts = self.counts.get(source)
        if counts is None:
            counts = self.counts[source] = SourceCounts()
        return counts

    def frame(self, source: str, frame: bytes, received_ns: int) -> None:
        self._of(source).frames += 1
        if self._tap is not None:
            self._tap(source, frame, received_ns)

    def request(self, source: str, outcome: RequestOutcome) -> None:
        self.requests[source, outcome] += 1

    async def tick(self, tick: Tick) -> None:
        self._of(tick.source).ticks += 1
        if self._publisher.stats.buffered >= BACKPRESSURE_AT:
            # A source faster than the bus (a replay at full speed, a flood) waits here instead of making
            # the publisher drop its oldest ticks; after the wait, overflow is dropped and counted.
            with contextlib.suppress(TimeoutError):
                await self._publisher.wait_for(lambda s: s.buffered < BACKPRESSURE_AT // 2, timeout=BACKPRESSURE_WAIT_S)
        await self._publisher.submit(tick)

    async def reject(self, error: RejectedInput, *, source: str, frame: bytes) -> None:
        self._of(source).rejected[error.reason] += 1
        await self._dead_letters.reject(error, subject=subjects.venue_input(source), payload=frame)

    async def state(self, source: str, state: SourceState, *, transport: str, detail: str | None = None) -> None:
        counts = self._of(source)
        if state == "reconnecting":
            counts.reconnects += 1
        counts.state, counts.transport = state, transport
        status = SourceStatus(
            source=source,
            state=state,
            transport=transport,
            detail=detail,
            frames=counts.frames,
            ticks=counts.ticks,
            rejected=sum(counts.rejected.values()),
            reconnects=counts.reconnects,
            ts=self._clock(),
        )
        log.info("source_state", source=source, state=state, transport=transport, detail=detail)
        try:
            await self._js.publish(subjects.source_status(source), encode(status))
        except (NatsError, TimeoutError) as exc:
            # The state is also in the log line above; the next change publishes the counters again.
            log.warning("source_state_not_published", source=source, error=repr(exc))


async def supervise(
    source: Source, sink: Sink, stop: asyncio.Event, *, backoff: Backoff, switches: SourceSwitches | None = None
) -> None:
    """Run `source` until `stop`; if it ever fails (a bug: sources handle venue trouble themselves),
    log it with the traceback, mark it stopped, and start it again after a backoff. With `switches`, a
    pause stops the source and a resume starts it again."""
    while not stop.is_set():
        if switches is not None and switches.is_paused(source.name):
            await wait_while_paused(switches, source.name, stop)
            continue
        run_until, linker = (stop, None) if switches is None else run_stop(switches, source.name, stop)
        try:
            await source.run(sink, run_until)
        except Exception as exc:
            log.exception("source_failed", source=source.name)
            await sink.state(source.name, "stopped", transport="", detail=repr(exc))
            await wait_event(stop, backoff.next_delay())
        else:
            if switches is None or not switches.is_paused(source.name):
                return  # stopped, or done by itself (a replay that reached its end)
        finally:
            if linker is not None:
                linker.cancel()
