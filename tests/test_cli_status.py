"""`pricewire status` and `pricewire monitor` against a running stack (all services, real NATS, Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from pricewire_cli.stack import run_stack
from pricewire_cli.status_cmd import instances_from
from pricewire_common.config import Settings
from tests.pipeline import running, service_env
from tests.waiting import eventually

pytestmark = pytest.mark.slow

SERVICES = {"collector", "validator", "cache_writer", "gateway"}


@asynccontextmanager
async def stack(settings: Settings) -> AsyncIterator[str]:
    """Every service in this process (as `pricewire up` runs them); yields the gateway's URL once a price is out."""
    settings = replace(settings, metrics_port=0, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with running(asyncio.create_task(run_stack(settings, stop, bound=bound)), stop):
        url = f"http://127.0.0.1:{await asyncio.wait_for(bound, 30)}"

        async def priced() -> int:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/api/v1/prices/BTC") as response:
                return response.status

        await eventually(priced, lambda status: status == 200, timeout=30, what="a BTC price")
        yield url


async def pricewire_status(settings: Settings, *args: str) -> tuple[int, str, str]:
    """The command's exit code, stdout (what it reports) and stderr (its logs)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pricewire_cli", "status", *args,
        env={**service_env(settings), "COLUMNS": "200"}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_info_and_stats_replies_are_joined_by_instance() -> None:
    info = b'{"name":"pricewire-gateway","id":"A1","version":"0.1","metadata":{"service":"gateway","http_port":"8000"}}'
    stats = b'{"name":"pricewire-gateway","id":"A1","started":"2026-11-22T10:00:00Z","endpoints":[{"name":"status","subject":"pricewire.gateway.status","num_requests":3,"num_errors":1}]}'  # noqa: E501 - one reply as NATS sends it
    orphan = b'{"name":"pricewire-cache-writer","id":"B2","version":"0.1","metadata":{}}'
    now = datetime(2026, 11, 22, 10, 1, tzinfo=UTC)
    found = instances_from([info, orphan], [stats], now=now)
    assert [(i.service, i.id, i.uptime_s, i.requests, i.errors) for i in found] == [
        ("cache-writer", "B2", None, None, None),  # no stats reply: shown, with nothing made up
        ("gateway", "A1", 60.0, 3, 1),
    ]


async def test_status_reports_every_service_source_and_projection_lag(settings: Settings) -> None:
    async with stack(settings) as url:
        code, out, err = await pricewire_status(settings, "--json", "--url", url)
        assert code == 0, out + err
        report: dict[str, Any] = json.loads(out)
        assert {i["service"] for i in report["instances"]} == SERVICES
        assert all(i["uptime_s"] >= 0 and i["version"] for i in report["instances"])
        assert {r["service"]: r["status"] for r in report["readiness"]} == dict.fromkeys(SERVICES, "ready")
        gateway = next(i for i in report["instances"] if i["service"] == "gateway")
        assert gateway["metadata"]["http_port"] == url.rsplit(":", 1)[1]
        sources = {s["source"]: s for s in report["sources"]}
        assert set(sources) == {"sim-a", "sim-b", "sim-c"}  # the settings' three simulated venues
        assert all(s["assets"] >= 1 and s["freshest_age_ms"] is not None for s in sources.values())
        lags = {p["projection"]: p["lag"] for p in report["projections"]}
        assert {"cache-redis", "cache-db-ticks", "cache-db-prices"} <= set(lags)
        assert all(isinstance(lag, int) and lag >= 0 for lag in lags.values())
        assert {c["name"]: c["ok"] for c in report["checks"]} == {"nats": True, "redis": True, "postgres": True}
        assert report["errors"] == []

        code, out, err = await pricewire_status(settings, "--url", url)
        assert code == 0, out + err
        for title in ("Services", "Sources", "Projections", "cache-db-ticks", "sim-a", "postgres=up"):
            assert title in out, out

    # The stack is gone: the command says what did not answer and exits 1.
    code, out, err = await pricewire_status(settings, "--json", "--url", url)
    assert code == 1, out + err
    report = json.loads(out)
    assert report["instances"] == []
    assert any(e.startswith("gateway at") for e in report["errors"])


async def gateway_metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_monitor_shows_a_live_table_of_every_asset(settings: Settings) -> None:
    async with stack(settings) as url:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pricewire_cli", "monitor", "--url", url.replace("http", "ws", 1) + "/ws",
            env={**service_env(settings), "COLUMNS": "160"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        clients = "pricewire_websocket_clients"
        await eventually(lambda: gateway_metric(url, clients), lambda n: n == 1, timeout=30, what="monitor connected")
        # Live updates offered to it (it is the only client), beyond the snapshot; then Ctrl-C, as a user stops it.
        offered = await gateway_metric(url, "pricewire_websocket_updates_offered_total")
        await eventually(
            lambda: gateway_metric(url, "pricewire_websocket_updates_offered_total"),
            lambda n: n >= offered + 10,
            what="live updates sent to the monitor",
        )
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "Pricewire consensus (USD)" in text, text
    rows = [line for line in text.splitlines() if line.startswith("│ BTC")]
    assert rows, text
    assert "ok" in rows[-1] or "degraded" in rows[-1], rows
