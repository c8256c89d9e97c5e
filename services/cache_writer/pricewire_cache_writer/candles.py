"""OHLCV candles of the consensus price, read from either storage path with the same SQL.

Plain PostgreSQL keeps `candles_1m` and `candles_1h` as tables (db_projection.py writes them with the
prices); TimescaleDB has continuous aggregates of the same names and columns. 1m and 1h candles are
read as stored; 5m and 15m are rolled up from `candles_1m`, 1d from `candles_1h`, in SQL with
`date_bin`. Every bucket is aligned on the Unix epoch, so all of them on UTC minutes, hours and days.

The window is the candles whose bucket *begins* in [start, end), each one whole: a 5m candle beginning
at 10:00 is left out of a window starting at 10:02 rather than returned with only part of its data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final

import asyncpg
import msgspec

from pricewire_cache_writer.errors import CandleQueryError

MAX_LIMIT: Final = 10_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Width:
    """One candle interval: its length and the stored candles it is read or rolled up from."""

    seconds: int
    source: str
    rolled_up: bool


INTERVALS: Final[Mapping[str, Width]] = {
    "1m": Width(60, "candles_1m", rolled_up=False),
    "5m": Width(300, "candles_1m", rolled_up=True),
    "15m": Width(900, "candles_1m", rolled_up=True),
    "1h": Width(3_600, "candles_1h", rolled_up=False),
    "1d": Width(86_400, "candles_1h", rolled_up=True),
}


class Candle(msgspec.Struct, frozen=True, kw_only=True):
    """One candle: `bucket` is its start (UTC); `volume` is the 24 h volume at its close, or None."""

    bucket: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal | None
    n: int
    """Consensus prices in the candle."""


@dataclass(frozen=True, slots=True)
class Window:
    """The stored candles to read: buckets in [low, high), both aligned on the interval."""

    width: Width
    low: datetime
    high: datetime
    limit: int


def _micros(ts: datetime) -> int:
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def bucket_floor(ts: datetime, seconds: int) -> datetime:
    """The start of the `seconds`-wide bucket holding `ts` (buckets aligned on the epoch)."""
    width = seconds * 1_000_000
    return _EPOCH + timedelta(microseconds=_micros(ts) // width * width)


def bucket_ceil(ts: datetime, seconds: int) -> datetime:
    """The first bucket start at or after `ts`."""
    width = seconds * 1_000_000
    return _EPOCH + timedelta(microseconds=-(-_micros(ts) // width) * width)


def window(interval: str, start: datetime, end: datetime, limit: int) -> Window:
    """Check the parameters and align them; raises CandleQueryError with a message fit for a client."""
    width = INTERVALS.get(interval)
    if width is None:
        raise CandleQueryError(f"interval must be one of {', '.join(INTERVALS)}; got {interval!r}")
    for name, value in (("start", start), ("end", end)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise CandleQueryError(f"{name} must carry a time zone (ISO 8601 with Z or an offset)")
    if end <= start:
        raise CandleQueryError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    if not 1 <= limit <= MAX_LIMIT:
        raise CandleQueryError(f"limit must be between 1 and {MAX_LIMIT}; got {limit}")
    return Window(
        width=width,
        low=bucket_ceil(start.astimezone(UTC), width.seconds),
        high=bucket_ceil(end.astimezone(UTC), width.seconds),
        limit=limit,
    )


def _direct_sql(source: str, order: str) -> str:
    return f"""
SELECT bucket, open, high, low, close, volume, n::bigint AS n
FROM {source}
WHERE asset = $1 AND bucket >= $2 AND bucket < $3
ORDER BY bucket {order}
LIMIT $4"""


def _rollup_sql(source: str, order: str) -> str:
    # Stored buckets are disjoint and ordered in time, so the first one's open is the rolled-up open.
    return f"""
SELECT date_bin($5::interval, bucket, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS bucket,
       (array_agg(open ORDER BY bucket))[1] AS open, max(high) AS high, min(low) AS low,
       (array_agg(close ORDER BY bucket DESC))[1] AS close,
       (array_agg(volume ORDER BY bucket DESC))[1] AS volume,
       sum(n)::bigint AS n
FROM {source}
WHERE asset = $1 AND bucket >= $2 AND bucket < $3
GROUP BY 1
ORDER BY 1 {order}
LIMIT $4"""


async def candles(
    conn: asyncpg.Connection | asyncpg.Pool,
    asset: str,
    interval: str,
    *,
    start: datetime,
    end: datetime,
    limit: int,
    latest: bool = False,
) -> list[Candle]:
    """The `asset`'s candles of `interval` whose bucket begins in [start, end), oldest first.

    At most `limit` of them: the earliest, or with `latest` the most recent ones (still oldest first).
    Raises CandleQueryError for bad parameters (see `window`).
    """
    win = window(interval, start, end, limit)
    if win.low >= win.high:
        return []
    order = "DESC" if latest else "ASC"
    source = win.width.source  # one of our own table names, never client text
    if win.width.rolled_up:
        rows = await conn.fetch(
            _rollup_sql(source, order), asset, win.low, win.high, win.limit, timedelta(seconds=win.width.seconds)
        )
    else:
        rows = await conn.fetch(_direct_sql(source, order), asset, win.low, win.high, win.limit)
    result = [
        Candle(
            bucket=row["bucket"],
            open=row["open"],
            high=row["high"],
            low=row["low"],
            close=row["close"],
            volume=row["volume"],
            n=row["n"],
        )
        for row in rows
    ]
    if latest:
        result.reverse()
    return result
