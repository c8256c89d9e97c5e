"""The decider's consumer (`tick_consumer`): cumulative acks, and every life resumes at the ack floor."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import StreamSettings
from pricewire_common.consumer import ConsumerTally, stream_seq, tally_batch
from pricewire_validator.tick_consumer import bind_at_ack_floor
from tests.waiting import eventually

WAIT_S = 10.0
DURABLE = "decider-test"
FILTERS = [subjects.ALL_TICKS]


async def publish(js: JetStreamContext, count: int) -> None:
    await ensure_streams(js, StreamSettings())
    for i in range(count):
        await js.publish(subjects.tick("sim-a", "BTC", "USD"), str(i).encode(), headers={MSG_ID_HEADER: f"t{i}"})


async def acked_to(js: JetStreamContext, seq: int) -> None:
    """Until the server has applied the acks sent up to stream seq `seq` (it applies them asynchronously)."""
    await eventually(
        lambda: js.consumer_info(subjects.TICKS_STREAM, DURABLE),
        lambda info: info.ack_floor.stream_seq >= seq,
        timeout=WAIT_S,
        what=f"the ack floor at {seq}",
    )


async def bind(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    sub, _ = await bind_at_ack_floor(js, DURABLE, FILTERS, ack_wait_s=30, start_ns=None)
    return sub


async def test_the_next_life_gets_again_in_order_what_was_delivered_after_the_last_ack(nc: NATS) -> None:
    js = nc.jetstream()
    await publish(js, 6)
    sub = await bind(js)
    msgs = await sub.fetch(5, timeout=WAIT_S)
    await msgs[1].ack()  # acks the first two: the ack policy is cumulative
    await sub.unsubscribe()
    await acked_to(js, 2)  # a life that ends (or dies) with ticks 3 to 5 delivered and not acked
    info = await js.consumer_info(subjects.TICKS_STREAM, DURABLE)
    assert info.config.ack_policy == AckPolicy.ALL
    assert (info.ack_floor.stream_seq, info.delivered.stream_seq) == (2, 5)

    sub = await bind(js)
    again = await sub.fetch(4, timeout=WAIT_S)
    assert [stream_seq(m) for m in again] == [3, 4, 5, 6]
    assert [m.metadata.num_delivered for m in again] == [1, 1, 1, 1]
    await again[-1].ack()
    await sub.unsubscribe()
    await acked_to(js, 6)
    info = await js.consumer_info(subjects.TICKS_STREAM, DURABLE)
    assert (info.ack_floor.stream_seq, info.num_ack_pending, info.num_pending) == (6, 0, 0)


async def test_what_the_next_life_gets_again_counts_as_redelivered(nc: NATS) -> None:
    js = nc.jetstream()
    await publish(js, 6)
    sub = await bind(js)
    first = await sub.fetch(5, timeout=WAIT_S)
    await first[1].ack()
    await sub.unsubscribe()
    await acked_to(js, 2)  # ticks 3 to 5 delivered and not acked

    sub, again_through = await bind_at_ack_floor(js, DURABLE, FILTERS, ack_wait_s=30, start_ns=None)
    tally = ConsumerTally(again_through=again_through)
    tally_batch(tally, await sub.fetch(2, timeout=WAIT_S))  # 3 and 4
    second = await sub.fetch(2, timeout=WAIT_S)  # 5, then 6: the first one new
    tally_batch(tally, second)
    await second[-1].ack()
    await sub.unsubscribe()
    await acked_to(js, 6)

    assert again_through == 5
    assert (tally.delivered, tally.redelivered, tally.again_through) == (4, 3, 0)
    _, none_again = await bind_at_ack_floor(js, DURABLE, FILTERS, ack_wait_s=30, start_ns=None)
    assert none_again == 0  # the consumer was not made anew: nothing it delivers is a redelivery


async def test_a_consumer_with_nothing_unacked_is_bound_as_it_is(nc: NATS) -> None:
    js = nc.jetstream()
    await publish(js, 3)
    sub = await bind(js)
    msgs = await sub.fetch(3, timeout=WAIT_S)
    await msgs[-1].ack()
    await sub.unsubscribe()
    await acked_to(js, 3)
    before = await js.consumer_info(subjects.TICKS_STREAM, DURABLE)

    await (await bind(js)).unsubscribe()
    after = await js.consumer_info(subjects.TICKS_STREAM, DURABLE)
    assert after.created == before.created  # not made again
    assert after.ack_floor.stream_seq == 3


async def test_a_consumer_that_acked_one_by_one_is_made_again_at_its_ack_floor(nc: NATS) -> None:
    """A consumer from before cumulative acks: an explicit ack policy cannot be changed in place."""
    js = nc.jetstream()
    await publish(js, 4)
    config = ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, filter_subject=subjects.ALL_TICKS)
    sub = await js.pull_subscribe(subjects.ALL_TICKS, durable=DURABLE, stream=subjects.TICKS_STREAM, config=config)
    for msg in await sub.fetch(2, timeout=WAIT_S):
        await msg.ack()
    await sub.unsubscribe()
    await acked_to(js, 2)

    sub = await bind(js)
    info = await js.consumer_info(subjects.TICKS_STREAM, DURABLE)
    assert info.config.ack_policy == AckPolicy.ALL
    assert [stream_seq(m) for m in await sub.fetch(2, timeout=WAIT_S)] == [3, 4]
    await sub.unsubscribe()
