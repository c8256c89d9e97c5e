"""The collector against a real JetStream: publishing, de-duplication, retries, dead letters, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from decimal import Decimal

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from pricewire_cli.embedded import NatsServer
from pricewire_collector.publisher import Publisher
from pricewire_collector.service import run
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, connect, ensure_streams
from pricewire_common.config import DEFAULT_ASSETS, Settings, SimSettings, StreamSettings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import DeadLetter, Tick, decode_dead_letter, decode_tick, encode
from pricewire_common.rules import check_tick
from tests.projections import stored_messages

T0 = 1_700_000_000_000_000_000


def make_tick(n: int, **changes: object) -> Tick:
    fields: dict[str, object] = {
        "id": f"test:{n}",
        "source": "sim-a",
        "symbol": "BTC-USDT",
        "base": "BTC",
        "quote": "USDT",
        "price": Decimal("67000.50") + n,
        "bid": Decimal("67000.40") + n,
        "ask": Decimal("67000.60") + n,
        "ts_exchange": T0 + n,
        "ts_received": T0 + n + 1,
    }
    fields.update(changes)
    return Tick(**fields)  # type: ignore[arg-type]


def sim_settings(nats_url: str, *, rate: float) -> Settings:
    sim = SimSettings(rate=rate, seed=7, venues=3, outlier_probability=0.0, quiet_rate=0.0)
    return replace(Settings(), nats_url=nats_url, sim=sim)


async def stream_messages(js: JetStreamContext, stream: str) -> list[tuple[str, bytes, str | None]]:
    """(subject, payload, Nats-Msg-Id) of every message in `stream`, in order."""
    return [
        (msg.subject or "", msg.data or b"", (msg.headers or {}).get(MSG_ID_HEADER))
        for msg in await stored_messages(js, stream)
    ]


@contextlib.asynccontextmanager
async def publisher_on(
    nc: NATS, *, ack_timeout_s: float = 2.0, backoff_initial_s: float = 0.05
) -> AsyncIterator[Publisher]:
    async with Publisher(
        nc,
        dead_letters=DeadLetters(nc.jetstream(), service="collector"),
        assets=DEFAULT_ASSETS,
        ack_timeout_s=ack_timeout_s,
        backoff_initial_s=backoff_initial_s,
    ) as publisher:
        yield publisher


async def test_service_publishes_checked_ticks_at_the_configured_rate(nats_url: str, nc: NATS) -> None:
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    hundred: asyncio.Future[None] = loop.create_future()

    async def on_tick(msg: Msg) -> None:
        arrivals.append(loop.time())
        if len(arrivals) == 100 and not hundred.done():
            hundred.set_result(None)

    sub = await nc.subscribe(subjects.ALL_TICKS, cb=on_tick)
    stop = asyncio.Event()
    service = asyncio.create_task(run(sim_settings(nats_url, rate=200.0), stop))
    await asyncio.wait_for(hundred, 5)
    stop.set()
    stopped_at = loop.time()
    await asyncio.wait_for(service, 2.0)
    assert loop.time() - stopped_at < 2.0
    await sub.unsubscribe()

    rate = 99 / (arrivals[99] - arrivals[0])
    assert 100 < rate < 400

    js = nc.jetstream()
    stored = await stream_messages(js, subjects.TICKS_STREAM)
    assert len(stored) >= 100
    ticks = [decode_tick(payload) for _, payload, _ in stored]
    for (subject, _, msg_id), tick in zip(stored, ticks, strict=True):
        assert check_tick(tick, assets=DEFAULT_ASSETS) is tick
        assert subject == subjects.tick(tick.source, tick.base, tick.quote)
        assert msg_id == tick.id
    assert len({t.id for t in ticks}) == len(ticks)
    assert {t.source for t in ticks} == {"sim-a", "sim-b", "sim-c"}
    assert {t.base for t in ticks} == set(DEFAULT_ASSETS)


async def test_stop_is_prompt_even_between_slow_ticks(nats_url: str, nc: NATS) -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[None] = loop.create_future()

    async def on_tick(msg: Msg) -> None:
        if not first.done():
            first.set_result(None)

    sub = await nc.subscribe(subjects.ALL_TICKS, cb=on_tick)
    stop = asyncio.Event()
    service = asyncio.create_task(run(sim_settings(nats_url, rate=0.1), stop))
    await asyncio.wait_for(first, 5)  # the first turn is due at once; the next only in 10 s
    stop.set()
    stopped_at = loop.time()
    await asyncio.wait_for(service, 2.0)
    assert loop.time() - stopped_at < 1.0
    await sub.unsubscribe()


async def test_a_tick_already_stored_is_stored_once(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    tick = make_tick(1)
    # An earlier attempt was stored, but its ack never came back.
    await js.publish(subjects.tick("sim-a", "BTC", "USDT"), encode(tick), headers={MSG_ID_HEADER: tick.id})
    async with publisher_on(nc) as publisher:
        await publisher.submit(tick)
        stats = await publisher.wait_for(lambda s: s.published == 1, timeout=5)
    assert stats.duplicates == 1
    assert [msg_id for _, _, msg_id in await stream_messages(js, subjects.TICKS_STREAM)] == [tick.id]


async def test_publishes_are_retried_with_their_ids_until_the_stream_exists(nc: NATS) -> None:
    js = nc.jetstream()
    ticks = [make_tick(n) for n in range(5)]
    async with publisher_on(nc, backoff_initial_s=0.02) as publisher:
        for tick in ticks:
            await publisher.submit(tick)
        await publisher.wait_for(lambda s: s.retries >= 5, timeout=5)  # no stream answers yet
        await ensure_streams(js, StreamSettings())
        stats = await publisher.wait_for(lambda s: s.published == 5, timeout=10)
    assert stats.dropped == 0
    stored = await stream_messages(js, subjects.TICKS_STREAM)
    assert [msg_id for _, _, msg_id in stored] == [t.id for t in ticks]
    assert [decode_tick(payload) for _, payload, _ in stored] == ticks


@contextlib.contextmanager
def paused(server: NatsServer) -> Iterator[None]:
    """Freeze the server (SIGSTOP): connections stay open, but nothing answers."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def test_lost_acks_are_retried_with_the_same_id_and_stored_once(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url, name="pricewire-tests")
    try:
        js = nc.jetstream()
        await ensure_streams(js, StreamSettings())
        ticks = [make_tick(n) for n in range(20)]
        async with publisher_on(nc, ack_timeout_s=0.2, backoff_initial_s=0.02) as publisher:
            with paused(nats_server):
                for tick in ticks:
                    await publisher.submit(tick)
                await publisher.wait_for(lambda s: s.retries >= 40, timeout=5)  # two rounds unanswered
            stats = await publisher.wait_for(lambda s: s.published == 20, timeout=10)
        assert stats.dropped == 0
        stored = await stream_messages(js, subjects.TICKS_STREAM)
        assert sorted(msg_id or "" for _, _, msg_id in stored) == sorted(t.id for t in ticks)
    finally:
        await nc.close()


async def test_invalid_ticks_go_to_the_dead_letter_stream_not_to_ticks(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    bad = {
        "invalid_price": make_tick(1, price=Decimal(0)),
        "unknown_asset": make_tick(2, base="XRP", symbol="XRP-USDT"),
        "bad_source": make_tick(3, source="Sim.A"),
    }
    good = make_tick(4)
    async with publisher_on(nc) as publisher:
        for tick in bad.values():
            await publisher.submit(tick)
        await publisher.submit(good)
        assert await publisher.flush(timeout=5)
        stats = publisher.stats
    assert stats.rejected == 3
    assert stats.published == 1
    letters: list[DeadLetter] = []
    for subject, payload, _ in await stream_messages(js, subjects.DLQ_STREAM):
        assert subject == subjects.dead_letter("collector")
        letters.append(decode_dead_letter(payload))
    assert {letter.reason: decode_tick(letter.payload) for letter in letters} == bad
    assert all(letter.service == "collector" and letter.detail for letter in letters)
    assert [msg_id for _, _, msg_id in await stream_messages(js, subjects.TICKS_STREAM)] == [good.id]


async def test_a_full_buffer_drops_the_oldest_unsent_ticks(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    publisher = Publisher(nc, dead_letters=DeadLetters(js, service="collector"), max_buffer=3)
    ticks = [make_tick(n) for n in range(5)]
    for tick in ticks:  # the sender has not started: everything waits in the buffer
        await publisher.submit(tick)
    assert publisher.stats.dropped == 2
    assert publisher.stats.buffered == 3
    publisher.start()
    assert await publisher.flush(timeout=5)
    await publisher.close()
    assert publisher.stats.published == 3
    stored = await stream_messages(js, subjects.TICKS_STREAM)
    assert [msg_id for _, _, msg_id in stored] == [t.id for t in ticks[2:]]


async def test_a_closed_publisher_refuses_ticks(nc: NATS) -> None:
    js = nc.jetstream()
    publisher = Publisher(nc, dead_letters=DeadLetters(js, service="collector"))
    await publisher.close(timeout=0.1)
    with pytest.raises(RuntimeError):
        await publisher.submit(make_tick(1))


async def test_ticks_sent_while_the_server_is_down_are_stored_once_it_is_back(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url, name="pricewire-tests")
    try:
        js = nc.jetstream()
        await ensure_streams(js, StreamSettings())
        ticks = [make_tick(n) for n in range(10)]
        async with publisher_on(nc, ack_timeout_s=0.2, backoff_initial_s=0.02) as publisher:
            nats_server.stop()
            for tick in ticks:
                await publisher.submit(tick)
            await publisher.wait_for(lambda s: s.retries >= 10, timeout=5)
            nats_server.start()  # same port, same store
            stats = await publisher.wait_for(lambda s: s.published == 10, timeout=10)
        assert stats.dropped == 0
        stored = await stream_messages(js, subjects.TICKS_STREAM)
        assert sorted(msg_id or "" for _, _, msg_id in stored) == sorted(t.id for t in ticks)
    finally:
        await nc.close()
