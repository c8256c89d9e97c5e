"""The PostgreSQL projections of TICKS and PRICES: batched, idempotent inserts with their offsets.

A batch goes in as one statement (tables.py): `INSERT ... ON CONFLICT DO NOTHING`, so a redelivered
event (same primary key) changes nothing, and in the same statement (so the same transaction) the
projection's row of `projection_offsets` moves to the batch's last stream sequence with GREATEST: the
offset never covers rows that did not commit. A batch of `copy_from` rows or more is first copied
(binary COPY) into a temporary staging table in the same transaction; a smaller one travels as arrays
read by `unnest`. Measured throughput: see README, Speed.
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
from pricewire_cache_writer.tables import ADVANCE_OFFSET, PRICES, PRICES_AND_CANDLES, TICKS, Table
from pricewire_common.errors import InvalidEvent, RejectedInput
from pricewire_common.events import decode_price, decode_tick
from pricewire_common.rules import check_tick

log = structlog.get_logger(__name__)

STORE = "postgres"
ACQUIRE_TIMEOUT_S = 5.0
COPY_FROM: Final = 256
"""Batches of this many rows or more go by COPY; below, by unnest (faster for small batches: one round trip)."""

__all__ = [
    "COPY_FROM",
    "PRICES",
    "PRICES_AND_CANDLES",
    "TICKS",
    "Offset",
    "PostgresPrices",
    "PostgresTicks",
    "Table",
    "insert",
    "insert_prices",
    "insert_ticks",
    "load_offset",
    "write_batch",
    "write_rows",
]

# A row the database refuses although records.py let it through: data exceptions (SQLSTATE 22),
# constraint violations, and values asyncpg cannot encode.
_ROW_FAULTS: tuple[type[Exception], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
)

Record = TickRecord | PriceRecord


def columns(records: Sequence[Record], numeric: frozenset[str]) -> list[list[Any]]:
    """One list per column, the `numeric` ones as exact decimal text: the arrays `unnest` reads."""
    result: list[list[Any]] = []
    for name, column in zip(records[0]._fields, zip(*records, strict=True), strict=True):
        if name in numeric:
            result.append([None if value is None else str(value) for value in column])
        else:
            result.append(list(column))
    return result


def rows(records: Sequence[Record], numeric: frozenset[str]) -> list[tuple[Any, ...]]:
    """The records as COPY rows, the `numeric` fields as exact decimal text."""
    positions = [i for i, name in enumerate(records[0]._fields) if name in numeric]
    result = []
    for record in records:
        row = list(record)
        for i in positions:
            if row[i] is not None:
                row[i] = str(row[i])
        result.append(tuple(row))
    return result


def _by_copy(conn: asyncpg.Connection, records: Sequence[Record], copy_from: int) -> bool:
    # Inside a caller's transaction the staging table would keep the previous batch until that
    # transaction commits (it is emptied ON COMMIT): such a batch goes by unnest.
    return len(records) >= copy_from and not conn.is_in_transaction()


async def _staged(conn: asyncpg.Connection, table: Table, records: Sequence[Record], *args: object) -> asyncpg.Record:
    """COPY the batch into the staging table and run the staged statement, in one transaction.

    The staging table is made on a connection's first use: its absence aborts the transaction, which
    is then tried once more.
    """
    statement = table.statement(offset=bool(args), staged=True)
    for attempt in (1, 2):
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(table.stage, records=rows(records, table.numeric))
                row: asyncpg.Record | None = await conn.fetchrow(statement, *args)
        except asyncpg.UndefinedTableError:
            if attempt == 2:
                raise
            await conn.execute(table.create_stage)
            continue
        assert row is not None  # an aggregate-only SELECT answers one row
        return row
    raise AssertionError("unreachable")  # the loop returns or raises


async def insert(
    conn: asyncpg.Connection, table: Table, records: Sequence[Record], *, copy_from: int = COPY_FROM
) -> int:
    """Insert a batch in one statement; rows whose primary key exists are skipped. Returns rows added."""
    if not records:
        return 0
    if _by_copy(conn, records, copy_from):
        added: int = (await _staged(conn, table, records))["added"]
    else:
        added = await conn.fetchval(table.statement(offset=False), *columns(records, table.numeric))
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


async def write_rows(
    conn: asyncpg.Connection, table: Table, records: Sequence[Record], offset: Offset, *, copy_from: int = COPY_FROM
) -> Written:
    """Insert a batch and advance the projection's offset, in one transaction."""
    if not records:
        applied: int = await conn.fetchval(ADVANCE_OFFSET, offset.projection, offset.through_seq)
        return Written(applied_seq=applied)
    if _by_copy(conn, records, copy_from):
        row = await _staged(conn, table, records, offset.projection, offset.through_seq)
    else:
        found = await conn.fetchrow(
            table.statement(offset=True), *columns(records, table.numeric), offset.projection, offset.through_seq
        )
        assert found is not None  # an aggregate-only SELECT answers one row
        row = found
    log.debug("batch_inserted", table=table.name, rows=len(records), added=row["added"])
    return Written(applied_seq=row["applied_seq"])


async def write_batch(
    pool: asyncpg.Pool, table: Table, records: Sequence[Record], offset: Offset, *, copy_from: int = COPY_FROM
) -> Written:
    """Insert the batch and advance the offset; rows the database refuses (normally none) come back refused.

    Raises StoreUnavailable when PostgreSQL is down.
    """
    with postgres_guard():
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            try:
                return await write_rows(conn, table, records, offset, copy_from=copy_from)
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

    def __init__(self, pool: asyncpg.Pool, *, assets: Collection[str], copy_from: int = COPY_FROM) -> None:
        self._pool = pool
        self._assets = frozenset(assets)
        self._copy_from = copy_from

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> TickRecord:
        """The row of a TICKS message; raises RejectedInput (`unknown_asset` for a base not in `assets`)."""
        return tick_record(check_tick(decode_tick(payload), assets=self._assets), stream_seq=stream_seq)

    async def write(self, records: Sequence[TickRecord], *, through_seq: int) -> Written:
        return await write_batch(self._pool, TICKS, records, Offset(self.name, through_seq), copy_from=self._copy_from)

    async def load_offset(self) -> int:
        return await load_offset(self._pool, self.name)


class PostgresPrices:
    """The `prices` table: every consensus price of the PRICES stream, once; with `candles`, the
    `candles_1m` and `candles_1h` tables too, in the same statement (plain PostgreSQL)."""

    name = "cache-db-prices"
    store = STORE

    def __init__(
        self, pool: asyncpg.Pool, *, assets: Collection[str], candles: bool = True, copy_from: int = COPY_FROM
    ) -> None:
        self._pool = pool
        self._assets = frozenset(assets)
        self._copy_from = copy_from
        self._table = PRICES_AND_CANDLES if candles else PRICES

    def decode(self, subject: str, payload: bytes, stream_seq: int) -> PriceRecord:
        """The row of a PRICES message; raises RejectedInput (`unknown_asset` for an asset not in `assets`)."""
        price = check_price(decode_price(payload), subject=subject, assets=self._assets)
        return price_record(price, stream_seq=stream_seq)

    async def write(self, records: Sequence[PriceRecord], *, through_seq: int) -> Written:
        offset = Offset(self.name, through_seq)
        return await write_batch(self._pool, self._table, records, offset, copy_from=self._copy_from)

    async def load_offset(self) -> int:
        return await load_offset(self._pool, self.name)
