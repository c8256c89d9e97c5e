"""Faults of the bus itself, counted as the analyses of message systems count them.

The validator and the cache_writer run as processes of their own against a NATS of this test's own
(JetStream on disk), PostgreSQL and Redis. The feed is the collector's own `Publisher` over the seeded
sim feed, in this process, with a ledger of every tick JetStream acknowledged. Then the NATS server is
killed (SIGKILL) and started again on the same store, or frozen (SIGSTOP) and thawed, mid-stream. After
the fault the counts must be:

- lost = acknowledged - observed = 0, where observed is the ticks table of PostgreSQL;
- duplicated = 0: every tick id once in stream TICKS, once in PostgreSQL;
- Redis holds the last consensus of the log, and a consensus newer than the fault is published within
  RECOVERY_S of the server coming back.

The pause lasts PAUSE_S (3 s here; `PRICEWIRE_FAULT_PAUSE_S=10` for the 10 s of issue 8's campaign), and
each service is killed PRICEWIRE_FAULT_KILLS times (1 here, 3 in `make reliability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from pricewire_cli.embedded import NatsServer
from pricewire_collector.publisher import Publisher
from pricewire_collector.sim import SimFeed
from pricewire_common import subjects
from pricewire_common.bus import connect, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import Tick, decode_price
from tests.pipeline import ServiceProcess, service_env, tick_ids_in_log
from tests.reliability import Outcome, record
from tests.test_cache_writer import consumers_idle
from tests.test_cache_writer_outages import assert_redis_holds_the_last_consensus
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.fault]

TICKS_PER_S = 200.0
PAUSE_S = float(os.environ.get("PRICEWIRE_FAULT_PAUSE_S", "3"))
DOWN_S = 2.0
"""How long a killed server stays down before it is started again."""
RECOVERY_S = 20.0
"""The stated time within which consensus flows again once the server is back."""
SETTLE_S = 60.0


@dataclass
class Ledger:
    """What the feed attempted and what JetStream acknowledged, by tick id."""

    attempted: list[str] = field(default_factory=list)
    acknowledged: Counter[str] = field(default_factory=Counter)

    def attempt(self, tick: Tick) -> None:
        self.attempted.append(tick.id)

    def ack(self, tick: Tick) -> None:
        self.acknowledged[tick.id] += 1


class Feed:
    """The seeded sim feed through the collector's Publisher, at a steady rate, into a ledger."""

    def __init__(self, publisher: Publisher, ledger: Ledger, assets: tuple[str, ...]) -> None:
        self._publisher = publisher
        self._ledger = ledger
        self._sim = SimFeed(assets, venues=3, seed=11, outlier_probability=0.0, quiet_rate=0.0, run_id="fault")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            tick = self._sim.next_tick(time.time_ns())
            if tick is not None:
                self._ledger.attempt(tick)
                await self._publisher.submit(tick)
            # The load's pace, not a wait for a state.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1 / TICKS_PER_S)


UP_EVENT = {"pricewire_gateway": "gateway_listening"}
"""The log event that says a service is at work, where it is not `<service>_started`."""


async def up_count(process: ServiceProcess) -> int:
    """How many times `process` has said it is at work."""
    return await process.logged(UP_EVENT.get(process.module, f"{process.module.removeprefix('pricewire_')}_started"))


@dataclass
class Pipeline:
    """The services as processes of their own: the validator and the cache_writer, and with `whole` a sim
    collector and the gateway too."""

    processes: list[ServiceProcess]

    async def restart(self, process: ServiceProcess) -> None:
        """SIGKILL `process` (a crash), start it again and wait until it is at work."""
        before = await up_count(process)
        process.kill()
        process.start()
        await eventually(functools.partial(up_count, process), lambda n: n > before, timeout=30, what=process.module)

    def stop_collectors(self) -> None:
        """SIGTERM the collectors (they flush and exit 0), so the log stops growing before it is counted."""
        for process in self.processes:
            if process.module == "pricewire_collector":
                assert process.terminate() == 0


@contextlib.asynccontextmanager
async def pipeline(settings: Settings, tmp_path: Path, *, whole: bool = False) -> AsyncIterator[Pipeline]:
    env = service_env(settings)
    modules = ["pricewire_validator", "pricewire_cache_writer"]
    if whole:
        modules += ["pricewire_collector", "pricewire_gateway"]
    with contextlib.ExitStack() as stack:
        processes = [
            stack.enter_context(ServiceProcess(m, env, tmp_path / f"{m.removeprefix('pricewire_')}.log"))
            for m in modules
        ]
        for process in processes:
            process.start()
        for process in processes:
            await eventually(functools.partial(up_count, process), lambda n: n >= 1, timeout=30, what=process.module)
        yield Pipeline(processes)
        for process in processes:
            if process.process is not None and process.process.poll() is None:
                assert process.terminate() == 0, process.module


@contextlib.contextmanager
def frozen(server: NatsServer) -> Iterator[None]:
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def last_price_ts(js: JetStreamContext, asset: str) -> int:
    try:
        raw = await js.get_last_msg(subjects.PRICES_STREAM, subjects.price(asset))
    except (NotFoundError, NatsError, TimeoutError):  # no price yet, or the server still coming back
        return 0
    return decode_price(raw.data or b"").ts


async def observed_ids(database_url: str) -> Counter[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return Counter(row["id"] for row in await conn.fetch("SELECT id FROM ticks"))
    finally:
        await conn.close()


Fault = Callable[[Pipeline], contextlib.AbstractAsyncContextManager[None]]


async def run_fault(
    settings: Settings, server: NatsServer, tmp_path: Path, fault: Fault, *, name: str, what: str, whole: bool = False
) -> None:
    """Feed, run `fault` mid-stream, feed on, then count (and record the counts as scenario `name`)."""
    nc = await connect(server.url, name="fault-feed")
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    ledger = Ledger()
    asset = settings.assets[0]
    try:
        async with (
            pipeline(settings, tmp_path, whole=whole) as services,
            Publisher(
                js, dead_letters=DeadLetters(js, service="collector"), ack_timeout_s=0.5, acked=ledger.ack
            ) as publisher,
        ):
            stop = asyncio.Event()
            feeding = asyncio.create_task(Feed(publisher, ledger, settings.assets).run(stop))
            try:
                await eventually(lambda: last_price_ts(js, asset), lambda ts: ts > 0, timeout=30, what="a price")
                async with fault(services):
                    pass
                back_ns = time.time_ns()
                # Consensus flows again: a price decided after the server came back.
                again_ns = await eventually(
                    lambda: last_price_ts(js, asset), lambda ts: ts > back_ns, timeout=RECOVERY_S, what="a new price"
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)  # a little more load after recovery
            finally:
                stop.set()
                await feeding
            assert await publisher.flush(timeout=30), "the publisher could not send every tick"
            services.stop_collectors()
            await eventually(lambda: consumers_idle(js), lambda idle: idle, timeout=SETTLE_S, what="caught up")
            observed = await observed_ids(settings.database_url)
            in_log = Counter(await tick_ids_in_log(js, subjects.TICKS_STREAM))
            client = redis_asyncio.from_url(settings.redis_url, decode_responses=True)
            try:
                await assert_redis_holds_the_last_consensus(client, js)
            finally:
                await client.aclose()
    finally:
        await nc.close()

    acknowledged = set(ledger.acknowledged)
    lost = acknowledged - set(observed)
    duplicated = {i for i, n in observed.items() if n > 1} | {i for i, n in in_log.items() if n > 1}
    record(
        Outcome(
            scenario=name,
            load=f"{TICKS_PER_S:.0f} ticks/s, {len(settings.assets)} assets x 3 venues",
            fault=what,
            acknowledged=len(acknowledged),
            lost=len(lost),
            duplicated=len(duplicated),
            recovery_s=(again_ns - back_ns) / 1e9,
        )
    )
    assert len(acknowledged) > TICKS_PER_S  # a real load went through the fault
    assert lost == set(), f"{len(lost)} acknowledged ticks lost"
    assert duplicated == set(), f"{len(duplicated)} ticks stored more than once"
    assert set(in_log) == set(observed)  # what the log holds is what PostgreSQL holds


@pytest.fixture
def fault_settings(settings: Settings, nats_server: NatsServer) -> Settings:
    return replace(settings, nats_url=nats_server.url)


async def test_nats_killed_and_restarted_mid_stream_loses_no_acknowledged_tick(
    fault_settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    @contextlib.asynccontextmanager
    async def kill_and_restart(_: Pipeline) -> AsyncIterator[None]:
        await asyncio.sleep(1.5)  # under load first: the fault must land mid-stream
        nats_server.kill()
        await asyncio.sleep(DOWN_S)
        nats_server.start()  # same port, same store
        yield

    await run_fault(
        fault_settings,
        nats_server,
        tmp_path,
        kill_and_restart,
        name="NATS killed and restarted",
        what=f"SIGKILL mid-stream, down {DOWN_S:.0f} s, restarted on the same store",
    )


async def test_nats_frozen_mid_stream_loses_no_acknowledged_tick(
    fault_settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    # Leases shorter than the freeze: every lease and member entry expires at the thaw, as a 10 s freeze does
    # to the default 10 s leases (a validator once missed its SIGTERM there, stuck listing the bucket).
    fault_settings = replace(fault_settings, validator=replace(fault_settings.validator, lease_s=PAUSE_S / 2))

    @contextlib.asynccontextmanager
    async def freeze(_: Pipeline) -> AsyncIterator[None]:
        await asyncio.sleep(1.5)
        with frozen(nats_server):
            await asyncio.sleep(PAUSE_S)
        yield

    await run_fault(
        fault_settings,
        nats_server,
        tmp_path,
        freeze,
        name="NATS paused",
        what=f"SIGSTOP mid-stream for {PAUSE_S:.0f} s, then SIGCONT",
    )


async def test_every_service_killed_at_random_moments_loses_no_acknowledged_tick(
    fault_settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("PRICEWIRE_FAULT_SEED", "8")))
    kills = int(os.environ.get("PRICEWIRE_FAULT_KILLS", "1"))

    @contextlib.asynccontextmanager
    async def kill_each(services: Pipeline) -> AsyncIterator[None]:
        for _ in range(kills):
            for process in services.processes:
                await asyncio.sleep(rng.uniform(0.2, 1.5))  # a random moment under load
                await services.restart(process)
        yield

    # The sim collector's ticks count as the log's: whatever JetStream stored of them must be in PostgreSQL once.
    await run_fault(
        fault_settings,
        nats_server,
        tmp_path,
        kill_each,
        name="every service killed",
        what=f"collector, validator, cache_writer and gateway each SIGKILLed {kills} times at seeded random moments",
        whole=True,
    )
