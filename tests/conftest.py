"""Fixtures: real NATS (JetStream), Redis and PostgreSQL, isolated per test."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from hypothesis import settings as hypothesis_settings
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from pricewire_cli.embedded import NatsServer, ensure_database, with_database
from pricewire_common import subjects
from pricewire_common.bus import connect, ensure_streams
from pricewire_common.config import CacheSettings, Settings, SimSettings, StreamSettings, ValidatorSettings
from pricewire_validator.leases import BUCKET as LEASE_BUCKET
from tests import reliability, servers

_database_names = itertools.count()

# `dev` (local runs) draws new examples each run; `ci` (.ci/run) the same ones every run. Neither has a
# deadline: on two shared cores an example's time says more about the neighbours than about the code.
hypothesis_settings.register_profile("dev", deadline=None)
hypothesis_settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def _docker() -> bool:
    return servers.docker_answers()


@pytest.fixture(scope="session")
def _shared_nats(_docker: bool) -> Iterator[str | None]:
    """A NATS shared by the session when one is given or containerised; None means one per test."""
    url = servers.env_url("NATS_URL")
    if url is not None:
        yield url
    elif _docker:
        with servers.nats_container() as url:
            yield url
    else:
        yield None


@pytest.fixture
async def nats_url(_shared_nats: str | None, tmp_path: Path) -> AsyncIterator[str]:
    """A NATS server with JetStream and none of Pricewire's streams."""
    if _shared_nats is None:
        with servers.embedded_nats(tmp_path / "nats") as server:
            yield server.url
        return
    nc = await connect(_shared_nats, name="pricewire-tests")
    js = nc.jetstream()
    leases = f"KV_{LEASE_BUCKET}"  # a lease left by a test's validator would hold the next one back
    for stream in (subjects.TICKS_STREAM, subjects.PRICES_STREAM, subjects.SOURCES_STREAM, subjects.DLQ_STREAM, leases):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    await nc.close()
    yield _shared_nats


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """An embedded NATS of this test's own, for tests that stop and restart the server."""
    with servers.embedded_nats(tmp_path / "nats-own") as server:
        yield server


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await connect(nats_url, name="pricewire-tests")
    yield client
    await client.close()


@pytest.fixture(scope="session")
def _redis_server(_docker: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = servers.env_url("REDIS_URL")
    if url is not None:
        yield url
    elif _docker:
        with servers.redis_container() as url:
            yield url
    else:
        with servers.embedded_redis(tmp_path_factory.mktemp("redis")) as url:
            yield url


@pytest.fixture
async def redis_url(_redis_server: str) -> AsyncIterator[str]:
    """A Redis database emptied for this test."""
    client = redis_asyncio.from_url(_redis_server)
    await client.flushdb()
    await client.aclose()
    yield _redis_server


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def _postgres_server(_docker: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = servers.env_url("DATABASE_URL")
    if url is not None:
        yield url
    elif _docker:
        with servers.postgres_container() as url:
            yield url
    else:
        with servers.embedded_postgres(tmp_path_factory.mktemp("pg")) as url:
            yield url


@pytest.fixture
async def database_url(_postgres_server: str) -> str:
    """A fresh, empty database of this test's own."""
    # The pid keeps two test sessions on one shared server (DATABASE_URL) from dropping each other's databases.
    name = f"pw_test_{os.getpid()}_{next(_database_names)}"
    maintenance = with_database(_postgres_server, "postgres")
    conn = await asyncpg.connect(maintenance)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    return await ensure_database(maintenance, name)


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def settings(nats_url: str, redis_url: str, database_url: str) -> Settings:
    """Settings for one test: its own servers, a fast seeded sim feed, short timers."""
    base = Settings()
    return replace(
        base,
        nats_url=nats_url,
        redis_url=redis_url,
        database_url=database_url,
        sim=SimSettings(rate=200.0, seed=7, venues=3, outlier_probability=0.02, quiet_rate=0.0),
        validator=replace(ValidatorSettings(), heartbeat_s=1.0),
        cache=replace(CacheSettings(), batch_wait_s=0.05),
        # A killed consumer's unacked deliveries come back after this: short, so crash tests stay quick.
        streams=replace(StreamSettings(), ack_wait_s=2.0),
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A `fault` test must record its outcome, or `make reliability`'s table would lack its row."""
    before = reliability.recorded()
    yield  # raises what the test raised: a failing scenario is reported as itself, not as this
    if item.get_closest_marker("fault") is not None and reliability.recorded() == before:
        raise AssertionError(f"{item.nodeid} is a fault scenario but recorded no reliability Outcome")


@pytest.fixture
async def replicas_nats(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client of this test's own NATS (2.10 or later, as several filter subjects need), its streams made:
    what validator replicas as processes share."""
    client = await connect(nats_server.url, name="pricewire-tests")
    await ensure_streams(client.jetstream(), StreamSettings())
    yield client
    await client.close()
