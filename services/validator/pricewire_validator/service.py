"""The validator service: ticks from stream TICKS in, consensus prices on `md.price.<ASSET>` out.

Per batch from a durable consumer: each tick is decoded and checked against the contract and the
validator's clock (rejects go to `md.dlq.validator` and are terminated), the book takes the good ones,
the touched assets are evaluated one by one and their due events published, then the ticks are acked.
A tick whose quote makes its asset's evaluation raise is dead-lettered as `unprocessable` and left out
of the book. If a publish fails, the ticks are nak'd and come back; the book keeps the newest quote per
venue, so redelivery never moves it back. A sweep re-evaluates every asset each second (or each
heartbeat, if shorter) so that a silent venue turns into a `degraded` or `stale` event.

With PRICEWIRE_VALIDATOR_PARTITIONS = 1 (the default) one process decides every asset from the durable
consumer `validator` on `md.tick.>`. With more, the assets fall into fixed partitions (`partitions`) and
replicas share them through leases (`leases`, `ownership`): each partition held gets its own book,
publisher, sweep and durable consumer `validator-p<i>of<n>` filtered on its assets' tick subjects, so an
asset is decided by one replica at a time and a replica's partitions move to the others when it stops
or dies.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection
from contextlib import AsyncExitStack

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close, ensure_streams
from pricewire_common.clock import Clock, skewed, wall_clock
from pricewire_common.config import Settings
from pricewire_common.consumer import close_pull, prefetched_batches, stream_seq
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import ConfigError, RejectedInput
from pricewire_common.events import Tick, decode_tick
from pricewire_common.js_publish import AckedPublisher
from pricewire_common.metrics import Exposition
from pricewire_common.operations import open_operations
from pricewire_common.ops_http import nats_check
from pricewire_common.rules import check_tick
from pricewire_common.tracing import TRACEPARENT, Tracing, open_tracing, traceparent_of
from pricewire_common.waits import wait_event
from pricewire_validator.consensus import ConsensusBook, ConsensusRule, closest_first
from pricewire_validator.errors import PublishLost, UnprocessableTick
from pricewire_validator.leases import LeaseBucket, replica_id
from pricewire_validator.metrics import ObservedBook, ValidatorMetrics
from pricewire_validator.ownership import Hold, Ownership
from pricewire_validator.partitions import Partition, partitions, supports_filter_subjects
from pricewire_validator.publisher import PricePublisher, Published
from pricewire_validator.recovery import quote_window_ns, recover_last_prices, warm_up
from pricewire_validator.tick_consumer import bind_at_ack_floor

log = structlog.get_logger(__name__)

SERVICE = "validator"
DURABLE = "validator"
BATCH = 256
FETCH_WAIT_S = 0.5
"""Longest a fetch waits on the server: bounds how long a stop takes to be noticed."""
SWEEP_MAX_S = 1.0
"""The longest between two re-evaluations of every asset (see `sweep_every_s`)."""
MAX_UNSETTLED = 4
"""Batches decided whose prices the log has yet to confirm: bounds what a lost publish sends back."""
RESTART_DELAY_S = 1.0
"""Pause before a decider that lost a price starts again from the log."""


_BUS_ERRORS: tuple[type[BaseException], ...] = (NatsError, TimeoutError)
"""Failures of the bus itself (down, reconnecting, slow): retryable, the ticks are nak'd and come back."""
_RETRIED: tuple[type[BaseException], ...] = (PublishLost, *_BUS_ERRORS)
"""What sends a batch's ticks back: the bus failing, or a price of this decider lost (it starts again)."""


class TickHandler:
    """Maps each batch of ticks to outcomes.

    decode or rule rejection -> dead letter + term; a tick whose quote makes its asset's consensus
    raise -> dead letter (`unprocessable`) + term, and out of the book; otherwise the batch is acked
    (its last decided tick: the consumer acks cumulatively, `tick_consumer`) once the prices due are
    stored. A batch that cannot be settled (a price lost, the bus failing, a dead letter refused, an
    unexpected error: the consume boundary, logged with its traceback) sets `failed`, and nothing is
    acked from then on: the decider starts again from the log, where its consumer resumes at the ack floor.
    """

    def __init__(
        self,
        book: ConsensusBook,
        publisher: PricePublisher,
        dead_letters: DeadLetters,
        *,
        assets: Collection[str],
        clock: Clock,
        traced: bool = False,
        fence: Callable[[], bool] | None = None,
        decided: Callable[[int, list[int]], None] | None = None,
    ) -> None:
        """`fence`: whether this decider surely still holds its partition; a batch is acked only while it does.
        `decided`: told, per batch, when its prices due were sent and when each of its ticks was received (ns)."""
        self._decided = decided
        self._book = book
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._assets = frozenset(assets)  # asked once per tick
        self._clock = clock
        self._fence = fence
        self._settling: deque[asyncio.Task[None]] = deque()
        self._traced = traced
        """Whether a tick's traceparent is looked for (tracing on): one header look-up per tick, no span."""
        self.failed = asyncio.Event()
        """Set once a batch could not be settled: the decider must start again from the log."""

    async def handle(self, msgs: list[Msg]) -> None:
        """Decide the batch and settle it once its prices are confirmed, while the next one is decided;
        never raises but for cancellation. At most MAX_UNSETTLED batches wait on their confirmation."""
        while self._settling and (self._settling[0].done() or len(self._settling) >= MAX_UNSETTLED):
            await self._settling.popleft()
        if self.failed.is_set():
            return  # left unacked: the next life of the decider gets them again
        try:
            await self._handle(msgs)
        except _RETRIED:
            self._fail("tick_batch_retried", ticks=len(msgs))
        except Exception:
            # The consume boundary: not the input's fault (that is a RejectedInput), so keep the ticks.
            self._fail("tick_batch_failed", ticks=len(msgs))

    def _fail(self, event: str, **fields: object) -> None:
        """Log what stopped the decider (with the exception being handled, if any) and stop acking."""
        log.error(event, **fields, exc_info=True)
        self.failed.set()

    async def _handle(self, msgs: list[Msg]) -> None:
        now = self._clock()
        held: dict[str, tuple[Tick, ...]] = {}  # per asset, the quotes before this batch
        arrived: dict[str, list[tuple[Msg, Tick]]] = {}
        traced: dict[str, Msg] = {}  # per asset, one sampled tick: the price decided from it continues its trace
        look = self._traced
        last: Msg | None = None  # the batch's last tick taken into the book: its ack acks the batch
        received: list[int] = []  # the kept ticks' ts_received
        for msg in msgs:
            try:
                tick = check_tick(decode_tick(msg.data), assets=self._assets, now_ns=now)
            except RejectedInput as err:
                await self._reject(msg, err)
                continue
            if tick.base not in held:
                held[tick.base] = self._book.quotes(tick.base)
            self._book.update(tick)
            arrived.setdefault(tick.base, []).append((msg, tick))
            last = msg
            received.append(tick.ts_received)
            if look and msg.headers and TRACEPARENT in msg.headers:
                traced[tick.base] = msg
        published = await self._publisher.send_due(sorted(arrived), traced=traced)
        if published.failed:
            for asset in published.failed:
                await self._set_aside_poison(asset, held[asset], arrived[asset], now_ns=published.now_ns)
            again = await self._publisher.send_due(published.failed)
            published.sent += again.sent
            published.acks += again.acks
        if published.failed:  # a tick set aside as poison is terminated: the batch's ack is the last one kept
            last = next((msg for msg in reversed(msgs) if not msg.is_acked), None)
        if self._decided is not None and received:
            self._decided(self._clock(), received)  # the prices are sent: the batch's ticks are decided
        before = self._settling[-1] if self._settling else None
        self._settling.append(asyncio.create_task(self._settle(published, last, before)))

    async def _settle(self, published: Published, last: Msg | None, before: asyncio.Task[None] | None) -> None:
        """Ack up to `last` once the log holds the prices decided from its batch and the batch `before` is
        settled (acks go out in order: each acks all before it); never if a batch failed meanwhile."""
        try:
            if before is not None:
                await before  # never raises: a settle catches what it meets
            await self._publisher.confirm(published)
            if last is None or self.failed.is_set() or (self._fence is not None and not self._fence()):
                return
            await last.ack()
        except PublishLost:
            self.failed.set()  # logged by the publisher (price_lost); decided again by the next life
        except _BUS_ERRORS:
            # Not lost: the next batch's ack acks this one too (or the next life gets it again).
            log.warning("ack_failed", exc_info=True)
        except Exception:
            # The settle task's boundary: logged with its traceback; the decider starts again from the log.
            self._fail("tick_batch_settle_failed")

    async def settle_all(self) -> None:
        """Wait until every batch handed to `handle` is settled."""
        while self._settling:
            await self._settling.popleft()

    async def abandon(self) -> None:
        """Ack nothing more: cancel the settles still waiting (the next life gets their ticks again)."""
        settles = list(self._settling)
        self._settling.clear()
        for settle in settles:
            settle.cancel()
        if settles:
            await asyncio.wait(settles)  # a cancellation of the caller itself still propagates

    async def _set_aside_poison(
        self, asset: str, held: tuple[Tick, ...], arrived: list[tuple[Msg, Tick]], *, now_ns: int
    ) -> None:
        """Rebuild `asset` from the quotes it held and then this batch's ticks in order, rejecting those that raise.

        The held quotes come first: the asset evaluated with them, so a tick that now breaks it is the culprit.
        """
        replay = [*closest_first(held), *(tick for _, tick in arrived)]
        left_out = self._book.rebuild(asset, replay, now_ns=now_ns)
        for msg, tick in arrived:
            if any(tick is poison for poison in left_out):
                detail = f"{asset} consensus cannot be computed with the {tick.source} quote {tick.price}"
                await self._reject(msg, UnprocessableTick(detail))
        for poison in left_out:
            if not any(poison is tick for _, tick in arrived):
                log.warning("quote_dropped", asset=asset, source=poison.source, tick_id=poison.id)

    async def _reject(self, msg: Msg, err: RejectedInput) -> None:
        """Dead-letter and terminate `msg`; a bus refusing the letter fails the batch (`handle`)."""
        await self._dead_letters.reject(
            err, subject=msg.subject, payload=msg.data, stream_seq=stream_seq(msg), traceparent=traceparent_of(msg)
        )
        await msg.term()


async def heartbeat(publisher: PricePublisher, book: ConsensusBook, *, every_s: float, stop: asyncio.Event) -> None:
    """Re-evaluate every asset each `every_s` until `stop`, so ageing quotes are published as such.

    An asset whose consensus raises is rebuilt from its own quotes without the ones that make it
    raise (`ConsensusBook.set_aside_unprocessable`), so it is published again at the next beat.
    """
    while True:
        if await wait_event(stop, every_s):
            return
        try:
            published = await publisher.publish_due(book.assets)
        except PublishLost:
            return  # the decider starts again from the log
        except Exception:
            # The heartbeat's boundary: the next beat (or the next tick) tries again.
            log.exception("heartbeat_publish_failed")
            continue
        for asset in published.failed:
            for poison in book.set_aside_unprocessable(asset, now_ns=published.now_ns):
                log.warning("quote_dropped", asset=asset, source=poison.source, tick_id=poison.id)


async def _close_pull_unless_closed(nc: NATS, sub: JetStreamContext.PullSubscription) -> None:
    # A closed connection has no subscription left to close (and nats-py would raise).
    if not nc.is_closed:
        await close_pull(sub)


def whole(settings: Settings) -> Partition:
    """Every asset, read from `md.tick.>` by the durable consumer `validator`: the one-replica deployment."""
    return Partition(index=0, count=1, assets=settings.assets, filter_subjects=(subjects.ALL_TICKS,))


def sweep_every_s(settings: Settings) -> float:
    """How often every asset is re-evaluated: at most a second, so a quiet venue turns stale within ~1 s of
    its max age; whether a sweep publishes is the publish policy's call (status change, heartbeat, move)."""
    return min(SWEEP_MAX_S, settings.validator.heartbeat_s)


def durable_of(partition: Partition) -> str:
    """The partition's durable consumer: `validator` for the one-replica deployment, else `validator-p<i>of<n>`."""
    return DURABLE if partition.count == 1 else partition.durable


async def partition_pull(
    js: JetStreamContext, partition: Partition, *, ack_wait_s: float, start_ns: int
) -> tuple[JetStreamContext.PullSubscription, int]:
    """Bind to a partition's durable consumer, resumed at its ack floor (`tick_consumer`); also the stream seq
    up to which it delivers again what an earlier life was delivered (`bind_at_ack_floor`).

    A new consumer of a partition starts at `start_ns`, a quote's max age back, not at the stream's first
    tick: older ticks can only be stale, and a day of them would be decided again (the one-replica consumer
    `validator`, older, starts at the first tick). Its filters follow PRICEWIRE_ASSETS and
    PRICEWIRE_USD_QUOTES, which may have changed since it was created.
    """
    return await bind_at_ack_floor(
        js,
        durable_of(partition),
        list(partition.filter_subjects),
        ack_wait_s=ack_wait_s,
        start_ns=None if partition.count == 1 else start_ns,
    )


async def decide(
    nc: NATS,
    settings: Settings,
    partition: Partition,
    stop: asyncio.Event,
    *,
    dead_letters: DeadLetters,
    clock: Clock,
    metrics: ValidatorMetrics | None = None,
    tracing: Tracing | None = None,
    fence: Callable[[], bool] | None = None,
) -> None:
    """Decide `partition`'s assets until `stop`, starting again from the log whenever a price sent was lost
    or the bus failed under it (reading the log, binding the consumer: NATS slow, away or restarting).

    `fence` says whether this replica surely still holds the partition; a price is sent only while it does.
    """
    while not stop.is_set():
        try:
            again = await _decide_from_log(
                nc,
                settings,
                partition,
                stop,
                dead_letters=dead_letters,
                clock=clock,
                metrics=metrics,
                tracing=tracing,
                fence=fence,
            )
        except _BUS_ERRORS as exc:
            log.warning("decider_restarting", assets=partition.assets, error=repr(exc))
        else:
            if stop.is_set() or again is None:
                return
            log.warning("decider_restarting", assets=partition.assets, error=again)
        # A log that keeps refusing (a stream misconfigured, say) must not spin the restarts.
        await wait_event(stop, RESTART_DELAY_S)


async def _decide_from_log(
    nc: NATS,
    settings: Settings,
    partition: Partition,
    stop: asyncio.Event,
    *,
    dead_letters: DeadLetters,
    clock: Clock,
    metrics: ValidatorMetrics | None,
    tracing: Tracing | None = None,
    fence: Callable[[], bool] | None = None,
) -> str | None:
    """Decide `partition`'s assets until `stop`, a lost price or a batch that could not be settled: their
    last prices and fresh quotes from the log, then the ticks. Returns why it must start again (None: stopped).

    Each call has a book of its own, so a partition taken over (or a decider whose book got ahead of the
    log) starts from the log, never from what this process held before.
    """
    js = nc.jetstream()
    rule = ConsensusRule.from_settings(settings)
    book = ConsensusBook(rule) if metrics is None else ObservedBook(rule, on_commit=metrics.committed)
    recovered = await recover_last_prices(js, book, partition.assets)
    now_ns = clock()
    await warm_up(js, book, now_ns=now_ns, assets=partition.assets, filter_subjects=partition.filter_subjects)
    sender = AckedPublisher(nc)  # this life's own: acks owed to an earlier life land nowhere
    publisher = PricePublisher(sender, book, clock=clock, tracing=tracing, fence=fence)
    traced = tracing is not None and tracing.enabled
    handler = TickHandler(
        book,
        publisher,
        dead_letters,
        assets=partition.assets,
        clock=clock,
        traced=traced,
        fence=fence,
        decided=None if metrics is None else metrics.ticks_decided,
    )
    start_ns = now_ns - quote_window_ns(book.rule)
    sub, again_through = await partition_pull(js, partition, ack_wait_s=settings.streams.ack_wait_s, start_ns=start_ns)
    alone = partition.count == 1
    consumer = durable_of(partition)
    tally = None if metrics is None else metrics.deciding(consumer, book, partition.assets)
    if tally is not None:
        tally.again_through = again_through
    halt = asyncio.Event()
    try:
        # One partition is the whole validator: its start and stop keep the service's own event names.
        log.info("validator_started" if alone else "partition_started", assets=partition.assets, recovered=recovered)
        async with asyncio.TaskGroup() as group:
            group.create_task(_set_on_first(halt, stop, publisher.lost_event, handler.failed))
            group.create_task(heartbeat(publisher, book, every_s=sweep_every_s(settings), stop=halt))
            try:
                async for msgs in prefetched_batches(
                    nc,
                    sub,
                    batch=BATCH,
                    wait_s=FETCH_WAIT_S,
                    stop=halt,
                    tally=tally,
                    gather_s=settings.validator.gather_s,
                ):
                    await handler.handle(msgs)
            finally:
                halt.set()
        await handler.settle_all()
    finally:
        try:
            await handler.abandon()  # after a failure (or cancellation): no ack may follow the next life's resume
            if metrics is not None:
                metrics.released(consumer)
            await _close_pull_unless_closed(nc, sub)
        finally:
            await sender.close()
    log.info("validator_stopping" if alone else "partition_stopping", published=publisher.published)
    if publisher.lost is not None:
        return str(publisher.lost)
    if handler.failed.is_set() and not stop.is_set():
        return "a batch of ticks could not be settled"
    return None


async def _set_on_first(target: asyncio.Event, *events: asyncio.Event) -> None:
    """Set `target` as soon as one of `events` (or `target` itself) is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in (*events, target)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    target.set()


async def run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    clock: Clock = wall_clock,
    replica: str | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Run the validator until `stop` is set, then finish the batch in hand, drain and return.

    It decides the partitions it holds a lease on, shared with the other replicas; `replica` names it
    among them (default: host, pid and a random suffix). With one partition (the default) that is every
    asset, or nothing while another replica holds the lease (a hot standby).
    """
    clock = skewed(clock, settings.clock_offset_s)  # 0 unless a fault test skews this host's clock
    async with AsyncExitStack() as stack:
        tracing = open_tracing(stack, settings.tracing, service=SERVICE, given=tracing)  # `tracing`: a test's
        nc = await connect(settings.nats_url, name=SERVICE, auth=settings.nats_auth)
        stack.push_async_callback(drain_or_close, nc)
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)
        dead_letters = DeadLetters(js, service=SERVICE, clock=clock)
        metrics = ValidatorMetrics(js, service=SERVICE, dead_letters=dead_letters)
        exposition = Exposition(SERVICE)
        exposition.add(metrics.collect)
        exposition.add_refresh("consumers", metrics.refresh)
        await open_operations(
            stack,
            nc,
            service=SERVICE,
            description="Consensus prices of the assets onto md.price.<ASSET>",
            exposition=exposition,
            checks=[nats_check(nc)],
            port=settings.metrics_port,
        )
        await _share(
            nc,
            settings,
            stop,
            replica=replica or replica_id(),
            dead_letters=dead_letters,
            clock=clock,
            metrics=metrics,
            tracing=tracing,
        )


async def _share(
    nc: NATS,
    settings: Settings,
    stop: asyncio.Event,
    *,
    replica: str,
    dead_letters: DeadLetters,
    clock: Clock,
    metrics: ValidatorMetrics | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Decide the partitions this replica holds leases on, taking and handing them back as replicas come and go."""
    count = settings.validator.partitions
    version = nc.connected_server_version
    if count > 1 and not supports_filter_subjects(version.major, version.minor):
        raise ConfigError(
            "PRICEWIRE_VALIDATOR_PARTITIONS",
            f"{count} partitions need a NATS server 2.10 or later (consumers with several filter subjects); "
            f"the server runs {version.major}.{version.minor}.{version.patch}",
        )
    js = nc.jetstream()
    bucket = await LeaseBucket.open(
        js, replica=replica, lease_s=settings.validator.lease_s, replicas=settings.streams.replicas
    )
    # One partition is the whole validator, leased all the same: a second replica started by mistake (or
    # for a hot standby) waits instead of deciding every asset a second time from half the ticks.
    shares = partitions(settings.assets, settings.usd_quotes, count) if count > 1 else (whole(settings),)

    async def work(partition: Partition, stop_partition: asyncio.Event, hold: Hold) -> None:
        # Bound in the worker's own task: its log lines, and only its, name the partition.
        structlog.contextvars.bind_contextvars(replica=replica, partition=partition.name)
        await decide(
            nc,
            settings,
            partition,
            stop_partition,
            dead_letters=dead_letters,
            clock=clock,
            metrics=metrics,
            tracing=tracing,
            fence=hold.valid,
        )

    log.info(
        "validator_started",
        replica=replica,
        lease_s=bucket.lease_s,
        partitions={p.name: p.assets for p in shares},
    )
    await Ownership(bucket, shares, work).run(stop)
    log.info("validator_stopping", replica=replica)
