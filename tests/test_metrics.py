"""Prometheus metrics: the catalogue, and every service's `/metrics` after real traffic through the pipeline,
its figures checked against what the log and the stores hold, and its exposition passed through promtool."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from nats.aio.client import Client as NATS

from pricewire_cache_writer.service import run as run_cache_writer
from pricewire_cli.embedded import free_port
from pricewire_collector.service import run as run_collector
from pricewire_common import metrics as m
from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.config import AlertSettings, Settings
from pricewire_common.consumer import ConsumerTally, PullReader, durable_pull
from pricewire_common.events import Price, decode_price, encode
from pricewire_common.keys import detail_key
from pricewire_gateway.service import run as run_gateway
from pricewire_validator.service import run as run_validator
from tests.factories import make_tick
from tests.pipeline import running
from tests.projections import prices_in_log
from tests.scraping import PROMTOOL, Scrape, ops_base, promtool_check, scrape
from tests.test_gateway_alerts import consumer_bound, create, publish_prices
from tests.test_gateway_auth import user_gateway
from tests.test_gateway_core import make_price
from tests.test_live_pipeline import five_venues
from tests.tools import require
from tests.waiting import eventually

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIM_SOURCES = {"sim-a", "sim-b", "sim-c"}


@pytest.fixture
def _promtool() -> str:
    """promtool, which promtool_check runs: the test skips without it, or fails under PRICEWIRE_REQUIRE_TOOLS=1."""
    return require(PROMTOOL if Path(PROMTOOL).exists() else None, "promtool not found (Debian package prometheus)")


needs_promtool = pytest.mark.usefixtures("_promtool")


# -- the catalogue -------------------------------------------------------------------------------


def test_catalogue_follows_prometheus_conventions() -> None:
    names = [spec.name for spec in m.CATALOGUE]
    assert len(names) == len(set(names))
    for spec in m.CATALOGUE:
        assert re.fullmatch(r"pricewire_[a-z0-9_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.help and spec.help.endswith((".", ")")), spec.name
        assert all(re.fullmatch(r"[a-z_]+", label) and label != "le" for label in spec.labels), spec.name
        assert not re.search(r"_(milliseconds|ms|bytes_total_total)$", spec.name), "base units only"


def test_every_name_the_deployment_reads_is_in_the_catalogue() -> None:
    listed = ROOT / "deploy" / "metrics-names.txt"
    if not listed.exists():
        pytest.skip("deploy/metrics-names.txt is not there (the deployment files have not landed)")
    wanted = {line.strip() for line in listed.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert wanted, "an empty list checks nothing"
    assert wanted <= {spec.name for spec in m.CATALOGUE}


def test_buckets_are_cumulative_with_inclusive_bounds() -> None:
    buckets = m.Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert buckets.count == 5
    assert buckets.sum == pytest.approx(8.65)
    with pytest.raises(ValueError, match="increasing"):
        m.Buckets((1.0, 0.5))


async def test_two_expositions_in_one_process_keep_their_own_numbers() -> None:
    first, second = m.Exposition("collector"), m.Exposition("validator")
    first.add(lambda: [m.SOURCE_TICKS.counter({("sim-a",): 3})])
    second.add(lambda: [m.SOURCE_TICKS.counter({("sim-a",): 5})])
    one, two = Scrape.parse((await first.render()).decode()), Scrape.parse((await second.render()).decode())
    assert one.value("pricewire_source_ticks_total", source="sim-a") == 3
    assert two.value("pricewire_source_ticks_total", source="sim-a") == 5
    assert one.value("pricewire_build_info", service="collector", version=m.package_version()) == 1


async def test_a_refresh_that_fails_leaves_the_last_values() -> None:
    exposition = m.Exposition("validator", process=False)
    pending = {"validator": 7.0}
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ConnectionError("JetStream did not answer")
        pending["validator"] = 4.0

    exposition.add_refresh("consumers", refresh)
    exposition.add(lambda: [m.JETSTREAM_PENDING.gauge({(k,): v for k, v in pending.items()})])
    first = Scrape.parse((await exposition.render()).decode())
    second = Scrape.parse((await exposition.render()).decode())
    assert first.value("pricewire_jetstream_consumer_pending", consumer="validator") == 4
    assert second.value("pricewire_jetstream_consumer_pending", consumer="validator") == 4
    assert calls == 2


async def test_the_pull_reader_tallies_deliveries_and_redeliveries(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    for i in range(5):
        tick = make_tick(id=f"tally-{i}")
        await js.publish(subjects.tick(tick.source, tick.base, tick.quote), encode(tick))
    sub = await durable_pull(js, stream=subjects.TICKS_STREAM, durable="tally-test", filter_subject=subjects.ALL_TICKS)
    tally = ConsumerTally()
    reader = await PullReader.bind(nc, sub, batch=10, wait_s=1.0, tally=tally)
    stop = asyncio.Event()
    try:
        first = await reader.next_batch(stop)
        while len(first) < 5:
            first += await reader.next_batch(stop)
        for msg in first[:2]:
            await msg.nak()  # at once: both come back
        for msg in first[2:]:
            await msg.ack()
        again = await reader.next_batch(stop)
        while len(again) < 2:
            again += await reader.next_batch(stop)
        for msg in again:
            await msg.ack()
    finally:
        await reader.close()
        await sub.unsubscribe()
    assert sorted(msg.data for msg in again) == sorted(msg.data for msg in first[:2])
    assert (tally.delivered, tally.redelivered) == (7, 2)


async def test_the_collector_counts_each_venue_frames_requests_and_faults(settings: Settings, nc: NATS) -> None:
    async with five_venues(faults=True) as env:
        venues = Settings.from_env(env)
        live = replace(settings, metrics_port=0, feed="live", assets=venues.assets, live=venues.live)
        stop = asyncio.Event()
        async with (
            running(asyncio.create_task(run_collector(live, stop)), stop),
            aiohttp.ClientSession() as http,
        ):
            base = await ops_base(nc, "collector")

            def settled(s: Scrape) -> bool:
                up = all(s.value("pricewire_source_up", source=name) == 1 for name in LIVE_NAMES)
                polled_ok = all(
                    s.total("pricewire_source_requests_total", source=name, outcome="ok") >= 1
                    for name in ("coingecko", "bitstamp")
                )
                ticked = all(s.total("pricewire_source_ticks_total", source=name) >= 1 for name in LIVE_NAMES)
                return up and polled_ok and ticked

            seen = await eventually(lambda: scrape(http, base), settled, timeout=30, what="every venue up and ticking")
    assert promtool_check(seen.text) == ""
    requests = "pricewire_source_requests_total"
    for name in ("coingecko", "bitstamp"):  # each answered its first request with 429
        assert seen.value(requests, source=name, outcome="rate_limited") == 1
    frames = "pricewire_source_frames_total"
    for name in ("coinbase", "kraken"):  # each sent garbage first
        assert seen.total(frames, source=name, outcome="rejected") >= 1
        assert seen.total(frames, source=name, outcome="ok") >= 1
    assert seen.total(frames, outcome="rejected") == seen.total("pricewire_dlq_messages_total", service="collector")
    assert all(seen.total("pricewire_source_reconnects_total", source=n) >= 1 for n in ("binance", "coinbase"))
    for name in LIVE_NAMES:
        ticks = seen.value("pricewire_source_ticks_total", source=name)
        assert ticks is not None
        assert seen.value("pricewire_venue_latency_seconds_count", source=name) == ticks


LIVE_NAMES = ("binance", "coinbase", "kraken", "coingecko", "bitstamp")


async def test_alert_deliveries_are_counted_by_channel_and_outcome(settings: Settings, nc: NATS) -> None:
    hooked = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        hooked.set()
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    good, closed = f"http://127.0.0.1:{runner.addresses[0][1]}/hook", f"http://127.0.0.1:{free_port()}/hook"
    once = replace(settings, alerts=AlertSettings(webhook_attempts=1, webhook_timeout_s=2.0))
    try:
        async with user_gateway(once) as gw, aiohttp.ClientSession() as http:
            await consumer_bound(nc, "SOL")
            for url in (good, closed):
                body = {"symbol": "SOL", "target_price": "100", "alert_type": "below", "webhook_url": url}
                await create(http, gw, "erin", body)
            await publish_prices(
                nc, [make_price("SOL", 1, price=Decimal("101")), make_price("SOL", 2, price=Decimal("99.5"))]
            )
            await asyncio.wait_for(hooked.wait(), timeout=10)  # the good hook was called
            deliveries = "pricewire_alert_deliveries_total"
            seen = await eventually(
                lambda: scrape(http, gw.url),
                lambda s: (
                    s.value(deliveries, channel="nats", outcome="ok") == 2
                    and s.total(deliveries, channel="webhook") == 2
                ),
                what="both firings published and both webhooks settled",
            )
    finally:
        await runner.cleanup()
    assert seen.value(deliveries, channel="webhook", outcome="ok") == 1
    assert seen.value(deliveries, channel="webhook", outcome="failed") == 1
    assert promtool_check(seen.text) == ""


# -- the services, after real traffic --------------------------------------------------------------------


@dataclass
class Pipeline:
    settings: Settings
    stops: dict[str, asyncio.Event]
    tasks: dict[str, asyncio.Task[None]]
    gateway_port: int

    async def stop(self, service: str) -> None:
        self.stops[service].set()
        await asyncio.wait_for(self.tasks[service], timeout=30)


@asynccontextmanager
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """The four services, each in a task of its own with its own stop, ops ports on free ports."""
    settings = replace(settings, metrics_port=0, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stops = {name: asyncio.Event() for name in ("cache_writer", "validator", "gateway", "collector")}
    works = {
        "cache_writer": run_cache_writer(settings, stops["cache_writer"]),
        "validator": run_validator(settings, stops["validator"]),
        "gateway": run_gateway(settings, stops["gateway"], bound=bound),
        "collector": run_collector(settings, stops["collector"]),
    }
    tasks: dict[str, asyncio.Task[None]] = {}
    async with AsyncExitStack() as stack:
        for name, work in works.items():
            tasks[name] = await stack.enter_async_context(running(asyncio.create_task(work), stops[name]))
            if name == "gateway":
                await asyncio.wait_for(bound, timeout=20)
        yield Pipeline(settings, stops, tasks, bound.result())


async def last_price(nc: NATS, asset: str) -> Price:
    msg = await nc.jetstream().get_last_msg(subjects.PRICES_STREAM, subjects.price(asset))
    return decode_price(msg.data or b"")


def excluded(prices: list[Price]) -> Counter[tuple[str, str]]:
    return Counter((q.source, q.reason) for p in prices for q in p.sources if q.reason is not None)


@needs_promtool
async def test_each_service_reports_the_traffic_it_handled(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    async with pipeline(settings) as services, aiohttp.ClientSession() as http:
        await check_collector(http, await ops_base(nc, "collector"))
        await services.stop("collector")
        in_log = (await nc.jetstream().stream_info(subjects.TICKS_STREAM)).state.messages
        assert in_log >= 300
        await check_validator(http, await ops_base(nc, "validator"), nc, in_log)
        await check_cache_writer(http, await ops_base(nc, "cache_writer"), in_log)
        await services.stop("validator")
        await services.stop("cache_writer")
        await check_gateway(http, f"http://127.0.0.1:{services.gateway_port}", redis_client)


async def check_collector(http: aiohttp.ClientSession, base: str) -> None:
    """Every simulated venue's frames, ticks and latency observations agree."""
    seen = await eventually(
        lambda: scrape(http, base),
        lambda s: s.total("pricewire_collector_ticks_published_total") >= 300,
        what="300 ticks published",
    )
    assert promtool_check(seen.text) == ""
    assert seen.label_values("pricewire_source_frames_total", "source") == SIM_SOURCES
    for source in SIM_SOURCES:
        ticks = seen.value("pricewire_source_ticks_total", source=source)
        assert ticks is not None and ticks > 0
        assert seen.value("pricewire_source_frames_total", source=source, outcome="ok") == ticks
        assert seen.value("pricewire_venue_latency_seconds_count", source=source) == ticks
        assert seen.value("pricewire_venue_latency_seconds_bucket", source=source, le="+Inf") == ticks
        assert seen.value("pricewire_source_up", source=source) == 1


async def check_validator(http: aiohttp.ClientSession, base: str, nc: NATS, in_log: int) -> None:
    """Every tick received once (net of redeliveries); the gauges are the last event published; exclusions
    and publications equal a count over the log."""

    def drained(s: Scrape) -> bool:
        delivered = s.total("pricewire_jetstream_delivered_total", consumer="validator")
        again = s.total("pricewire_jetstream_redeliveries_total", consumer="validator")
        pending = s.value("pricewire_jetstream_consumer_pending", consumer="validator")
        return delivered - again == in_log and pending == 0

    await eventually(lambda: scrape(http, base), drained, what="the validator's consumer drained")

    async def gauges_and_log() -> tuple[Scrape, Price]:
        return await scrape(http, base), await last_price(nc, "BTC")

    def same(pair: tuple[Scrape, Price]) -> bool:
        s, price = pair
        return s.value("pricewire_consensus_price", asset="BTC") == float(price.price)

    seen, price = await eventually(gauges_and_log, same, what="the BTC gauge at the last BTC price")
    assert promtool_check(seen.text) == ""
    assert seen.value("pricewire_consensus_confidence", asset="BTC") == float(price.confidence)
    # Each tick once, when the prices decided from its batch were sent: before its ack, so all are in by now.
    assert seen.value("pricewire_validator_decision_latency_seconds_count") == in_log
    assert seen.value("pricewire_validator_decision_latency_seconds_bucket", le="+Inf") == in_log
    latency_sum = seen.value("pricewire_validator_decision_latency_seconds_sum")
    assert latency_sum is not None and latency_sum > 0
    if price.change_pct_24h is not None:
        assert seen.value("pricewire_consensus_change_24h_percent", asset="BTC") == float(price.change_pct_24h)
    assert seen.value("pricewire_consensus_status", asset="BTC", status=price.status) == 1
    assert seen.value("pricewire_consensus_sources_used", asset="BTC") == price.n_used

    # A heartbeat may publish between the scrape and the read of the log: then both are read again.
    async def counted_and_logged() -> tuple[Scrape, list[Price]]:
        return await scrape(http, base), await prices_in_log(nc.jetstream())

    def agree(pair: tuple[Scrape, list[Price]]) -> bool:
        s, prices = pair
        counted = {
            (dict(ls)["source"], dict(ls)["reason"]): v
            for (n, ls), v in s.samples.items()
            if n == "pricewire_consensus_exclusions_total"
        }
        return counted == dict(excluded(prices)) and s.total("pricewire_consensus_published_total") == len(prices)

    _, prices = await eventually(counted_and_logged, agree, what="exclusions and publications as in the log")
    assert sum(excluded(prices).values()) > 0, "the seeded sim gives outliers to count"


async def check_cache_writer(http: aiohttp.ClientSession, base: str, in_log: int) -> None:
    """Every projection caught up, every tick written once to PostgreSQL."""

    def caught_up(s: Scrape) -> bool:
        lags = {s.value("pricewire_projection_lag_events", projection=p) for p in CONSUMER_NAMES}
        return lags == {0} and s.value("pricewire_projection_written_total", projection="cache-db-ticks") == in_log

    seen = await eventually(lambda: scrape(http, base), caught_up, what="projections caught up")
    assert promtool_check(seen.text) == ""
    assert {seen.value("pricewire_projection_store_up", projection=p) for p in CONSUMER_NAMES} == {1}
    delivered = seen.total("pricewire_jetstream_delivered_total", consumer="cache-db-ticks")
    assert delivered - seen.total("pricewire_jetstream_redeliveries_total", consumer="cache-db-ticks") == in_log


async def check_gateway(http: aiohttp.ClientSession, base: str, redis_client: redis_asyncio.Redis) -> None:
    """Redis lookups by result, the PostgreSQL fallback, WebSocket clients."""
    before = await scrape(http, base)
    for _ in range(2):
        async with http.get(f"{base}/api/v1/prices/BTC") as response:
            assert response.status == 200
    await redis_client.delete(detail_key("ETH"))
    async with http.get(f"{base}/api/v1/prices/ETH") as response:
        assert response.status == 200  # from PostgreSQL, marked stale
    after = await scrape(http, base)
    assert promtool_check(after.text) == ""
    lookups, fallbacks = "pricewire_cache_requests_total", "pricewire_cache_fallbacks_total"
    assert after.total(lookups, result="hit") == before.total(lookups, result="hit") + 2
    assert after.total(lookups, result="miss") == before.total(lookups, result="miss") + 1
    assert after.total(fallbacks) == before.total(fallbacks) + 1
    assert after.value("pricewire_websocket_clients") == 0
    async with http.ws_connect(f"{base}/ws") as ws:
        await ws.send_json({"type": "subscribe", "symbols": ["BTC"]})
        await ws.receive_str()
        connected = await scrape(http, base)
        assert connected.value("pricewire_websocket_clients") == 1
    await eventually(
        lambda: scrape(http, base), lambda s: s.value("pricewire_websocket_clients") == 0, what="the client gone"
    )


CONSUMER_NAMES = ("cache-redis", "cache-db-ticks", "cache-db-prices")
