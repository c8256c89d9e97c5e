"""The validator service on a real NATS JetStream: ticks in, prices and dead letters out."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams, stream_configs
from pricewire_common.clock import NS_PER_S, Clock
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import DeadLetter, Price, Tick, decode_dead_letter, decode_price, encode
from pricewire_common.js_publish import AckedPublisher
from pricewire_validator.consensus import ConsensusBook, ConsensusRule, Decision
from pricewire_validator.publisher import PricePublisher
from pricewire_validator.service import TickHandler, partition_pull, run, whole
from tests.pipeline import ServiceProcess, service_env
from tests.waiting import eventually

WAIT_S = 10.0
_ids = itertools.count()


def make_tick(
    source: str,
    price: str,
    *,
    base: str = "BTC",
    quote: str = "USDT",
    ahead_ns: int = 0,
    open_24h: Decimal | None = None,
) -> Tick:
    now = time.time_ns() + ahead_ns
    return Tick(
        id=f"{source}-{base}-{next(_ids)}",
        source=source,
        symbol=f"{base}-{quote}",
        base=base,
        quote=quote,
        price=Decimal(price),
        ts_exchange=now - 1_000_000,
        ts_received=now,
        open_24h=open_24h,
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


async def test_a_price_the_log_refused_restarts_the_decider_from_the_log(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    prices = {c.name: c for c in stream_configs(settings.streams)}[subjects.PRICES_STREAM]
    reader = await PriceReader.open(js)

    async def events() -> list[str]:
        return [e["event"] for e in logs]

    with capture_logs() as logs:
        async with validator(settings):
            await eventually(events, lambda seen: seen.count("validator_started") == 2, timeout=WAIT_S, what="deciding")
            # From now on PRICES takes BTC only: ETH's first event is refused after the book committed it.
            await js.update_stream(replace(prices, subjects=[subjects.price("BTC")]))
            for source in ("sim-a", "sim-b", "sim-c"):
                await publish_tick(js, make_tick(source, "10", base="ETH"))
            await eventually(events, lambda seen: "decider_restarting" in seen, timeout=WAIT_S, what="a restart")
            await js.update_stream(replace(prices, subjects=[subjects.ALL_PRICES]))
            for source in ("sim-a", "sim-b", "sim-c"):
                await publish_tick(js, make_tick(source, "5"))
            await reader.next(fully_used)  # BTC flows on the restarted decider
            eth = await js.pull_subscribe(subjects.price("ETH"), stream=subjects.PRICES_STREAM)
            (msg,) = await eth.fetch(1, timeout=WAIT_S)  # the refused ticks came back and were decided again
            assert await settled(js) == (0, 0, 0)
    await reader.close()

    first_eth = decode_price(msg.data)
    assert (first_eth.seq, first_eth.price, first_eth.n_used) == (1, Decimal(10), 3)
    lost = [e for e in logs if e["event"] == "price_lost"]
    assert lost and lost[0]["asset"] == "ETH" and lost[0]["seq"] == 1


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


async def test_an_extreme_quote_is_dead_lettered_and_stalls_no_asset(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    # Both decode and were once accepted; the consensus arithmetic could not take either of them.
    await publish_tick(js, make_tick("sim-a", "1e60"))
    await publish_tick(js, make_tick("sim-b", "47000", open_24h=Decimal("1e-60")))
    for source in ("sim-b", "sim-c"):
        await publish_tick(js, make_tick(source, "47000"))
        await publish_tick(js, make_tick(source, "3000", base="ETH"))
    btc, eth = await PriceReader.open(js, "BTC"), await PriceReader.open(js, "ETH")
    async with validator(settings):
        letters = await dead_letters(js, 2)
        btc_price = await btc.next(lambda p: p.n_used == 2)
        eth_price = await eth.next(lambda p: p.n_used == 2)
    await btc.close()
    await eth.close()

    assert [(d.reason, d.stream_seq) for d in letters] == [("invalid_price", 1), ("invalid_price", 2)]
    assert (btc_price.price, btc_price.status, btc_price.n_sources) == (Decimal(47000), "ok", 2)
    assert eth_price.price == Decimal(3000)
    info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_tick_from_the_future_is_dead_lettered_and_its_venue_keeps_quoting(
    settings: Settings, nc: NATS
) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    # Stamped a minute ahead: kept, it would shadow every real sim-a quote for that minute.
    await publish_tick(js, make_tick("sim-a", "200", ahead_ns=60 * NS_PER_S))
    await publish_tick(js, make_tick("sim-a", "100"))
    await publish_tick(js, make_tick("sim-b", "100"))
    reader = await PriceReader.open(js)
    async with validator(settings):
        (letter,) = await dead_letters(js, 1)
        price = await reader.next(lambda p: p.n_used == 2)
    await reader.close()

    assert (letter.reason, letter.stream_seq) == ("bad_timestamp", 1)
    assert {q.source: q.price for q in price.sources} == {"sim-a": Decimal(100), "sim-b": Decimal(100)}
    assert str(price.price) == "100"
    assert reader.seen[0].price == Decimal(100)  # the future quote never made a price


POISON = Decimal("123.456")


class PoisonedBook(ConsensusBook):
    """A book whose arithmetic raises on one price within the tick bounds, as a quote past them once did."""

    def __init__(self, rule: ConsensusRule, *, raises: type[Exception] = InvalidOperation, times: int = -1) -> None:
        super().__init__(rule)
        self._raises = raises
        self._times = times

    def decide(self, asset: str, now_ns: int) -> Decision | None:
        if self._times != 0 and any(q.price == POISON for q in self.quotes(asset)):
            self._times -= 1
            raise self._raises("the poison quote")
        return super().decide(asset, now_ns)


async def handle_all(handler: TickHandler, sub: JetStreamContext.PullSubscription, count: int) -> None:
    """Fetch and handle `count` deliveries, one batch at a time as the service does."""
    handled = 0
    while handled < count:
        msgs = await sub.fetch(count - handled, timeout=WAIT_S)
        await handler.handle(msgs)
        handled += len(msgs)
    await handler.settle_all()


def handler_of(nc: NATS, book: ConsensusBook, settings: Settings) -> tuple[PricePublisher, TickHandler]:
    """A publisher and a tick handler on `book`, as a decider makes them (no tracing, no fence, no metrics)."""
    publisher = PricePublisher(AckedPublisher(nc), book, clock=time.time_ns)
    dead_letters = DeadLetters(nc.jetstream(), service="validator")
    handler = TickHandler(book, publisher, dead_letters, assets=settings.assets, clock=time.time_ns)
    return publisher, handler


async def ticks_consumer(js: JetStreamContext, settings: Settings) -> JetStreamContext.PullSubscription:
    sub, _ = await partition_pull(js, whole(settings), ack_wait_s=30, start_ns=time.time_ns())
    return sub


async def handled_from_log(
    nc: NATS, book: ConsensusBook, settings: Settings
) -> tuple[PricePublisher, TickHandler, JetStreamContext.PullSubscription]:
    """On the streams, a publisher and a tick handler on `book` (`handler_of`) and the validator's consumer."""
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    publisher, handler = handler_of(nc, book, settings)
    return publisher, handler, await ticks_consumer(js, settings)


async def settled(js: JetStreamContext) -> tuple[int, int, int]:
    """The consumer's (ack pending, pending, redelivered) once the acks sent have been applied."""

    async def probe() -> tuple[int, int, int]:
        info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
        return (info.num_ack_pending, info.num_pending, info.num_redelivered)

    return await eventually(probe, lambda counts: counts == (0, 0, 0), timeout=WAIT_S, what="every tick settled")


async def test_a_quote_the_consensus_cannot_take_is_dead_lettered_and_left_out(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    book = PoisonedBook(ConsensusRule.from_settings(settings))
    publisher, handler, sub = await handled_from_log(nc, book, settings)
    for source in ("sim-a", "sim-b"):
        await publish_tick(js, make_tick(source, "100"))
        await publish_tick(js, make_tick(source, "10", base="ETH"))
    await handle_all(handler, sub, 4)
    # One batch: the poison between good ticks of both assets.
    await publish_tick(js, make_tick("sim-c", "10.1", base="ETH"))
    await publish_tick(js, make_tick("sim-a", str(POISON)))
    await publish_tick(js, make_tick("sim-c", "101"))
    with capture_logs() as logs:
        await handle_all(handler, sub, 3)
    await sub.unsubscribe()

    (letter,) = await dead_letters(js, 1)
    assert (letter.reason, letter.stream_seq) == ("unprocessable", 6)
    assert {q.source: q.price for q in book.quotes("BTC")} == {"sim-a": 100, "sim-b": 100, "sim-c": 101}
    btc, eth = book.last("BTC"), book.last("ETH")
    assert btc is not None and eth is not None
    assert (btc.price, btc.n_used, btc.seq) == (Decimal(100), 3, 2)
    assert (eth.price, eth.n_used, eth.seq) == (Decimal(10), 3, 2)
    assert [e["asset"] for e in logs if e["event"] == "consensus_failed"] == ["BTC"]
    assert publisher.failures == {"BTC": 1}
    assert await settled(js) == (0, 0, 0)


async def test_a_batch_whose_last_tick_is_set_aside_is_acked_all_the_same(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    book = PoisonedBook(ConsensusRule.from_settings(settings))
    _, handler, sub = await handled_from_log(nc, book, settings)
    await publish_tick(js, make_tick("sim-a", "100"))
    await publish_tick(js, make_tick("sim-b", str(POISON)))  # the batch's last tick, terminated
    batch: list[Msg] = []
    while len(batch) < 2:  # one batch of both
        batch += await sub.fetch(2 - len(batch), timeout=WAIT_S)
    with capture_logs() as logs:
        await handler.handle(batch)
        await handler.settle_all()
    await sub.unsubscribe()
    assert "ack_failed" not in [e["event"] for e in logs]  # the batch's ack is its last tick kept, not the poison

    (letter,) = await dead_letters(js, 1)
    assert (letter.reason, letter.stream_seq) == ("unprocessable", 2)
    assert not handler.failed.is_set()
    assert await settled(js) == (0, 0, 0)


async def test_one_asset_failing_to_evaluate_holds_back_no_other(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    book = ConsensusBook(ConsensusRule.from_settings(settings))
    book.update(make_tick("sim-a", "1e60", base="ADA"))  # past the rules: only a book filled by hand holds it
    book.update(make_tick("sim-b", "0.5", base="ADA"))
    book.update(make_tick("sim-c", "0.5", base="ADA"))
    book.update(make_tick("sim-a", "3000", base="ETH"))
    publisher = PricePublisher(AckedPublisher(nc), book, clock=time.time_ns)

    with capture_logs() as logs:
        published = await publisher.publish_due(["ADA", "ETH"])

    assert published.failed == ["ADA"]
    assert [(p.asset, p.price) for p in published.sent] == [("ETH", Decimal(3000))]
    (failed,) = [e for e in logs if e["event"] == "consensus_failed"]
    assert (failed["asset"], failed["log_level"], failed["exc_info"]) == ("ADA", "error", True)
    assert book.set_aside_unprocessable("ADA", now_ns=published.now_ns)[0].price == Decimal("1e60")
    assert (await publisher.publish_due(["ADA"])).sent[0].price == Decimal("0.5")


async def test_an_unexpected_error_stops_the_acks_and_the_next_life_gets_the_ticks_again(
    settings: Settings, nc: NATS
) -> None:
    js = nc.jetstream()
    book = PoisonedBook(ConsensusRule.from_settings(settings), raises=RuntimeError, times=1)
    publisher, handler, sub = await handled_from_log(nc, book, settings)
    await publish_tick(js, make_tick("sim-a", "10", base="ETH"))
    await handle_all(handler, sub, 1)  # decided and acked
    await publish_tick(js, make_tick("sim-a", str(POISON)))
    await publish_tick(js, make_tick("sim-b", str(POISON)))
    with capture_logs() as logs:
        await handle_all(handler, sub, 2)  # a bug, not the input's fault: not dead-lettered, not acked
        await publish_tick(js, make_tick("sim-c", str(POISON)))
        await handle_all(handler, sub, 1)  # nor is anything after it, until the decider starts again
    await sub.unsubscribe()
    assert handler.failed.is_set()
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["tick_batch_failed"]
    info = await js.consumer_info(subjects.TICKS_STREAM, "validator")
    assert (info.ack_floor.stream_seq, info.delivered.stream_seq) == (1, 4)

    # The next life: its consumer resumes after the ack floor, and the three ticks come again, in order.
    again = TickHandler(
        book, publisher, DeadLetters(js, service="validator"), assets=settings.assets, clock=time.time_ns
    )
    sub = await ticks_consumer(js, settings)
    await handle_all(again, sub, 3)
    await sub.unsubscribe()
    assert not again.failed.is_set()
    last = book.last("BTC")
    assert last is not None
    assert (last.price, last.n_used, last.seq) == (POISON, 3, 1)
    assert await settled(js) == (0, 0, 0)
    stream = await js.stream_info(subjects.DLQ_STREAM)
    assert stream.state.messages == 0
