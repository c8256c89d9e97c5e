"""The cache_writer's metrics: each projection's lag and store, its consumer's deliveries, the dead letters.

Lag and pending counts cost a JetStream round trip: they are asked for just before each scrape (the same
snapshot the status reporter writes to Redis every second), never on the write path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import nats.errors
import structlog
from nats.js import JetStreamContext
from prometheus_client.metrics_core import Metric

from pricewire_cache_writer.progress import ProjectionStatus, Tracked
from pricewire_cache_writer.status import StatusReporter
from pricewire_common import metrics as m
from pricewire_common.deadletters import DeadLetters

__all__ = ["CacheWriterMetrics"]

log = structlog.get_logger(__name__)


class CacheWriterMetrics:
    """Families of the projectors' state, refreshed from JetStream before each scrape."""

    def __init__(
        self,
        js: JetStreamContext,
        reporter: StatusReporter,
        projections: Callable[[], Sequence[Tracked]],
        *,
        service: str,
        dead_letters: DeadLetters,
    ) -> None:
        self._js = js
        self._reporter = reporter
        self._projections = projections
        """Asked at each refresh and scrape: the PostgreSQL projections are waiting ones until PostgreSQL is up."""
        self._service = service
        self._dead_letters = dead_letters
        self.statuses: dict[str, ProjectionStatus] = {}
        self.pending: dict[str, tuple[int, int]] = {}
        """By consumer: (not yet delivered, delivered but not acked), as JetStream last said."""

    async def refresh(self) -> None:
        """Each projection's lag and its consumer's pending counts, from JetStream."""
        for status in await self._reporter.snapshot():
            self.statuses[status.projection] = status
        for projector in self._projections():
            try:
                info = await self._js.consumer_info(projector.stream, projector.name)
            except nats.errors.Error as exc:
                log.warning("consumer_info_failed", consumer=projector.name, error=repr(exc))
                continue
            self.pending[projector.name] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))

    def collect(self) -> Iterable[Metric]:
        projections = self._projections()
        yield m.PROJECTION_LAG.gauge({(name,): s.lag for name, s in self.statuses.items()})
        yield m.PROJECTION_WRITTEN.counter({(p.name,): p.progress.written for p in projections})
        yield m.PROJECTION_STORE_UP.gauge({(p.name,): 1 if p.progress.store_up else 0 for p in projections})
        yield m.JETSTREAM_PENDING.gauge({(c,): p for c, (p, _) in self.pending.items()})
        yield m.JETSTREAM_ACK_PENDING.gauge({(c,): a for c, (_, a) in self.pending.items()})
        yield m.JETSTREAM_DELIVERED.counter({(p.name,): p.tally.delivered for p in projections})
        yield m.JETSTREAM_REDELIVERIES.counter({(p.name,): p.tally.redelivered for p in projections})
        yield m.dead_letter_family(self._service, self._dead_letters.counts)
