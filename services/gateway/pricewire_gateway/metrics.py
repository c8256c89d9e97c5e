"""The gateway's metrics, built at scrape time from the counts its parts keep: the Redis lookups of the
price store, the PostgreSQL fallbacks, the WebSocket hub's clients and conflated updates, dead letters (the
feed's and the alert consumers'), and alert deliveries (the alert worker's firings on NATS, its webhooks'
outcomes, the WebSocket pushes, and whatever a channel counts in `GatewayMetrics.alert_deliveries`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aiohttp import web
from prometheus_client.metrics_core import Metric

from pricewire_common import metrics as m
from pricewire_common.deadletters import DeadLetters
from pricewire_gateway.alert_worker import DLQ_SERVICE, AlertWorker
from pricewire_gateway.hub import Hub
from pricewire_gateway.latest import LatestPrices
from pricewire_gateway.store import PriceStore
from pricewire_gateway.user_sockets import UserSockets
from pricewire_gateway.webhook import Webhooks

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
        """`(channel, outcome)` -> notifications sent, for a channel that keeps no counts of its own."""
        self._alerts: tuple[AlertWorker, Webhooks, DeadLetters] | None = None
        self._sockets: UserSockets | None = None

    def watch_alerts(self, worker: AlertWorker, webhooks: Webhooks, dead_letters: DeadLetters) -> None:
        """Read the alert worker's firings (published on NATS) and its webhooks' outcomes when scraped."""
        self._alerts = (worker, webhooks, dead_letters)

    def watch_sockets(self, sockets: UserSockets) -> None:
        """Read the alerts this replica's signed-in WebSockets were sent, and missed, when scraped."""
        self._sockets = sockets

    def collect(self) -> Iterable[Metric]:
        yield m.CACHE_REQUESTS.counter({(result,): n for result, n in self._store.lookups.items()})
        yield m.ARCHIVE_FALLBACKS.counter({(): self._latest.fallbacks})
        yield m.WEBSOCKET_CLIENTS.gauge({(): len(self._hub)})
        yield m.WEBSOCKET_UPDATES_OFFERED.counter({(): self._hub.offered})
        yield m.WEBSOCKET_UPDATES_DROPPED.counter({("conflated",): self._hub.conflated})
        yield m.WEBSOCKET_CLOSED.counter({(reason,): n for reason, n in self._hub.closed.items()})
        deliveries: dict[tuple[str, ...], float] = dict(self.alert_deliveries.counts)
        if self._alerts is not None:
            worker, webhooks, _ = self._alerts
            deliveries["nats", "ok"] = deliveries.get(("nats", "ok"), 0) + worker.fired
            deliveries["webhook", "ok"] = deliveries.get(("webhook", "ok"), 0) + webhooks.delivered
            deliveries["webhook", "failed"] = deliveries.get(("webhook", "failed"), 0) + webhooks.failed
        if self._sockets is not None:
            deliveries["websocket", "ok"] = deliveries.get(("websocket", "ok"), 0) + self._sockets.alerts_pushed
            deliveries["websocket", "dropped"] = (
                deliveries.get(("websocket", "dropped"), 0) + self._sockets.alerts_missed
            )
        yield m.ALERT_DELIVERIES.counter(deliveries)
        dlq = m.dead_letter_family(self._service, *(d.counts for d in self._dead_letters))
        if self._alerts is not None:
            for reason, n in self._alerts[2].counts.items():
                dlq.add_metric([DLQ_SERVICE, reason], n)
        yield dlq


METRICS = web.AppKey("metrics", GatewayMetrics)
"""Where the application holds its metrics (the alert worker counts its deliveries there)."""
