"""How far each projection has got through its stream: pure values, no I/O.

Every projection stores the stream sequence it has applied through in the same atomic step as its
rows (PostgreSQL: the `projection_offsets` row, in the batch's transaction; Redis: the
`projection:<name>:seq` key, in the same Lua script as the price keys). The offset is a high-water
mark, advanced with GREATEST: a redelivered batch leaves it where it is. It tells how far behind the
log a projection is (`lag`); which events were applied is decided by the rows' own keys (a tick's
id, a price's asset and seq), never by comparing with the offset, since a nak'd batch can come back
after a later one was written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from pricewire_common.consumer import ConsumerTally
from pricewire_common.errors import DecodeError, RejectedInput


@dataclass(frozen=True, slots=True)
class Written:
    """What a store did with one batch."""

    applied_seq: int
    """The projection's offset in the store once the batch committed (never lower than before)."""
    refused: Mapping[int, RejectedInput] = field(default_factory=dict)
    """Items the store refused, by index in the batch (normally none)."""


@dataclass(slots=True)
class Progress:
    """What a projector has done since it started, and where its store stands."""

    written: int = 0
    rejected: int = 0
    retried: int = 0
    batches: int = 0
    applied_seq: int = 0
    """The offset its store holds (0: none read yet, or nothing applied)."""
    store_up: bool = True


class Tracked(Protocol):
    """A projection as the status report and the metrics see it: a running projector, or one still waiting
    for its store (postgres_side.Waiting)."""

    @property
    def name(self) -> str:
        """The durable consumer's name."""
        ...

    @property
    def stream(self) -> str: ...

    @property
    def store(self) -> str: ...

    @property
    def progress(self) -> Progress: ...

    @property
    def tally(self) -> ConsumerTally: ...


def lag(stream_last_seq: int, applied_seq: int) -> int:
    """Messages of the stream the projection has not applied yet (never negative).

    A stream purged or recreated below the offset reads as no lag, not a negative one.
    """
    return max(0, stream_last_seq - applied_seq)


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One projection's state as the cache_writer reports it: a field of the `projection:status` hash."""

    projection: str
    """The durable consumer's name: `cache-redis`, `cache-db-ticks`, `cache-db-prices`."""
    stream: str
    store: str
    applied_seq: int
    stream_last_seq: int
    lag: int
    store_up: bool
    written: int
    rejected: int
    retried: int
    ts: int
    """When this was reported, ns since the epoch: an old `ts` means no cache_writer is reporting."""


def status(
    *, projection: str, stream: str, store: str, progress: Progress, stream_last_seq: int, ts: int
) -> ProjectionStatus:
    """The report of one projection, from its progress and the stream's last sequence."""
    return ProjectionStatus(
        projection=projection,
        stream=stream,
        store=store,
        applied_seq=progress.applied_seq,
        stream_last_seq=stream_last_seq,
        lag=lag(stream_last_seq, progress.applied_seq),
        store_up=progress.store_up,
        written=progress.written,
        rejected=progress.rejected,
        retried=progress.retried,
        ts=ts,
    )


_STATUS_DECODER = msgspec.json.Decoder(ProjectionStatus)


def encode_status(report: ProjectionStatus) -> bytes:
    return msgspec.json.encode(report)


def decode_status(payload: bytes | str) -> ProjectionStatus:
    """A `projection:status` field's value; raises DecodeError when malformed."""
    try:
        return _STATUS_DECODER.decode(payload)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep; it escaped
    # GET /api/v1/status's handling of an unreadable report as a 500.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"projection status: {exc}") from exc
