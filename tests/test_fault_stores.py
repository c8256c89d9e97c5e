"""PostgreSQL and Redis cut, or blackholed, by a proxy of our own under load: the projections stop acking,
JetStream keeps the events, and both catch up by themselves once the stores answer again, counted as in
test_fault_nats (nothing acknowledged lost, nothing stored twice, Redis equal to the last consensus).

The outage lasts OUTAGE_S (3 s here; `PRICEWIRE_FAULT_OUTAGE_S=30` in `make reliability`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from pricewire_cli.embedded import NatsServer
from pricewire_common.config import Settings
from tests.faultproxy import FaultProxy, fault_proxy
from tests.test_fault_nats import Pipeline, run_fault

pytestmark = [pytest.mark.slow, pytest.mark.fault]

OUTAGE_S = float(os.environ.get("PRICEWIRE_FAULT_OUTAGE_S", "3"))


@contextlib.asynccontextmanager
async def proxied_stores(settings: Settings) -> AsyncIterator[tuple[Settings, FaultProxy, FaultProxy]]:
    async with (
        fault_proxy(settings.database_url, default_port=5432) as (postgres, database_url),
        fault_proxy(settings.redis_url, default_port=6379) as (redis, redis_url),
    ):
        yield replace(settings, database_url=database_url, redis_url=redis_url), postgres, redis


async def test_postgresql_and_redis_cut_then_restored_lose_nothing(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with proxied_stores(replace(settings, nats_url=nats_server.url)) as (proxied, postgres, redis):

        @contextlib.asynccontextmanager
        async def cut_both(_: Pipeline) -> AsyncIterator[None]:
            await asyncio.sleep(1.5)  # under load first
            await postgres.cut()
            await redis.cut()
            await asyncio.sleep(OUTAGE_S)  # the outage itself
            await postgres.restore()
            await redis.restore()
            yield

        await run_fault(
            proxied,
            nats_server,
            tmp_path,
            cut_both,
            name="PostgreSQL and Redis cut",
            what=f"both refused and every connection broken for {OUTAGE_S:.0f} s, then restored",
        )


async def test_postgresql_and_redis_blackholed_then_restored_lose_nothing(
    settings: Settings, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with proxied_stores(replace(settings, nats_url=nats_server.url)) as (proxied, postgres, redis):

        @contextlib.asynccontextmanager
        async def blackhole_both(_: Pipeline) -> AsyncIterator[None]:
            await asyncio.sleep(1.5)
            postgres.blackhole()
            redis.blackhole()
            await asyncio.sleep(OUTAGE_S)  # no byte crosses, no connection closes
            await postgres.restore()
            await redis.restore()
            yield

        await run_fault(
            proxied,
            nats_server,
            tmp_path,
            blackhole_both,
            name="PostgreSQL and Redis blackholed",
            what=f"connections open but silent for {OUTAGE_S:.0f} s, then restored",
        )
