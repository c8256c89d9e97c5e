"""Faults of the bus itself, counted as the analyses of message systems count them.

Every service runs as a process of its own (the sim collector and the gateway too, with `whole`) against a
NATS of this test's own (JetStream on disk), PostgreSQL and Redis. Beside them, a feed of the collector's own
`Publisher` over the seeded sim feed, in this process, keeps a ledger (tests/counting.py) of every tick it
attempted and JetStream acknowledged. Then the NATS server is killed (SIGKILL) and started again on the same
store, or frozen (SIGSTOP) and thawed, mid-stream. After the fault the counts must be:

- lost = acknowledged - observed = 0, where observed is the ticks table of PostgreSQL, and every tick the
  feed attempted was acknowledged in the end (its Publisher re-sent, dropped nothing);
- duplicated = 0: every tick id once in stream TICKS, once in PostgreSQL; no price seq twice in PRICES;
- Redis holds the last consensus of the log, and an `ok` consensus decided from a tick received after the
  fault ended is in the log for every asset within RECOVERY_S (the table's "consensus again after");
- with `whole`, every service shows it came back by itself: the collector's own ticks keep arriving after the
  fault, the gateway serves a fresh price, and (where the fault broke connections) each logged nats_reconnected.

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
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio as redis_asyncio

from pricewire_cli.embedded import NatsServer
from pricewire_collector.publisher import Publisher, PublisherStats
from pricewire_collector.sim import SimFeed
from pricewire_common import subjects
from pricewire_common.bus import connect, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import Price, Tick, decode_tick
from tests.counting import (
    Ledger,
    consensus_again_s,
    decided_twice,
    duplicated,
    first_fresh,
    fresh_assets,
    lost,
    seq_gaps,
)
from tests.pipeline import ServiceProcess, service_env
from tests.projections import events_in_log, prices_in_log
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
"""The stated time within which consensus flows again once the fault has ended."""
SETTLE_S = 60.0
FEED_RUN_ID = "fault"
"""The in-process feed's part of its tick ids; the collector process's ticks carry a random one."""


class Feed:
    """The seeded sim feed through the collector's Publisher, at a steady rate, into a ledger."""

    def __init__(self, publisher: Publisher, ledger: Ledger, assets: tuple[str, ...]) -> None:
        self._publisher = publisher
        self._ledger = ledger
        self._sim = SimFeed(assets, venues=3, seed=11, outlier_probability=0.0, quiet_rate=0.0, run_id=FEED_RUN_ID)

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

    def named(self, module: str) -> ServiceProcess | None:
        return next((p for p in self.processes if p.module == module), None)

    async def restart(self, process: ServiceProcess) -> None:
        """SIGKILL `process` (a crash), start it again and wait until it is at work."""
        before = await up_count(process)
        process.kill()
        process.start()
        await eventually(functools.partial(up_count, process), lambda n: n > before, timeout=30, what=process.module)

    async def stop_collectors(self) -> None:
        """SIGTERM the collectors (they flush and exit 0), so the log stops growing before it is counted."""
        for process in self.processes:
            if process.module == "pricewire_collector":
                assert await stopped(process) == 0


async def stopped(process: ServiceProcess) -> int:
    """SIGTERM `process` and wait for its exit code in a thread: this loop runs the fault proxies, and a
    service that flushes to a store through one must not wait on a loop blocked waiting for it to exit."""
    return await asyncio.to_thread(process.terminate)


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
                assert await stopped(process) == 0, process.module


@contextlib.contextmanager
def frozen(server: NatsServer) -> Iterator[None]:
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def observed_ids(database_url: str) -> Counter[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return Counter(row["id"] for row in await conn.fetch("SELECT id FROM ticks"))
    finally:
        await conn.close()


class Served(msgspec.Struct):
    """What the gateway's `GET /api/v1/prices/{asset}` says, as far as these tests look."""

    status: str
    ts_tick: int


async def served_fresh(gateway: ServiceProcess, assets: tuple[str, ...], after_ns: int) -> set[str]:
    """The assets the gateway (its latest life's port) serves an `ok` price of a tick received after `after_ns`."""
    port = gateway.lines("gateway_listening")[-1]["port"]
    found = set()
    async with aiohttp.ClientSession() as http:
        for asset in assets:
            try:
                async with http.get(f"http://127.0.0.1:{port}/api/v1/prices/{asset}") as response:
                    if response.status != 200:
                        continue
                    price = msgspec.json.decode(await response.read(), type=Served)
            except aiohttp.ClientError:  # a restarted gateway not listening yet
                continue
            if price.status == "ok" and price.ts_tick > after_ns:
                found.add(asset)
    return found


async def connection_changes(process: ServiceProcess) -> tuple[int, int]:
    """How many times `process` logged nats_disconnected and nats_reconnected."""
    return await process.logged("nats_disconnected"), await process.logged("nats_reconnected")


async def reconnected_since(process: ServiceProcess, before: int) -> None:
    """Until `process` has logged nats_reconnected more than `before` times."""
    await eventually(
        functools.partial(process.logged, "nats_reconnected"),
        lambda n: n > before,
        timeout=RECOVERY_S,
        what=f"{process.module} reconnected",
    )


async def each_service_came_back(
    services: Pipeline, assets: tuple[str, ...], after_ns: int, reconnected: dict[str, int] | None
) -> None:
    """Every process reconnected by itself (each time it was disconnected; and at least once more when
    `reconnected` holds the counts before the fault), and the gateway serves a consensus of after the fault."""
    for process in services.processes:
        if reconnected is not None:
            await reconnected_since(process, reconnected[process.module])
        # Whatever connection a process lost (a freeze may break none), it got back by itself.
        await eventually(
            functools.partial(connection_changes, process),
            lambda changes: changes[1] >= changes[0],
            timeout=RECOVERY_S,
            what=f"{process.module} connected again",
        )
    gateway = services.named("pricewire_gateway")
    if gateway is not None:
        await eventually(
            lambda: served_fresh(gateway, assets, after_ns),
            lambda found: found == set(assets),
            timeout=RECOVERY_S,
            what="the gateway serving a consensus of after the fault",
        )


Fault = Callable[[Pipeline], contextlib.AbstractAsyncContextManager[None]]


async def run_fault(
    settings: Settings,
    server: NatsServer,
    tmp_path: Path,
    fault: Fault,
    *,
    name: str,
    what: str,
    whole: bool = False,
    resends: bool = False,
    reconnects: bool = False,
    recovery: Callable[[], float] | None = None,
) -> None:
    """Feed, run `fault` mid-stream, feed on, then count (and record the counts as scenario `name`).

    `resends`: the fault must have made the in-process Publisher send ticks again (its retry path ran).
    `reconnects`: every service process must log nats_reconnected after the fault (it broke their connections).
    `recovery`: the scenario's own "consensus again after", read once the fault is over (a store fault: until
    the stores serve a consensus of after it again), instead of the bus's.
    """
    nc = await connect(server.url, name="fault-feed")
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    ledger = Ledger()
    assets = settings.assets
    try:
        async with (
            pipeline(settings, tmp_path, whole=whole) as services,
            Publisher(
                nc, dead_letters=DeadLetters(js, service="collector"), ack_timeout_s=0.5, acked=ledger.ack
            ) as publisher,
        ):
            stop = asyncio.Event()
            feeding = asyncio.create_task(Feed(publisher, ledger, assets).run(stop))
            try:
                await eventually(fresh_assets(js, assets, 0), lambda s: s == set(assets), timeout=30, what="prices")
                reconnected = {p.module: await p.logged("nats_reconnected") for p in services.processes}
                async with fault(services):
                    pass
                back_ns = time.time_ns()
                await eventually(
                    fresh_assets(js, assets, back_ns),
                    lambda s: s == set(assets),
                    timeout=RECOVERY_S,
                    what="an ok consensus of a tick after the fault, for every asset",
                )
                await each_service_came_back(services, assets, back_ns, reconnected if reconnects else None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)  # a little more load after recovery
            finally:
                stop.set()
                await feeding
            assert await publisher.flush(timeout=30), "the publisher could not send every tick"
            await services.stop_collectors()
            await eventually(lambda: consumers_idle(js), lambda idle: idle, timeout=SETTLE_S, what="caught up")
            seen = Seen(
                in_log=[tick for _, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick)],
                in_postgres=await observed_ids(settings.database_url),
                prices=await prices_in_log(js),
                first=await first_fresh(js, assets, back_ns),
                back_ns=back_ns,
            )
            client = redis_asyncio.from_url(settings.redis_url, decode_responses=True)
            try:
                await assert_redis_holds_the_last_consensus(client, js)
            finally:
                await client.aclose()
    finally:
        await nc.close()

    again_s = consensus_again_s(seen.first, assets, back_ns) if recovery is None else recovery()
    record(
        Outcome(
            scenario=name,
            load=f"{TICKS_PER_S:.0f} ticks/s, {len(assets)} assets x 3 venues" + (", sim collector" if whole else ""),
            fault=what,
            acknowledged=len(ledger.acknowledged),
            lost=len(lost(ledger.acknowledged, seen.in_postgres)),
            duplicated=len(seen.duplicated()),
            recovery_s=again_s,
        )
    )
    assert_counted(ledger, publisher.stats, seen, resends=resends)
    assert again_s <= RECOVERY_S
    collector = services.named("pricewire_collector")
    if collector is not None:
        # The collector process kept working through the fault by itself, and gave up on nothing it had.
        assert any(FEED_RUN_ID not in t.id and t.ts_received > back_ns for t in seen.in_log), "no collector tick"
        assert collector.lines("publisher_closed")[-1]["dropped"] == 0


@dataclass(frozen=True)
class Seen:
    """What the log and the stores hold once the pipeline has caught up."""

    in_log: list[Tick]
    """Stream TICKS, in order."""
    in_postgres: Counter[str]
    """Tick ids in PostgreSQL's ticks table."""
    prices: list[Price]
    """Stream PRICES, in order."""
    first: dict[str, Price]
    """Per asset, the first ok consensus of a tick received after the fault (`back_ns`)."""
    back_ns: int

    def duplicated(self) -> set[object]:
        """Tick ids stored twice, in the log or in PostgreSQL, and (asset, seq) decided twice."""
        ids_in_log = Counter(tick.id for tick in self.in_log)
        return set(duplicated(self.in_postgres, ids_in_log)) | set(decided_twice(self.prices))


def assert_counted(ledger: Ledger, stats: PublisherStats, seen: Seen, *, resends: bool) -> None:
    """Nothing acknowledged lost, nothing stored or decided twice, the feed's Publisher gave up on nothing."""
    missing = lost(ledger.acknowledged, seen.in_postgres)
    assert len(ledger.acknowledged) > TICKS_PER_S  # a real load went through the fault
    assert missing == set(), f"{len(missing)} acknowledged ticks lost"
    assert seen.duplicated() == set()
    assert {t.id for t in seen.in_log} == set(seen.in_postgres)  # what the log holds is what PostgreSQL holds
    assert seq_gaps(seen.prices) == {}  # each asset's consensus one chain: nothing skipped
    # The feed's side: every tick it attempted was acknowledged in the end; none dropped, none refused.
    assert ledger.never_acknowledged() == set()
    assert (stats.dropped, stats.rejected, stats.buffered) == (0, 0, 0), stats
    if resends:
        assert stats.retries > 0, "the fault never made the publisher send a tick again"


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
        whole=True,
        resends=True,
        reconnects=True,
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
        whole=True,
        resends=True,
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
