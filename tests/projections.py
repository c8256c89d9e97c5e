"""What the log says the projections should hold, and what they hold: for tests that compare the two."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import redis.asyncio as redis_asyncio
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from pricewire_common import subjects
from pricewire_common.clock import NS_PER_S
from pricewire_common.events import Price, decode_price

T = TypeVar("T")

TABLES = ("ticks", "prices", "candles_1m", "candles_1h", "projection_offsets")
"""The PostgreSQL projection's tables, compared row for row."""
REDIS_PATTERNS = ("price:*", "projection:*:seq")
"""The Redis projection's keys (`projection:status` is the live writer's report, not projected data)."""


async def events_in_log(js: JetStreamContext, stream: str, decode: Callable[[bytes], T]) -> list[tuple[int, T]]:
    """(stream sequence, event) of every message `stream` holds, in stream order."""
    info = await js.stream_info(stream)
    expected = info.state.messages
    sub = await js.pull_subscribe(">", stream=stream)
    events: list[tuple[int, T]] = []
    try:
        while len(events) < expected:
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except NatsTimeoutError:
                break
            for msg in msgs:
                events.append((int(msg.metadata.sequence.stream), decode(msg.data)))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return events


async def stored_messages(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    """Every message `stream` holds, read by sequence (an empty stream reports first_seq 0: nothing to read)."""
    state = (await js.stream_info(stream)).state
    if state.messages == 0:
        return []
    return [await js.get_msg(stream, seq) for seq in range(state.first_seq, state.last_seq + 1)]


async def prices_in_log(js: JetStreamContext) -> list[Price]:
    return [price for _, price in await events_in_log(js, subjects.PRICES_STREAM, decode_price)]


def last_consensus(prices: list[Price]) -> dict[str, Price]:
    """The newest event (highest seq) per asset: what Redis must hold."""
    last: dict[str, Price] = {}
    for price in prices:
        if price.asset not in last or price.seq > last[price.asset].seq:
            last[price.asset] = price
    return last


def brute_minute_counts(prices: list[Price]) -> Counter[tuple[str, int]]:
    """Non-stale consensus prices per (asset, minute since the epoch): what candles_1m's `n` must say.

    The stored bucket comes from `ts` truncated to microseconds, which never crosses a minute boundary.
    """
    return Counter((p.asset, p.ts // (60 * NS_PER_S)) for p in prices if p.status != "stale")


async def stored_minute_counts(pg: asyncpg.Connection) -> Counter[tuple[str, int]]:
    rows = await pg.fetch("SELECT asset, extract(epoch FROM bucket)::bigint / 60 AS minute, n FROM candles_1m")
    return Counter({(r["asset"], r["minute"]): r["n"] for r in rows})


@dataclass(frozen=True, slots=True)
class RedisState:
    values: dict[str, str]
    """Every projected key's value."""
    expiries_ms: dict[str, int]
    """Unix time in ms at which each key with a TTL expires (measured, so to within a few ms)."""


async def redis_state(client: redis_asyncio.Redis) -> RedisState:
    """The Redis projection's keys: values and expiry times. `client` must decode responses."""
    keys = sorted({str(k) for pattern in REDIS_PATTERNS for k in await client.keys(pattern)})
    values: dict[str, str] = {}
    expiries: dict[str, int] = {}
    for key in keys:
        seconds, micros = await client.time()  # the server's clock, the one its expiries run on
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        value, pttl = await client.get(key), await client.pttl(key)
        assert isinstance(value, str), key  # a key of the projection is a string, read decoded
        values[key] = value
        if pttl > 0:
            expiries[key] = now_ms + pttl
    return RedisState(values=values, expiries_ms=expiries)


async def table_rows(pg: asyncpg.Connection) -> dict[str, set[tuple[object, ...]]]:
    """Every row of every projected table, as sets (the order rows were written in does not matter).

    `projection_offsets.updated_at` is when a row was written, not what it says: left out.
    """
    rows: dict[str, set[tuple[object, ...]]] = {}
    for table in TABLES:
        columns = "projection, stream_seq" if table == "projection_offsets" else "*"
        rows[table] = {tuple(r.values()) for r in await pg.fetch(f"SELECT {columns} FROM {table}")}  # our names
    return rows
