"""The validator service: ticks from stream TICKS in, consensus prices on `md.price.<ASSET>` out.

Per batch from the durable consumer `validator`: each tick is decoded and checked (rejects go to
`md.dlq.validator` and are terminated), the book takes the good ones, the touched assets are
evaluated and their due events published, then the ticks are acked. If a publish fails, the ticks
are nak'd and come back; the book is idempotent under redelivery. A heartbeat re-evaluates every
asset so that a silent venue turns into a `degraded` or `stale` event without new ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import connect, ensure_streams
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.consumer import durable_pull, stream_seq
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.events import Tick, decode_tick
from pricewire_common.rules import check_tick
from pricewire_validator.consensus import ConsensusBook, ConsensusRule
from pricewire_validator.publisher import PricePublisher
from pricewire_validator.recovery import recover_last_prices, warm_up

log = structlog.get_logger(__name__)

SERVICE = "validator"
DURABLE = "validator"
BATCH = 256
FETCH_WAIT_S = 0.5
"""Longest a fetch waits on the server: bounds how long a stop takes to be noticed."""
NAK_DELAY_S = 1.0


class TickHandler:
    """Maps each batch of ticks to outcomes: book + publish + ack, dead letter + term, or nak."""

    def __init__(
        self,
        book: ConsensusBook,
        publisher: PricePublisher,
        dead_letters: DeadLetters,
        *,
        assets: Collection[str],
    ) -> None:
        self._book = book
        self._publisher = publisher
        self._dead_letters = dead_letters
        self._assets = assets

    async def handle(self, msgs: list[Msg]) -> None:
        accepted: list[Msg] = []
        touched: set[str] = set()
        for msg in msgs:
            tick = await self._admit(msg)
            if tick is not None:
                self._book.update(tick)
                touched.add(tick.base)
                accepted.append(msg)
        try:
            await self._publisher.publish_due(sorted(touched))
        except Exception:
            # The consume boundary: a publish that failed (bus down, timeout) is retried by redelivery.
            log.exception("price_publish_failed", assets=sorted(touched), ticks=len(accepted))
            for msg in accepted:
                await msg.nak(delay=NAK_DELAY_S)
            return
        for msg in accepted:
            await msg.ack()

    async def _admit(self, msg: Msg) -> Tick | None:
        """The checked tick, or None when the message was dead-lettered."""
        try:
            return check_tick(decode_tick(msg.data), assets=self._assets)
        except RejectedInput as err:
            await self._dead_letter(msg, err)
            return None

    async def _dead_letter(self, msg: Msg, err: RejectedInput) -> None:
        try:
            await self._dead_letters.reject(err, subject=msg.subject, payload=msg.data, stream_seq=stream_seq(msg))
        except Exception:
            # The consume boundary: the tick stays in the log until its dead letter is stored.
            log.exception("dead_letter_failed", subject=msg.subject, reason=err.reason)
            await msg.nak(delay=NAK_DELAY_S)
            return
        await msg.term()


async def heartbeat(publisher: PricePublisher, book: ConsensusBook, *, every_s: float, stop: asyncio.Event) -> None:
    """Re-evaluate every asset each `every_s` until `stop`, so ageing quotes are published as such."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        if stop.is_set():
            return
        try:
            await publisher.publish_due(book.assets)
        except Exception:
            # The heartbeat's boundary: the next beat (or the next tick) tries again.
            log.exception("heartbeat_publish_failed")


async def _batches(
    sub: JetStreamContext.PullSubscription, *, batch: int, wait_s: float, stop: asyncio.Event
) -> AsyncIterator[list[Msg]]:
    """`consumer.batches`, also surviving the plain TimeoutError nats-py's fetch raises on an empty poll.

    nats-py 2.16 `_fetch_n` raises `asyncio.TimeoutError`, not its own subclass, when the deadline
    runs out between its two requests; `consumer.batches` only catches the subclass. Until the shared
    loop catches `TimeoutError`, this copy keeps an idle consumer from crashing the service.
    """
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=wait_s)
        except TimeoutError:  # nats.errors.TimeoutError is a subclass
            continue
        if msgs:
            yield msgs


async def _drain(nc: NATS) -> None:
    if not nc.is_closed:
        await nc.drain()


async def _close_pull(nc: NATS, sub: JetStreamContext.PullSubscription) -> None:
    # Before the drain: nats-py's drain joins the pull inbox's queue, but `fetch` takes messages off
    # it without marking them done, so draining a pull subscription waits out drain_timeout (30 s).
    # Anything unacked it still holds is redelivered by JetStream after ack_wait.
    if not nc.is_closed:
        await sub.unsubscribe()


async def run(settings: Settings, stop: asyncio.Event, *, clock: Clock = wall_clock) -> None:
    """Run the validator until `stop` is set, then finish the batch in hand, drain and return."""
    async with AsyncExitStack() as stack:
        nc = await connect(settings.nats_url, name=SERVICE)
        stack.push_async_callback(_drain, nc)
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)

        book = ConsensusBook(ConsensusRule.from_settings(settings))
        recovered = await recover_last_prices(js, book, settings.assets)
        await warm_up(js, book, since_ns=clock() - book.rule.max_age_ns, assets=settings.assets)
        publisher = PricePublisher(js, book, clock=clock)
        handler = TickHandler(book, publisher, DeadLetters(js, service=SERVICE, clock=clock), assets=settings.assets)
        sub = await durable_pull(
            js,
            stream=subjects.TICKS_STREAM,
            durable=DURABLE,
            filter_subject=subjects.ALL_TICKS,
            ack_wait_s=settings.streams.ack_wait_s,
        )
        stack.push_async_callback(_close_pull, nc, sub)
        log.info("validator_started", assets=settings.assets, recovered=recovered)

        async with asyncio.TaskGroup() as group:
            group.create_task(heartbeat(publisher, book, every_s=settings.validator.heartbeat_s, stop=stop))
            async for msgs in _batches(sub, batch=BATCH, wait_s=FETCH_WAIT_S, stop=stop):
                await handler.handle(msgs)
        log.info("validator_stopping", published=publisher.published)
