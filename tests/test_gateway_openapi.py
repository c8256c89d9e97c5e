"""The OpenAPI document against the running gateway: schemathesis finds no 5xx and no response that breaks it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_common.config import Settings
from pricewire_gateway.openapi import PATH
from tests.test_gateway import cache
from tests.test_gateway_auth import source_state, token, user_gateway
from tests.test_gateway_core import make_price

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
RUN_TIMEOUT_S = 120.0


async def test_the_document_names_every_route_and_its_schemas(settings: Settings) -> None:
    async with user_gateway(settings) as gw, aiohttp.ClientSession() as http, http.get(gw.url + PATH) as response:
        assert response.status == 200
        doc = await response.json()
    assert doc["openapi"].startswith("3.1")
    routes = {"/api/v1/prices/{asset}", "/api/v1/history/{asset}", "/api/v1/ticks/{asset}", "/api/v1/status"}
    routes |= {"/api/v1/quality", "/api/v1/sources", "/api/v1/alerts", "/api/v1/alerts/{id}", "/api/v1/portfolio"}
    assert routes <= set(doc["paths"])
    price = doc["components"]["schemas"]["PriceData"]["properties"]
    assert price["price"] == {"type": "number"}  # decimals leave as numbers, as the encoder writes them
    assert doc["paths"]["/api/v1/alerts"]["post"]["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def schemathesis(url: str, token: str, tmp_path: Path, *options: str) -> str:
    """Run schemathesis against the gateway's document with `token`; its output, after checking it passed."""
    st = Path(sys.executable).with_name("st")
    process = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        url + PATH,
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--exclude-path",
        "/api/v1/stream",  # endless by design
        "--header",
        f"Authorization:Bearer {token}",
        "--seed",
        "7",
        "--generation-database",
        "none",  # nothing left in the working tree; the seed makes runs repeatable
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--report-dir",
        str(tmp_path),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,  # its replay cache (.schemathesis/) goes there, not into the working tree
    )
    output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "No issues found" in text or "passed" in text, text
    return text


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis, tmp_path: Path
) -> None:
    await cache(redis_client, make_price("BTC", 3), make_price("ETH", 4))
    async with user_gateway(settings) as gw:
        await nc.flush()
        await schemathesis(gw.url, token("schemathesis"), tmp_path, "--max-examples", "25")


async def test_schemathesis_as_an_admin_gets_the_admin_routes_200s_right(
    settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    """With a user's token pause/resume only ever answer 403: an admin's, with a collector to obey, reach 200."""
    from pricewire_collector.service import run as collector_run  # noqa: PLC0415
    from tests.pipeline import running  # noqa: PLC0415

    ticking = asyncio.Event()

    async def on_tick(_msg: Msg) -> None:
        ticking.set()

    await nc.subscribe("md.tick.sim-a.>", cb=on_tick)
    stop = asyncio.Event()
    async with (
        user_gateway(settings) as gw,
        running(asyncio.create_task(collector_run(settings, stop)), stop),
        aiohttp.ClientSession() as http,
    ):
        await asyncio.wait_for(ticking.wait(), timeout=15)  # the collector runs sim-a, so it takes commands
        # Only the admin routes: the rest ran above, and an admin token opens nothing else.
        await schemathesis(
            gw.url,
            token("st-admin", admin=True),
            tmp_path,
            "--include-path-regex",
            "^/api/v1/sources/",
            "--max-examples",
            "10",
        )
        state, detail = await source_state(http, gw.url, "sim-a")
    assert state in ("stopped", "connected")
    assert detail in ("paused by st-admin", "resumed by st-admin")  # a pause or resume was applied: a 200
