"""Emptying the projections before a rebuild, and the check that a rebuild loses nothing the log lacks.

A rebuild replays the log's retained part only (TICKS keeps a day by default, PRICES a week), while
PostgreSQL may hold much more: emptying its tables would then lose history for good. `check_retained`
refuses in that case unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import asyncpg
import redis.asyncio as redis_asyncio
import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from pricewire_cache_writer.errors import RebuildRefused, postgres_guard, redis_guard
from pricewire_cache_writer.migrate import Variant
from pricewire_cache_writer.timescale import CANDLE_VIEWS
from pricewire_common import subjects

log = structlog.get_logger(__name__)

REDIS_PATTERNS: Final = ("price:*", "projection:*")
"""The Redis projection's keys: prices, their details and seqs, its offset and the status hash."""

TRUNCATE_PLAIN: Final = "TRUNCATE ticks, prices, candles_1m, candles_1h, projection_offsets"
TRUNCATE_TIMESCALEDB: Final = "TRUNCATE ticks, prices, projection_offsets"
"""On TimescaleDB the candles are continuous aggregates: truncated one by one (a TRUNCATE of the raw
hypertables also invalidates them) and refreshed after the replay."""

TABLE_STREAMS: Final = (("ticks", subjects.TICKS_STREAM), ("prices", subjects.PRICES_STREAM))


@dataclass(frozen=True, slots=True)
class Held:
    """What a table holds and what its stream still has."""

    table: str
    stream: str
    rows: int
    oldest_seq: int | None
    """The smallest `stream_seq` among the rows (None when empty)."""
    messages: int
    first_seq: int
    """The stream's first sequence still retained."""

    def loss(self) -> str | None:
        """What a rebuild would lose, in words; None when the log covers every row."""
        if self.rows == 0 or self.oldest_seq is None:
            return None
        if self.oldest_seq < self.first_seq:
            return f"holds rows from stream sequence {self.oldest_seq}, the log only from {self.first_seq}"
        if self.rows > self.messages:
            # The stream was purged or recreated: sequences no longer tell, counts still do.
            return f"holds {self.rows} rows, the log only {self.messages} messages"
        return None


async def held(conn: asyncpg.Connection, js: JetStreamContext) -> list[Held]:
    """For `ticks` and `prices`: their rows and oldest stream sequence, and what their stream retains."""
    result = []
    for table, stream in TABLE_STREAMS:
        # The table first: rows a running cache_writer adds meanwhile are in the stream by the time it is read.
        with postgres_guard():
            row = await conn.fetchrow(f"SELECT count(*) AS n, min(stream_seq) AS oldest FROM {table}")  # our names
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            messages, first_seq = 0, 0  # no stream at all: every row would be lost
        else:
            messages, first_seq = int(info.state.messages), int(info.state.first_seq)
        assert row is not None  # an aggregate answers one row
        result.append(
            Held(
                table=table,
                stream=stream,
                rows=int(row["n"]),
                oldest_seq=row["oldest"],
                messages=messages,
                first_seq=first_seq,
            )
        )
    return result


async def check_retained(conn: asyncpg.Connection, js: JetStreamContext) -> None:
    """Raise RebuildRefused when a table holds rows its stream no longer has."""
    for each in await held(conn, js):
        loss = each.loss()
        if loss is not None:
            raise RebuildRefused(each.table, each.stream, loss)


async def empty_postgres(conn: asyncpg.Connection, variant: Variant) -> None:
    """Empty ticks, prices, the candles and the offsets in one transaction.

    Readers see the old tables or empty ones, never a mix; a cache_writer batch running meanwhile
    commits before (and is replayed) or after (and is kept).
    """
    with postgres_guard():
        async with conn.transaction():
            if variant == "timescaledb":
                await conn.execute(TRUNCATE_TIMESCALEDB)
                for view in CANDLE_VIEWS:
                    await conn.execute(f"TRUNCATE {view}")  # our own view names
            else:
                await conn.execute(TRUNCATE_PLAIN)
    log.info("postgres_emptied", variant=variant)


async def empty_redis(client: redis_asyncio.Redis) -> int:
    """Delete the Redis projection's keys; returns how many there were.

    One UNLINK takes them all at once: an asset's price, detail and seq keys go together, so a live
    write landing meanwhile is either deleted whole (and replayed) or kept whole (and newer).
    """
    with redis_guard():
        keys = [key for pattern in REDIS_PATTERNS async for key in client.scan_iter(match=pattern, count=1000)]
        if keys:
            await client.unlink(*keys)
    log.info("redis_emptied", keys=len(keys))
    return len(keys)
