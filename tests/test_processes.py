"""Each service as the process a container runs, and `pricewire up` as a new user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import msgspec
import pytest

from pricewire_cli.embedded import free_port
from pricewire_common.config import Settings
from tests.pipeline import ServiceProcess, service_env
from tests.waiting import eventually

pytestmark = pytest.mark.slow

READY_EVENT = {
    "pricewire_collector": "collector_started",
    "pricewire_validator": "validator_started",
    "pricewire_cache_writer": "cache_writer_started",
    "pricewire_gateway": "gateway_listening",
}


@pytest.mark.parametrize("module", sorted(READY_EVENT))
async def test_a_service_drains_and_exits_0_on_sigterm(module: str, settings: Settings, tmp_path: Path) -> None:
    with ServiceProcess(module, service_env(settings), tmp_path / f"{module}.log") as process:
        process.start()
        await eventually(lambda: process.logged(READY_EVENT[module]), bool, timeout=30, what=f"{module} ready")
        assert process.terminate() == 0
        assert await process.logged("service_stopped") == 1


class _Prices(msgspec.Struct):
    prices: list[dict[str, object]]


async def test_pricewire_up_runs_the_stack_on_embedded_servers(tmp_path: Path) -> None:
    # As `make run` does on a fresh machine: no server URLs, so `up` starts its own servers.
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "REDIS_URL", "DATABASE_URL"}}
    env["PRICEWIRE_LOG_FORMAT"] = "json"
    port = free_port()
    with (tmp_path / "up.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pricewire_cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "data"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        banner = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        assert f"http://localhost:{port}/" in banner.decode()

        async def assets_priced() -> set[object]:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/api/v1/prices") as r:
                body = msgspec.json.decode(await r.read(), type=_Prices)
            return {p["symbol"] for p in body.prices}

        priced = await eventually(assets_priced, lambda s: "BTC" in s, timeout=60, what="a BTC price")
        assert priced <= {"BTC", "ETH", "SOL", "ADA", "DOT"}
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as page:
            assert page.status == 200
            assert 'data-asset="BTC"' in await page.text()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), timeout=60) == 0
