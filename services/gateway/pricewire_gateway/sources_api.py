"""`GET /api/v1/sources`: the latest state of every venue connection, from `md.source.*`.

The gateway subscribes (core NATS) to `md.source.*` first, then loads the last stored status of each
source from stream SOURCES, so a gateway started after the events still shows them. The live message
and the stored one may arrive in either order: the board keeps the newer by `ts`. A status that breaks
the contract goes to `md.dlq.gateway`.
"""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.clock import iso_from_ns
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import InvalidEvent, RejectedInput
from pricewire_common.events import SourceState, SourceStatus, decode_source_status
from pricewire_gateway.appkeys import CLOCK
from pricewire_gateway.rest import json_response

__all__ = ["BOARD", "SourceBoard", "SourceList", "SourceView", "install", "list_sources", "source_view"]

log = structlog.get_logger(__name__)

PATH = "/api/v1/sources"


class SourceView(msgspec.Struct, frozen=True, kw_only=True):
    """One source as clients see it: its last `SourceStatus`, the time as ISO 8601 UTC."""

    source: str
    state: SourceState
    transport: str
    detail: str | None
    frames: int
    ticks: int
    rejected: int
    reconnects: int
    ts: str


class SourceList(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /api/v1/sources`: every source heard of, sorted by name."""

    sources: list[SourceView]
    timestamp: str


_ENCODER = msgspec.json.Encoder()


def source_view(status: SourceStatus) -> SourceView:
    return SourceView(
        source=status.source,
        state=status.state,
        transport=status.transport,
        detail=status.detail,
        frames=status.frames,
        ticks=status.ticks,
        rejected=status.rejected,
        reconnects=status.reconnects,
        ts=iso_from_ns(status.ts),
    )


def _checked(payload: bytes, subject: str) -> SourceStatus:
    """The status a message carries, if it is one for the source its subject names; RejectedInput otherwise."""
    status = decode_source_status(payload)
    if subject != subjects.source_status(status.source):
        raise InvalidEvent(f"status of {status.source!r} arrived on {subject}", reason="source_mismatch")
    return status


class SourceBoard:
    """The latest status of each source; fed by the subscription and the stored statuses."""

    def __init__(self, dead_letters: DeadLetters) -> None:
        self._dead_letters = dead_letters
        self._latest: dict[str, SourceStatus] = {}
        self.received = 0

    def update(self, status: SourceStatus) -> bool:
        """Keep `status` unless a newer one of its source is held; True when kept."""
        held = self._latest.get(status.source)
        if held is not None and held.ts > status.ts:
            return False
        self._latest[status.source] = status
        return True

    def latest(self) -> list[SourceStatus]:
        """The latest status of every source, sorted by source name."""
        return [self._latest[name] for name in sorted(self._latest)]

    def states(self) -> dict[str, SourceState]:
        """The latest connection state of every source heard of, by source name."""
        return {name: status.state for name, status in self._latest.items()}

    async def on_message(self, msg: Msg) -> None:
        """The `md.source.*` subscription callback."""
        self.received += 1
        try:
            self.update(_checked(msg.data, msg.subject))
        except RejectedInput as err:
            await self._reject(err, subject=msg.subject, payload=msg.data, stream_seq=None)

    async def load(self, js: JetStreamContext) -> int:
        """Take the last stored status of every source from stream SOURCES; returns how many were read.

        A bus that does not answer leaves the board to the live subscription (logged, not raised):
        the states then show up with each source's next change.
        """
        try:
            info = await js.stream_info(subjects.SOURCES_STREAM, subjects_filter=subjects.ALL_SOURCES)
            loaded = 0
            for subject in sorted(info.state.subjects or {}):
                stored = await js.get_last_msg(subjects.SOURCES_STREAM, subject)
                try:
                    self.update(_checked(stored.data or b"", subject))
                except RejectedInput as err:
                    await self._reject(err, subject=subject, payload=stored.data or b"", stream_seq=stored.seq)
                loaded += 1
        except (NatsError, TimeoutError) as exc:
            log.warning("source_states_not_loaded", error=repr(exc))
            return 0
        log.info("source_states_loaded", sources=loaded)
        return loaded

    async def _reject(self, err: RejectedInput, *, subject: str, payload: bytes, stream_seq: int | None) -> None:
        try:
            await self._dead_letters.reject(err, subject=subject, payload=payload, stream_seq=stream_seq)
        except Exception:
            # The boundary of the subscription: a status has no redelivery; the loss is logged and the
            # board goes on with the next status.
            log.exception("dead_letter_failed", subject=subject, reason=err.reason)


BOARD = web.AppKey("sources", SourceBoard)


async def list_sources(request: web.Request) -> web.Response:
    """`GET /api/v1/sources`."""
    app = request.app
    body = SourceList(
        sources=[source_view(status) for status in app[BOARD].latest()],
        timestamp=iso_from_ns(app[CLOCK]()),
    )
    return json_response(_ENCODER.encode(body))


def install(app: web.Application, board: SourceBoard) -> None:
    """Serve `board` at `GET /api/v1/sources`."""
    app[BOARD] = board
    app.router.add_get(PATH, list_sources)
