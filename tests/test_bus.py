"""Stream provisioning and de-duplication on a real JetStream."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

from nats.aio.client import Client as NATS

from pricewire_cli.embedded import NatsServer
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, connect, ensure_streams
from pricewire_common.config import StreamSettings
from pricewire_common.consumer import batches, durable_pull


async def test_streams_are_provisioned_idempotently_and_updated(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    await ensure_streams(js, StreamSettings())
    longer = replace(StreamSettings(), ticks_max_age_s=48 * 3600)
    await ensure_streams(js, longer)
    info = await js.stream_info(subjects.TICKS_STREAM)
    assert info.config.max_age == 48 * 3600
    assert info.config.subjects == [subjects.ALL_TICKS]
    names = {s.config.name for s in await js.streams_info()}
    assert {subjects.TICKS_STREAM, subjects.PRICES_STREAM, subjects.DLQ_STREAM} <= names


async def test_a_retried_publish_with_the_same_id_is_stored_once(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    subject = subjects.tick("sim-a", "BTC", "USDT")
    first = await js.publish(subject, b"{}", headers={MSG_ID_HEADER: "tick-1"})
    again = await js.publish(subject, b"{}", headers={MSG_ID_HEADER: "tick-1"})
    assert not first.duplicate
    assert again.duplicate
    info = await js.stream_info(subjects.TICKS_STREAM)
    assert info.state.messages == 1


async def test_a_consumer_carries_on_after_the_server_restarts(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url, name="restart-test")
    try:
        js = nc.jetstream()
        await ensure_streams(js, StreamSettings())
        sub = await durable_pull(js, stream=subjects.TICKS_STREAM, durable="t", filter_subject=subjects.ALL_TICKS)
        stop = asyncio.Event()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def consume() -> None:
            async for msgs in batches(sub, batch=10, wait_s=0.2, stop=stop):
                for msg in msgs:
                    await msg.ack()
                    received.put_nowait(msg.data)

        task = asyncio.create_task(consume())
        subject = subjects.tick("sim-a", "BTC", "USDT")
        await js.publish(subject, b"before")
        assert await asyncio.wait_for(received.get(), timeout=10) == b"before"

        nats_server.stop()  # same port and store on restart: the stream and the consumer survive
        nats_server.start()
        reconnected = asyncio.Event()
        while not nc.is_connected:  # the client reconnects on its own; wait for it, bounded
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reconnected.wait(), timeout=0.1)
        for _attempt in range(20):  # JetStream may still be recovering its store: retry with the same id
            try:
                await js.publish(subject, b"after", headers={MSG_ID_HEADER: "after"}, timeout=1)
                break
            except TimeoutError:
                continue
        assert await asyncio.wait_for(received.get(), timeout=15) == b"after"
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    finally:
        await nc.close()
