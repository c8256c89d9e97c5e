"""The Prometheus metric catalogue of every Pricewire service, and how a service exposes it.

Nothing here sits on a hot path. A service keeps plain counts where its work happens (ints, a
`Counter`, a `Tally`, `Buckets`), and registers a callback that turns them into metric families when
Prometheus scrapes: an increment costs what an int increment costs. Values that must be asked for
(a JetStream consumer's pending count, the projections' lag) are refreshed by async callbacks just
before each scrape. Each service instance holds its own `Exposition` (its own CollectorRegistry):
there is no process-wide registry, so several services in one process (`pricewire up`, the tests)
never mix their numbers.

Names follow Prometheus conventions: a `pricewire_` prefix, base units (seconds, USD), `_total` on
counters, and labels drawn from bounded sets (sources, assets, reasons, consumers: configured or
coded, never per-request values). README's "Metrics and health" lists them.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Literal, TypeVar

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "CATALOGUE",
    "CONTENT_TYPE",
    "LATENCY_BUCKETS_S",
    "Buckets",
    "Exposition",
    "MetricSpec",
    "Tally",
    "dead_letter_family",
    "package_version",
]

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text format `generate_latest` writes, named by the version every Prometheus 2 and 3 reads (the client's
own CONTENT_TYPE_LATEST now says 1.0.0, which older scrapers do not know)."""
REFRESH_TIMEOUT_S = 2.0
"""Longest a scrape waits on one refresh (a JetStream or store round trip) before serving what it has."""
LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the venue latency histogram: a streamed quote lands in the first few, a polled one
(CoinGecko's `last_updated_at`, say) may take tens of seconds."""

Kind = Literal["counter", "gauge", "histogram"]
LabelValues = tuple[str, ...]
K = TypeVar("K", bound=tuple[str, ...])


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of the catalogue: its exposed name, type, labels and meaning."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    def counter(self, values: Mapping[K, float]) -> CounterMetricFamily:
        """The family of this counter, one sample per label values."""
        self._expect("counter")
        family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for labels, value in values.items():
            family.add_metric(labels, value)
        return family

    def gauge(self, values: Mapping[K, float]) -> GaugeMetricFamily:
        """The family of this gauge, one sample per label values."""
        self._expect("gauge")
        family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for labels, value in values.items():
            family.add_metric(labels, value)
        return family

    def histogram(self, values: Mapping[K, Buckets]) -> HistogramMetricFamily:
        """The family of this histogram, one set of buckets per label values."""
        self._expect("histogram")
        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for labels, buckets in values.items():
            family.add_metric(labels, buckets.cumulative(), buckets.sum)
        return family

    def _expect(self, kind: Kind) -> None:
        if self.kind != kind:
            raise TypeError(f"{self.name} is a {self.kind}, not a {kind}")


def _spec(name: str, kind: Kind, doc: str, *labels: str) -> MetricSpec:
    return MetricSpec(name=name, kind=kind, help=doc, labels=labels)


# --- the catalogue ------------------------------------------------------------------------------------------
# collector
SOURCE_FRAMES = _spec(
    "pricewire_source_frames_total",
    "counter",
    "Raw frames received from a venue, by outcome (ok, rejected).",
    "source",
    "outcome",
)
SOURCE_REQUESTS = _spec(
    "pricewire_source_requests_total",
    "counter",
    "REST requests made to a venue, by outcome (ok, rate_limited, failed).",
    "source",
    "outcome",
)
SOURCE_TICKS = _spec("pricewire_source_ticks_total", "counter", "Normalized ticks a venue's frames gave.", "source")
SOURCE_RECONNECTS = _spec(
    "pricewire_source_reconnects_total", "counter", "Times a venue's connection went to reconnecting.", "source"
)
SOURCE_UP = _spec(
    "pricewire_source_up", "gauge", "1 while a venue delivers (connected, or on its REST fallback), else 0.", "source"
)
VENUE_LATENCY = _spec(
    "pricewire_venue_latency_seconds",
    "histogram",
    "Time from a quote's exchange timestamp to its receipt by the collector (clock skew below 0 counts as 0).",
    "source",
)
TICKS_PUBLISHED = _spec(
    "pricewire_collector_ticks_published_total", "counter", "Ticks JetStream acknowledged (duplicates included)."
)
TICKS_DROPPED = _spec(
    "pricewire_collector_ticks_dropped_total", "counter", "Good ticks never published (buffer full, unsent at stop)."
)
TICKS_BUFFERED = _spec("pricewire_collector_ticks_buffered", "gauge", "Ticks waiting for, or in flight to, JetStream.")
# validator
CONSENSUS_PRICE = _spec("pricewire_consensus_price", "gauge", "Last consensus price published, in USD.", "asset")
CONSENSUS_CONFIDENCE = _spec(
    "pricewire_consensus_confidence",
    "gauge",
    "Half-width of the last consensus price's confidence interval, in USD.",
    "asset",
)
CONSENSUS_CHANGE_24H = _spec(
    "pricewire_consensus_change_24h_percent",
    "gauge",
    "24h change of the last consensus price, in percent (absent while unknown).",
    "asset",
)
CONSENSUS_SOURCES_USED = _spec(
    "pricewire_consensus_sources_used", "gauge", "Venues admitted into the last consensus price.", "asset"
)
CONSENSUS_STATUS = _spec(
    "pricewire_consensus_status",
    "gauge",
    "1 for the last consensus price's status (ok, degraded, stale).",
    "asset",
    "status",
)
CONSENSUS_TIMESTAMP = _spec(
    "pricewire_consensus_timestamp_seconds", "gauge", "When the last consensus price was computed, Unix time.", "asset"
)
PRICES_PUBLISHED = _spec(
    "pricewire_consensus_published_total", "counter", "Consensus price events published to md.price.<ASSET>.", "asset"
)
CONSENSUS_EXCLUSIONS = _spec(
    "pricewire_consensus_exclusions_total",
    "counter",
    "Quotes left out of a published consensus price, by venue and reason (stale, outlier, outlier_mad, jump, ...).",
    "source",
    "reason",
)
CONSENSUS_ANOMALIES = _spec(
    "pricewire_consensus_anomalies_total",
    "counter",
    "Consensus prices published flagged anomaly (|z| over the limit).",
    "asset",
)
DECISION_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Upper bounds of the decision latency histogram: a tick decided on time lands in the first five."""
DECISION_LATENCY = _spec(
    "pricewire_validator_decision_latency_seconds",
    "histogram",
    "Per tick, from its receipt by the collector to the sending of the prices decided from its batch.",
)
# every consumer of the log
DLQ_MESSAGES = _spec(
    "pricewire_dlq_messages_total",
    "counter",
    "Inputs dead-lettered to md.dlq.<service>, by reason.",
    "service",
    "reason",
)
JETSTREAM_PENDING = _spec(
    "pricewire_jetstream_consumer_pending",
    "gauge",
    "Messages of a durable consumer not yet delivered (its lag).",
    "consumer",
)
JETSTREAM_ACK_PENDING = _spec(
    "pricewire_jetstream_consumer_ack_pending",
    "gauge",
    "Messages of a durable consumer delivered but not yet acked.",
    "consumer",
)
JETSTREAM_REDELIVERIES = _spec(
    "pricewire_jetstream_redeliveries_total", "counter", "Messages this instance received more than once.", "consumer"
)
JETSTREAM_DELIVERED = _spec(
    "pricewire_jetstream_delivered_total", "counter", "Messages this instance received from a consumer.", "consumer"
)
# cache_writer
PROJECTION_LAG = _spec(
    "pricewire_projection_lag_events", "gauge", "Events of a stream a projection has not applied yet.", "projection"
)
PROJECTION_WRITTEN = _spec(
    "pricewire_projection_written_total", "counter", "Events a projection wrote to its store.", "projection"
)
PROJECTION_STORE_UP = _spec(
    "pricewire_projection_store_up", "gauge", "1 while a projection's store takes writes, else 0.", "projection"
)
# gateway
CACHE_REQUESTS = _spec(
    "pricewire_cache_requests_total",
    "counter",
    "Latest-price lookups in Redis, by result (hit, miss, error).",
    "result",
)
ARCHIVE_FALLBACKS = _spec(
    "pricewire_cache_fallbacks_total", "counter", "Prices served from PostgreSQL because Redis had none to give."
)
WEBSOCKET_CLIENTS = _spec("pricewire_websocket_clients", "gauge", "WebSocket clients connected now.")
WEBSOCKET_UPDATES_OFFERED = _spec(
    "pricewire_websocket_updates_offered_total", "counter", "Price updates offered to WebSocket clients."
)
WEBSOCKET_UPDATES_DROPPED = _spec(
    "pricewire_websocket_updates_dropped_total",
    "counter",
    "Price updates a WebSocket client never got, by reason (conflated: replaced by a newer one while it read slowly).",
    "reason",
)
WEBSOCKET_CLOSED = _spec(
    "pricewire_websocket_closed_total",
    "counter",
    "WebSocket clients the gateway closed, by reason (too_slow: left frames unread; flood: too many messages).",
    "reason",
)
ALERT_DELIVERIES = _spec(
    "pricewire_alert_deliveries_total",
    "counter",
    "Alert notifications sent, by channel and outcome.",
    "channel",
    "outcome",
)
# every service
BUILD_INFO = _spec("pricewire_build_info", "gauge", "Always 1: the service and its version.", "service", "version")

CATALOGUE: tuple[MetricSpec, ...] = (
    SOURCE_FRAMES,
    SOURCE_REQUESTS,
    SOURCE_TICKS,
    SOURCE_RECONNECTS,
    SOURCE_UP,
    VENUE_LATENCY,
    TICKS_PUBLISHED,
    TICKS_DROPPED,
    TICKS_BUFFERED,
    CONSENSUS_PRICE,
    CONSENSUS_CONFIDENCE,
    CONSENSUS_CHANGE_24H,
    CONSENSUS_SOURCES_USED,
    CONSENSUS_STATUS,
    CONSENSUS_TIMESTAMP,
    PRICES_PUBLISHED,
    CONSENSUS_EXCLUSIONS,
    CONSENSUS_ANOMALIES,
    DECISION_LATENCY,
    DLQ_MESSAGES,
    JETSTREAM_PENDING,
    JETSTREAM_ACK_PENDING,
    JETSTREAM_REDELIVERIES,
    JETSTREAM_DELIVERED,
    PROJECTION_LAG,
    PROJECTION_WRITTEN,
    PROJECTION_STORE_UP,
    CACHE_REQUESTS,
    ARCHIVE_FALLBACKS,
    WEBSOCKET_CLIENTS,
    WEBSOCKET_UPDATES_OFFERED,
    WEBSOCKET_UPDATES_DROPPED,
    WEBSOCKET_CLOSED,
    ALERT_DELIVERIES,
    BUILD_INFO,
)


class Tally:
    """A counter kept by label values: `tally.add(("binance", "ok"))`; read at scrape time. No lock: one loop."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[LabelValues] = Counter()

    def add(self, labels: LabelValues, n: int = 1) -> None:
        self.counts[labels] += n

    def __getitem__(self, labels: LabelValues) -> int:
        return self.counts[labels]


class Buckets:
    """A histogram's counts by fixed upper bounds (`le`, inclusive), and their sum; no lock: one event loop."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds, where = self.counts, self.bounds, bisect.bisect_left
        total = 0.0
        for value in values:
            counts[where(bounds, value)] += 1
            total += value
        self.sum += total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """(`le`, observations at or below it) per bound, +Inf last: the exposition's buckets."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out


Collect = Callable[[], Iterable[Metric]]
Refresh = Callable[[], Awaitable[None]]


class _Callback:
    """A prometheus_client collector that asks a function for its families at each scrape."""

    def __init__(self, collect: Collect) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Exposition:
    """One service instance's metrics: a registry of its own, scrape-time callbacks, and the rendering."""

    def __init__(self, service: str, *, process: bool = True) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self._refreshes: list[tuple[str, Refresh]] = []
        if process:
            # process_* (CPU, memory, open fds) and python_info: standard, and read from /proc at scrape time.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        info = {(service, package_version()): 1.0}
        self.add(lambda: [BUILD_INFO.gauge(info)])

    def add(self, collect: Collect) -> None:
        """Call `collect` at every scrape for families of this service's metrics."""
        self.registry.register(_Callback(collect))

    def add_refresh(self, name: str, refresh: Refresh) -> None:
        """Await `refresh` before every scrape (bounded by REFRESH_TIMEOUT_S): values that cost a round trip."""
        self._refreshes.append((name, refresh))

    async def render(self) -> bytes:
        """The text exposition of every metric, after the refreshes; a refresh that fails keeps its last values."""
        if self._refreshes:
            outcomes = await asyncio.gather(
                *(_bounded(refresh) for _, refresh in self._refreshes),
                return_exceptions=True,
            )
            for (name, _), outcome in zip(self._refreshes, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, BaseException):
                    # A scrape during an outage still answers; the gauges say what was last known.
                    log.warning("metrics_refresh_failed", refresh=name, error=repr(outcome))
        return generate_latest(self.registry)


def dead_letter_family(service: str, *counts: Mapping[str, int]) -> CounterMetricFamily:
    """`pricewire_dlq_messages_total` of a service from its DeadLetters' counts per reason (summed when several)."""
    total: Counter[str] = Counter()
    for each in counts:
        total.update(each)
    return DLQ_MESSAGES.counter({(service, reason): n for reason, n in total.items()})


def package_version() -> str:
    """Pricewire's installed version (semver), or 0.0.0 when run from a tree that was never installed."""
    try:
        return version("pricewire")
    except PackageNotFoundError:
        return "0.0.0"


async def _bounded(refresh: Refresh) -> None:
    async with asyncio.timeout(REFRESH_TIMEOUT_S):
        await refresh()
