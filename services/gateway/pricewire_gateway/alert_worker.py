"""The alert consumers: one durable JetStream consumer of stream PRICES per asset, shared by every gateway replica.

All replicas pull from the same durables (`gateway-alerts-<ASSET>`), so each consensus event goes to one of
them. Each durable lets one event be in flight at a time (`max_ack_pending` 1): an asset's events are decided
in stream order whichever replica takes them, so a brief crossing is never decided after the event that
ended it; assets go in parallel. The replica that takes an event decides its alerts in one PostgreSQL
transaction (alert_store.py), then publishes each firing on `md.alert.<user>`, starts its webhook, marks
it delivered, and acks. Outcomes map to acks as everywhere: a store or the bus that is away -> nak with a
delay (JetStream keeps the event); an event that does not decode or breaks the contract -> dead letter +
term; any other exception (a bug) -> logged with its traceback and nak'd, and once the event has been
delivered MAX_DELIVERIES times, dead letter + term: with one event in flight per asset, an event that
always fails must not hold that asset's alerts back forever. A consumer starts at the stream's end when
first created: alerts are about prices from now on, not a replay of the week the stream retains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

import asyncpg
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pricewire_cache_writer.errors import POSTGRES_DOWN
from pricewire_common import subjects
from pricewire_common.config import AlertSettings
from pricewire_common.consumer import batches, close_pull, stream_seq
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.events import decode_price
from pricewire_common.rules import check_price
from pricewire_common.waits import wait_event
from pricewire_gateway.alert_store import AlertStore, Pending
from pricewire_gateway.alerts import encode_fired
from pricewire_gateway.errors import StoreUnavailable, UnprocessableEvent
from pricewire_gateway.schema import migrate
from pricewire_gateway.webhook import Webhooks

log = structlog.get_logger(__name__)

FETCH_WAIT_S: Final = 1.0
DLQ_SERVICE: Final = "gateway_alerts"
"""Rejections of the alert consumers go to `md.dlq.gateway_alerts`: the live feed rejects the same event on its own."""
RETRY_DELAY_S: Final = 1.0
"""Nak delay of an event that failed (PostgreSQL or NATS away, or a bug): it comes back after it."""
MAX_DELIVERIES: Final = 5
"""Deliveries of an event that raises something unexpected before it is dead-lettered. JetStream's count,
so deliveries nak'd while a store was away count too; those alone never dead-letter an event."""


def durable_name(asset: str) -> str:
    """`gateway-alerts-<ASSET>`: the consumer of one asset's prices that every replica shares."""
    return f"{subjects.ALERTS_DURABLE}-{subjects.check_asset(asset)}"


def consumer_config(asset: str, *, ack_wait_s: float) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable_name(asset),
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        # Unbounded: an event waits out a PostgreSQL outage of any length. Only a failure that is not one
        # (a bug) is bounded, by the worker (MAX_DELIVERIES), which dead-letters it instead of dropping it.
        max_deliver=-1,
        max_ack_pending=1,  # one event of the asset in flight: decided in order across replicas
        filter_subject=subjects.price(asset),
    )


class AlertWorker:
    """Decides alerts on each consensus event this replica is handed, and delivers the firings."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        store: AlertStore,
        webhooks: Webhooks,
        dead_letters: DeadLetters,
        *,
        settings: AlertSettings,
        ack_wait_s: float,
        retry_delay_s: float = RETRY_DELAY_S,
        max_deliveries: int = MAX_DELIVERIES,
    ) -> None:
        self._nc = nc
        self._js = js
        self._store = store
        self._webhooks = webhooks
        self._dead_letters = dead_letters
        self._band_pct = settings.hysteresis_pct
        self._ack_wait_s = ack_wait_s
        self._retry_delay_s = retry_delay_s
        self._max_deliveries = max_deliveries
        self.decided = 0
        self.fired = 0
        self.retried = 0
        self.failed = 0
        """Deliveries that raised something unexpected (each logged with its traceback)."""

    async def subscribe(self, assets: Sequence[str]) -> list[JetStreamContext.PullSubscription]:
        """Bind to the shared durable of each asset (creating it at the stream's end if it is new)."""
        return [
            await self._js.pull_subscribe(
                subjects.price(asset),
                durable=durable_name(asset),
                stream=subjects.PRICES_STREAM,
                config=consumer_config(asset, ack_wait_s=self._ack_wait_s),
            )
            for asset in assets
        ]

    async def run(self, subs: Sequence[JetStreamContext.PullSubscription], stop: asyncio.Event) -> None:
        """Consume every asset's durable until `stop` is set."""
        async with asyncio.TaskGroup() as group:
            for sub in subs:
                group.create_task(self._consume(sub, stop))

    async def _consume(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        try:
            async for msgs in batches(sub, batch=1, wait_s=FETCH_WAIT_S, stop=stop):
                for msg in msgs:
                    await self.settle(msg)
        finally:
            if not self._nc.is_closed:
                await close_pull(sub)

    async def settle(self, msg: Msg) -> None:
        """Handle one event, mapping whatever it raises to its ack: the consumer's boundary."""
        try:
            await self.handle(msg)
        except Exception as exc:  # the boundary (house rule 5): logged and routed, never out of the loop
            try:
                await self._after_failure(msg, exc)
            except NatsError as nats_exc:  # not even a nak got through: the event comes back after the ack wait
                log.warning("alert_event_unsettled", subject=msg.subject, error=repr(nats_exc))

    async def handle(self, msg: Msg) -> None:
        """Decide and deliver one event; raises NatsError when the bus fails it, anything else on a bug."""
        try:
            price = check_price(decode_price(msg.data), subject=msg.subject)
        except RejectedInput as err:
            await self._dead_letters.reject(err, subject=msg.subject, payload=msg.data, stream_seq=stream_seq(msg))
            await msg.term()
            return
        if price.status == "stale":
            await msg.ack()  # a re-published old consensus: nothing new to decide on
            return
        try:
            pending = await self._store.decide(price, band_pct=self._band_pct)
            await self._deliver(pending)
        except StoreUnavailable as exc:
            self.retried += 1
            log.warning("alert_decision_deferred", asset=price.asset, seq=price.seq, error=exc.detail)
            await msg.nak(delay=self._retry_delay_s)
            return
        self.decided += 1
        await msg.ack()

    async def _after_failure(self, msg: Msg, exc: Exception) -> None:
        if isinstance(exc, NatsError):  # a firing, dead letter or ack the bus did not take: transient
            self.retried += 1
            log.warning("alert_event_deferred", subject=msg.subject, error=repr(exc))
            await msg.nak(delay=self._retry_delay_s)
            return
        self.failed += 1
        deliveries = msg.metadata.num_delivered
        log.error(
            "alert_event_failed",
            subject=msg.subject,
            stream_seq=stream_seq(msg),
            delivery=deliveries,
            max_deliveries=self._max_deliveries,
            exc_info=exc,
        )
        if deliveries < self._max_deliveries:
            await msg.nak(delay=self._retry_delay_s)
            return
        # Set aside, not dropped: the letter keeps the event for a fix and a replay; the asset's next events go on.
        error = UnprocessableEvent(f"failed {deliveries} deliveries, last with {exc!r}"[:500])
        await self._dead_letters.reject(error, subject=msg.subject, payload=msg.data, stream_seq=stream_seq(msg))
        await msg.term()

    async def _deliver(self, pending: list[Pending]) -> None:
        """Publish, start webhooks, then mark delivered; a failure before the mark re-sends on redelivery."""
        if not pending:
            return
        for item in pending:
            fired = item.fired
            await self._nc.publish(subjects.alert(fired.user), encode_fired(fired))
            if item.webhook_url is not None:
                self._webhooks.send(item.webhook_url, fired)
            log.info(
                "alert_fired",
                alert=fired.alert_id,
                event_id=fired.id,
                user=fired.user,
                asset=fired.symbol,
                price=str(fired.price),
                seq=fired.price_seq,
            )
        await self._nc.flush()
        await self._store.mark_delivered([item.fired.id for item in pending])
        self.fired += len(pending)


MIGRATE_RETRY_S: Final = 2.0


async def try_migrate(pool: asyncpg.Pool) -> bool:
    """Migrate the gateway's tables; False (logged) when PostgreSQL does not answer."""
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
    except POSTGRES_DOWN as exc:
        log.warning("gateway_migration_deferred", error=repr(exc), retry_s=MIGRATE_RETRY_S)
        return False
    return True


async def start_alerts(
    worker: AlertWorker, pool: asyncpg.Pool, stop: asyncio.Event, *, assets: Sequence[str]
) -> asyncio.Task[None]:
    """Bind the shared consumers and migrate now, so the alert API works once the gateway says it serves;
    with PostgreSQL down, the returned task keeps migrating until it answers. The task consumes until `stop`."""
    subs = await worker.subscribe(assets)
    migrated = await try_migrate(pool)

    async def serve() -> None:
        done = migrated
        while not done and not stop.is_set():
            await wait_event(stop, MIGRATE_RETRY_S)
            done = await try_migrate(pool)
        log.info("alert_worker_started", consumers=[durable_name(asset) for asset in assets])
        await worker.run(subs, stop)

    return asyncio.create_task(serve(), name="alert-worker")
