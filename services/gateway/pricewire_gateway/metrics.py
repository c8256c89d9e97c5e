"""The gateway's metrics, built at scrape time from the counts its parts keep: the Redis lookups of the
price store, the PostgreSQL fallbacks, the WebSocket hub's clients and conflated updates, dead letters,
and alert deliveries (counted by the alert worker through `GatewayMetrics.alert_deliveries`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aiohttp import web
from prometheus_client.metrics_core import Metric

from pricewire_common import metrics as m
from pricewire_common.deadletters import DeadLetters
from pricewire_gateway.hub import Hub
from pricewire_gateway.latest import LatestPrices
from pricewire_gateway.store import PriceStore

__all__ = ["METRICS", "GatewayMetrics"]


class GatewayMetrics:
    """Reads the gateway's parts when scraped; holds the one count no part of the gateway keeps itself."""

    def __init__(
        self,
        *,
        service: str,
        hub: Hub,
        store: PriceStore,
        latest: LatestPrices,
        dead_letters: Sequence[DeadLetters],
    ) -> None:
        self._service = service
        self._hub = hub
        self._store = store
        self._latest = latest
        self._dead_letters = tuple(dead_letters)
        self.alert_deliveries = m.Tally()
        """`(channel, outcome)` -> notifications sent: `metrics.alert_deliveries.add(("webhook", "ok"))`."""

    def collect(self) -> Iterable[Metric]:
        yield m.CACHE_REQUESTS.counter({(result,): n for result, n in self._store.lookups.items()})
        yield m.ARCHIVE_FALLBACKS.counter({(): self._latest.fallbacks})
        yield m.WEBSOCKET_CLIENTS.gauge({(): len(self._hub)})
        yield m.WEBSOCKET_UPDATES_OFFERED.counter({(): self._hub.offered})
        yield m.WEBSOCKET_UPDATES_DROPPED.counter({("conflated",): self._hub.conflated})
        yield m.ALERT_DELIVERIES.counter(dict(self.alert_deliveries.counts))
        yield m.dead_letter_family(self._service, *(d.counts for d in self._dead_letters))


METRICS = web.AppKey("metrics", GatewayMetrics)
"""Where the application holds its metrics (the alert worker counts its deliveries there)."""
