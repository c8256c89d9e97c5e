"""The whole pipeline on real NATS JetStream, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
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


async def test_killed_cache_writer_stores_every_published_tick_exactly_once(
    settings: Settings, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    await apply_migrations(pg)  # the schema exists before the first count, as after any earlier start
    with ServiceProcess("pricewire_cache_writer", service_env(settings), tmp_path / "cache_writer.log") as writer:
        await _crash_and_restart_while_ticks_flow(writer, settings, pg)


async def _crash_and_restart_while_ticks_flow(
    writer: ServiceProcess, settings: Settings, pg: asyncpg.Connection
) -> None:
    stop = asyncio.Event()
    writer.start()
    async with (
        running(asyncio.create_task(run_validator(settings, stop)), stop),
        running(asyncio.create_task(run_collector(settings, stop)), stop) as collector,
    ):
        await eventually(lambda: pg.fetchval("SELECT count(*) FROM ticks"), lambda n: n > 100, what="first rows")
        writer.kill()  # mid-stream: batches in flight are neither acked nor committed, or committed and not acked
        first = await pg.fetchval("SELECT count(*) FROM ticks")
        await eventually(
            lambda: ticks_in_stream(settings), lambda n: n > first + 200, what="ticks flowing while it is down"
        )
        writer.start()
        await eventually(lambda: pg.fetchval("SELECT count(*) FROM ticks"), lambda n: n > first, what="catch-up")
        writer.kill()
        writer.start()
        await eventually(writer.started_count, lambda n: n == 3, what="the third cache_writer start")
        stop.set()
        await asyncio.wait_for(collector, timeout=30)

    nc = await connect(settings.nats_url, name="e2e-check")
    try:
        published = await tick_ids_in_log(nc.jetstream(), subjects.TICKS_STREAM)
    finally:
        await nc.close()
    assert len(published) == len(set(published)) > 300
    stored = await eventually(
        lambda: pg.fetchval("SELECT count(*) FROM ticks"),
        lambda n: n >= len(published),
        what=f"all {len(published)} ticks stored",
    )
    assert writer.terminate() == 0  # SIGTERM: drains and exits 0
    assert stored == len(published)
    assert await pg.fetchval("SELECT count(DISTINCT id) FROM ticks") == len(published)
    ids = {r["id"] for r in await pg.fetch("SELECT id FROM ticks")}
    assert ids == set(published)


async def ticks_in_stream(settings: Settings) -> int:
    nc = await connect(settings.nats_url, name="e2e-count")
    try:
        info = await nc.jetstream().stream_info(subjects.TICKS_STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()
