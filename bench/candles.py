"""Measure how fast candles come back from PostgreSQL and print one JSON line.

Fills a fresh database the way the cache_writer does (prices with their candles, in batches with
their offsets): `--days` days of consensus prices for `--assets` assets at `--rate` prices per second
each. Then asks `candles()` for one asset's last day, `--queries` times per interval, and reports
the latency of each interval in ms (p50, p99, max), plus the write rate of prices with candles.
Servers: DATABASE_URL when set, else an embedded PostgreSQL in a temporary directory.

    python bench/candles.py --days 2 --assets 5 --rate 1 --queries 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from pricewire_cache_writer.candles import INTERVALS, MAX_LIMIT, candles
from pricewire_cache_writer.db_projection import PRICES_AND_CANDLES, Offset, write_rows
from pricewire_cache_writer.migrate import apply_migrations
from pricewire_cache_writer.records import PriceRecord
from pricewire_cli.embedded import PostgresServer, ensure_database
from pricewire_common.logs import configure_logging

ASSETS = ("BTC", "ETH", "SOL", "ADA", "DOT", "XRP", "LTC", "AVAX")
START = datetime(2026, 11, 1, tzinfo=UTC)
BATCH = 500
SOURCES_JSON = (
    '[{"source":"sim-a","symbol":"BTC-USDT","price":"1","deviation_pct":"0","age_ms":1,"outlier":false,'
    '"reason":null,"weight":"1","kind":"stream"}]'
)


def price_records(days: int, assets: int, rate: float, *, seed: int = 1) -> Iterator[PriceRecord]:
    """Consensus prices as the cache_writer stores them: a random walk per asset, `rate` per second each."""
    rng = random.Random(seed)
    step_ns = round(1e9 / rate)
    start_ns = int(START.timestamp()) * 10**9
    levels = {a: Decimal(rng.randint(1, 70_000)) for a in ASSETS[:assets]}
    seqs = dict.fromkeys(levels, 0)
    stream_seq = 0
    for ts_ns in range(start_ns, start_ns + days * 86_400 * 10**9, step_ns):
        for asset, level in levels.items():
            price = max(Decimal("0.01"), level + Decimal(rng.randint(-100, 100)) / 100)
            levels[asset] = price
            seqs[asset] += 1
            stream_seq += 1
            yield PriceRecord(
                asset=asset,
                seq=seqs[asset],
                price=price,
                currency="USD",
                confidence=Decimal("0.50"),
                status="ok",
                n_sources=3,
                n_used=3,
                sources=SOURCES_JSON,
                volume_24h=Decimal(rng.randint(1_000, 100_000)),
                change_24h=None,
                change_pct_24h=None,
                ts_ns=ts_ns + rng.randrange(step_ns),
                ts_tick_ns=ts_ns,
                stream_seq=stream_seq,
            )


async def fill(conn: asyncpg.Connection, records: list[PriceRecord]) -> float:
    """Write the prices (and so their candles) in the service's batches; returns rows per second."""
    t0 = time.perf_counter()
    for i in range(0, len(records), BATCH):
        chunk = records[i : i + BATCH]
        await write_rows(conn, PRICES_AND_CANDLES, chunk, Offset("cache-db-prices", chunk[-1].stream_seq))
    return len(records) / (time.perf_counter() - t0)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latencies(conn: asyncpg.Connection, days: int, queries: int) -> dict[str, dict[str, float]]:
    """Per interval: ms to read the last day of one asset's candles, `queries` times."""
    end = START + timedelta(days=days)
    start = end - timedelta(days=1)
    result = {}
    for interval in INTERVALS:
        samples = []
        got = 0
        for _ in range(queries):
            t0 = time.perf_counter()
            got = len(await candles(conn, "BTC", interval, start=start, end=end, limit=MAX_LIMIT))
            samples.append((time.perf_counter() - t0) * 1000)
        result[interval] = {
            "candles": got,
            "p50_ms": round(statistics.median(samples), 2),
            "p99_ms": round(percentile(samples, 0.99), 2),
            "max_ms": round(max(samples), 2),
        }
    return result


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    server_url = os.environ.get("DATABASE_URL", "").strip()
    embedded = None
    if not server_url:
        embedded = PostgresServer(workdir / "postgres")
        embedded.start()
        server_url = embedded.url
    name = f"bench_candles_{secrets.token_hex(4)}"
    try:
        records = list(price_records(args.days, args.assets, args.rate))
        url = await ensure_database(server_url, name)
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn)
            write_rate = await fill(conn, records)
            stored = await conn.fetchval("SELECT count(*) FROM candles_1m")
            result = await latencies(conn, args.days, args.queries)
        finally:
            await conn.close()
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')  # our own generated name
        finally:
            await admin.close()
    finally:
        if embedded is not None:
            embedded.stop()
    return {
        "prices": len(records),
        "candles_1m_rows": stored,
        "prices_with_candles_rows_per_s": round(write_rate),
        "queries": args.queries,
        "latency_last_day": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=2, help="days of prices stored")
    parser.add_argument("--assets", type=int, default=5, choices=range(1, len(ASSETS) + 1), help="assets priced")
    parser.add_argument("--rate", type=float, default=1.0, help="consensus prices per second per asset")
    parser.add_argument("--queries", type=int, default=300, help="queries per interval")
    args = parser.parse_args()
    configure_logging(level="warning", fmt="json")  # to stderr: stdout carries only the result
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
