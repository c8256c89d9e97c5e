"""The PostgreSQL projections of TICKS and PRICES: batched, idempotent inserts.

A batch goes in as ONE statement: `INSERT ... SELECT FROM unnest(<one array per column>)` with
`ON CONFLICT DO NOTHING`, so a redelivered event (same primary key) changes nothing, and in the same
statement (so the same transaction) the projection's row of `projection_offsets` moves to the
batch's last stream sequence with GREATEST: the offset never covers rows that did not commit.
Numerics travel as their exact decimal text and the `timestamptz` columns are derived from
the ns columns in SQL, so the client builds and encodes no Decimal or datetime objects.
Measured throughput: see README, Speed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import structlog

from pricewire_cache_writer.errors import postgres_guard
from pricewire_cache_writer.progress import Written
from pricewire_cache_writer.records import PriceRecord, TickRecord, check_price, price_record, tick_record
from pricewire_common.errors import InvalidEvent, RejectedInput
from pricewire_common.events import decode_price, decode_tick
from pricewire_common.rules import check_tick

log = structlog.get_logger(__name__)

STORE = "postgres"
ACQUIRE_TIMEOUT_S = 5.0


def _timestamptz(ns: str) -> str:
    # Whole seconds and the microseconds apart keep it exact: a double holds neither ns nor µs
    # since the epoch exactly. Truncates like clock.datetime_from_ns.
    return f"to_timestamp({ns} / 1000000000) + ({ns} % 1000000000 / 1000) * interval '1 microsecond'"


INSERT_TICKS: Final = f"""
INSERT INTO ticks (id, source, symbol, base, quote, price, bid, ask, volume_24h, open_24h,
                   ts_exchange, ts_received, ts_exchange_ns, ts_received_ns, stream_seq)
SELECT id, source, symbol, base, quote,
       price::numeric, bid::numeric, ask::numeric, volume_24h::numeric, open_24h::numeric,
       {_timestamptz("ts_exchange_ns")}, {_timestamptz("ts_received_ns")},
       ts_exchange_ns, ts_received_ns, stream_seq
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
            $11::bigint[], $12::bigint[], $13::bigint[])
     AS batch (id, source, symbol, base, quote, price, bid, ask, volume_24h, open_24h,
               ts_exchange_ns, ts_received_ns, stream_seq)
ON CONFLICT DO NOTHING"""

INSERT_PRICES: Final = f"""
INSERT INTO prices (asset, seq, price, currency, confidence, status, n_sources, n_used, sources,
                    volume_24h, change_24h, change_pct_24h, ts, ts_ns, ts_tick_ns, stream_seq)
SELECT asset, seq, price::numeric, currency, confidence::numeric, status, n_sources, n_used,
       sources::jsonb, volume_24h::numeric, change_24h::numeric, change_pct_24h::numeric,
       {_timestamptz("ts_ns")}, ts_ns, ts_tick_ns, stream_seq
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::int[], $8::int[], $9::text[], $10::text[], $11::text[], $12::text[],
            $13::bigint[], $14::bigint[], $15::bigint[])
     AS batch (asset, seq, price, currency, confidence, status, n_sources, n_used, sources,
               volume_24h, change_24h, change_pct_24h, ts_ns, ts_tick_ns, stream_seq)
ON CONFLICT DO NOTHING"""

# A row the database refuses although records.py let it through: data exceptions (SQLSTATE 22),
# constraint violations, and values asyncpg cannot encode.
_ROW_FAULTS: tuple[type[Exception], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
)

Record = TickRecord | PriceRecord


@dataclass(frozen=True, slots=True)
class Table:
    """How a batch of records goes into one table."""

    name: str
    insert: str
    """`INSERT ... ON CONFLICT DO NOTHING` reading `unnest($1..$n)`, one array per record field."""
    numeric: frozenset[str]
    """Record fields sent as decimal text and cast to numeric by the insert."""
    width: int
    """Fields per record: the insert's parameters are $1..$width."""
    returning: str = "1"
    """What the insert returns of each row it added, for the statements that follow it."""
    followers: tuple[str, ...] = ()
    """More `name AS (statement)` steps run on the rows actually inserted (`inserted`)."""

    def statement(self, *, offset: bool) -> str:
        """The whole batch as one statement answering `added` (and, with `offset`, `applied_seq`).

        With `offset`, $width+1 is the projection's name and $width+2 the batch's last stream sequence.
        """
        steps = [f"inserted AS ({self.insert} RETURNING {self.returning})", *self.followers]
        answer = "(SELECT count(*) FROM inserted) AS added"
        if offset:
            steps.append(f"advanced AS ({_ADVANCE.format(name=f'${self.width + 1}', seq=f'${self.width + 2}')})")
            answer += ", (SELECT stream_seq FROM advanced) AS applied_seq"
        return "WITH " + ",\n".join(steps) + "\nSELECT " + answer


_ADVANCE: Final = """
INSERT INTO projection_offsets AS o (projection, stream_seq, updated_at) VALUES ({name}, {seq}, now())
ON CONFLICT (projection) DO UPDATE SET stream_seq = GREATEST(o.stream_seq, EXCLUDED.stream_seq), updated_at = now()
RETURNING stream_seq
"""

ADVANCE_OFFSET: Final = _ADVANCE.format(name="$1", seq="$2")
"""Move a projection's offset forward (never back); answers the offset it holds then."""


TICKS: Final = Table(
    name="ticks",
    insert=INSERT_TICKS,
    numeric=frozenset({"price", "bid", "ask", "volume_24h", "open_24h"}),
    width=13,
)
PRICES: Final = Table(
    name="prices",
    insert=INSERT_PRICES,
    numeric=frozenset({"price", "confidence", "volume_24h", "change_24h", "change_pct_24h"}),
    width=15,
)
"""Prices alone: on TimescaleDB, whose continuous aggregates make the candles."""


def _candle_upsert(table: str, width: str) -> str:
    """Merge the rows just inserted into `prices` (CTE `inserted`) into the candle table `table`.

    Each batch is summarised per (asset, bucket) and merged into the stored candle so that the result
    does not depend on the order rows arrive in: open/close are the prices of the smallest/largest
    (ts_ns, seq), high/low the extremes, n a sum. Only rows the insert actually added reach here (a
    redelivered price is skipped by ON CONFLICT and so never counted twice).
    """
    return f"""{table}_merged AS (
INSERT INTO {table} AS c (asset, bucket, open, high, low, close, volume, n,
                          open_ts_ns, close_ts_ns, open_seq, close_seq)
SELECT asset, date_bin('{width}', ts, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
       (array_agg(price ORDER BY ts_ns, seq))[1], max(price), min(price),
       (array_agg(price ORDER BY ts_ns DESC, seq DESC))[1],
       (array_agg(volume_24h ORDER BY ts_ns DESC, seq DESC))[1], count(*),
       min(ts_ns), max(ts_ns),
       (array_agg(seq ORDER BY ts_ns, seq))[1], (array_agg(seq ORDER BY ts_ns DESC, seq DESC))[1]
FROM inserted
WHERE status <> 'stale'
GROUP BY 1, 2
ON CONFLICT (asset, bucket) DO UPDATE SET
    open = CASE WHEN (EXCLUDED.open_ts_ns, EXCLUDED.open_seq) < (c.open_ts_ns, c.open_seq)
                THEN EXCLUDED.open ELSE c.open END,
    open_seq = CASE WHEN (EXCLUDED.open_ts_ns, EXCLUDED.open_seq) < (c.open_ts_ns, c.open_seq)
                    THEN EXCLUDED.open_seq ELSE c.open_seq END,
    open_ts_ns = LEAST(c.open_ts_ns, EXCLUDED.open_ts_ns),
    high = GREATEST(c.high, EXCLUDED.high),
    low = LEAST(c.low, EXCLUDED.low),
    close = CASE WHEN (EXCLUDED.close_ts_ns, EXCLUDED.close_seq) > (c.close_ts_ns, c.close_seq)
                 THEN EXCLUDED.close ELSE c.close END,
    volume = CASE WHEN (EXCLUDED.close_ts_ns, EXCLUDED.close_seq) > (c.close_ts_ns, c.close_seq)
                  THEN EXCLUDED.volume ELSE c.volume END,
    close_seq = CASE WHEN (EXCLUDED.close_ts_ns, EXCLUDED.close_seq) > (c.close_ts_ns, c.close_seq)
                     THEN EXCLUDED.close_seq ELSE c.close_seq END,
    close_ts_ns = GREATEST(c.close_ts_ns, EXCLUDED.close_ts_ns),
    n = c.n + EXCLUDED.n
RETURNING 1)"""


PRICES_AND_CANDLES: Final = Table(
    name="prices",
    insert=INSERT_PRICES,
    numeric=PRICES.numeric,
    width=PRICES.width,
    returning="asset, seq, price, volume_24h, ts, ts_ns, status",
    followers=(_candle_upsert("candles_1m", "1 minute"), _candle_upsert("candles_1h", "1 hour")),
)
"""Prices and, in the same statement, the candles they fall into: on plain PostgreSQL."""


def columns(records: Sequence[Record], numeric: frozenset[str]) -> list[list[Any]]:
    """One list per column, the `numeric` ones as exact decimal text: the arrays `unnest` reads."""
    result: list[list[Any]] = []
    for name, column in zip(records[0]._fields, zip(*records, strict=True), strict=True):
        if name in numeric:
            result.append([None if value is None else str(value) for value in column])
        else:
            result.append(list(column))
    return result


async def insert(conn: asyncpg.Connection, table: Table, records: Sequence[Record]) -> int:
    """Insert a batch in one statement; rows whose primary key exists are skipped. Returns rows added."""
    if not records:
        return 0
    added: int = await conn.fetchval(table.statement(offset=False), *columns(records, table.numeric))
    return added


async def insert_ticks(conn: asyncpg.Connection, records: Sequence[TickRecord]) -> int:
    """Insert a batch of ticks in one statement; rows whose id exists are skipped."""
    return await insert(conn, TICKS, records)


async def insert_prices(conn: asyncpg.Connection, records: Sequence[PriceRecord], *, candles: bool = True) -> int:
    """Insert a batch of prices in one statement, and their candles; rows whose (asset, seq) exists are skipped.

    `candles=False` on TimescaleDB, where continuous aggregates make them.
    """
    return await insert(conn, PRICES_AND_CANDLES if candles else PRICES, records)


@dataclass(frozen=True, slots=True)
class Offset:
    """A projection's name in `projection_offsets` and the stream sequence a batch runs through."""

    projection: str
    through_seq: int


async def write_rows(conn: asyncpg.Connection, table: Table, records: Sequence[Record], offset: Offset) -> Written:
    """Insert a batch and advance the projection's offset, in one statement (one transaction)."""
    if not records:
        applied: int = await conn.fetchval(ADVANCE_OFFSET, offset.projection, offset.through_seq)
        return Written(applied_seq=applied)
    row = await conn.fetchrow(
        table.statement(offset=True), *columns(records, table.numeric), offset.projection, offset.through_seq
    )
    assert row is not None  # an aggregate-only SELECT answers one row
    log.debug("batch_inserted", table=table.name, rows=len(records), added=row["added"])
    return Written(applied_seq=row["applied_seq"])


async def write_batch(pool: asyncpg.Pool, table: Table, records: Sequence[Record], offset: Offset) -> Written:
    """Insert the batch and advance the offset; rows the database refuses (normally none) come back refused.

    Raises StoreUnavailable when PostgreSQL is down.
    """
    with postgres_guard():
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            try:
                return await write_rows(conn, table, records, offset)
            except _ROW_FAULTS as exc:
                log.warning("batch_refused", table=table.name, rows=len(records), error=str(exc))
                return await _isolate(conn, table, records, offset)


async def _isolate(conn: asyncpg.Connection, table: Table, records: Sequence[Record], offset: Offset) -> Written:
    # Rare path: one statement per row, each in a savepoint, finds the rows the database refuses; the
    # rest and the offset commit together.
    rejected: dict[int, RejectedInput] = {}
    async with conn.transaction():
        for index, record in enumerate(records):
            try:
                async with conn.transaction():
                    await insert(conn, table, [record])
            except _ROW_FAULTS as exc:
                rejected[index] = InvalidEvent(f"the database refused the row: {exc}", reason="unstorable")
        applied: int = await conn.fetchval(ADVANCE_OFFSET, offset.projection, offset.through_seq)
    log.warning("rows_refused", table=table.name, refused=len(rejected), rows=len(records))
    return Written(applied_seq=applied, refused=rejected)


async def load_offset(pool: asyncpg.Pool, projection: str) -> int:
    """The offset PostgreSQL holds for `projection` (0 when none). Raises StoreUnavailable."""
    with postgres_guard():
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            seq: int | None = await conn.fetchval(
                "SELECT stream_seq FROM projection_offsets WHERE projection = $1", projection
            )
    return seq or 0


class PostgresTicks:
    """The `ticks` table: every tick of the TICKS stream, once."""

    name = "cache-db-ticks"
    store = STORE

    def __init__(self, pool: asyncpg.Pool, *, assets: Collection[str]) -> None:
        self._pool = pool
        self._assets = frozenset(assets)

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> TickRecord:
        """The row of a TICKS message; raises RejectedInput (`unknown_asset` for a base not in `assets`)."""
        return tick_record(check_tick(decode_tick(payload), assets=self._assets), stream_seq=stream_seq)

    async def write(self, records: Sequence[TickRecord], *, through_seq: int) -> Written:
        return await write_batch(self._pool, TICKS, records, Offset(self.name, through_seq))

    async def load_offset(self) -> int:
        return await load_offset(self._pool, self.name)


class PostgresPrices:
    """The `prices` table: every consensus price of the PRICES stream, once; with `candles`, the
    `candles_1m` and `candles_1h` tables too, in the same statement (plain PostgreSQL)."""

    name = "cache-db-prices"
    store = STORE

    def __init__(self, pool: asyncpg.Pool, *, assets: Collection[str], candles: bool = True) -> None:
        self._pool = pool
        self._assets = frozenset(assets)
        self._table = PRICES_AND_CANDLES if candles else PRICES

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> PriceRecord:
        """The row of a PRICES message; raises RejectedInput (`unknown_asset` for an asset not in `assets`)."""
        price = check_price(decode_price(payload), subject=subject, assets=self._assets)
        return price_record(price, stream_seq=stream_seq)

    async def write(self, records: Sequence[PriceRecord], *, through_seq: int) -> Written:
        return await write_batch(self._pool, self._table, records, Offset(self.name, through_seq))

    async def load_offset(self) -> int:
        return await load_offset(self._pool, self.name)
