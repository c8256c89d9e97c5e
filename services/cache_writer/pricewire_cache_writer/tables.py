"""The SQL that writes a batch into `ticks` or `prices`: pure text, built once at import.

A batch reaches the database one of two ways, chosen by its size (see db_projection.py):

- as one array per field, read by `unnest(...)`: one round trip, best for small batches;
- by binary COPY into a temporary staging table, then `INSERT ... SELECT` from it: more round trips
  but less work per row, best for large batches (measured in bench/db_ingest.py).

Either way one statement does the rest: `INSERT ... ON CONFLICT DO NOTHING RETURNING` (a redelivered
event meets its own row and is skipped), then steps that read only the rows actually inserted (the
candles), then the projection's `projection_offsets` row moved forward with GREATEST. Numbers travel
as their exact decimal text and the `timestamptz` columns are derived from the ns columns in SQL, so
the client builds no Decimal or datetime objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


def _timestamptz(ns: str) -> str:
    # Whole seconds and the microseconds apart keep it exact: a double holds neither ns nor µs
    # since the epoch exactly. Truncates like clock.datetime_from_ns.
    return f"to_timestamp({ns} / 1000000000) + ({ns} % 1000000000 / 1000) * interval '1 microsecond'"


_ADVANCE: Final = """
INSERT INTO projection_offsets AS o (projection, stream_seq, updated_at) VALUES ({name}, {seq}, now())
ON CONFLICT (projection) DO UPDATE SET stream_seq = GREATEST(o.stream_seq, EXCLUDED.stream_seq), updated_at = now()
RETURNING stream_seq"""

ADVANCE_OFFSET: Final = _ADVANCE.format(name="$1", seq="$2")
"""Move a projection's offset forward (never back); answers the offset it holds then."""


@dataclass(frozen=True, slots=True)
class Table:
    """How a batch of records goes into one table."""

    name: str
    fields: tuple[tuple[str, str], ...]
    """(record field, SQL type it travels as), in record order: `numeric` fields travel as text."""
    columns: str
    """The table's columns the insert fills."""
    select: str
    """The values for `columns`, computed from the batch's fields (`batch.<field>`)."""
    numeric: frozenset[str]
    """Record fields sent as decimal text and cast to numeric by the insert."""
    returning: str = "1"
    """What the insert returns of each row it added, for the steps that follow it."""
    followers: tuple[str, ...] = ()
    """More `name AS (statement)` steps run on the rows actually inserted (CTE `inserted`)."""

    @property
    def width(self) -> int:
        return len(self.fields)

    @property
    def stage(self) -> str:
        """The temporary table a COPY fills, one per connection, emptied at each commit."""
        return f"{self.name}_stage"

    @property
    def create_stage(self) -> str:
        fields = ", ".join(f"{name} {kind}" for name, kind in self.fields)
        return f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} ({fields}) ON COMMIT DELETE ROWS"

    def insert(self, *, staged: bool) -> str:
        """`INSERT ... ON CONFLICT DO NOTHING` from the staging table, or from `unnest($1..$width)`."""
        names = ", ".join(name for name, _ in self.fields)
        if staged:
            source = f"{self.stage} AS batch"
        else:
            arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(self.fields, start=1))
            source = f"unnest({arrays}) AS batch ({names})"
        return f"INSERT INTO {self.name} ({self.columns})\nSELECT {self.select}\nFROM {source}\nON CONFLICT DO NOTHING"

    def statement(self, *, offset: bool, staged: bool = False) -> str:
        """The whole batch as one statement answering `added` (and, with `offset`, `applied_seq`).

        Parameters: unless `staged`, $1..$width are the field arrays; with `offset` the next two are the
        projection's name and the batch's last stream sequence.
        """
        steps = [f"inserted AS ({self.insert(staged=staged)}\nRETURNING {self.returning})", *self.followers]
        answer = "(SELECT count(*) FROM inserted) AS added"
        if offset:
            first = 1 if staged else self.width + 1
            steps.append(f"advanced AS ({_ADVANCE.format(name=f'${first}', seq=f'${first + 1}')})")
            answer += ", (SELECT stream_seq FROM advanced) AS applied_seq"
        return "WITH " + ",\n".join(steps) + "\nSELECT " + answer


TICKS: Final = Table(
    name="ticks",
    fields=(
        *((name, "text") for name in ("id", "source", "symbol", "base", "quote")),
        *((name, "text") for name in ("price", "bid", "ask", "volume_24h", "open_24h")),
        ("ts_exchange_ns", "bigint"),
        ("ts_received_ns", "bigint"),
        ("stream_seq", "bigint"),
    ),
    columns="""id, source, symbol, base, quote, price, bid, ask, volume_24h, open_24h,
            ts_exchange, ts_received, ts_exchange_ns, ts_received_ns, stream_seq""",
    select=f"""id, source, symbol, base, quote,
       price::numeric, bid::numeric, ask::numeric, volume_24h::numeric, open_24h::numeric,
       {_timestamptz("ts_exchange_ns")}, {_timestamptz("ts_received_ns")},
       ts_exchange_ns, ts_received_ns, stream_seq""",
    numeric=frozenset({"price", "bid", "ask", "volume_24h", "open_24h"}),
)

_PRICE_FIELDS: Final = (
    ("asset", "text"),
    ("seq", "bigint"),
    ("price", "text"),
    ("currency", "text"),
    ("confidence", "text"),
    ("status", "text"),
    ("n_sources", "int"),
    ("n_used", "int"),
    ("sources", "text"),
    ("volume_24h", "text"),
    ("change_24h", "text"),
    ("change_pct_24h", "text"),
    ("ts_ns", "bigint"),
    ("ts_tick_ns", "bigint"),
    ("stream_seq", "bigint"),
    ("method", "text"),
    ("cv_pct", "text"),
    ("anomaly", "boolean"),
    ("z_score", "text"),
)
_PRICE_COLUMNS: Final = """asset, seq, price, currency, confidence, status, n_sources, n_used, sources,
            volume_24h, change_24h, change_pct_24h, ts, ts_ns, ts_tick_ns, stream_seq,
            method, cv_pct, anomaly, z_score"""
_PRICE_SELECT: Final = f"""asset, seq, price::numeric, currency, confidence::numeric, status, n_sources, n_used,
       sources::jsonb, volume_24h::numeric, change_24h::numeric, change_pct_24h::numeric,
       {_timestamptz("ts_ns")}, ts_ns, ts_tick_ns, stream_seq, method, cv_pct::numeric, anomaly, z_score::numeric"""
_PRICE_NUMERIC: Final = frozenset(
    {"price", "confidence", "volume_24h", "change_24h", "change_pct_24h", "cv_pct", "z_score"}
)

PRICES: Final = Table(
    name="prices",
    fields=_PRICE_FIELDS,
    columns=_PRICE_COLUMNS,
    select=_PRICE_SELECT,
    numeric=_PRICE_NUMERIC,
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
    fields=_PRICE_FIELDS,
    columns=_PRICE_COLUMNS,
    select=_PRICE_SELECT,
    numeric=_PRICE_NUMERIC,
    returning="asset, seq, price, volume_24h, ts, ts_ns, status",
    followers=(_candle_upsert("candles_1m", "1 minute"), _candle_upsert("candles_1h", "1 hour")),
)
"""Prices and, in the same statement, the candles they fall into: on plain PostgreSQL."""
