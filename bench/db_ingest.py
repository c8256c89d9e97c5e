"""Measure the PostgreSQL tick projection of the cache_writer and print one JSON line.

Figures from one run:

- `unnest_rows_per_s` and `copy_rows_per_s`: the two ways db_projection writes a batch into `ticks`
  with its `projection_offsets` row (one statement over `unnest` arrays, or COPY into a staging table
  then `INSERT ... SELECT`), `--rounds` times each, interleaved, each round on a fresh database;
- `rebuild`: `--rebuild-rows` ticks written into an empty database the way the service writes them
  (batches of `--batch`, each with its offset), timed whole and checked stored exactly once;
- `end_to_end_ticks_per_s`: the cache_writer service run in-process draining `--ticks` ticks already in
  the TICKS stream into `ticks` (NATS fetch, decode, write and acks);
- `log_rebuild`: `pricewire rebuild --projection all` (the same code, in-process) over `--log-ticks` ticks and
  `--log-prices` consensus prices stored in fresh TICKS and PRICES streams, into an empty database and
  Redis, timed whole and checked: every tick and price in PostgreSQL once, Redis's latest price per asset the
  log's. The streams are deleted first: with NATS_URL set that needs `--reset`.

Records are built before the clock starts. Servers: NATS_URL, REDIS_URL and DATABASE_URL when set, else
embedded ones in a temporary directory.

    python bench/db_ingest.py --rows 200000 --rounds 3 --rebuild-rows 1000000 --ticks 100000 --batch 500
    python bench/db_ingest.py --rows 0 --ticks 0 --log-ticks 1000000 --log-prices 20000
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
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import asyncpg
import redis.asyncio as redis_asyncio
from nats.js.errors import NotFoundError

from pricewire_cache_writer.db_projection import COPY_FROM, TICKS, Offset, write_rows
from pricewire_cache_writer.migrate import apply_migrations
from pricewire_cache_writer.records import TickRecord, tick_record
from pricewire_cache_writer.replay import rebuild
from pricewire_cache_writer.service import run
from pricewire_cli.embedded import ensure_database
from pricewire_cli.stack import embedded_servers, settings_for
from pricewire_common import events, keys, subjects
from pricewire_common.bus import MSG_ID_HEADER, connect, ensure_streams
from pricewire_common.config import Settings
from pricewire_common.logs import configure_logging

VENUES = (("binance", "USDT"), ("coinbase", "USD"), ("kraken", "USD"))
# Start price and price step of each asset, as the venues quote them.
ASSETS = {"BTC": ("67000", "0.01"), "ETH": ("3500", "0.01"), "SOL": ("150", "0.001"), "ADA": ("0.45", "0.0001")}
POLL_S = 0.05
STOP_TIMEOUT_S = 30.0


def ticks(count: int, *, seed: int = 1) -> Iterator[events.Tick]:
    """Ticks like the collector's: random-walk prices at the venue's step, bid < price < ask, 24h figures."""
    rng = random.Random(seed)
    run_id = secrets.token_hex(6)  # ids unique across runs, so the stream's duplicate window keeps none
    prices = {asset: Decimal(start) for asset, (start, _) in ASSETS.items()}
    now_ns = time.time_ns()
    for seq in range(1, count + 1):
        asset = rng.choice(tuple(ASSETS))
        source, quote = rng.choice(VENUES)
        step = Decimal(ASSETS[asset][1])
        price = max(step, (prices[asset] * Decimal(1 + rng.gauss(0, 0.0005))).quantize(step))
        prices[asset] = price
        spread = step * rng.randint(1, 5)
        symbol = subjects.symbol(asset, quote)
        ts_received = now_ns + seq * 1_000_000
        yield events.Tick(
            id=f"{source}:{symbol}:{run_id}:{seq}",
            source=source,
            symbol=symbol,
            base=asset,
            quote=quote,
            price=price,
            bid=price - spread,
            ask=price + spread,
            volume_24h=Decimal(rng.uniform(1e3, 1e6)).quantize(Decimal("0.0001")),
            open_24h=Decimal(ASSETS[asset][0]),
            ts_exchange=ts_received - rng.randint(1_000_000, 40_000_000),
            ts_received=ts_received,
        )


async def drop_databases(server_url: str, names: list[str]) -> None:
    """Drop the benchmark's databases, so runs against a shared server leave nothing behind."""
    conn = await asyncpg.connect(server_url)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # our own generated names
    finally:
        await conn.close()


def tick_records(rows: int) -> list[TickRecord]:
    return [tick_record(t, stream_seq=seq) for seq, t in enumerate(ticks(rows, seed=2), start=1)]


async def timed_writes(database_url: str, records: list[TickRecord], batch: int, *, copy_from: int) -> float:
    """Seconds to write `records` in batches of `batch` into a fresh schema, each batch with its offset."""
    chunks = [records[i : i + batch] for i in range(0, len(records), batch)]
    conn = await asyncpg.connect(database_url)
    try:
        await apply_migrations(conn)
        t0 = time.perf_counter()
        for chunk in chunks:
            await write_rows(conn, TICKS, chunk, Offset("bench", chunk[-1].stream_seq), copy_from=copy_from)
        elapsed = time.perf_counter() - t0
        stored = await conn.fetchval("SELECT count(DISTINCT id) FROM ticks")
    finally:
        await conn.close()
    if stored != len(records):
        raise SystemExit(f"stored {stored} distinct ticks, expected {len(records)}")
    return elapsed


async def bench_methods(
    server_url: str, token: str, records: list[TickRecord], batch: int, rounds: int
) -> dict[str, list[int]]:
    """Rows per second of each write method, interleaved so a busy machine weighs on both alike."""
    rates: dict[str, list[int]] = {"unnest": [], "copy": []}
    for number in range(rounds):
        for method, copy_from in (("unnest", len(records) + 1), ("copy", 1)):
            name = f"bench_{method}_{token}_{number}"
            try:
                url = await ensure_database(server_url, name)
                elapsed = await timed_writes(url, records, batch, copy_from=copy_from)
            finally:
                await drop_databases(server_url, [name])
            rates[method].append(round(len(records) / elapsed))
    return rates


async def publish(settings: Settings, count: int) -> None:
    """Put `count` ticks into TICKS (async publishes, the client's bounded window); refuse a backlog."""
    nc = await connect(settings.nats_url, name="bench-db-ingest", auth=settings.nats_auth)
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)
        try:
            info = await js.consumer_info(subjects.TICKS_STREAM, "cache-db-ticks")
            backlog = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        except NotFoundError:  # a new durable starts at the beginning of the stream
            backlog = int((await js.stream_info(subjects.TICKS_STREAM)).state.messages)
        if backlog:
            raise SystemExit(f"cache-db-ticks has {backlog} ticks pending already: the count would be off")
        futures = [
            await js.publish_async(
                subjects.tick(t.source, t.base, t.quote), events.encode(t), headers={MSG_ID_HEADER: t.id}
            )
            for t in ticks(count)
        ]
        acks = await asyncio.gather(*futures)
        if duplicates := sum(1 for ack in acks if ack.duplicate):
            raise SystemExit(f"{duplicates} ticks were duplicates of earlier ones")
    finally:
        await nc.close()


async def count_ticks(conn: asyncpg.Connection) -> int:
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ticks"))
    except asyncpg.UndefinedTableError:  # the service has not applied its migrations yet
        return 0


async def bench_end_to_end(settings: Settings, count: int) -> tuple[float, bool]:
    """Ticks per second the cache_writer stores from a full TICKS stream; whether each went in once."""
    await publish(settings, count)
    stop = asyncio.Event()
    conn = await asyncpg.connect(settings.database_url)
    try:
        t0 = time.perf_counter()
        service = asyncio.create_task(run(settings, stop), name="cache_writer")
        while await count_ticks(conn) < count:
            if service.done():
                await service  # raises the service's error
                raise SystemExit("the cache_writer stopped before storing every tick")
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - t0
        stop.set()
        await asyncio.wait_for(service, timeout=STOP_TIMEOUT_S)
        row = await conn.fetchrow("SELECT count(*) AS n, count(DISTINCT id) AS distinct_ids FROM ticks")
    finally:
        stop.set()
        await conn.close()
    return count / elapsed, row is not None and row["n"] == row["distinct_ids"] == count


def consensus_prices(count: int, *, seed: int = 3) -> Iterator[events.Price]:
    """Consensus events as the validator publishes them: per asset a seq from 1, three venues' evidence each."""
    rng = random.Random(seed)
    seqs = dict.fromkeys(ASSETS, 0)
    prices = {asset: Decimal(start) for asset, (start, _) in ASSETS.items()}
    now_ns = time.time_ns()
    for n in range(1, count + 1):
        asset = rng.choice(tuple(ASSETS))
        seqs[asset] += 1
        step = Decimal(ASSETS[asset][1])
        price = prices[asset] = max(step, (prices[asset] * Decimal(1 + rng.gauss(0, 0.0005))).quantize(step))
        quotes = tuple(
            events.SourceQuote(
                source=source,
                symbol=subjects.symbol(asset, quote),
                price=price + step * rng.randint(-3, 3),
                deviation_pct=Decimal("0.0012"),
                age_ms=rng.randint(1, 900),
                outlier=False,
                weight=Decimal("0.3333"),
            )
            for source, quote in VENUES
        )
        ts = now_ns + n * 5_000_000
        yield events.Price(
            asset=asset,
            price=price,
            confidence=step * 2,
            status="ok",
            n_sources=3,
            n_used=3,
            sources=quotes,
            volume_24h=Decimal("12345.6789"),
            change_24h=price - Decimal(ASSETS[asset][0]),
            change_pct_24h=Decimal("0.1234"),
            ts=ts,
            ts_tick=ts - 2_000_000,
            seq=seqs[asset],
        )


async def fill_log(settings: Settings, tick_count: int, price_count: int, *, reset: bool) -> dict[str, events.Price]:
    """Fresh TICKS and PRICES holding the ticks and prices; the last price of each asset."""
    nc = await connect(settings.nats_url, name="bench-db-ingest", auth=settings.nats_auth)
    try:
        js = nc.jetstream()
        for stream in (subjects.TICKS_STREAM, subjects.PRICES_STREAM):
            try:
                info = await js.stream_info(stream)
            except NotFoundError:
                continue
            if info.state.messages and not reset:
                raise SystemExit(f"stream {stream} holds {info.state.messages} messages: rerun with --reset")
            await js.delete_stream(stream)
        await ensure_streams(js, settings.streams)
        last: dict[str, events.Price] = {}
        pending = []
        batches = (
            *((subjects.tick(t.source, t.base, t.quote), t.id, events.encode(t)) for t in ticks(tick_count, seed=4)),
            *(
                (subjects.price(p.asset), f"price:{p.asset}:{p.seq}", events.encode(p))
                for p in consensus_prices(price_count)
                if not last.update({p.asset: p})  # remember the last price of each asset on the way
            ),
        )
        for subject, msg_id, payload in batches:
            pending.append(await js.publish_async(subject, payload, headers={MSG_ID_HEADER: msg_id}))
        acks = await asyncio.gather(*pending)
        if duplicates := sum(1 for ack in acks if ack.duplicate):
            raise SystemExit(f"{duplicates} events were duplicates")
        return last
    finally:
        await nc.close()


async def bench_log_rebuild(settings: Settings, tick_count: int, price_count: int, *, reset: bool) -> dict[str, object]:
    """Time `pricewire rebuild --projection all` over a log of `tick_count` ticks and `price_count` prices."""
    last = await fill_log(settings, tick_count, price_count, reset=reset)
    summary = await rebuild(settings, projection="all", force=True)
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT count(*) AS n, count(DISTINCT id) AS distinct_ids FROM ticks")
        stored_prices = await conn.fetchval("SELECT count(*) FROM prices")
    finally:
        await conn.close()
    client = redis_asyncio.from_url(settings.redis_url)
    try:
        cached = {asset: await client.get(keys.seq_key(asset)) for asset in last}
    finally:
        await client.aclose()
    once = row is not None and row["n"] == row["distinct_ids"] == tick_count and stored_prices == price_count
    return {
        "ticks": tick_count,
        "prices": price_count,
        "seconds": round(summary.elapsed_s, 1),
        "events_per_s": round((tick_count + price_count) / summary.elapsed_s),
        "applied": summary.applied,
        "rejected": summary.rejected,
        "stored_exactly_once": once,
        "redis_is_last_price": all(
            value is not None and int(value) == last[asset].seq for asset, value in cached.items()
        ),
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    result: dict[str, object] = {"batch": args.batch, "rows": args.rows, "rounds": args.rounds}
    with embedded_servers(workdir / "servers", os.environ) as servers:
        base = await settings_for(Settings.from_env(), servers)
        settings = replace(base, cache=replace(base.cache, batch_size=args.batch))
        token = secrets.token_hex(4)  # fresh databases, so reruns and figures do not interfere
        if args.rows:
            rates = await bench_methods(settings.database_url, token, tick_records(args.rows), args.batch, args.rounds)
            result["unnest_rows_per_s"] = rates["unnest"]
            result["copy_rows_per_s"] = rates["copy"]
            result["faster"] = max(rates, key=lambda m: statistics.median(rates[m]))
        if args.rebuild_rows:
            records = tick_records(args.rebuild_rows)
            name = f"bench_rebuild_{token}"
            try:
                url = await ensure_database(settings.database_url, name)
                elapsed = await timed_writes(url, records, args.batch, copy_from=COPY_FROM)
            finally:
                await drop_databases(settings.database_url, [name])
            del records
            result["rebuild"] = {
                "rows": args.rebuild_rows,
                "seconds": round(elapsed, 1),
                "rows_per_s": round(args.rebuild_rows / elapsed),
                "stored_exactly_once": True,  # timed_writes checks it or exits
            }
        if args.ticks:
            name = f"bench_e2e_{token}"
            try:
                e2e_db = await ensure_database(settings.database_url, name)
                e2e_rate, once = await bench_end_to_end(replace(settings, database_url=e2e_db), args.ticks)
            finally:
                await drop_databases(settings.database_url, [name])
            result.update(end_to_end_ticks_per_s=round(e2e_rate), ticks=args.ticks, stored_exactly_once=once)
        if args.log_ticks or args.log_prices:
            name = f"bench_log_rebuild_{token}"
            try:
                log_db = await ensure_database(settings.database_url, name)
                result["log_rebuild"] = await bench_log_rebuild(
                    replace(settings, database_url=log_db), args.log_ticks, args.log_prices, reset=args.reset
                )
            finally:
                await drop_databases(settings.database_url, [name])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per round of each write method (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each write method")
    parser.add_argument("--rebuild-rows", type=int, default=0, help="ticks of the timed rebuild (0: skip)")
    parser.add_argument("--ticks", type=int, default=100_000, help="ticks through the service end to end (0: skip)")
    parser.add_argument("--batch", type=int, default=500, help="rows per write, and the service's batch size")
    parser.add_argument("--log-ticks", type=int, default=0, help="ticks in the log of the timed `rebuild` (0: skip)")
    parser.add_argument("--log-prices", type=int, default=0, help="consensus prices in that log")
    parser.add_argument("--reset", action="store_true", help="delete TICKS and PRICES on NATS_URL for the rebuild")
    args = parser.parse_args()
    configure_logging(level="warning", fmt="json")  # to stderr: stdout carries only the result
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
