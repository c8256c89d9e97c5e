"""PostgreSQL and Redis cut, blackholed, or slowed by a proxy of our own under load: the projections stop acking
(or ack late), JetStream keeps the events, and both catch up by themselves once the stores answer again (at
speed), counted as in test_fault_nats (nothing acknowledged lost, nothing stored twice, Redis equal to the
last consensus). The validator never touches a store, so here "consensus again after" is until the stores
serve it: Redis holds an `ok` consensus of a tick received after the fault for every asset, and PostgreSQL
a tick received after it.

The outage, and the slow spell, last OUTAGE_S (3 s here; `PRICEWIRE_FAULT_OUTAGE_S=30` in `make reliability`).
The cache_writer itself is also paused (SIGSTOP) past its ack wait, for PAUSE_S (3 s; 10 s in `make reliability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from pricewire_cli.embedded import NatsServer
from pricewire_common.config import Settings
from pricewire_common.events import Price, decode_price
from pricewire_common.waits import wait_event
from tests.counting import fresh
from tests.faultproxy import FaultProxy, fault_proxy
from tests.pipeline import ServiceProcess
from tests.test_fault_nats import PAUSE_S, RECOVERY_S, Pipeline, run_fault
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.fault]

OUTAGE_S = float(os.environ.get("PRICEWIRE_FAULT_OUTAGE_S", "3"))
DELAY_S = 0.1
"""Added to every chunk each way by the slow proxy: 200 ms more on each round trip to a store, a link across
an ocean. At 200 ms each way the PostgreSQL ticks projection fell behind 200 ticks/s (a batch costs several
round trips and holds at most 500 ticks): its lag grew by some 0.3 s a second through a 30 s spell."""
LAG_BOUND_S = 5.0
"""The stated bound on the projections' lag (now - the newest tick in PostgreSQL, - the newest consensus in
Redis) while every round trip to them takes 200 ms more."""
CAUGHT_UP_S = 1.0
"""A lag this small is caught up (a batch waits up to 50 ms; the feed ticks every 5 ms)."""
SAMPLE_S = 0.25


@contextlib.asynccontextmanager
async def proxied_stores(settings: Settings) -> AsyncIterator[tuple[Settings, FaultProxy, FaultProxy]]:
    async with (
        fault_proxy(settings.database_url, default_port=5432) as (postgres, database_url),
        fault_proxy(settings.redis_url, default_port=6379) as (redis, redis_url),
    ):
        yield replace(settings, database_url=database_url, redis_url=redis_url), postgres, redis


@dataclass
class Stores:
    """This test's own view of the stores, straight to them (not through the proxies)."""

    settings: Settings
    assets: tuple[str, ...]
    lags_s: list[float] = field(default_factory=list)
    """The lag at each sample taken while the stores were slow."""
    served_again_s: float | None = None

    async def lag_s(self) -> float:
        """Seconds from now back to the newer of: the newest tick PostgreSQL holds, the oldest of the newest
        consensus per asset Redis holds (0 ticks or prices: from the epoch, a lag nobody could miss)."""
        now_ns = time.time_ns()
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            newest_tick = int(await conn.fetchval("SELECT coalesce(max(ts_received_ns), 0) FROM ticks"))
        finally:
            await conn.close()
        newest_prices = min(0 if p is None else p.ts_tick for p in await self.cached())
        return (now_ns - min(newest_tick, newest_prices)) / 1e9

    async def cached(self) -> list[Price | None]:
        """The consensus Redis holds for each asset (None: none)."""
        client = redis_asyncio.from_url(self.settings.redis_url)
        try:
            details = [await client.get(f"price:{asset}:detail") for asset in self.assets]
        finally:
            await client.aclose()
        # A client that does not decode responses answers bytes; the stubs allow str as well.
        return [None if d is None else decode_price(d if isinstance(d, bytes) else d.encode()) for d in details]

    async def sample(self, stop: asyncio.Event) -> None:
        """The lag every SAMPLE_S until `stop`: a measurement's cadence, not a wait for a state."""
        while not await wait_event(stop, SAMPLE_S):
            self.lags_s.append(await self.lag_s())

    async def served_fresh(self, after_ns: int) -> bool:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            tick = await conn.fetchval("SELECT 1 FROM ticks WHERE ts_received_ns > $1 LIMIT 1", after_ns)
        finally:
            await conn.close()
        return tick is not None and all(fresh(price, after_ns) for price in await self.cached())

    async def wait_served_again(self, after_ns: int) -> None:
        """Until the stores serve a consensus of after `after_ns` (see the module's docstring); kept as
        `served_again_s`."""
        await eventually(lambda: self.served_fresh(after_ns), bool, timeout=RECOVERY_S, what="the stores serving")
        self.served_again_s = (time.time_ns() - after_ns) / 1e9

    def recovery(self) -> Callable[[], float]:
        def read() -> float:
            assert self.served_again_s is not None, "the fault never measured its recovery"
            return self.served_again_s

        return read


async def test_postgresql_and_redis_cut_then_restored_lose_nothing(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    stores = Stores(settings, settings.assets)
    async with proxied_stores(replace(settings, nats_url=nats_server.url)) as (proxied, postgres, redis):

        @contextlib.asynccontextmanager
        async def cut_both(_: Pipeline) -> AsyncIterator[None]:
            await asyncio.sleep(1.5)  # under load first
            await postgres.cut()
            await redis.cut()
            await asyncio.sleep(OUTAGE_S)  # the outage itself
            await postgres.restore()
            await redis.restore()
            await stores.wait_served_again(time.time_ns())
            yield

        await run_fault(
            proxied,
            nats_server,
            tmp_path,
            cut_both,
            name="PostgreSQL and Redis cut",
            what=f"both refused and every connection broken for {OUTAGE_S:.0f} s, then restored",
            recovery=stores.recovery(),
        )


async def test_postgresql_and_redis_blackholed_then_restored_lose_nothing(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    stores = Stores(settings, settings.assets)
    async with proxied_stores(replace(settings, nats_url=nats_server.url)) as (proxied, postgres, redis):

        @contextlib.asynccontextmanager
        async def blackhole_both(_: Pipeline) -> AsyncIterator[None]:
            await asyncio.sleep(1.5)
            postgres.blackhole()
            redis.blackhole()
            await asyncio.sleep(OUTAGE_S)  # no byte crosses, no connection closes
            await postgres.restore()
            await redis.restore()
            await stores.wait_served_again(time.time_ns())
            yield

        await run_fault(
            proxied,
            nats_server,
            tmp_path,
            blackhole_both,
            name="PostgreSQL and Redis blackholed",
            what=f"connections open but silent for {OUTAGE_S:.0f} s, then restored",
            recovery=stores.recovery(),
        )


async def test_postgresql_and_redis_slowed_under_load_lose_nothing_and_their_lag_stays_bounded(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    stores = Stores(settings, settings.assets)
    caught_up_lag_s: list[float] = []
    async with proxied_stores(replace(settings, nats_url=nats_server.url)) as (proxied, postgres, redis):

        @contextlib.asynccontextmanager
        async def slow_both(_: Pipeline) -> AsyncIterator[None]:
            await asyncio.sleep(1.5)
            postgres.delay(DELAY_S)
            redis.delay(DELAY_S)
            done = asyncio.Event()
            sampling = asyncio.create_task(stores.sample(done))
            try:
                await asyncio.sleep(OUTAGE_S)  # the slow spell itself, under load
            finally:
                done.set()
                await sampling
            await postgres.restore()
            await redis.restore()
            await stores.wait_served_again(time.time_ns())
            # Caught up, not merely moving: the lag falls back to what an unhurried projection shows.
            caught_up_lag_s.append(
                await eventually(stores.lag_s, lambda lag: lag < CAUGHT_UP_S, timeout=RECOVERY_S, what="caught up")
            )
            yield

        await run_fault(
            proxied,
            nats_server,
            tmp_path,
            slow_both,
            name="PostgreSQL and Redis slowed",
            what=f"{DELAY_S * 1000:.0f} ms added each way to every chunk for {OUTAGE_S:.0f} s, then restored",
            recovery=stores.recovery(),
        )

    assert len(stores.lags_s) >= OUTAGE_S / SAMPLE_S / 2  # the lag was watched the whole spell
    assert max(stores.lags_s) <= LAG_BOUND_S, stores.lags_s
    assert max(stores.lags_s) > 2 * DELAY_S, stores.lags_s  # the delay did reach the projections
    assert caught_up_lag_s and caught_up_lag_s[0] < CAUGHT_UP_S


async def test_the_cache_writer_paused_past_its_ack_wait_loses_and_doubles_nothing(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    # Its batches in hand outlive the ack wait while it is stopped: JetStream delivers them again, and at
    # SIGCONT it finishes the old ones too. Both land on the rows' keys, so nothing is stored twice.
    fault_settings = replace(settings, nats_url=nats_server.url)
    assert fault_settings.streams.ack_wait_s < PAUSE_S
    stores = Stores(fault_settings, fault_settings.assets)
    paused: list[ServiceProcess] = []

    @contextlib.asynccontextmanager
    async def pause_it(services: Pipeline) -> AsyncIterator[None]:
        writer = services.named("pricewire_cache_writer")
        assert writer is not None
        paused.append(writer)
        # Its projections live first: on a busy machine it may still be starting when the prices flow, and a
        # writer paused before it reads anything has nothing in hand for JetStream to deliver again.
        started_ns = time.time_ns()
        await eventually(lambda: stores.served_fresh(started_ns), bool, timeout=RECOVERY_S, what="the stores serving")
        await asyncio.sleep(1.0)  # under load
        with writer.paused():
            await asyncio.sleep(PAUSE_S)  # the pause itself, past the ack wait
        await stores.wait_served_again(time.time_ns())
        yield

    await run_fault(
        fault_settings,
        nats_server,
        tmp_path,
        pause_it,
        name="cache_writer paused",
        what=f"SIGSTOP mid-stream for {PAUSE_S:.0f} s (ack wait {fault_settings.streams.ack_wait_s:.0f} s), "
        "then SIGCONT",
        recovery=stores.recovery(),
    )
    # The redelivery path ran: a projector wrote more events than its stream holds (one stream, from seq 1,
    # none rejected), the ones it had in hand at the pause written once more, yet stored once (run_fault).
    stopped = paused[0].lines("projector_stopped")
    assert {e["consumer"] for e in stopped} == {"cache-redis", "cache-db-ticks", "cache-db-prices"}
    assert all(e["rejected"] == 0 for e in stopped)
    assert any(int(str(e["written"])) > int(str(e["applied_seq"])) for e in stopped), stopped
