"""A decider's durable consumer on TICKS: acknowledged cumulatively, and resumed at its ack floor.

A partition is decided by one replica at a time, in the order its consumer delivers, so how far it has
decided is one number: the consumer's ack floor. The consumer's ack policy is `all`: the ack of a tick
acks every tick delivered before it, so a batch costs one ack instead of one per tick (an explicit ack
costs the reader about 4 us a tick, `bench/pull_reader.py`, and the server about as much again: at
30,000 ticks/s, a quarter of a core of the two this machine has).

What that asks of the decider: a tick may never be left behind and acked by a newer one. So a decider
never naks: a batch it cannot settle (a price lost, the bus failing, an unexpected error) stops it
acking, and it starts again from the log. And every life of a decider begins here, by moving its
consumer back to just after the ack floor (deleted and created again there, under the same name) when
the consumer had delivered more than that: what was delivered but not acked, by this process or one
that died, comes again, in order.

One more thing a cumulative policy does (seen on nats-server 2.15): terminating a tick (a
rejected one, dead-lettered) also acks every tick delivered before it, prices confirmed or not. That
loses nothing of the consensus: a decider's next life starts from the log (each venue's newest tick per
pair, and the last prices), so an older tick coming back would change nothing in its book.
"""

from __future__ import annotations

import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from pricewire_common import subjects
from pricewire_common.clock import datetime_from_ns

log = structlog.get_logger(__name__)

MAX_ACK_PENDING = 20_000


def fresh_config(
    durable: str, filters: list[str], *, ack_wait_s: float, start_ns: int | None, after_seq: int = 0
) -> ConsumerConfig:
    """The consumer's config, delivering from stream seq `after_seq` + 1 when given, else from `start_ns`
    (a quote's max age back: older ticks can only be stale), else from the stream's first tick."""
    config = ConsumerConfig(
        durable_name=durable,
        name=durable,
        ack_policy=AckPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=MAX_ACK_PENDING,
        deliver_policy=DeliverPolicy.ALL,
    )
    if len(filters) == 1:
        config.filter_subject = filters[0]
    else:
        config.filter_subjects = filters  # a partition's assets: NATS 2.10 or later
    if after_seq > 0:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = after_seq + 1
    elif start_ns is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime_from_ns(start_ns)
    return config


def filters_of(info: ConsumerInfo) -> list[str]:
    return sorted(info.config.filter_subjects or [info.config.filter_subject or ""])


def floor_and_delivered(info: ConsumerInfo) -> tuple[int, int]:
    """The stream seqs of the consumer's ack floor and of the last tick it delivered (0: none)."""
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    return floor, info.delivered.stream_seq if info.delivered else 0


def must_resume(info: ConsumerInfo, filters: list[str]) -> bool:
    """Whether the consumer must be made again at its ack floor: it delivered ticks nobody acked, it acks
    one by one (a consumer from before cumulative acks), or its filters are not the partition's any more."""
    floor, delivered = floor_and_delivered(info)
    return delivered > floor or info.config.ack_policy != AckPolicy.ALL or filters_of(info) != sorted(filters)


async def bind_at_ack_floor(
    js: JetStreamContext,
    durable: str,
    filters: list[str],
    *,
    ack_wait_s: float,
    start_ns: int | None,
) -> tuple[JetStreamContext.PullSubscription, int]:
    """Bind to the decider's consumer `durable`, making it first if it is not there, or making it again at
    its ack floor if it must resume there (`must_resume`). `start_ns`: where a new consumer starts (None:
    the stream's first tick). Also returns the stream seq up to which the consumer delivers again what
    the one it replaced had delivered (0: none; `ConsumerTally.again_through`)."""
    again_through = 0
    try:
        info = await js.consumer_info(subjects.TICKS_STREAM, durable)
    except NotFoundError:
        await js.add_consumer(
            subjects.TICKS_STREAM, fresh_config(durable, filters, ack_wait_s=ack_wait_s, start_ns=start_ns)
        )
    else:
        if must_resume(info, filters):
            floor, delivered = floor_and_delivered(info)
            config = fresh_config(durable, filters, ack_wait_s=ack_wait_s, start_ns=start_ns, after_seq=floor)
            await js.delete_consumer(subjects.TICKS_STREAM, durable)
            await js.add_consumer(subjects.TICKS_STREAM, config)
            again_through = delivered
            log.info(
                "consumer_resumed_at_ack_floor",
                consumer=durable,
                ack_floor=floor,
                delivered=delivered,
                filters=filters,
            )
    return await js.pull_subscribe_bind(durable=durable, stream=subjects.TICKS_STREAM), again_through
