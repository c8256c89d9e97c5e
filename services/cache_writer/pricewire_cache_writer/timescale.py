"""The TimescaleDB path's run-time part: compression and retention policies, and candle refreshes.

The schema itself comes from `migrations/0003_candles.timescaledb.sql`. Policies take their ages from
the settings, so they are set at every start rather than frozen in a migration. Setting them compares
first and changes only what differs (`policy_changes`, pure): a policy already at the wanted age is left
alone, one at another age is removed and added again, a missing one is added. TimescaleDB's own
`if_not_exists => true` skips a policy that exists with the same age (a notice) and, with another age,
only warns and keeps the old one, so it cannot be the change itself; it is still passed, so an add never
fails on a policy that appeared meanwhile. The whole step runs under the schema's advisory lock
(migrate.schema_lock), in one transaction: replicas starting together take turns, and the second finds
nothing to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Literal

import asyncpg
import structlog

from pricewire_cache_writer.migrate import schema_lock

log = structlog.get_logger(__name__)

DEFAULT_COMPRESS_AFTER_S: Final = 7 * 86_400
DEFAULT_RETENTION_S: Final = 90 * 86_400

HYPERTABLES: Final = ("ticks", "prices")
CANDLE_VIEWS: Final = ("candles_1m", "candles_1h")


@dataclass(frozen=True, slots=True, kw_only=True)
class Policies:
    """Ages after which chunks of `ticks` and `prices` are compressed, and dropped.

    The candle aggregates have no retention policy: they are small, and they keep their candles after
    the raw rows behind them are dropped (a refresh never reaches back past the refresh window).
    """

    compress_after_s: int = DEFAULT_COMPRESS_AFTER_S
    retention_s: int | None = DEFAULT_RETENTION_S
    """None: keep every row."""

    def __post_init__(self) -> None:
        if self.compress_after_s <= 0:
            raise ValueError(f"compress_after_s must be positive, got {self.compress_after_s}")
        if self.retention_s is not None and self.retention_s <= self.compress_after_s:
            raise ValueError(f"retention_s ({self.retention_s}) must exceed compress_after_s ({self.compress_after_s})")


Kind = Literal["compression", "retention"]
KINDS: Final[tuple[Kind, ...]] = ("compression", "retention")

_PROC: Final[dict[Kind, str]] = {"compression": "policy_compression", "retention": "policy_retention"}
_ADD: Final[dict[Kind, str]] = {
    "compression": "SELECT add_compression_policy($1::text::regclass, compress_after => $2::interval,"
    " if_not_exists => true)",
    "retention": "SELECT add_retention_policy($1::text::regclass, drop_after => $2::interval, if_not_exists => true)",
}
_REMOVE: Final[dict[Kind, str]] = {
    "compression": "SELECT remove_compression_policy($1::text::regclass, if_exists => true)",
    "retention": "SELECT remove_retention_policy($1::text::regclass, if_exists => true)",
}

# The policies of our hypertables as TimescaleDB keeps them: one job per (table, kind), its age in the
# job's config as interval text. Seconds compare exactly whatever IntervalStyle wrote the text.
_EXISTING: Final = """
SELECT hypertable_name AS table_name, proc_name,
       EXTRACT(EPOCH FROM COALESCE(config->>'compress_after', config->>'drop_after')::interval)::bigint AS after_s
FROM timescaledb_information.jobs
WHERE proc_name IN ('policy_compression', 'policy_retention')
  AND hypertable_schema = current_schema() AND hypertable_name = ANY($1::text[])
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyChange:
    """One policy to set on one hypertable: remove the one there first (`remove`), then add one of
    `after_s` seconds (None: add none)."""

    table: str
    kind: Kind
    remove: bool
    after_s: int | None


def wanted_ages(policies: Policies) -> dict[Kind, int | None]:
    """The age each kind of policy should have on every hypertable (None: no such policy)."""
    return {"compression": policies.compress_after_s, "retention": policies.retention_s}


def policy_changes(
    existing: Mapping[tuple[str, Kind], int | None], policies: Policies, *, tables: Sequence[str] = HYPERTABLES
) -> list[PolicyChange]:
    """What to do so that `tables` have `policies`, given the policies there now: their age by (table, kind),
    None for one that has no age (set some other way, say by creation time)."""
    changes = []
    wanted = wanted_ages(policies)
    for table in tables:
        for kind in KINDS:
            want, there = wanted[kind], (table, kind) in existing
            if there and existing[(table, kind)] == want:
                continue
            if there or want is not None:
                changes.append(PolicyChange(table=table, kind=kind, remove=there, after_s=want))
    return changes


async def existing_policies(
    conn: asyncpg.Connection, tables: Sequence[str] = HYPERTABLES
) -> dict[tuple[str, Kind], int | None]:
    """The compression and retention policies `tables` have now: their age (s) by (table, kind)."""
    by_proc = {proc: kind for kind, proc in _PROC.items()}
    rows = await conn.fetch(_EXISTING, list(tables))
    return {(row["table_name"], by_proc[row["proc_name"]]): row["after_s"] for row in rows}


async def apply_policies(conn: asyncpg.Connection, policies: Policies) -> list[PolicyChange]:
    """Give the hypertables `policies`, changing only what differs; returns the changes made.

    Under the schema lock (re-entrant: a caller may already hold it) and in one transaction.
    """
    async with schema_lock(conn), conn.transaction():
        changes = policy_changes(await existing_policies(conn), policies)
        for change in changes:
            if change.remove:
                await conn.execute(_REMOVE[change.kind], change.table)
            if change.after_s is not None:
                await conn.execute(_ADD[change.kind], change.table, timedelta(seconds=change.after_s))
    log.info(
        "timescaledb_policies",
        compress_after_s=policies.compress_after_s,
        retention_s=policies.retention_s,
        changed=[f"{c.table}:{c.kind}" for c in changes],
    )
    return changes


async def refresh_candles(conn: asyncpg.Connection) -> None:
    """Materialize every candle now, over all time: after a migration of old rows or a replay of old events.

    Must run outside a transaction block (TimescaleDB refreshes in transactions of its own).
    """
    for view in CANDLE_VIEWS:
        await conn.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")  # our own view names
    log.info("candles_refreshed", views=list(CANDLE_VIEWS))
