"""The TimescaleDB path's run-time part: compression and retention policies, and candle refreshes.

The schema itself comes from `migrations/0003_candles.timescaledb.sql`. Policies take their ages from
the settings, so they are set at every start rather than frozen in a migration: each is removed and
added again in one transaction (TimescaleDB keeps an existing policy as it is when asked to add one with
other ages).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import asyncpg
import structlog

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


async def apply_policies(conn: asyncpg.Connection, policies: Policies) -> None:
    """Set the compression and retention policies of the hypertables to `policies`."""
    async with conn.transaction():
        for table in HYPERTABLES:
            await conn.execute("SELECT remove_compression_policy($1::text::regclass, if_exists => true)", table)
            await conn.execute(
                "SELECT add_compression_policy($1::text::regclass, compress_after => $2::interval)",
                table,
                timedelta(seconds=policies.compress_after_s),
            )
            await conn.execute("SELECT remove_retention_policy($1::text::regclass, if_exists => true)", table)
            if policies.retention_s is not None:
                await conn.execute(
                    "SELECT add_retention_policy($1::text::regclass, drop_after => $2::interval)",
                    table,
                    timedelta(seconds=policies.retention_s),
                )
    log.info(
        "timescaledb_policies",
        compress_after_s=policies.compress_after_s,
        retention_s=policies.retention_s,
    )


async def refresh_candles(conn: asyncpg.Connection) -> None:
    """Materialize every candle now, over all time: after a migration of old rows or a replay of old events.

    Must run outside a transaction block (TimescaleDB refreshes in transactions of its own).
    """
    for view in CANDLE_VIEWS:
        await conn.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")  # our own view names
    log.info("candles_refreshed", views=list(CANDLE_VIEWS))
