"""The validator service on a real NATS JetStream: ticks in, prices and dead letters out."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.clock import NS_PER_S, Clock
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.events import DeadLetter, Price, Tick, decode_dead_letter, decode_price, encode
from pricewire_validator.consensus import ConsensusBook, ConsensusRule
from pricewire_validator.publisher import PricePublisher
from pricewire_validator.service import run
from tests.pipeline import ServiceProcess, service_env

WAIT_S = 10.0
_ids = itertools.count()


def make_tick(source: str, price: str, *, base: str = "BTC", quote: str = "USDT") -> Tick:
    now = time.time_ns()
    return Tick(
        id=f"{source}-{base}-{next(_ids)}",
        source=source,
        symbol=f"{base}-{quote}",
        base=base,
        quote=quote,
        price=Decimal(price),
        ts_exchange=now - 1_000_000,
        ts_received=now,
    )


async def publish_tick(js: JetStreamContext, tick: Tick) -> None:
    await js.publish(subjects.tick(tick.source, tick.base, tick.quote), encode(tick), headers={MSG_ID_HEADER: tick.id})


async def publish_raw(js: JetStreamContext, subject: str, payload: bytes, msg_id: str) -> None:
    await js.publish(subject, payload, headers={MSG_ID_HEADER: msg_id})


@asynccontextmanager
async def validator(settings: Settings, *, clock: Clock = time.time_ns) -> AsyncIterator[asyncio.Task[None]]:
    """The service running in this loop; stopped (and its error surfaced) on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, clock=clock))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=WAIT_S)


class PriceReader:
    """Reads md.price.<asset> from stream PRICES, in order, waiting on the server for each event."""

    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self._sub = sub
        self.seen: list[Price] = []

    @classmethod
    async def open(cls, js: JetStreamContext, asset: str = "BTC") -> PriceReader:
        return cls(await js.pull_subscribe(subjects.price(asset), stream=subjects.PRICES_STREAM))

    async def next(self, accept: Callable[[Price], bool] = lambda _: True) -> Price:
        """The next event `accept` takes (the ones before it are kept in `seen`)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            (msg,) = await self._sub.fetch(1, timeout=max(0.1, deadline - time.monotonic()))
            await msg.ack()
            price = decode_price(msg.data)
            self.seen.append(price)
            if accept(price):
                return price

    async def close(self) -> None:
        await self._sub.unsubscribe()


async def dead_letters(js: JetStreamContext, count: int) -> list[DeadLetter]:
    sub = await js.pull_subscribe(subjects.dead_letter("validator"), stream=subjects.DLQ_STREAM)
    try:
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + WAIT_S
        while len(letters) < count:
            msgs = await sub.fetch(count - len(letters), timeout=max(0.1, deadline - time.monotonic()))
            letters += [decode_dead_letter(m.data) for m in msgs]
        return letters
    finally:
        await sub.unsubscribe()


@pytest.fixture
def settings(nats_url: str) -> Settings:
    """Only NATS is needed here; a 1 s heartbeat keeps the timer-driven tests short."""
    return replace(Settings(), nats_url=nats_url, validator=replace(ValidatorSettings(), heartbeat_s=1.0))


def fully_used(price: Price) -> bool:
    return price.n_used == 3


async def test_ticks_from_three_venues_make_an_ok_consensus(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    for source, quoted in (("sim-a", "47000.50"), ("sim-b", "47001.70"), ("sim-c", "46999.00")):
        await publish_tick(js, make_tick(source, quoted))
    reader = await PriceReader.open(js)
    async with validator(settings):
        price = await reader.next(fully_used)
    await reader.close()

    assert price.asset == "BTC"
    assert price.price == Decimal("47000.50")
    assert str(price.price) == "47000.50"
    assert price.confidence == Decimal("1.50")
    assert (price.status, price.currency, price.n_sources) == ("ok", "USD", 3)
    assert [q.source for q in price.sources] == ["sim-a", "sim-b", "sim-c"]
    assert all(q.reason is None and not q.outlier for q in price.sources)
    assert price.seq == len(reader.seen)
    info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
    assert info.num_ack_pending == 0  # every tick acked once its price was stored


async def test_rejected_ticks_land_in_the_dead_letters_and_the_service_keeps_going(
    settings: Settings, nc: NATS
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    good = encode(make_tick("sim-a", "100"))
    btc = subjects.tick("sim-a", "BTC", "USDT")
    await publish_raw(js, btc, good.replace(b'"100"', b'"NaN"'), "bad-nan")
    await publish_raw(js, btc, good.replace(b'"100"', b'"0"'), "bad-zero")
    await publish_raw(js, btc, b'{"v":1,"id":', "bad-json")
    await publish_tick(js, make_tick("sim-a", "100", base="XRP"))
    reader = await PriceReader.open(js)
    async with validator(settings) as service:
        letters = await dead_letters(js, 4)
        await publish_tick(js, make_tick("sim-a", "100.5"))
        await publish_tick(js, make_tick("sim-b", "100.7"))
        price = await reader.next(lambda p: p.n_used == 2)
        assert not service.done()
    await reader.close()

    assert [(d.reason, d.service) for d in letters] == [
        ("invalid_price", "validator"),
        ("invalid_price", "validator"),
        ("decode_error", "validator"),
        ("unknown_asset", "validator"),
    ]
    assert letters[2].payload == b'{"v":1,"id":'
    assert letters[3].subject == "md.tick.sim-a.XRP-USDT"
    assert [d.stream_seq for d in letters] == [1, 2, 3, 4]
    assert price.price == Decimal("100.6")
    assert reader.seen[0].seq == 1  # no event came from a rejected tick
    info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_seq_continues_across_a_restart_and_fresh_quotes_survive_it(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    reader = await PriceReader.open(js)
    for source in ("sim-a", "sim-b", "sim-c"):
        await publish_tick(js, make_tick(source, "2000"))
    async with validator(settings):
        await reader.next(fully_used)
    before = decode_price((await js.get_last_msg(subjects.PRICES_STREAM, subjects.price("BTC"))).data or b"")

    async with validator(settings):
        # No new tick yet: the heartbeat repeats the consensus, still ok, since the restarted
        # service replayed the recent ticks instead of forgetting them.
        repeated = await reader.next(lambda p: p.seq > before.seq)
        for source in ("sim-a", "sim-b", "sim-c"):
            await publish_tick(js, make_tick(source, "2010"))
        moved = await reader.next(lambda p: p.price == Decimal(2010) and fully_used(p))
    await reader.close()

    assert (repeated.seq, repeated.status, repeated.n_used) == (before.seq + 1, "ok", 3)
    assert repeated.price == before.price
    assert moved.seq > repeated.seq
    seqs = [p.seq for p in reader.seen]
    assert seqs == list(range(1, len(seqs) + 1))  # per asset: 1, 2, 3... with no gap or repeat


async def test_a_silent_market_is_published_as_stale_by_the_heartbeat(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    skew = [0]  # the validator's clock runs ahead by this many ns once the venues fall silent
    reader = await PriceReader.open(js, "ETH")
    for source in ("sim-a", "sim-b"):
        await publish_tick(js, make_tick(source, "3.5", base="ETH"))
    async with validator(settings, clock=lambda: time.time_ns() + skew[0]):
        ok = await reader.next(lambda p: p.n_used == 2)
        skew[0] = round((settings.validator.max_age_s + 1) * NS_PER_S)
        stale = await reader.next(lambda p: p.status == "stale")
    await reader.close()

    assert ok.status == "ok"
    assert (stale.price, stale.confidence, stale.n_used, stale.n_sources) == (ok.price, ok.confidence, 0, 2)
    assert {q.reason for q in stale.sources} == {"stale"}
    assert stale.seq > ok.seq


async def test_a_publish_the_log_already_holds_is_taken_from_the_log(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    book = ConsensusBook(ConsensusRule.from_settings(settings))
    book.update(make_tick("sim-a", "10"))
    book.update(make_tick("sim-b", "10"))
    proposed = book.propose("BTC", time.time_ns())
    assert proposed is not None
    # An earlier attempt at seq 1 was stored, but its ack never came back.
    earlier = msgspec.structs.replace(proposed, ts=1)
    await js.publish(subjects.price("BTC"), encode(earlier), headers={MSG_ID_HEADER: "price:BTC:1"})

    (sent,) = await PricePublisher(js, book, clock=time.time_ns).publish_due(["BTC"])

    assert sent == earlier
    assert book.last("BTC") == earlier
    info = await js.stream_info(subjects.PRICES_STREAM)
    assert info.state.messages == 1


async def test_the_process_serves_and_exits_0_on_sigterm(settings: Settings, nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    reader = await PriceReader.open(js)
    process = ServiceProcess("pricewire_validator", service_env(settings), tmp_path / "validator.log")
    process.start()
    try:
        for source in ("sim-a", "sim-b", "sim-c"):
            await publish_tick(js, make_tick(source, "5"))
        price = await reader.next(fully_used)
    finally:
        code = process.terminate()
        await reader.close()
    assert (price.price, price.status) == (Decimal(5), "ok")
    assert code == 0
    assert b"validator_stopping" in (tmp_path / "validator.log").read_bytes()
