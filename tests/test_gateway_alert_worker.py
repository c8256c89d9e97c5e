"""The alert worker's outcomes over real NATS and PostgreSQL: a bug is retried a few times, then the event is
dead-lettered so its asset's alerts go on; a store that is away is waited out however long it takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import aiohttp
import asyncpg
import pytest
from nats.aio.client import Client as NATS

from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.config import AlertSettings, StreamSettings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import Price, decode_dead_letter
from pricewire_gateway.alert_store import AlertStore, Pending
from pricewire_gateway.alert_worker import DLQ_SERVICE, AlertWorker
from pricewire_gateway.alerts import Rule, decode_fired
from pricewire_gateway.errors import StoreUnavailable
from pricewire_gateway.schema import migrate
from pricewire_gateway.webhook import Webhooks
from tests.test_gateway_alerts import Collected, publish_prices
from tests.test_gateway_core import make_price

MAX_DELIVERIES = 3
RETRY_DELAY_S = 0.05
ABOVE = Rule(kind="above", target_price=Decimal(50_000))


class Failing(AlertStore):
    """The real store, made to fail on chosen events (a seam we own: the worker takes its store)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.bug_on: set[int] = set()
        """seqs whose decision raises a bug (an exception no store or bus outage raises)."""
        self.away_for: dict[int, int] = {}
        """seq -> how many more decisions of it answer as if PostgreSQL were down."""
        self.attempts: dict[int, int] = {}

    async def decide(self, price: Price, *, band_pct: Decimal) -> list[Pending]:
        self.attempts[price.seq] = self.attempts.get(price.seq, 0) + 1
        if price.seq in self.bug_on:
            raise ZeroDivisionError("a bug in deciding")
        if self.away_for.get(price.seq, 0) > 0:
            self.away_for[price.seq] -= 1
            raise StoreUnavailable("postgres", "connection refused")
        return await super().decide(price, band_pct=band_pct)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


@pytest.fixture
async def failing(pool: asyncpg.Pool) -> Failing:
    store = Failing(pool)
    await store.create(user="alice", asset="BTC", rule=ABOVE, webhook_url=None, note=None, limit=10)
    return store


@pytest.fixture
async def worker(nc: NATS, failing: Failing) -> AsyncIterator[AlertWorker]:
    """The BTC alert consumer, running over `failing`, with short retries."""
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    async with aiohttp.ClientSession() as session:
        worker = AlertWorker(
            nc,
            js,
            failing,
            Webhooks(session, AlertSettings()),
            DeadLetters(js, service=DLQ_SERVICE),
            settings=AlertSettings(),
            ack_wait_s=30.0,  # far past the test: every redelivery seen here is a nak's
            retry_delay_s=RETRY_DELAY_S,
            max_deliveries=MAX_DELIVERIES,
        )
        subs = await worker.subscribe(["BTC"])
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(subs, stop))
        yield worker
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_an_event_that_always_fails_is_dead_lettered_and_the_assets_alerts_go_on(
    nc: NATS, failing: Failing, worker: AlertWorker
) -> None:
    js = nc.jetstream()
    letters = await js.subscribe(subjects.dead_letter(DLQ_SERVICE), stream=subjects.DLQ_STREAM)
    fired = Collected()
    await nc.subscribe(subjects.alert("alice"), cb=fired.on)
    failing.bug_on.add(2)
    prices = [make_price("BTC", seq, price=Decimal(p)) for seq, p in ((1, 49_000), (2, 49_500), (3, 50_100))]
    last = await publish_prices(nc, prices)

    # Before: the poison event stayed unacked forever, and with one event in flight BTC's next never came.
    await asyncio.wait_for(fired.arrived.wait(), timeout=10)
    (firing,) = [decode_fired(m.data) for m in fired.messages]
    assert (firing.price_seq, firing.price) == (3, Decimal(50_100))
    letter = decode_dead_letter((await letters.next_msg(timeout=5)).data)
    await letters.unsubscribe()
    assert (letter.reason, letter.subject, letter.stream_seq) == ("unprocessable", "md.price.BTC", last - 1)
    assert f"failed {MAX_DELIVERIES} deliveries" in letter.detail
    assert "ZeroDivisionError" in letter.detail
    assert failing.attempts[2] == MAX_DELIVERIES  # retried, then set aside: not once, not forever
    assert worker.failed == MAX_DELIVERIES


async def test_a_store_away_longer_than_the_bug_bound_is_waited_out_not_dead_lettered(
    nc: NATS, failing: Failing, worker: AlertWorker
) -> None:
    fired = Collected()
    await nc.subscribe(subjects.alert("alice"), cb=fired.on)
    failing.away_for[1] = 3 * MAX_DELIVERIES
    await publish_prices(nc, [make_price("BTC", 1, price=Decimal(50_500))])
    await asyncio.wait_for(fired.arrived.wait(), timeout=10)
    (firing,) = [decode_fired(m.data) for m in fired.messages]
    assert firing.price_seq == 1
    assert failing.attempts[1] == 3 * MAX_DELIVERIES + 1  # every delivery past the bound still decided
    assert (worker.retried, worker.failed) == (3 * MAX_DELIVERIES, 0)
    stream = await nc.jetstream().stream_info(subjects.DLQ_STREAM)
    assert stream.state.messages == 0
