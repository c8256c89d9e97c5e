"""The prefetching pull reader (`consumer.PullReader`) on a real JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from pricewire_cli.embedded import NatsServer
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, connect, ensure_streams
from pricewire_common.config import StreamSettings
from pricewire_common.consumer import PullReader, durable_pull, prefetched_batches
from tests.waiting import eventually

WAIT_S = 10.0
SUBJECT = subjects.tick("sim-a", "BTC", "USDT")


async def consumer(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    await ensure_streams(js, StreamSettings())
    return await durable_pull(js, stream=subjects.TICKS_STREAM, durable="reader", filter_subject=subjects.ALL_TICKS)


async def publish(js: JetStreamContext, count: int, *, start: int = 0) -> None:
    for i in range(start, start + count):
        await js.publish(SUBJECT, str(i).encode(), headers={MSG_ID_HEADER: f"m{i}"})


async def polling_reader(nc: NATS, stored: int, *, wait_s: float, gather_s: float) -> PullReader:
    """A polling reader (batches of 10) on the test consumer, `stored` messages already in the log."""
    js = nc.jetstream()
    sub = await consumer(js)
    await publish(js, stored)
    return await PullReader.bind(nc, sub, batch=10, wait_s=wait_s, gather_s=gather_s)


async def settled_and_delivered(js: JetStreamContext) -> tuple[int, int, int]:
    info = await js.consumer_info(subjects.TICKS_STREAM, "reader")
    return (info.num_ack_pending, info.num_pending, info.delivered.stream_seq)


async def test_every_message_comes_once_and_in_order_in_batches_no_larger_than_asked(nc: NATS) -> None:
    js = nc.jetstream()
    sub = await consumer(js)
    await publish(js, 25)
    stop = asyncio.Event()
    sizes: list[int] = []
    seen: list[bytes] = []
    async for msgs in prefetched_batches(nc, sub, batch=10, wait_s=0.5, stop=stop):
        sizes.append(len(msgs))
        for msg in msgs:
            seen.append(msg.data)
            await msg.ack()
        if len(seen) >= 25:
            stop.set()

    assert seen == [str(i).encode() for i in range(25)]
    assert max(sizes) <= 10
    assert await eventually(lambda: settled_and_delivered(js), lambda s: s[:2] == (0, 0), timeout=WAIT_S) == (0, 0, 25)


async def test_the_next_batch_is_on_its_way_while_one_is_handled(nc: NATS) -> None:
    js = nc.jetstream()
    sub = await consumer(js)
    await publish(js, 20)
    reader = await PullReader.bind(nc, sub, batch=10, wait_s=2.0)
    stop = asyncio.Event()
    try:
        batches = [await reader.next_batch(stop)]
        # Nothing acked and no call for more: the next batch is delivered to us all the same.
        state = await eventually(lambda: settled_and_delivered(js), lambda s: s[2] == 20, timeout=WAIT_S)
        while sum(map(len, batches)) < 20:  # all here already: handed out a batch (at most 10) at a time
            batches.append(await reader.next_batch(stop))
    finally:
        await reader.close()

    assert state == (20, 0, 20)
    assert all(1 <= len(batch) <= 10 for batch in batches)
    assert [m.data for batch in batches for m in batch] == [str(i).encode() for i in range(20)]


async def test_an_idle_reader_stops_within_its_wait(nc: NATS) -> None:
    js = nc.jetstream()
    sub = await consumer(js)
    stop = asyncio.Event()
    got: list[list[Msg]] = []

    async def consume() -> None:
        async for msgs in prefetched_batches(nc, sub, batch=10, wait_s=0.2, stop=stop):
            got.append(msgs)

    async def batches_got() -> int:
        return len(got)

    task = asyncio.create_task(consume())
    await publish(js, 1)
    await eventually(batches_got, lambda n: n == 1, timeout=WAIT_S)
    stop.set()
    await asyncio.wait_for(task, timeout=WAIT_S)
    assert [m.data for m in got[0]] == [b"0"]


@pytest.mark.parametrize("gather_s", [0.0, 0.01], ids=["request-open", "polling"])
async def test_a_reader_carries_on_after_the_server_restarts(nats_server: NatsServer, gather_s: float) -> None:
    nc = await connect(nats_server.url, name="reader-restart-test")
    try:
        js = nc.jetstream()
        sub = await consumer(js)
        stop = asyncio.Event()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def consume() -> None:
            async for msgs in prefetched_batches(nc, sub, batch=10, wait_s=0.2, stop=stop, gather_s=gather_s):
                for msg in msgs:
                    await msg.ack()
                    received.put_nowait(msg.data)

        task = asyncio.create_task(consume())
        await js.publish(SUBJECT, b"before")
        assert await asyncio.wait_for(received.get(), timeout=WAIT_S) == b"before"

        nats_server.stop()  # same port and store on restart: the stream and the consumer survive
        nats_server.start()
        reconnected = asyncio.Event()
        while not nc.is_connected:  # the client reconnects on its own; wait for it, bounded
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reconnected.wait(), timeout=0.1)
        for _attempt in range(20):  # JetStream may still be recovering its store: retry with the same id
            try:
                await js.publish(SUBJECT, b"after", headers={MSG_ID_HEADER: "after"}, timeout=1)
                break
            except TimeoutError:
                continue
        # The request open when the server went away never reports its end: the reader asks again anyway.
        assert await asyncio.wait_for(received.get(), timeout=15) == b"after"
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    finally:
        await nc.close()


async def test_with_a_gather_the_reader_polls_and_waits_only_after_a_short_answer(nc: NATS) -> None:
    js = nc.jetstream()
    reader = await polling_reader(nc, 3, wait_s=2.0, gather_s=0.3)
    stop = asyncio.Event()
    try:
        first = await reader.next_batch(stop)  # the first poll: what the consumer holds, at once
        answered = time.monotonic()
        await publish(js, 2, start=3)
        second = await reader.next_batch(stop)  # the first came back short: the next poll waits the gather
        second_waited = time.monotonic() - answered
        await publish(js, 25, start=5)
        third = await reader.next_batch(stop)  # a full answer (10 of 25)...
        began = time.monotonic()
        fourth = await reader.next_batch(stop)  # ...so the next poll goes out at once
        fourth_waited = time.monotonic() - began
    finally:
        await reader.close()

    assert [m.data for m in first] == [b"0", b"1", b"2"]
    assert [m.data for m in second] == [b"3", b"4"]
    assert 0.25 <= second_waited < 2.0  # the gather, not the request's 2 s
    assert [m.data for m in [*third, *fourth]] == [str(i).encode() for i in range(5, 25)]
    assert fourth_waited < 0.25


async def test_messages_queued_before_a_lull_are_handed_out_not_held_for_the_next(nc: NATS) -> None:
    reader = await polling_reader(nc, 15, wait_s=0.3, gather_s=0.05)
    stop = asyncio.Event()
    try:
        first = await reader.next_batch(stop)  # a full batch; the poll sent on handing it out brings the other 5
        await asyncio.sleep(0.2)  # a handler slower than the gather: the next call polls again, and finds nothing
        second = await asyncio.wait_for(reader.next_batch(stop), timeout=WAIT_S)
    finally:
        stop.set()
        await reader.close()

    assert [m.data for m in first] == [str(i).encode() for i in range(10)]
    # Queued, they are handed out at once: not kept behind a request waiting for the next message to land.
    assert [m.data for m in second] == [str(i).encode() for i in range(10, 15)]


async def test_an_idle_polling_reader_waits_on_the_server_instead_of_polling(nc: NATS) -> None:
    js = nc.jetstream()
    sub = await consumer(js)
    info = await sub.consumer_info()
    requests: list[dict[str, object]] = []

    async def count(msg: Msg) -> None:
        requests.append(json.loads(msg.data))

    async def requests_now() -> list[dict[str, object]]:
        await nc.flush()
        return list(requests)

    listener = await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{info.stream_name}.{info.name}", cb=count)
    # A gather longer than the wait for the poll below: a poll held back by it would not be seen in time.
    reader = await PullReader.bind(nc, sub, batch=10, wait_s=0.3, gather_s=2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(reader.next_batch(stop))
    try:
        await asyncio.sleep(1.0)  # nothing to read
        idle = await requests_now()
        await publish(js, 1)
        batch = await asyncio.wait_for(task, timeout=WAIT_S)
        # Handing the lull's tick out, the reader polls again at once, without the gather.
        poll: dict[str, object] = {"batch": 10, "no_wait": True}
        polled = await eventually(requests_now, lambda r: poll in r[len(idle) :], timeout=1.0, what="a poll")
        await publish(js, 3, start=1)
        after: list[Msg] = []
        while len(after) < 3:
            after += await asyncio.wait_for(reader.next_batch(stop), timeout=WAIT_S)
    finally:
        stop.set()
        await reader.close()
        await listener.unsubscribe()

    # One poll found nothing; then a request for one message that waits on the server, renewed as each
    # expires (0.3 s), and the open one brings the tick: no request more was needed for it.
    waiting = {"batch": 1, "expires": 300_000_000}
    assert idle[0] == {"batch": 10, "no_wait": True}
    assert idle[1:] and all(r == waiting for r in idle[1:]) and len(idle) <= 6
    assert [m.data for m in batch] == [b"0"]
    # Before the poll, at most the renewal of a waiting request that expired as the tick landed.
    assert all(r == waiting for r in polled[len(idle) : polled.index(poll, len(idle))])
    # What comes after it comes as it lands: the poll, if it found nothing, was followed by a waiting request.
    assert [m.data for m in after] == [b"1", b"2", b"3"]
