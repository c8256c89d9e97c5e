"""`GET /api/v1/status`: where each projection stands in its stream, the streams, and what the gateway reaches.

Pure: the handler (`status_api`) gathers what each party says and this module combines it. A
projection's lag is computed *live* whenever both halves can be read now: its offset from its own store
(`projection_offsets` in PostgreSQL, `projection:<name>:seq` in Redis, written in the same atomic step
as the rows) and its stream's last sequence from JetStream. When either cannot be read, the
cache_writer's last report (the `projection:status` hash, rewritten every second) stands in, with its age.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import msgspec

from pricewire_cache_writer.db_projection import PostgresPrices, PostgresTicks
from pricewire_cache_writer.progress import ProjectionStatus, lag
from pricewire_cache_writer.redis_projection import RedisPrices
from pricewire_common import subjects
from pricewire_common.clock import iso_from_ns
from pricewire_gateway.messages import Check, age_s


@dataclass(frozen=True, slots=True)
class KnownProjection:
    """A projection the cache_writer runs: its durable consumer's name, the stream it reads, its store."""

    name: str
    stream: str
    store: str


PROJECTIONS: tuple[KnownProjection, ...] = (
    KnownProjection(RedisPrices.name, subjects.PRICES_STREAM, "redis"),
    KnownProjection(PostgresTicks.name, subjects.TICKS_STREAM, "postgres"),
    KnownProjection(PostgresPrices.name, subjects.PRICES_STREAM, "postgres"),
)
STREAMS: tuple[str, ...] = (
    subjects.TICKS_STREAM,
    subjects.PRICES_STREAM,
    subjects.SOURCES_STREAM,
    subjects.DLQ_STREAM,
)


class StreamView(msgspec.Struct, frozen=True, kw_only=True):
    """One JetStream stream as JetStream reports it now."""

    stream: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int


class ProjectionView(msgspec.Struct, frozen=True, kw_only=True):
    """One projection: how far it has applied its stream, and the cache_writer's last word on it."""

    projection: str
    stream: str
    store: str
    applied_seq: int | None
    """The stream sequence the store holds the projection's rows through (its offset)."""
    stream_last_seq: int | None
    lag: int | None
    """stream_last_seq - applied_seq, never negative; null when neither way of knowing answered."""
    basis: Literal["live", "report"] | None
    """`live`: read now from the store and JetStream; `report`: the cache_writer's last report; null: neither."""
    store_up: bool | None
    """The cache_writer's view: false while its store refuses the projector (from its last report)."""
    written: int | None
    rejected: int | None
    retried: int | None
    reported_at: str | None
    """When the cache_writer last reported on it (ISO 8601 UTC); null when it never has (or Redis is down)."""
    report_age_s: Decimal | None
    """Seconds since that report: over a few seconds, no cache_writer is reporting."""


class StatusBody(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /api/v1/status`."""

    projections: list[ProjectionView]
    streams: list[StreamView]
    checks: list[Check]
    """What the gateway reached while answering: `nats`, `redis`, `postgres`."""
    timestamp: str


Answer = Mapping[str, int] | str
"""Offsets (or stream last sequences) by name, or why they could not be read."""


@dataclass(frozen=True, slots=True)
class Observed:
    """What each party said while the status was gathered (a `str` is the error of a party that did not answer)."""

    streams: Mapping[str, StreamView] | str
    reports: Mapping[str, ProjectionStatus] | str
    redis_offsets: Answer
    postgres_offsets: Answer


def _check(name: str, *answers: object) -> Check:
    errors = [answer for answer in answers if isinstance(answer, str)]
    return Check(name=name, ok=not errors, error=errors[0] if errors else None)


def _offset(known: KnownProjection, observed: Observed) -> int | None:
    offsets = observed.redis_offsets if known.store == "redis" else observed.postgres_offsets
    if isinstance(offsets, str):
        return None
    return offsets.get(known.name, 0)  # no row (or key) yet: nothing applied


def projection_view(known: KnownProjection, observed: Observed, *, now_ns: int) -> ProjectionView:
    report = None if isinstance(observed.reports, str) else observed.reports.get(known.name)
    applied = _offset(known, observed)
    stream = None if isinstance(observed.streams, str) else observed.streams.get(known.stream)
    basis: Literal["live", "report"] | None = None
    last: int | None = None
    if applied is not None and stream is not None:
        basis, last = "live", stream.last_seq
    elif report is not None:
        basis, applied, last = "report", report.applied_seq, report.stream_last_seq
    else:
        applied = None
    return ProjectionView(
        projection=known.name,
        stream=known.stream,
        store=known.store,
        applied_seq=applied,
        stream_last_seq=last,
        lag=None if applied is None or last is None else lag(last, applied),
        basis=basis,
        store_up=None if report is None else report.store_up,
        written=None if report is None else report.written,
        rejected=None if report is None else report.rejected,
        retried=None if report is None else report.retried,
        reported_at=None if report is None else iso_from_ns(report.ts),
        report_age_s=None if report is None else age_s(now_ns, report.ts),
    )


def known_projections(observed: Observed, known: Sequence[KnownProjection] = PROJECTIONS) -> list[KnownProjection]:
    """The projections to show: the known ones, then any other the cache_writer reports, by name."""
    names = {k.name for k in known}
    extra: list[KnownProjection] = []
    if not isinstance(observed.reports, str):
        extra = [
            KnownProjection(report.projection, report.stream, report.store)
            for name, report in sorted(observed.reports.items())
            if name not in names
        ]
    return [*known, *extra]


def status_body(observed: Observed, *, now_ns: int, known: Sequence[KnownProjection] = PROJECTIONS) -> StatusBody:
    """The status answer from what each party said."""
    streams = [] if isinstance(observed.streams, str) else list(observed.streams.values())
    return StatusBody(
        projections=[projection_view(k, observed, now_ns=now_ns) for k in known_projections(observed, known)],
        streams=streams,
        checks=[
            _check("nats", observed.streams),
            _check("redis", observed.reports, observed.redis_offsets),
            _check("postgres", observed.postgres_offsets),
        ],
        timestamp=iso_from_ns(now_ns),
    )


_ENCODER = msgspec.json.Encoder(decimal_format="number")


def encode(body: StatusBody) -> bytes:
    return _ENCODER.encode(body)
