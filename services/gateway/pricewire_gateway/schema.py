"""The gateway's own tables (alerts, their history, portfolios), migrated by the gateway at start.

The same scheme as the cache_writer's migrations (`NNNN_name.sql`, versions 1..n, each applied with
its ledger row in one transaction), under a ledger and an advisory lock of the gateway's own: the two
services' versions never collide, and gateway replicas starting at once apply each version once
(one holds the lock, the others wait and then find nothing to do).
"""

from __future__ import annotations

from importlib import resources
from typing import Final

import asyncpg
import structlog

from pricewire_cache_writer.migrate import Migration, parse_migrations

log = structlog.get_logger(__name__)

LOCK_KEY: Final = 0x7077_6761_7465_77
"""Advisory lock key of the gateway's migrations ("pwgatew" in ASCII), distinct from the cache_writer's."""

_CREATE_LEDGER: Final = """
CREATE TABLE IF NOT EXISTS gateway_schema_migrations (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


def gateway_migrations() -> tuple[Migration, ...]:
    """The migrations shipped in this package's `migrations/` folder."""
    folder = resources.files("pricewire_gateway").joinpath("migrations")
    files = {entry.name: entry.read_text(encoding="utf-8") for entry in folder.iterdir() if entry.name.endswith(".sql")}
    return parse_migrations(files)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply what `conn`'s database lacks of the gateway's schema; the versions applied by this call."""
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE_LEDGER)
        applied = {row["version"] for row in await conn.fetch("SELECT version FROM gateway_schema_migrations")}
        done = []
        for migration in gateway_migrations():
            if migration.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute("INSERT INTO gateway_schema_migrations (version) VALUES ($1)", migration.version)
            log.info("gateway_migration_applied", version=migration.version, name=migration.name)
            done.append(migration.version)
        return done
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
