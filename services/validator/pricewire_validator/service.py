"""The validator service: ticks from stream TICKS in, consensus prices on `md.price.<ASSET>` out.

Per batch from the durable consumer `validator`: each tick is decoded and checked against the
contract and the validator's clock (rejects go to `md.dlq.validator` and are terminated), the book
takes the good ones, the touched assets are evaluated one by one and their due events published,
then the ticks are acked. A tick whose quote makes its asset's evaluation raise is dead-lettered as
`unprocessable` and left out of the book. If a publish fails, the ticks are nak'd and come back;
the book keeps the newest quote per venue, so redelivery never moves it back. A heartbeat
re-evaluates every asset so that a silent venue turns into a `degraded` or `stale` event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from contextlib import AsyncExitStack

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close, ensure_streams
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.consumer import batches, close_pull, durable_pull, stream_seq
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.events import Tick, decode_tick
from pricewire_common.rules import check_tick
from pricewire_validator.consensus import ConsensusBook, ConsensusRule, closest_first
from pricewire_validator.errors import UnprocessableTick
from pricewire_validator.publisher import PricePublisher
from pricewire_validator.recovery import recover_last_prices, warm_up

log = structlog.get_logger(__name__)

SERVICE = "validator"
DURABLE = "validator"
BATCH = 256
FETCH_WAIT_S = 0.5
"""Longest a fetch waits on the server: bounds how long a stop takes to be noticed."""
NAK_DELAY_S = 1.0


_BUS_ERRORS: tuple[type[BaseException], ...] = (NatsError, TimeoutError)
"""Failures of the bus itself (down, reconnecting, slow): retryable, the ticks are nak'd and come back."""


class TickHandler:
    """Maps each batch of ticks to outcomes.

    decode or rule rejection -> dead letter + term; a tick whose quote makes its asset's consensus
    raise -> dead letter (`unprocessable`) + term, and out of the book; bus failure -> nak with delay;
    anything else -> logged with its traceback and nak'd (the consume boundary); otherwise ack once
    the prices due are stored.
    """

    def __init__(
        self,
        book: ConsensusBook,
        publisher: PricePublisher,
        dead_letters: DeadLetters,
        *,
        assets: Collection[str],
        clock: Clock,
    ) -> None:
        self._book = book
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._assets = assets
        self._clock = clock

    async def handle(self, msgs: list[Msg]) -> None:
        """Settle every message of the batch; never raises but for cancellation."""
        try:
            await self._handle(msgs)
        except _BUS_ERRORS:
            log.exception("tick_batch_retried", ticks=len(msgs))
            await _nak_unsettled(msgs)
        except Exception:
            # The consume boundary: not the input's fault (that is a RejectedInput), so keep the ticks.
            log.exception("tick_batch_failed", ticks=len(msgs))
            await _nak_unsettled(msgs)

    async def _handle(self, msgs: list[Msg]) -> None:
        now = self._clock()
        held: dict[str, tuple[Tick, ...]] = {}  # per asset, the quotes before this batch
        arrived: dict[str, list[tuple[Msg, Tick]]] = {}
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
        published = await self._publisher.publish_due(sorted(arrived))
        if published.failed:
            for asset in published.failed:
                await self._set_aside_poison(asset, held[asset], arrived[asset], now_ns=published.now_ns)
            await self._publisher.publish_due(published.failed)
        for ticks in arrived.values():
            for msg, _ in ticks:
                if not msg.is_acked:
                    await msg.ack()

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
        """Dead-letter and terminate `msg`; if the bus refuses the letter, nak it so it comes back."""
        try:
            await self._dead_letters.reject(err, subject=msg.subject, payload=msg.data, stream_seq=stream_seq(msg))
        except _BUS_ERRORS:
            log.exception("dead_letter_failed", subject=msg.subject, reason=err.reason)
            await _nak(msg)
            return
        await msg.term()


async def _nak_unsettled(msgs: list[Msg]) -> None:
    for msg in msgs:
        if not msg.is_acked:
            await _nak(msg)


async def _nak(msg: Msg) -> None:
    try:
        await msg.nak(delay=NAK_DELAY_S)
    except _BUS_ERRORS:
        # Not lost: JetStream redelivers an unacknowledged message once its ack wait runs out.
        log.warning("nak_failed", subject=msg.subject, exc_info=True)


async def heartbeat(publisher: PricePublisher, book: ConsensusBook, *, every_s: float, stop: asyncio.Event) -> None:
    """Re-evaluate every asset each `every_s` until `stop`, so ageing quotes are published as such.

    An asset whose consensus raises is rebuilt from its own quotes without the ones that make it
    raise (`ConsensusBook.set_aside_unprocessable`), so it is published again at the next beat.
    """
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        if stop.is_set():
            return
        try:
            published = await publisher.publish_due(book.assets)
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


async def run(settings: Settings, stop: asyncio.Event, *, clock: Clock = wall_clock) -> None:
    """Run the validator until `stop` is set, then finish the batch in hand, drain and return."""
    async with AsyncExitStack() as stack:
        nc = await connect(settings.nats_url, name=SERVICE)
        stack.push_async_callback(drain_or_close, nc)
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)

        book = ConsensusBook(ConsensusRule.from_settings(settings))
        recovered = await recover_last_prices(js, book, settings.assets)
        await warm_up(js, book, now_ns=clock(), assets=settings.assets)
        publisher = PricePublisher(js, book, clock=clock)
        dead_letters = DeadLetters(js, service=SERVICE, clock=clock)
        handler = TickHandler(book, publisher, dead_letters, assets=settings.assets, clock=clock)
        sub = await durable_pull(
            js,
            stream=subjects.TICKS_STREAM,
            durable=DURABLE,
            filter_subject=subjects.ALL_TICKS,
            ack_wait_s=settings.streams.ack_wait_s,
        )
        stack.push_async_callback(_close_pull_unless_closed, nc, sub)
        log.info("validator_started", assets=settings.assets, recovered=recovered)

        async with asyncio.TaskGroup() as group:
            group.create_task(heartbeat(publisher, book, every_s=settings.validator.heartbeat_s, stop=stop))
            async for msgs in batches(sub, batch=BATCH, wait_s=FETCH_WAIT_S, stop=stop):
                await handler.handle(msgs)
        log.info("validator_stopping", published=publisher.published)
