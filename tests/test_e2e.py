"""The whole pipeline on real NATS JetStream, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio as redis_asyncio

from pricewire_cache_writer.migrate import apply_migrations
from pricewire_cli.stack import run_stack
from pricewire_collector.service import run as run_collector
from pricewire_common import subjects
from pricewire_common.bus import connect
from pricewire_common.config import Settings
from pricewire_common.events import decode_price
from pricewire_validator.service import run as run_validator
from tests.pipeline import ServiceProcess, running, service_env, tick_ids_in_log
from tests.projections import brute_minute_counts, last_consensus, prices_in_log, stored_minute_counts
from tests.test_cache_writer import consumers_idle
from tests.waiting import eventually

pytestmark = pytest.mark.slow


EXACT = msgspec.json.Decoder(float_hook=Decimal)
"""JSON numbers read from their text into Decimal, never through a float."""


async def next_update(ws: aiohttp.ClientWebSocketResponse, asset: str) -> dict[str, object]:
    """The next `price_update` for `asset` with an `ok` consensus."""
    while True:
        frame = EXACT.decode(await ws.receive_str())
        data = frame.get("data") or {}
        if frame["type"] == "price_update" and data["symbol"] == asset and data["status"] == "ok":
            return dict(frame)


async def test_sim_feed_reaches_websocket_redis_and_postgres(
    settings: Settings, redis_client: redis_asyncio.Redis, pg: asyncpg.Connection
) -> None:
    settings = replace(settings, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with running(asyncio.create_task(run_stack(settings, stop, bound=bound)), stop):
        port = await asyncio.wait_for(bound, timeout=20)
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await ws.send_json({"type": "subscribe", "symbols": ["BTC"]})
            update = await asyncio.wait_for(next_update(ws, "BTC"), timeout=20)
            data = update["data"]
            assert isinstance(data, dict)
            assert data["n_used"] >= 2
            assert data["currency"] == "USD"
            assert isinstance(data["price"], Decimal) and data["price"] > 0
            assert {s["source"] for s in data["sources"]} <= {"sim-a", "sim-b", "sim-c"}

            await eventually(lambda: redis_client.get("price:BTC"), bool, what="price:BTC in Redis")
            cached, detail_json = await redis_client.mget("price:BTC", "price:BTC:detail")
            assert isinstance(detail_json, str)
            detail = decode_price(detail_json.encode())
            assert cached == str(detail.price)  # the same digits, as text
            assert 0 < await redis_client.ttl("price:BTC") <= settings.cache.price_ttl_s

            async with http.get(f"http://127.0.0.1:{port}/api/v1/prices/BTC") as response:
                assert response.status == 200
                body = EXACT.decode(await response.read())
                assert body["symbol"] == "BTC"

        ticks = await eventually(
            lambda: pg.fetchval("SELECT count(*) FROM ticks"), lambda n: n > 50, what="ticks in PostgreSQL"
        )
        prices = await eventually(
            lambda: pg.fetchval("SELECT count(*) FROM prices WHERE asset = 'BTC'"), lambda n: n > 0, what="prices"
        )
        assert ticks > 50 and prices > 0
        # Exact decimals end to end: the consensus the REST API served has the same digits in PostgreSQL.
        stored = await eventually(
            lambda: pg.fetchval("SELECT price::text FROM prices WHERE asset = 'BTC' AND seq = $1", body["seq"]),
            lambda text: text is not None,
            what="the served consensus in PostgreSQL",
        )
        assert stored == str(body["price"])


KILLS = 4
KILL_SEED = 20261122
"""The kills land at seeded random moments: a failure names the seed, and the same seed repeats it."""


async def test_a_cache_writer_killed_at_random_points_loses_and_doubles_nothing(
    settings: Settings, pg: asyncpg.Connection, redis_client: redis_asyncio.Redis, tmp_path: Path
) -> None:
    await apply_migrations(pg)  # the schema exists before the first count, as after any earlier start
    with ServiceProcess("pricewire_cache_writer", service_env(settings), tmp_path / "cache_writer.log") as writer:
        await _kill_at_random_points_while_ticks_flow(writer, settings, pg, random.Random(KILL_SEED))

    nc = await connect(settings.nats_url, name="e2e-check")
    try:
        js = nc.jetstream()
        published = await tick_ids_in_log(js, subjects.TICKS_STREAM)
        prices = await prices_in_log(js)
    finally:
        await nc.close()
    assert len(published) == len(set(published)) > 300
    ids = [r["id"] for r in await pg.fetch("SELECT id FROM ticks")]
    assert len(ids) == len(published) and set(ids) == set(published)  # every tick, once
    assert await pg.fetchval("SELECT count(*) FROM prices") == len(prices)
    assert await stored_minute_counts(pg) == brute_minute_counts(prices)
    for asset, last in last_consensus(prices).items():
        assert await redis_client.get(f"price:{asset}:seq") == str(last.seq), asset
        detail = await redis_client.get(f"price:{asset}:detail")
        assert isinstance(detail, str) and decode_price(detail.encode()) == last, asset


async def _kill_at_random_points_while_ticks_flow(
    writer: ServiceProcess, settings: Settings, pg: asyncpg.Connection, rng: random.Random
) -> None:
    """SIGKILL the cache_writer KILLS times, each a random moment after it started consuming, while the
    sim feed and the validator run; then let the last one catch up and stop it with SIGTERM."""
    validator_stop, collector_stop = asyncio.Event(), asyncio.Event()
    async with (
        running(asyncio.create_task(run_validator(settings, validator_stop)), validator_stop),
        running(asyncio.create_task(run_collector(settings, collector_stop)), collector_stop),
    ):
        for started in range(1, KILLS + 1):
            writer.start()
            await eventually(writer.started_count, started.__eq__, timeout=30, what=f"start {started}")
            await asyncio.sleep(rng.uniform(0.05, 1.0))  # the random point: mid-batch, between batches, mid-ack
            writer.kill()  # batches in flight: neither acked nor committed, or committed and not acked
        first = await pg.fetchval("SELECT count(*) FROM ticks")
        await eventually(
            lambda: ticks_in_stream(settings), lambda n: n > first + 200, what="ticks flowing while it is down"
        )
        writer.start()
        await eventually(lambda: pg.fetchval("SELECT count(*) FROM ticks"), lambda n: n > first, what="catch-up")
    # The feed and the validator have stopped: the log is complete; the last writer must take all of it.
    nc = await connect(settings.nats_url, name="e2e-idle")
    try:
        await eventually(lambda: consumers_idle(nc.jetstream()), bool, timeout=30, what="everything settled")
    finally:
        await nc.close()
    assert writer.terminate() == 0  # SIGTERM: drains and exits 0


async def ticks_in_stream(settings: Settings) -> int:
    nc = await connect(settings.nats_url, name="e2e-count")
    try:
        info = await nc.jetstream().stream_info(subjects.TICKS_STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()
