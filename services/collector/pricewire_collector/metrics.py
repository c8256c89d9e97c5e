"""The collector's metrics: counts kept as ticks pass, and the families they make at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from pricewire_collector.publisher import Publisher
from pricewire_collector.sources.runtime import CollectorSink
from pricewire_common import metrics as m
from pricewire_common.clock import NS_PER_S
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import Tick
from pricewire_common.ops_http import NotReady

__all__ = ["LIVE_STATES", "CollectorMetrics"]

LIVE_STATES = frozenset({"connected", "fallback"})
"""Source states in which a venue delivers quotes (on its stream, or on its REST fallback)."""


class CollectorMetrics:
    """Ticks and venue latency per source (`observe`, told by the publisher), and, read when scraped, the
    sink's frames, requests and states (live venues), the publisher's counters and the dead letters."""

    def __init__(self, *, service: str, dead_letters: DeadLetters) -> None:
        self._service = service
        self._dead_letters = dead_letters
        self.ticks: Counter[str] = Counter()
        self.latency: dict[str, m.Buckets] = {}
        self.publisher: Publisher | None = None
        self.sink: CollectorSink | None = None
        """The live venues' sink; None for the simulated feed, whose every tick is a frame of its own."""

    def observe(self, tick: Tick) -> None:
        """One good tick queued for publishing."""
        self.ticks[tick.source] += 1
        buckets = self.latency.get(tick.source)
        if buckets is None:
            buckets = self.latency[tick.source] = m.Buckets()
        # A venue clock ahead of ours would read as negative latency: it counts as none.
        buckets.observe(max(0, tick.ts_received - tick.ts_exchange) / NS_PER_S)

    def live_sources(self) -> list[str]:
        """Sources delivering now: a live venue connected (or on its fallback); a simulated venue once it ticked."""
        if self.sink is None:
            return sorted(self.ticks)
        return sorted(name for name, counts in self.sink.counts.items() if counts.state in LIVE_STATES)

    async def probe_sources(self) -> None:
        """The collector's readiness check: at least one source live."""
        if not self.live_sources():
            raise NotReady("no source is live yet")

    def collect(self) -> Iterable[Metric]:
        frames: dict[tuple[str, ...], float] = {}
        up: dict[tuple[str, ...], float] = {}
        reconnects: dict[tuple[str, ...], float] = {}
        if self.sink is None:
            for source, n in self.ticks.items():
                frames[source, "ok"] = n
                up[(source,)] = 1
        else:
            for source, counts in self.sink.counts.items():
                rejected = sum(counts.rejected.values())
                frames[source, "ok"] = max(0, counts.frames - rejected)
                frames[source, "rejected"] = rejected
                up[(source,)] = 1 if counts.state in LIVE_STATES else 0
                reconnects[(source,)] = counts.reconnects
        yield m.SOURCE_FRAMES.counter(frames)
        requests = {} if self.sink is None else dict(self.sink.requests)
        yield m.SOURCE_REQUESTS.counter(requests)
        yield m.SOURCE_TICKS.counter({(source,): n for source, n in self.ticks.items()})
        yield m.SOURCE_RECONNECTS.counter(reconnects)
        yield m.SOURCE_UP.gauge(up)
        yield m.VENUE_LATENCY.histogram({(source,): buckets for source, buckets in self.latency.items()})
        if self.publisher is not None:
            stats = self.publisher.stats
            yield m.TICKS_PUBLISHED.counter({(): stats.published})
            yield m.TICKS_DROPPED.counter({(): stats.dropped})
            yield m.TICKS_BUFFERED.gauge({(): stats.buffered})
        yield m.dead_letter_family(self._service, self._dead_letters.counts)
