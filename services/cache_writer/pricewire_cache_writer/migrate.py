"""Versioned SQL migrations, packaged with the service and applied at start.

Safe when several replicas start at once: the whole run holds a PostgreSQL advisory lock
(`schema_lock`), so one replica applies what is missing while the others wait and then find nothing to
do. Each migration and its `schema_migrations` row commit in one transaction. The same lock covers the
TimescaleDB policies set after the migrations (timescale.py): a caller holding it across both makes the
whole schema step one critical section.

A migration may come in two variants: `NNNN_name.sql` for plain PostgreSQL and
`NNNN_name.timescaledb.sql` for a server with the TimescaleDB extension. The first run that meets a
two-variant migration decides for the database: TimescaleDB when `CREATE EXTENSION IF NOT EXISTS
timescaledb` succeeds (and the caller allows it), plain PostgreSQL otherwise. The choice is written in
the ledger (`schema_migrations.variant`) and every later run follows it, so a database never mixes
the two.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Final, Literal

import asyncpg
import structlog

from pricewire_cache_writer.errors import MigrationError

log = structlog.get_logger(__name__)

Variant = Literal["postgres", "timescaledb"]

MIGRATIONS_LOCK_KEY = 0x7077_6361_6368_65
"""Advisory lock key shared by every replica ("pwcache" in ASCII): the schema's migrations and policies."""

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)(?P<variant>\.timescaledb)?\.sql$")

_CREATE_LEDGER: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS variant text NOT NULL DEFAULT 'postgres';
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One version: `NNNN_name.sql`, and optionally its TimescaleDB variant, applied in version order."""

    version: int
    name: str
    sql: str
    timescaledb_sql: str | None = None

    def variant_sql(self, variant: Variant) -> str:
        if variant == "timescaledb" and self.timescaledb_sql is not None:
            return self.timescaledb_sql
        return self.sql


def parse_migrations(files: Mapping[str, str]) -> tuple[Migration, ...]:
    """Migrations from `{file name: SQL}`; versions must run 1, 2, 3... without gaps.

    A `.timescaledb.sql` file needs the plain file of the same version and name beside it.
    """
    plain: dict[int, tuple[str, str]] = {}
    variants: dict[int, tuple[str, str]] = {}
    for file_name, sql in files.items():
        match = _FILE_NAME.match(file_name)
        if match is None:
            raise MigrationError(
                f"migration file {file_name!r} is not named NNNN_name.sql or NNNN_name.timescaledb.sql"
            )
        into = variants if match["variant"] else plain
        version = int(match["version"])
        if version in into:
            raise MigrationError(f"migration version {version} appears twice: {into[version][0]!r}, {match['name']!r}")
        into[version] = (match["name"], sql)
    for version, (name, _) in variants.items():
        if plain.get(version, ("",))[0] != name:
            raise MigrationError(f"{version:04d}_{name}.timescaledb.sql has no plain {version:04d}_{name}.sql")
    versions = sorted(plain)
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps or repeats, got {versions}")
    return tuple(
        Migration(
            version=v,
            name=plain[v][0],
            sql=plain[v][1],
            timescaledb_sql=variants[v][1] if v in variants else None,
        )
        for v in versions
    )


def packaged_migrations() -> tuple[Migration, ...]:
    """The migrations shipped in this package's `migrations/` folder."""
    folder = resources.files("pricewire_cache_writer").joinpath("migrations")
    files = {entry.name: entry.read_text(encoding="utf-8") for entry in folder.iterdir() if entry.name.endswith(".sql")}
    return parse_migrations(files)


async def apply_migrations(
    conn: asyncpg.Connection,
    migrations: Sequence[Migration] | None = None,
    *,
    timescaledb: bool = True,
) -> list[int]:
    """Apply the migrations `conn`'s database lacks; return the versions applied by this call.

    `timescaledb=False` keeps a database that has not chosen yet on plain PostgreSQL.
    """
    pending = packaged_migrations() if migrations is None else tuple(migrations)
    async with schema_lock(conn):
        return await _apply_locked(conn, pending, timescaledb_allowed=timescaledb)


@asynccontextmanager
async def schema_lock(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Hold the schema's advisory lock on `conn` for the block, waiting for another replica's turn.

    A session lock, taken outside any transaction (a rolled-back transaction would not release it, and an
    aborted one could not unlock it). Re-entrant: PostgreSQL counts a session's locks, so a block nested
    in another on the same connection takes it again at once and the outer block still holds it after.
    """
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATIONS_LOCK_KEY):
        log.info("schema_lock_wait")
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK_KEY)
    try:
        yield
    finally:
        # A lost connection released the session lock already.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK_KEY)


async def schema_variant(conn: asyncpg.Connection) -> Variant:
    """Which path the database is on: `timescaledb` once a TimescaleDB variant has been applied."""
    on_timescaledb = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE variant = 'timescaledb')"
    )
    return "timescaledb" if on_timescaledb else "postgres"


async def _apply_locked(
    conn: asyncpg.Connection, migrations: Sequence[Migration], *, timescaledb_allowed: bool
) -> list[int]:
    await conn.execute(_CREATE_LEDGER)
    applied = {
        row["version"]: row["variant"] for row in await conn.fetch("SELECT version, variant FROM schema_migrations")
    }
    known = {m.version for m in migrations}
    if unknown := sorted(set(applied) - known):
        log.warning("schema_newer_than_code", unknown_versions=unknown)
    todo = [m for m in migrations if m.version not in applied]
    variant = await _variant(conn, migrations, applied, todo, timescaledb_allowed=timescaledb_allowed)
    done: list[int] = []
    for migration in todo:
        used: Variant = variant if migration.timescaledb_sql is not None else "postgres"
        async with conn.transaction():
            await conn.execute(migration.variant_sql(used))
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at, variant) VALUES ($1, now(), $2)",
                migration.version,
                used,
            )
        log.info("migration_applied", version=migration.version, name=migration.name, variant=used)
        done.append(migration.version)
    return done


async def _variant(
    conn: asyncpg.Connection,
    migrations: Sequence[Migration],
    applied: Mapping[int, str],
    todo: Sequence[Migration],
    *,
    timescaledb_allowed: bool,
) -> Variant:
    # A database that already applied a two-variant migration keeps that path.
    decided = {applied[m.version] for m in migrations if m.timescaledb_sql is not None and m.version in applied}
    if decided:
        return "timescaledb" if "timescaledb" in decided else "postgres"
    if not timescaledb_allowed or not any(m.timescaledb_sql is not None for m in todo):
        return "postgres"
    return "timescaledb" if await timescaledb_available(conn) else "postgres"


async def timescaledb_available(conn: asyncpg.Connection) -> bool:
    """Whether `CREATE EXTENSION IF NOT EXISTS timescaledb` succeeds here (it stays created if so)."""
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except asyncpg.PostgresConnectionError:
        raise
    except asyncpg.PostgresError as exc:
        # Not installed (undefined_file), not preloaded, or not ours to create (insufficient_privilege):
        # each one means plain PostgreSQL, and the log says which.
        log.info("timescaledb_unavailable", sqlstate=exc.sqlstate, reason=str(exc))
        return False
    return True
