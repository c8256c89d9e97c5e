"""The collector service: runs the configured feed at its rate and publishes every tick it yields."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import Callable
from dataclasses import asdict

import structlog

from pricewire_collector.feed import Feed, build_feed
from pricewire_collector.metrics import CollectorMetrics
from pricewire_collector.publisher import Publisher
from pricewire_collector.sim import venue_name
from pricewire_collector.sources.base import Source
from pricewire_collector.sources.registry import build_sources
from pricewire_collector.sources.resilience import Backoff
from pricewire_collector.sources.runtime import CollectorSink, supervise
from pricewire_collector.switches import SourceSwitches, status_publisher
from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close, ensure_streams
from pricewire_common.clock import Clock, skewed, wall_clock
from pricewire_common.config import Settings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import SourceState
from pricewire_common.metrics import Exposition
from pricewire_common.operations import open_operations
from pricewire_common.ops_http import Check, nats_check
from pricewire_common.tracing import Tracing, open_tracing
from pricewire_common.waits import wait_event

__all__ = ["SERVICE", "pace", "run"]

log = structlog.get_logger(__name__)

SERVICE = "collector"
SLOT_S = 0.01
"""At high rates the feed runs in bursts, one per slot of this many seconds."""
MAX_LAG_S = 1.0
"""When the loop falls further behind the schedule than this, the backlog is skipped, not burst."""
_UNTRACED: contextlib.AbstractContextManager[object] = contextlib.nullcontext()


async def run(
    settings: Settings, stop: asyncio.Event, *, clock: Clock = wall_clock, tracing: Tracing | None = None
) -> None:
    """Publish the feed `settings.feed` at `settings.sim.rate` ticks/s until `stop` is set.

    Then flush the publisher's buffer (bounded time), drain NATS and return. `tracing`: a test's, else
    built from `settings.tracing`.
    """
    run_id = secrets.token_hex(6)  # tick ids stay unique across restarts of the collector
    clock = skewed(clock, settings.clock_offset_s)  # 0 unless a fault test skews this host's clock
    async with contextlib.AsyncExitStack() as stack:
        tracing = open_tracing(stack, settings.tracing, service=SERVICE, given=tracing)
        nc = await connect(settings.nats_url, name=SERVICE, auth=settings.nats_auth)
        stack.push_async_callback(drain_or_close, nc)
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)
        dead_letters = DeadLetters(js, service=SERVICE, clock=clock)
        metrics = CollectorMetrics(service=SERVICE, dead_letters=dead_letters)
        publisher = await stack.enter_async_context(
            Publisher(nc, dead_letters=dead_letters, assets=settings.assets, observe=metrics.observe, tracing=tracing)
        )
        metrics.publisher = publisher
        exposition = Exposition(SERVICE)
        exposition.add(metrics.collect)
        await open_operations(
            stack,
            nc,
            service=SERVICE,
            description="Venue connectors: normalized ticks onto md.tick.<source>.<BASE>-<QUOTE>",
            exposition=exposition,
            checks=[nats_check(nc), Check("sources", metrics.probe_sources)],
            port=settings.metrics_port,
        )
        if settings.feed == "sim":
            feed = build_feed(settings, run_id=run_id)
            rate = settings.sim.rate
            venues = [venue_name(i) for i in range(settings.sim.venues)]
            switches = SourceSwitches(venues, announce=status_publisher(js, transport="sim", clock=clock))
            await nc.subscribe(subjects.ALL_SOURCE_CONTROLS, cb=switches.on_command)
            log.info("collector_started", feed=feed.name, rate=rate, run_id=run_id, assets=list(settings.assets))
            await pace(feed, publisher, rate=rate, stop=stop, clock=clock, tracing=tracing, skip=switches.is_paused)
        else:
            sink = metrics.sink = CollectorSink(js, publisher, dead_letters, clock=clock, tracing=tracing)
            sources = _sources(settings)

            async def announce(source: str, state: SourceState, detail: str | None) -> None:
                await sink.state(source, state, transport="", detail=detail)

            live_switches = SourceSwitches([s.name for s in sources], announce=announce)
            await nc.subscribe(subjects.ALL_SOURCE_CONTROLS, cb=live_switches.on_command)
            log.info("collector_started", feed=settings.feed, sources=[s.name for s in sources])
            async with asyncio.TaskGroup() as group:
                runs = []
                for source in sources:
                    backoff = Backoff(settings.live.backoff_initial_s, settings.live.backoff_max_s)
                    runs.append(
                        group.create_task(supervise(source, sink, stop, backoff=backoff, switches=live_switches))
                    )
                # A publisher that died (a bug) takes the collector down rather than leaving it deaf.
                watch = group.create_task(publisher.wait_failed())
                await asyncio.wait(runs)
                watch.cancel()
        log.info("collector_stopping", **asdict(publisher.stats))


def _sources(settings: Settings) -> list[Source]:
    """The live venues, or the replay of a capture file (`replay:<file>`)."""
    if settings.feed == "live":
        return build_sources(settings)
    from pricewire_collector.sources.replay import build_replay  # noqa: PLC0415 - only a replay needs it

    return [build_replay(settings, path=settings.feed.removeprefix("replay:"))]


async def pace(
    feed: Feed,
    publisher: Publisher,
    *,
    rate: float,
    stop: asyncio.Event,
    clock: Clock,
    tracing: Tracing | None = None,
    skip: Callable[[str], bool] | None = None,
) -> None:
    """Ask `feed` for `rate` ticks per second of the loop clock and submit them, until `stop`; a tick
    whose source `skip` names (a venue an admin paused) is dropped.

    With `tracing`, each turn of the feed is a frame: the root of its tick's trace when sampled."""
    frames = tracing if tracing is not None and tracing.enabled else None
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive number, not {rate}")
    loop = asyncio.get_running_loop()
    start = loop.time()
    turns = 0  # feed turns taken since `start`; turn n is due at start + n / rate
    max_burst = max(1, math.ceil(rate * MAX_LAG_S))
    while not stop.is_set():
        publisher.check()
        due = math.floor((loop.time() - start) * rate) + 1 - turns
        if due > max_burst:
            log.warning("feed_fell_behind", skipped_turns=due - max_burst, rate=rate)
            turns += due - max_burst
            due = max_burst
        for _ in range(due):
            with _UNTRACED if frames is None else frames.frame(feed.name):
                tick = feed.next_tick(clock())
                turns += 1
                if tick is not None and (skip is None or not skip(tick.source)):
                    await publisher.submit(tick)
        wait_s = max(SLOT_S, start + turns / rate - loop.time())
        await wait_event(stop, wait_s)
