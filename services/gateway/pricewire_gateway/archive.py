"""Reads of the PostgreSQL projection: the latest consensus per asset, candles, raw ticks, offsets.

The cache_writer owns the schema and writes every row; the gateway only reads. Candles are read
through `pricewire_cache_writer.candles`, the one reader of both storage paths. A database that is
down, slow or not migrated yet raises StoreUnavailable("postgres"), which the callers turn into a
degraded answer or a 503; it never stops the gateway from serving live prices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, NamedTuple

import asyncpg
import msgspec

from pricewire_cache_writer.candles import Candle, candles
from pricewire_cache_writer.errors import POSTGRES_DOWN, CandleQueryError
from pricewire_common.events import DEFAULT_METHOD, Price, SourceQuote, Status
from pricewire_gateway.errors import BadParameter, StoreUnavailable
from pricewire_gateway.params import HistoryQuery, TicksQuery

ACQUIRE_TIMEOUT_S: Final = 2.0
"""How long a request waits for a pooled connection (or a new one) before answering store_unavailable."""

_SOURCES: Final = msgspec.json.Decoder(tuple[SourceQuote, ...])

_LATEST: Final = """
SELECT p.asset, p.seq, p.price, p.currency, p.confidence, p.status, p.n_sources, p.n_used,
       p.sources::text AS sources, p.volume_24h, p.change_24h, p.change_pct_24h, p.ts_ns, p.ts_tick_ns,
       p.method, p.cv_pct, p.anomaly, p.z_score
FROM unnest($1::text[]) AS wanted (asset)
CROSS JOIN LATERAL (
    SELECT * FROM prices
    WHERE prices.asset = wanted.asset AND prices.status <> 'stale'
    ORDER BY prices.ts DESC, prices.seq DESC
    LIMIT 1
) AS p"""
"""The latest live (`ok`/`degraded`) consensus of each asset: one backward step of (asset, ts) each.
`stale` rows repeat an older consensus under a new time, which would understate the price's age."""

_OFFSETS: Final = "SELECT projection, stream_seq FROM projection_offsets"


class TickRow(NamedTuple):
    """One stored tick as the ticks endpoint serves it."""

    id: str
    source: str
    symbol: str
    base: str
    quote: str
    price: Decimal
    bid: Decimal | None
    ask: Decimal | None
    volume_24h: Decimal | None
    open_24h: Decimal | None
    ts_exchange: datetime
    ts_received: datetime
    stream_seq: int


def ticks_sql(query: TicksQuery) -> tuple[str, list[object]]:
    """The statement and arguments of a tick query: newest first, one more row than asked (to tell truncation)."""
    where = ["base = $1"]
    args: list[object] = [query.asset]
    for condition, value in (
        ("source = ${}", query.source),
        ("ts_exchange >= ${}", query.start),
        ("ts_exchange < ${}", query.end),
    ):
        if value is not None:
            args.append(value)
            where.append(condition.format(len(args)))
    args.append(query.limit + 1)
    sql = f"""
SELECT {", ".join(TickRow._fields)}
FROM ticks
WHERE {" AND ".join(where)}
ORDER BY ts_exchange DESC, id DESC
LIMIT ${len(args)}"""
    return sql, args


def price_from_row(row: Mapping[str, Any]) -> Price:
    """The Price event a `prices` row was written from, as far as the row keeps it.

    Rows written before schema version 4 have no `method`, `cv_pct`, `anomaly` or `z_score`: those read
    as the event's defaults (`median`, null, false, null).
    """
    status: Status = row["status"]
    return Price(
        asset=row["asset"],
        seq=row["seq"],
        price=row["price"],
        currency=row["currency"],
        confidence=row["confidence"],
        status=status,
        n_sources=row["n_sources"],
        n_used=row["n_used"],
        sources=_SOURCES.decode(row["sources"]) if row["sources"] is not None else (),
        volume_24h=row["volume_24h"],
        change_24h=row["change_24h"],
        change_pct_24h=row["change_pct_24h"],
        ts=row["ts_ns"],
        ts_tick=row["ts_tick_ns"],
        method=row["method"] or DEFAULT_METHOD,
        cv_pct=row["cv_pct"],
        anomaly=bool(row["anomaly"]),
        z_score=row["z_score"],
    )


@contextmanager
def _postgres() -> Iterator[None]:
    """Map "cannot serve now" (down, slow, no schema yet) to StoreUnavailable; let anything else through."""
    try:
        yield
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
        # The cache_writer migrates at its start, while the gateway may already serve: a table or a column
        # a later migration adds is not there yet.
        raise StoreUnavailable("postgres", f"schema not migrated yet (the cache_writer migrates it): {exc}") from exc
    except POSTGRES_DOWN as exc:
        raise StoreUnavailable("postgres", str(exc) or type(exc).__name__) from exc


class Archive:
    """The gateway's read-only view of PostgreSQL, over a pool that connects on first use."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = ACQUIRE_TIMEOUT_S) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    async def latest(self, assets: Sequence[str]) -> dict[str, Price]:
        """The latest `ok`/`degraded` consensus of each of `assets` that has one (one query)."""
        if not assets:
            return {}
        with _postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                rows = await conn.fetch(_LATEST, list(assets))
        return {row["asset"]: price_from_row(row) for row in rows}

    async def candles(self, query: HistoryQuery) -> tuple[list[Candle], bool]:
        """The latest `query.limit` candles of the window, oldest first, and whether more were left out."""
        with _postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                try:
                    found = await candles(
                        conn,
                        query.asset,
                        query.interval,
                        start=query.start,
                        end=query.end,
                        limit=query.limit + 1,
                        latest=True,
                    )
                except CandleQueryError as exc:  # params.py checks the same; this keeps the reader's word
                    raise BadParameter("interval", str(exc)) from exc
        truncated = len(found) > query.limit
        return (found[1:] if truncated else found), truncated

    async def ticks(self, query: TicksQuery) -> tuple[list[TickRow], bool]:
        """The newest `query.limit` ticks of the query, newest first, and whether more were left out."""
        sql, args = ticks_sql(query)
        with _postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                rows = await conn.fetch(sql, *args)
        found = [TickRow(*row) for row in rows]
        return found[: query.limit], len(found) > query.limit

    async def offsets(self) -> dict[str, int]:
        """Every PostgreSQL projection's offset, by projection name."""
        with _postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                rows = await conn.fetch(_OFFSETS)
        return {row["projection"]: row["stream_seq"] for row in rows}
