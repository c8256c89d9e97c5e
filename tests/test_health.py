"""Liveness and readiness: `/healthz` answers while the process runs, `/readyz` says 503 and names the
dependency that is down (a closed port, a stopped server), and 200 again once it is back."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from pricewire_cache_writer.service import run as run_cache_writer
from pricewire_cli.embedded import NatsServer, free_port
from pricewire_collector.service import run as run_collector
from pricewire_common.bus import connect
from pricewire_common.config import LiveSettings, Settings
from pricewire_common.discovery import service_name
from pricewire_common.metrics import Exposition
from pricewire_common.ops_http import OpsServer, nats_check, postgres_check, redis_check
from pricewire_validator.service import run as run_validator
from tests.pipeline import running
from tests.scraping import ops_base, service_info
from tests.waiting import eventually

Answer = tuple[int, dict[str, Any]]


async def get(http: aiohttp.ClientSession, url: str) -> Answer:
    async with http.get(url) as response:
        return response.status, msgspec.json.decode(await response.read())


def failed(answer: Answer) -> set[str]:
    return {check["name"] for check in answer[1]["checks"] if not check["ok"]}


@asynccontextmanager
async def ops(checks: list[Any]) -> AsyncIterator[str]:
    async with OpsServer(
        service="test", exposition=Exposition("test"), checks=checks, host="127.0.0.1", port=0
    ) as server:
        yield f"http://127.0.0.1:{server.port}"


async def test_readyz_names_each_dependency_that_is_down(nc: NATS, redis_url: str, database_url: str) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    dead_redis = redis_asyncio.Redis.from_url(f"redis://{closed}/0", socket_connect_timeout=1)
    dead_pool = await asyncpg.create_pool(f"postgresql://postgres@{closed}/x", min_size=0, timeout=1)
    live_redis = redis_asyncio.Redis.from_url(redis_url)
    live_pool = await asyncpg.create_pool(database_url, min_size=0)
    try:
        async with aiohttp.ClientSession() as http:
            async with ops([nats_check(nc), redis_check(dead_redis), postgres_check(dead_pool)]) as base:
                status, body = answer = await get(http, f"{base}/readyz")
                assert status == 503
                assert body["status"] == "unavailable"
                assert failed(answer) == {"redis", "postgres"}
                errors = {check["name"]: check["error"] for check in body["checks"]}
                assert errors["nats"] is None and "Error" in errors["redis"]
                assert (await get(http, f"{base}/healthz"))[0] == 200  # alive all the same
            async with ops([nats_check(nc), redis_check(live_redis), postgres_check(live_pool)]) as base:
                status, body = answer = await get(http, f"{base}/readyz")
                assert (status, body["status"], failed(answer)) == (200, "ready", set())
    finally:
        await dead_redis.aclose()
        await live_redis.aclose()
        await dead_pool.close()
        await live_pool.close()


async def test_the_cache_writer_is_not_ready_while_redis_is_down(settings: Settings, nc: NATS) -> None:
    settings = replace(settings, metrics_port=0, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    stop = asyncio.Event()
    async with running(asyncio.create_task(run_cache_writer(settings, stop)), stop), aiohttp.ClientSession() as http:
        base = await ops_base(nc, "cache_writer")
        # The ops port opens before the PostgreSQL side is up (it migrates meanwhile): wait for that side only.
        answer = await eventually(
            lambda: get(http, f"{base}/readyz"), lambda a: "postgres" not in failed(a), what="PostgreSQL side up"
        )
        assert answer[0] == 503
        assert failed(answer) == {"redis"}
        assert (await get(http, f"{base}/healthz"))[0] == 200


async def test_the_collector_is_ready_once_a_source_is_live(settings: Settings, nc: NATS) -> None:
    # A live feed whose one venue cannot be reached: the collector runs, but nothing is live.
    unreachable = LiveSettings(sources=("coingecko",), coingecko_rest_url=f"http://127.0.0.1:{free_port()}")
    live = replace(settings, metrics_port=0, feed="live", live=unreachable)
    stop = asyncio.Event()
    async with running(asyncio.create_task(run_collector(live, stop)), stop), aiohttp.ClientSession() as http:
        answer = await get(http, f"{await ops_base(nc, 'collector')}/readyz")
        assert answer[0] == 503
        assert failed(answer) == {"sources"}
    await eventually(lambda: gone(nc, "collector"), bool, what="the stopped collector unregistered")
    sim = replace(settings, metrics_port=0)
    stop = asyncio.Event()
    async with running(asyncio.create_task(run_collector(sim, stop)), stop), aiohttp.ClientSession() as http:
        base = await ops_base(nc, "collector")
        await eventually(lambda: get(http, f"{base}/readyz"), lambda a: a[0] == 200, what="a simulated venue live")


async def gone(nc: NATS, service: str) -> bool:
    """True when no instance of `service` answers `$SRV.PING`."""
    try:
        await nc.request(f"$SRV.PING.{service_name(service)}", b"", timeout=0.5)
    except NoRespondersError:
        return True
    return False


async def test_the_validator_is_ready_only_while_nats_is_connected(settings: Settings, nats_server: NatsServer) -> None:
    settings = replace(settings, metrics_port=0, nats_url=nats_server.url)
    stop = asyncio.Event()
    nc = await connect(nats_server.url, name="health-test")
    try:
        async with running(asyncio.create_task(run_validator(settings, stop)), stop), aiohttp.ClientSession() as http:
            base = await ops_base(nc, "validator")
            ready = f"{base}/readyz"
            await eventually(lambda: get(http, ready), lambda a: a[0] == 200, what="ready")
            nats_server.stop()
            answer = await eventually(lambda: get(http, ready), lambda a: a[0] == 503, what="not ready without NATS")
            assert failed(answer) == {"nats"}
            assert (await get(http, f"{base}/healthz"))[0] == 200
            nats_server.start()  # same port and store
            await eventually(lambda: get(http, ready), lambda a: a[0] == 200, timeout=30, what="ready again")
    finally:
        await nc.close()


async def test_a_service_whose_ops_port_is_taken_still_does_its_work(settings: Settings, nc: NATS) -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        stop = asyncio.Event()
        taking = replace(settings, metrics_port=taken)
        async with running(asyncio.create_task(run_validator(taking, stop)), stop):
            info = await service_info(nc, "validator")
            assert "metrics_port" not in info["metadata"]
            status = msgspec.json.decode((await nc.request("pricewire.validator.status", b"", timeout=5)).data)
            assert status["status"] == "ready"
