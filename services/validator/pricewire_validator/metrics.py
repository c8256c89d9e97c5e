"""The validator's metrics, built at scrape time: nothing here runs per tick.

The consensus gauges are read from the books of the partitions this replica decides (their last
published price per asset); exclusions, anomalies and publications are counted per price event
published (`committed`, told by the book as it commits one), never per tick; the consumers' deliveries and
redeliveries are tallied per batch by their readers, and their pending counts asked of JetStream
just before each scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import nats.errors
import structlog
from nats.js import JetStreamContext
from prometheus_client.metrics_core import Metric

from pricewire_common import metrics as m
from pricewire_common import subjects
from pricewire_common.clock import NS_PER_S
from pricewire_common.consumer import ConsumerTally
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import Price
from pricewire_validator.consensus import ConsensusBook, ConsensusRule

__all__ = ["ObservedBook", "ValidatorMetrics"]

log = structlog.get_logger(__name__)

STATUSES = ("ok", "degraded", "stale")


class ObservedBook(ConsensusBook):
    """A book that tells `on_commit` of each price it commits: once per published event, never per tick."""

    def __init__(self, rule: ConsensusRule, *, on_commit: Callable[[Price], None]) -> None:
        super().__init__(rule)
        self._on_commit = on_commit

    def commit(self, price: Price) -> None:
        super().commit(price)
        self._on_commit(price)


@dataclass(slots=True)
class _Decided:
    book: ConsensusBook
    assets: tuple[str, ...]


class ValidatorMetrics:
    """What this replica decides and has published, for `/metrics`."""

    def __init__(self, js: JetStreamContext, *, service: str, dead_letters: DeadLetters) -> None:
        self._js = js
        self._service = service
        self._dead_letters = dead_letters
        self._decided: dict[str, _Decided] = {}
        """By consumer name, the partitions decided now."""
        self.tallies: dict[str, ConsumerTally] = {}
        """By consumer name, every consumer this replica has read (counters outlive a partition handed back)."""
        self.decision_latency = m.Buckets(m.DECISION_LATENCY_BUCKETS_S)
        """Per tick, its age when the prices decided from its batch were sent (`ticks_decided`)."""
        self.pending: dict[str, tuple[int, int]] = {}
        """By consumer name: (not yet delivered, delivered but not acked), as JetStream last said."""
        self.exclusions: Counter[tuple[str, str]] = Counter()
        self.published: Counter[str] = Counter()
        self.anomalies: Counter[str] = Counter()

    def deciding(self, consumer: str, book: ConsensusBook, assets: Collection[str]) -> ConsumerTally:
        """A partition is decided with `book` from `consumer`: its tally, to hand to the consumer's reader."""
        self._decided[consumer] = _Decided(book, tuple(assets))
        tally = self.tallies.get(consumer)
        if tally is None:
            tally = self.tallies[consumer] = ConsumerTally()
        return tally

    def released(self, consumer: str) -> None:
        """The partition is no longer decided here: its prices are another replica's to report."""
        self._decided.pop(consumer, None)
        self.pending.pop(consumer, None)

    def ticks_decided(self, now_ns: int, received_ns: Iterable[int]) -> None:
        """A batch's prices were sent at `now_ns`: its ticks, received at `received_ns`, are decided."""
        self.decision_latency.observe_many(max(0, now_ns - ts) / NS_PER_S for ts in received_ns)

    def committed(self, price: Price) -> None:
        """One consensus price stored in the log."""
        self.published[price.asset] += 1
        if price.anomaly:
            self.anomalies[price.asset] += 1
        for quote in price.sources:
            if quote.reason is not None:
                self.exclusions[quote.source, quote.reason] += 1

    async def refresh(self) -> None:
        """Ask JetStream for each decided consumer's pending counts."""
        for consumer in list(self._decided):
            try:
                info = await self._js.consumer_info(subjects.TICKS_STREAM, consumer)
            except nats.errors.Error as exc:
                log.warning("consumer_info_failed", consumer=consumer, error=repr(exc))
                continue
            self.pending[consumer] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))

    def collect(self) -> Iterable[Metric]:
        prices: dict[tuple[str], float] = {}
        confidence: dict[tuple[str], float] = {}
        change: dict[tuple[str], float] = {}
        used: dict[tuple[str], float] = {}
        status: dict[tuple[str, str], float] = {}
        stamped: dict[tuple[str], float] = {}
        for decided in self._decided.values():
            for asset in decided.assets:
                last = decided.book.last(asset)
                if last is None:
                    continue
                prices[(asset,)] = float(last.price)
                confidence[(asset,)] = float(last.confidence)
                if last.change_pct_24h is not None:
                    change[(asset,)] = float(last.change_pct_24h)
                used[(asset,)] = last.n_used
                for each in STATUSES:
                    status[asset, each] = 1.0 if last.status == each else 0.0
                stamped[(asset,)] = last.ts / NS_PER_S
        yield m.CONSENSUS_PRICE.gauge(prices)
        yield m.CONSENSUS_CONFIDENCE.gauge(confidence)
        yield m.CONSENSUS_CHANGE_24H.gauge(change)
        yield m.CONSENSUS_SOURCES_USED.gauge(used)
        yield m.CONSENSUS_STATUS.gauge(status)
        yield m.CONSENSUS_TIMESTAMP.gauge(stamped)
        yield m.PRICES_PUBLISHED.counter({(asset,): n for asset, n in self.published.items()})
        yield m.CONSENSUS_ANOMALIES.counter({(asset,): n for asset, n in self.anomalies.items()})
        yield m.CONSENSUS_EXCLUSIONS.counter(dict(self.exclusions))
        yield m.JETSTREAM_PENDING.gauge({(c,): p for c, (p, _) in self.pending.items()})
        yield m.JETSTREAM_ACK_PENDING.gauge({(c,): a for c, (_, a) in self.pending.items()})
        yield m.DECISION_LATENCY.histogram({(): self.decision_latency})
        yield m.JETSTREAM_DELIVERED.counter({(c,): t.delivered for c, t in self.tallies.items()})
        yield m.JETSTREAM_REDELIVERIES.counter({(c,): t.redelivered for c, t in self.tallies.items()})
        yield m.dead_letter_family(self._service, self._dead_letters.counts)
