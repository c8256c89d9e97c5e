"""What every live source is, and what it reports to.

A source owns its connection(s) to one venue and delivers to a `Sink`: normalized ticks, rejected
raw frames (with the reason), and changes of its connection state. A venue's `Parser` is pure:
bytes in, ticks out, or `VenueFrameError`; the replay feed and `bench/parse.py` use the same parsers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal, Protocol, runtime_checkable

import msgspec

from pricewire_common.clock import ns_from_rfc3339
from pricewire_common.errors import InvalidEvent, RejectedInput
from pricewire_common.events import SourceState, Tick
from pricewire_common.rules import check_tick
from pricewire_common.tracing import Tracing


class VenueFrameError(RejectedInput):
    """A venue frame that cannot become ticks. Reasons:

    `malformed_frame` (not JSON, not the documented shape), `missing_field`, `venue_error` (the venue's own
    error frame), `unknown_symbol`, `invalid_price` (zero, negative, NaN, huge), `out_of_order` (a sequence
    number not above the last one seen: a duplicate or a late update), and the reasons of
    `rules.check_tick` that a venue's figures can break (`invalid_volume`, `bad_timestamp`).
    """

    reason = "malformed_frame"

    def __init__(self, detail: str, *, reason: str | None = None, ticks: Sequence[Tick] = ()) -> None:
        super().__init__(detail, reason=reason)
        self.ticks = tuple(ticks)
        """The good ticks of a frame that carried several items, one of them bad: they are still delivered."""


def venue_time(text: str, *, what: str) -> int:
    """ns since the epoch of a venue's RFC 3339 time; VenueFrameError (malformed_frame) when it is not one."""
    try:
        return ns_from_rfc3339(text)
    except (ValueError, OverflowError) as exc:
        raise VenueFrameError(f"{what}: {exc}") from exc


def checked(tick: Tick, *, assets: Collection[str] | None = None) -> Tick:
    """The tick if it keeps the contract (`rules.check_tick`), else VenueFrameError with that rule's reason."""
    try:
        return check_tick(tick, assets=assets)
    except InvalidEvent as exc:
        raise VenueFrameError(f"{tick.source} {tick.symbol}: {exc.detail}", reason=exc.reason) from exc


class Parser(Protocol):
    """A venue's frame parser: pure, no I/O; `received_ns` stamps `ts_received`."""

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        """The ticks a frame carries: none for control frames (heartbeats, acks); raises VenueFrameError."""
        ...


class Polled:
    """A stream parser reused for a venue's REST answers: its ticks are marked `kind="poll"`, so the
    validator holds them to the polled max age (a REST fallback's quotes are as old as its poll period)."""

    def __init__(self, parser: Parser) -> None:
        self._parser = parser

    def parse(self, frame: bytes, received_ns: int) -> list[Tick]:
        try:
            ticks = self._parser.parse(frame, received_ns)
        except VenueFrameError as err:
            err.ticks = tuple(_polled(t) for t in err.ticks)
            raise
        return [_polled(t) for t in ticks]


def _polled(tick: Tick) -> Tick:
    return msgspec.structs.replace(tick, kind="poll")


class Sink(Protocol):
    """Where a source delivers; implemented by the collector's runtime."""

    def frame(self, source: str, frame: bytes, received_ns: int) -> None:
        """Count one raw frame received (and hand it to a capture, when one runs)."""
        ...

    async def tick(self, tick: Tick) -> None:
        """Publish one normalized tick (checked against the contract, de-duplicated by its id)."""
        ...

    async def reject(self, error: RejectedInput, *, source: str, frame: bytes) -> None:
        """Dead-letter a raw frame with its reason; counted per source and reason."""
        ...

    async def state(self, source: str, state: SourceState, *, transport: str, detail: str | None = None) -> None:
        """Record and publish a change of a source's connection state."""
        ...


RequestOutcome = Literal["ok", "rate_limited", "failed"]


@runtime_checkable
class RequestLog(Protocol):
    """A sink that also counts REST requests by outcome (the collector's does; a test's fake need not)."""

    def request(self, source: str, outcome: RequestOutcome) -> None: ...


def count_request(sink: Sink, source: str, outcome: RequestOutcome) -> None:
    """Count one REST request to a venue, when `sink` keeps such counts."""
    if isinstance(sink, RequestLog):
        sink.request(source, outcome)


class Source(Protocol):
    """One venue's connector: runs until `stop` is set, reconnecting on its own."""

    @property
    def name(self) -> str: ...

    async def run(self, sink: Sink, stop: asyncio.Event) -> None: ...


_UNTRACED: AbstractContextManager[object] = nullcontext()


def traced_frame(sink: Sink, source: str, frame: bytes) -> AbstractContextManager[object]:
    """The root span of one frame (current inside the block) when the sink traces and the frame is sampled.

    A sink traces when it has a `tracing` (the collector's does; a test's fake need not): an attribute
    look-up rather than a runtime protocol check, which costs tens of microseconds per frame.
    """
    tracing: Tracing | None = getattr(sink, "tracing", None)
    return _UNTRACED if tracing is None else tracing.frame(source, size=len(frame))


async def deliver(name: str, parser: Parser, sink: Sink, frame: bytes, received_ns: int) -> int:
    """Hand one raw frame to the sink and the parser: its ticks are published, a bad frame is
    dead-lettered whole (after its good ticks, if it carried some). Returns how many ticks it gave."""
    sink.frame(name, frame, received_ns)
    with traced_frame(sink, name, frame):
        try:
            ticks = parser.parse(frame, received_ns)
        except VenueFrameError as err:
            for tick in err.ticks:
                await sink.tick(tick)
            await sink.reject(err, source=name, frame=frame)
            return len(err.ticks)
        for tick in ticks:
            await sink.tick(tick)
        return len(ticks)
