"""The whole pipeline in one process: embedded servers when no URL is given, then the four services."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from pricewire_cli.embedded import NatsServer, PostgresServer, RedisServer, Server, ensure_database
from pricewire_common.config import Settings

log = structlog.get_logger(__name__)

DATABASE_NAME = "pricewire"


@dataclass(slots=True)
class EmbeddedServers:
    """The servers started for a stack, so they can be stopped (or killed) by whoever started them."""

    nats: NatsServer | None = None
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None
    started: list[Server] = field(default_factory=list)


@contextlib.contextmanager
def embedded_servers(
    data_dir: Path, environ: Mapping[str, str], *, nats_only: bool = False
) -> Iterator[EmbeddedServers]:
    """Start an embedded server for each of NATS_URL, REDIS_URL, DATABASE_URL that `environ` leaves unset
    (`nats_only`: for NATS_URL alone, as the benches of the bus do)."""
    servers = EmbeddedServers()
    try:
        if not environ.get("NATS_URL"):
            servers.nats = NatsServer(data_dir / "nats")
            servers.nats.start()
            servers.started.append(servers.nats)
        if not nats_only and not environ.get("REDIS_URL"):
            servers.redis = RedisServer(data_dir / "redis")
            servers.redis.start()
            servers.started.append(servers.redis)
        if not nats_only and not environ.get("DATABASE_URL"):
            servers.postgres = PostgresServer(data_dir / "postgres")
            servers.postgres.start()
            servers.started.append(servers.postgres)
        yield servers
    finally:
        for server in reversed(servers.started):
            server.stop()


async def settings_for(settings: Settings, servers: EmbeddedServers) -> Settings:
    """`settings` with the URLs of the embedded servers filled in (and the database created)."""
    changes: dict[str, str] = {}
    if servers.nats is not None:
        changes["nats_url"] = servers.nats.url
    if servers.redis is not None:
        changes["redis_url"] = servers.redis.url
    if servers.postgres is not None:
        changes["database_url"] = await ensure_database(servers.postgres.url, DATABASE_NAME)
    return replace(settings, **changes)  # type: ignore[arg-type]


async def run_stack(settings: Settings, stop: asyncio.Event, *, bound: asyncio.Future[int] | None = None) -> None:
    """Run collector, validator, cache_writer and gateway side by side until `stop` is set.

    The services share nothing but the bus and the stores, exactly as when they run as separate processes.
    If one of them fails, the others are stopped and the error is raised.
    """
    from pricewire_cache_writer.service import run as run_cache_writer  # noqa: PLC0415
    from pricewire_collector.service import run as run_collector  # noqa: PLC0415
    from pricewire_gateway.service import run as run_gateway  # noqa: PLC0415
    from pricewire_validator.service import run as run_validator  # noqa: PLC0415

    async def supervised(name: str, work: Coroutine[Any, Any, None]) -> None:
        structlog.contextvars.bind_contextvars(service=name)
        try:
            await work
        except Exception:
            # One service down takes the stack down, the others by a graceful stop rather than a cancel.
            log.exception("service_failed")
            stop.set()
            raise

    def ops_port(offset: int) -> Settings:
        # Three ops ports in one process: collector, validator, cache_writer from PRICEWIRE_METRICS_PORT up.
        port = settings.metrics_port
        return settings if not port else replace(settings, metrics_port=port + offset)

    async with asyncio.TaskGroup() as group:
        # Projections and the consensus start first so they are bound before ticks arrive.
        group.create_task(supervised("cache_writer", run_cache_writer(ops_port(2), stop)))
        group.create_task(supervised("validator", run_validator(ops_port(1), stop)))
        group.create_task(supervised("gateway", run_gateway(settings, stop, bound=bound)))
        group.create_task(supervised("collector", run_collector(ops_port(0), stop)))
