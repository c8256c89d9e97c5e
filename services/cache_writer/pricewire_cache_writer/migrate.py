"""Versioned SQL migrations, packaged with the service and applied at start.

Safe when several replicas start at once: the whole run holds a PostgreSQL advisory lock,
so one replica applies what is missing while the others wait and then find nothing to do.
Each migration and its `schema_migrations` row commit in one transaction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

from pricewire_cache_writer.errors import MigrationError

log = structlog.get_logger(__name__)

MIGRATIONS_LOCK_KEY = 0x7077_6361_6368_65
"""Advisory lock key shared by every replica ("pwcache" in ASCII)."""

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: `NNNN_name.sql`, applied in version order."""

    version: int
    name: str
    sql: str


def parse_migrations(files: Mapping[str, str]) -> tuple[Migration, ...]:
    """Migrations from `{file name: SQL}`; versions must run 1, 2, 3... without gaps."""
    migrations = []
    for file_name, sql in files.items():
        match = _FILE_NAME.match(file_name)
        if match is None:
            raise MigrationError(f"migration file {file_name!r} is not named NNNN_name.sql")
        migrations.append(Migration(version=int(match["version"]), name=match["name"], sql=sql))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps or repeats, got {versions}")
    return tuple(migrations)


def packaged_migrations() -> tuple[Migration, ...]:
    """The migrations shipped in this package's `migrations/` folder."""
    folder = resources.files("pricewire_cache_writer").joinpath("migrations")
    files = {entry.name: entry.read_text(encoding="utf-8") for entry in folder.iterdir() if entry.name.endswith(".sql")}
    return parse_migrations(files)


async def apply_migrations(conn: asyncpg.Connection, migrations: Sequence[Migration] | None = None) -> list[int]:
    """Apply the migrations `conn`'s database lacks; return the versions applied by this call."""
    pending = packaged_migrations() if migrations is None else tuple(migrations)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATIONS_LOCK_KEY):
        log.info("migration_lock_wait")
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK_KEY)
    try:
        return await _apply_locked(conn, pending)
    finally:
        # A lost connection released the session lock already.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK_KEY)


async def _apply_locked(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> list[int]:
    await conn.execute(_CREATE_LEDGER)
    applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    known = {m.version for m in migrations}
    if unknown := sorted(applied - known):
        log.warning("schema_newer_than_code", unknown_versions=unknown)
    done: list[int] = []
    for migration in migrations:
        if migration.version in applied:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())", migration.version
            )
        log.info("migration_applied", version=migration.version, name=migration.name)
        done.append(migration.version)
    return done
