"""The projections' lag, reported to the `projection:status` hash in Redis every second.

Lag is the stream's last sequence (asked of JetStream) minus the offset the projection's store holds.
The hash is for readers that want every projection in one look (the gateway's status endpoint); the
authoritative offsets stay in the stores themselves (`projection_offsets`, `projection:<name>:seq`).
While Redis is down the report cannot be written: PostgreSQL's offsets and JetStream still tell.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import nats.errors
import redis.asyncio as redis_asyncio
import structlog
from nats.js import JetStreamContext

from pricewire_cache_writer.errors import REDIS_DOWN
from pricewire_cache_writer.progress import ProjectionStatus, Tracked, encode_status, status
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.keys import PROJECTION_STATUS_KEY
from pricewire_common.waits import wait_event

log = structlog.get_logger(__name__)

REPORT_EVERY_S = 1.0


class StatusReporter:
    """Writes each projection's status to `projection:status` until stopped."""

    def __init__(
        self,
        client: redis_asyncio.Redis,
        js: JetStreamContext,
        projections: Callable[[], Sequence[Tracked]],
        *,
        every_s: float = REPORT_EVERY_S,
        clock: Clock = wall_clock,
    ) -> None:
        self._client = client
        self._js = js
        self._projections = projections
        """Asked at each report: the PostgreSQL projectors join once PostgreSQL is up (postgres_side.py)."""
        self._every_s = every_s
        self._clock = clock
        self._redis_down = False

    async def run(self, stop: asyncio.Event) -> None:
        """Report now and then every `every_s` until `stop` is set, and once more at the end."""
        while True:
            await self.report()
            if stop.is_set():
                return
            await wait_event(stop, self._every_s)

    async def snapshot(self) -> list[ProjectionStatus]:
        """Every projection's status now; raises nats.errors.Error when JetStream does not answer."""
        projections = self._projections()
        last_seqs: dict[str, int] = {}
        for stream in {p.stream for p in projections}:
            info = await self._js.stream_info(stream)  # the JetStream context's timeout (5 s)
            last_seqs[stream] = int(info.state.last_seq)
        now = self._clock()
        return [
            status(
                projection=p.name,
                stream=p.stream,
                store=p.store,
                progress=p.progress,
                stream_last_seq=last_seqs[p.stream],
                ts=now,
            )
            for p in projections
        ]

    async def report(self) -> None:
        """One report; a bus or Redis outage skips it (logged once per outage), never stops the service."""
        try:
            reports = await self.snapshot()
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("status_not_reported", reason="nats", error=repr(exc))
            return
        try:
            await self._client.hset(PROJECTION_STATUS_KEY, mapping={r.projection: encode_status(r) for r in reports})
        except REDIS_DOWN as exc:
            if not self._redis_down:
                log.warning("status_not_reported", reason="redis", error=repr(exc))
            self._redis_down = True
            return
        self._redis_down = False
        for r in reports:
            if r.lag:
                log.debug("projection_lag", projection=r.projection, lag=r.lag, applied_seq=r.applied_seq)
