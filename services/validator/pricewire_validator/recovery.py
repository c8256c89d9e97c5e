"""Start-up state from the log: the last price of each asset (so seq continues) and recent ticks."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import suppress

import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from pricewire_common import subjects
from pricewire_common.errors import DecodeError, RejectedInput
from pricewire_common.events import decode_price, decode_tick
from pricewire_common.rules import check_tick
from pricewire_validator.consensus import ConsensusBook, ConsensusRule
from pricewire_validator.errors import RecoveryError

log = structlog.get_logger(__name__)

WARM_UP_BATCH = 1024
WARM_UP_FETCH_S = 5.0
_WARM_UP_IDLE_S = 30.0


def quote_window_ns(rule: ConsensusRule) -> int:
    """How far back a tick can still be a fresh quote: the longer of the streamed and polled max ages."""
    return max(rule.max_age_ns, rule.max_age_poll_ns)


async def recover_last_prices(js: JetStreamContext, book: ConsensusBook, assets: Collection[str]) -> int:
    """Seed `book` with each asset's last event in stream PRICES; returns how many assets had one."""
    found = 0
    for asset in assets:
        try:
            raw = await js.get_last_msg(subjects.PRICES_STREAM, subjects.price(asset))
        except NotFoundError:
            continue
        try:
            price = decode_price(raw.data or b"")
        except DecodeError as err:
            # Restarting seq at 1 would break every projection's ordering: refuse to start instead.
            raise RecoveryError(asset, err.detail) from err
        book.seed(price)
        found += 1
        log.info("price_recovered", asset=asset, seq=price.seq, status=price.status, price=str(price.price))
    return found


async def warm_up(
    js: JetStreamContext,
    book: ConsensusBook,
    *,
    now_ns: int,
    assets: Collection[str],
    filter_subjects: Sequence[str] = (subjects.ALL_TICKS,),
) -> int:
    """Put into `book` each venue's newest tick of each pair on `filter_subjects`; returns how many it took.

    The durable consumer only redelivers unacknowledged ticks, so without this a restart would forget
    every fresh quote and report the assets stale until each venue ticks again. A tick's subject names
    its venue and pair, so the last message per subject is exactly the quote the book keeps: one read per
    pair and venue, however many ticks the stream holds (replaying a window of them read every tick of
    the window). Ticks older than a quote's max age are skipped; nothing is published here; ticks the
    rules reject (against `now_ns` too) are skipped, and so are quotes the consensus cannot compute with:
    the durable consumer dead-letters them (or did, before the restart).
    """
    since_ns = now_ns - quote_window_ns(book.rule)
    info = await js.stream_info(subjects.TICKS_STREAM)
    if info.state.messages == 0:
        return 0
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=_WARM_UP_IDLE_S,
    )
    if len(filter_subjects) == 1:
        config.filter_subject = filter_subjects[0]
    else:
        config.filter_subjects = list(filter_subjects)  # a partition's assets: NATS 2.10 or later
    sub = await js.pull_subscribe(filter_subjects[0], stream=subjects.TICKS_STREAM, config=config)
    consumer: str | None = None
    applied = 0
    try:
        started = await sub.consumer_info()
        consumer = started.name
        pending = started.num_pending or 0
        while pending > 0:
            msgs = await sub.fetch(min(pending, WARM_UP_BATCH), timeout=WARM_UP_FETCH_S)
            for msg in msgs:
                try:
                    tick = check_tick(decode_tick(msg.data), assets=assets, now_ns=now_ns)
                except RejectedInput:
                    continue  # not lost: the durable consumer dead-letters it
                if tick.ts_received >= since_ns and book.update(tick):
                    applied += 1
            pending = msgs[-1].metadata.num_pending
    finally:
        await sub.unsubscribe()
        if consumer is not None:  # else its inactive threshold removes it
            with suppress(NotFoundError):
                await js.delete_consumer(subjects.TICKS_STREAM, consumer)
    for asset in book.assets:
        try:
            book.evaluate(asset, now_ns)
        except ArithmeticError:
            log.exception("consensus_failed", asset=asset)
            for poison in book.set_aside_unprocessable(asset, now_ns=now_ns):
                log.warning("quote_dropped", asset=asset, source=poison.source, tick_id=poison.id)
    log.info("book_warmed_up", ticks=applied, assets=book.assets)
    return applied
