"""`--feed live` end to end: five fake venues speaking their real protocols, the whole stack, one consensus."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from pricewire_cli.embedded import free_port
from pricewire_cli.stack import run_stack
from pricewire_common import subjects
from pricewire_common.bus import connect
from pricewire_common.clock import ns_from_rfc3339
from pricewire_common.config import Settings
from pricewire_common.events import Tick, decode_dead_letter, decode_tick
from tests.counting import duplicated, lost
from tests.fakes import coinbase, kraken
from tests.fakes.binance import FakeBinance, Plan
from tests.fakes.ccxt_venue import FakeBitstamp, market
from tests.fakes.ccxt_venue import ticker as bitstamp_ticker
from tests.fakes.coingecko import Answer, FakeCoinGecko, rate_limited, simple_price_body
from tests.fakes.script import Drop, Pause, Send, Step
from tests.pipeline import running
from tests.projections import events_in_log, stored_messages
from tests.reliability import Outcome, record
from tests.waiting import eventually

pytestmark = pytest.mark.slow

LIVE_SOURCES = {"binance", "coinbase", "kraken", "coingecko", "bitstamp"}
SKEW_S = 600.0
KRAKEN_FLOOD = 3000
AGAIN_S = 15.0
"""The stated time from the stalled venue's new connection to a consensus of all five venues."""
EXACT = msgspec.json.Decoder(float_hook=Decimal)


def coinbase_script(n: int, *, clock_s: float | None = None) -> list[Step]:
    """`n` tickers 0.2 s apart; with `clock_s`, each stamped by a venue clock that starts there."""
    steps: list[Step] = []
    for i in range(n):
        price = f"{60005 + i % 3}.00"
        frame = (
            coinbase.ticker("BTC-USD", 1000 + i, price)
            if clock_s is None
            else coinbase.ticker("BTC-USD", 1000 + i, price, time=iso_utc(clock_s + i * 0.2))
        )
        steps += [Send(frame), Pause(0.2)]
    return steps


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kraken_script(n: int) -> list[Step]:
    steps: list[Step] = [Send(kraken.ticker("BTC/USD", "60003.0", kind="snapshot"))]
    for i in range(n):
        steps += [Pause(0.2), Send(kraken.ticker("BTC/USD", f"{60003 + i % 2}.0"))]
    return steps


@dataclass(frozen=True)
class Venues:
    """The fake venues a stack reads, and what a test needs to know of them."""

    env: dict[str, str]
    """The environment that points Pricewire at them."""
    binance: FakeBinance
    flood: tuple[str, ...]
    """With `hostile`, the venue timestamp of each of Kraken's KRAKEN_FLOOD flood updates, in the order sent."""


@asynccontextmanager
async def five_venues(*, faults: bool = False, hostile: bool = False) -> AsyncIterator[dict[str, str]]:
    """`venues`, yielding only the environment."""
    async with venues(faults=faults, hostile=hostile) as running:
        yield running.env


@asynccontextmanager
async def venues(*, faults: bool = False, hostile: bool = False) -> AsyncIterator[Venues]:
    """Binance, Coinbase, Kraken, CoinGecko and Bitstamp (through ccxt), all quoting BTC near 60,000 USD;
    yields the environment that points Pricewire at them. With `faults`, each venue first misbehaves:
    Binance drops its first connection, Coinbase and Kraken send garbage and drop theirs, CoinGecko and
    Bitstamp answer their first request with 429 and a Retry-After. With `hostile`: Binance's first
    connection stalls (open, pinging, silent), Coinbase's clock runs 10 minutes ahead, and Kraken opens
    with a flood of KRAKEN_FLOOD updates sent back to back. Yields them and the environment that points Pricewire
    at them."""
    now_s = int(time.time())
    async with AsyncExitStack() as venues:
        binance = await venues.enter_async_context(
            FakeBinance(
                symbols=("BTCUSDT",),
                plans=[Plan(drop_after=10)] if faults else [Plan(silent=True)] if hostile else [],
                ping_s=0.5,
            )
        )
        cb_first: list[Step] = [Send("{not json"), Send(coinbase.ticker("BTC-USD", 1, "60005.00")), Pause(0.3), Drop()]
        cb_clock = time.time() + (SKEW_S if hostile else 0)
        cb = await venues.enter_async_context(
            coinbase.FakeCoinbase(
                [cb_first, coinbase_script(300)]
                if faults
                else [coinbase_script(300, clock_s=cb_clock if hostile else None)]
            )
        )
        kr_first: list[Step] = [Send(kraken.ticker("BTC/USD", "60003.0", kind="snapshot")), Send("[1,2"), Drop()]
        kr_flood: list[Step] = [Send(kraken.ticker("BTC/USD", "60003.0", kind="snapshot"))]
        flood_at = time.time()  # each update its own venue time, so each is a tick of its own (ids carry it)
        flood = tuple(iso_utc(flood_at + i * 1e-5) for i in range(KRAKEN_FLOOD))
        kr_flood += [Send(kraken.ticker("BTC/USD", f"{60003 + i % 2}.0", timestamp=t)) for i, t in enumerate(flood)]
        for i in range(300):  # then the usual pace, on the venue's clock after the flood
            kr_flood += [
                Pause(0.2),
                Send(kraken.ticker("BTC/USD", f"{60003 + i % 2}.0", timestamp=iso_utc(flood_at + 1 + i))),
            ]
        kr_scripts = [kr_first, kraken_script(300)] if faults else [kr_flood] if hostile else None
        kr = await venues.enter_async_context(kraken.FakeKraken(kr_scripts or [kraken_script(300)]))
        gecko_body = simple_price_body(
            {"bitcoin": {"usd": "60004", "usd_24h_vol": "30000000000", "usd_24h_change": "1.5",
                         "last_updated_at": now_s}}
        )  # fmt: skip
        gecko = await venues.enter_async_context(
            FakeCoinGecko(default=Answer(gecko_body), script=[rate_limited("1")] if faults else None)
        )
        quote = bitstamp_ticker(
            "BTC/USD", last="60006.00", bid="60005.50", ask="60006.50", volume="1200.5", open_="59100.00",
            timestamp=str(now_s),
        )  # fmt: skip
        bitstamp = await venues.enter_async_context(FakeBitstamp(markets=[market("BTC", "USD")], tickers=[quote]))
        if faults:
            bitstamp.ticker_errors.append(429)
            bitstamp.retry_after = "1"
        env = {
            "PRICEWIRE_BACKOFF_INITIAL_S": "0.05",
            "PRICEWIRE_BACKOFF_MAX_S": "0.3",
            "PRICEWIRE_BINANCE_WS_URL": binance.ws_url,
            "PRICEWIRE_BINANCE_REST_URL": binance.rest_url,
            "PRICEWIRE_COINBASE_WS_URL": cb.url,
            "PRICEWIRE_KRAKEN_WS_URL": kr.url,
            "PRICEWIRE_COINGECKO_REST_URL": gecko.url,
            "PRICEWIRE_CCXT_API_URL": bitstamp.url,
            "PRICEWIRE_CCXT_EXCHANGES": "bitstamp",
            "PRICEWIRE_COINGECKO_POLL_S": "0.5",
            "PRICEWIRE_CCXT_POLL_S": "0.5",
            "PRICEWIRE_ASSETS": "BTC",
        }
        yield Venues(env=env, binance=binance, flood=flood if hostile else ())


def check_consensus(data: dict[str, Any]) -> None:
    assert data["status"] == "ok"
    assert {s["source"] for s in data["sources"] if s["reason"] is None} == LIVE_SOURCES
    assert Decimal(60000) < data["price"] < Decimal(60020)
    # Every venue quotes in USD or a stablecoin, each with its own digits.
    assert {s["symbol"] for s in data["sources"]} == {"BTC-USDT", "BTC-USD"}


@dataclass
class Seen:
    """What a client of the stack saw: the first consensus with every venue admitted, and /api/v1/sources."""

    consensus: dict[str, Any]
    sources: list[dict[str, Any]]
    at: float
    """When that consensus reached the client (event loop time, as the fakes' connection records)."""


@asynccontextmanager
async def live_stack(settings: Settings, env: dict[str, str], *, timeout: float) -> AsyncIterator[Seen]:
    """The whole stack on `env`'s venues; yields once a consensus admits every venue (the stack still runs)."""
    venue_settings = Settings.from_env(env)
    stack_settings = replace(
        settings,
        feed="live",
        assets=venue_settings.assets,
        live=venue_settings.live,
        gateway=replace(settings.gateway, host="127.0.0.1", port=0),
    )
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with running(asyncio.create_task(run_stack(stack_settings, stop, bound=bound)), stop):
        port = await asyncio.wait_for(bound, timeout=20)
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await ws.send_json({"type": "subscribe", "symbol": "BTC"})
            data = await asyncio.wait_for(consensus_from_all(ws), timeout=timeout)
            at = asyncio.get_running_loop().time()
            async with http.get(f"http://127.0.0.1:{port}/api/v1/sources") as response:
                sources = EXACT.decode(await response.read())["sources"]
        yield Seen(data, sources, at)


@pytest.mark.parametrize("faults", [False, True], ids=["calm", "drops-garbage-429"])
async def test_live_feed_turns_five_venues_into_one_consensus(settings: Settings, faults: bool) -> None:
    async with five_venues(faults=faults) as env, live_stack(settings, env, timeout=30) as seen:
        rejected = await dead_letter_subjects(settings)

    check_consensus(seen.consensus)
    states = {s["source"]: s["state"] for s in seen.sources}
    assert {name: states.get(name) for name in LIVE_SOURCES} == dict.fromkeys(LIVE_SOURCES, "connected")
    if faults:
        # The garbage was dead-lettered with its venue, and the dropped streams came back by themselves.
        assert {"venue.coinbase", "venue.kraken"} <= rejected
        reconnects = {s["source"]: s["reconnects"] for s in seen.sources}
        assert all(reconnects[name] >= 1 for name in ("binance", "coinbase", "kraken")), reconnects


@pytest.mark.fault
async def test_a_stalled_a_flooding_and_a_skewed_venue_leave_the_consensus_whole(settings: Settings) -> None:
    """Counted as the rest of the campaign: every one of Kraken's KRAKEN_FLOOD flood updates is one tick in the
    log (by its venue timestamp, which its id carries), every tick JetStream acknowledged is in PostgreSQL once,
    and a consensus of all five venues comes within AGAIN_S of the stalled venue's new connection (the last
    of the faults to end; the skewed clock never does)."""
    async with (
        venues(hostile=True) as hostile,
        # Every venue counts: the stalled one is back, the flood is through, the skewed clock is taken.
        live_stack(settings, {**hostile.env, "PRICEWIRE_WATCHDOG_S": "2"}, timeout=40) as seen,
    ):
        stored = await stored_ticks(settings)
        rejected = await dead_letter_subjects(settings)

    check_consensus(seen.consensus)
    reconnects = {s["source"]: s["reconnects"] for s in seen.sources}
    assert reconnects["binance"] >= 1  # the watchdog gave up on the silent stream
    again_s = seen.at - hostile.binance.connections[1].opened_at
    flood = Counter(ns_from_rfc3339(stamp) for stamp in hostile.flood)
    flood_ticks = Counter(t.ts_exchange for t in stored.in_log if t.source == "kraken" and t.ts_exchange in flood)
    acknowledged = {t.id for t in stored.in_log}
    missing = lost(acknowledged, stored.in_postgres)
    twice = duplicated(Counter(t.id for t in stored.in_log), stored.in_postgres)
    record(
        Outcome(
            scenario="venue stalled, flooding, skewed",
            load=f"5 live venues, 1 asset; a flood of {KRAKEN_FLOOD:,} updates back to back",
            fault="Binance's first stream open but silent (watchdog 2 s), Kraken's flood, Coinbase's clock "
            f"{SKEW_S / 60:.0f} min ahead; consensus again counted from Binance's new connection",
            acknowledged=len(acknowledged),
            lost=len(missing) + (KRAKEN_FLOOD - sum(flood_ticks.values())),
            duplicated=len(twice),
            recovery_s=again_s,
        )
    )
    assert len(flood) == KRAKEN_FLOOD  # each flood update has a timestamp of its own...
    assert flood_ticks == flood  # ...and became exactly one tick: none dropped, none doubled, none of the paced
    assert missing == set(), f"{len(missing)} acknowledged ticks not in PostgreSQL"
    assert twice == set()
    assert not rejected  # none of it was garbage: nothing dead-lettered
    coinbase_quote = next(s for s in seen.consensus["sources"] if s["source"] == "coinbase")
    assert coinbase_quote["reason"] is None  # its freshness is our receive time, not its clock
    assert 0 < again_s <= AGAIN_S


@dataclass(frozen=True)
class Stored:
    """Stream TICKS up to a sequence, and the tick ids PostgreSQL holds once it has projected that far."""

    in_log: list[Tick]
    in_postgres: Counter[str]


async def stored_ticks(settings: Settings) -> Stored:
    """The log's ticks as they stand now, once the running cache_writer has acknowledged them all."""
    nc = await connect(settings.nats_url, name="live-check")
    try:
        js = nc.jetstream()
        last = (await js.stream_info(subjects.TICKS_STREAM)).state.last_seq

        async def ack_floor() -> int:
            info = await js.consumer_info(subjects.TICKS_STREAM, "cache-db-ticks")
            return 0 if info.ack_floor is None else int(info.ack_floor.stream_seq)

        # The stack runs on: it is caught up to `last`, not idle.
        await eventually(ack_floor, lambda floor: floor >= last, timeout=30, what="PostgreSQL caught up")
        in_log = [tick for seq, tick in await events_in_log(js, subjects.TICKS_STREAM, decode_tick) if seq <= last]
    finally:
        await nc.close()
    conn = await asyncpg.connect(settings.database_url)
    try:
        in_postgres = Counter(str(row["id"]) for row in await conn.fetch("SELECT id FROM ticks"))
    finally:
        await conn.close()
    return Stored(in_log=in_log, in_postgres=in_postgres)


async def dead_letter_subjects(settings: Settings) -> set[str]:
    """The `subject` of every dead letter the collector wrote."""
    nc = await connect(settings.nats_url, name="live-check")
    try:
        js = nc.jetstream()
        letters = await stored_messages(js, subjects.DLQ_STREAM)
        return {decode_dead_letter(m.data or b"").subject for m in letters if m.subject == "md.dlq.collector"}
    finally:
        await nc.close()


async def test_pricewire_up_feed_live_reads_the_venue_urls_from_the_environment(tmp_path: Path) -> None:
    async with five_venues() as venue_env:
        env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "REDIS_URL", "DATABASE_URL"}}
        env.update(venue_env, PRICEWIRE_LOG_FORMAT="json")
        port = free_port()
        with (tmp_path / "up.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pricewire_cli", "up", "--feed", "live", "--port", str(port),
                "--data-dir", str(tmp_path / "data"), env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        try:
            assert process.stdout is not None
            await asyncio.wait_for(process.stdout.readline(), timeout=60)

            async def btc() -> dict[str, Any]:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/api/v1/prices/BTC") as r:
                    return dict(EXACT.decode(await r.read())) if r.status == 200 else {}

            def from_all(data: dict[str, Any]) -> bool:
                used = {s["source"] for s in data.get("sources", ()) if s["reason"] is None}
                return used == LIVE_SOURCES

            data = await eventually(btc, from_all, timeout=60, what="a consensus of all five venues")
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(process.wait(), timeout=60)
    check_consensus(data)
    assert code == 0


async def consensus_from_all(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The first BTC consensus that used a quote of every live venue."""
    while True:
        message = await ws.receive()
        assert message.type is aiohttp.WSMsgType.TEXT, (message, ws.close_code, ws.exception())
        frame = EXACT.decode(message.data)
        if frame["type"] != "price_update":
            continue
        data = frame["data"]
        if {s["source"] for s in data["sources"] if s["reason"] is None} >= LIVE_SOURCES:
            return dict(data)
