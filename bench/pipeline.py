"""Drive the whole pipeline at a given tick rate, with `--clients` WebSocket clients, and print JSON.

Each service runs as its own process (as in production) against real NATS, Redis and PostgreSQL:
the URLs from the environment, else embedded servers in a temporary directory. Every client joins the
`prices` room and counts its `price_update` frames; the first LATENCY_CLIENTS of them also time each one
from the receipt of the newest tick behind it (`ts_tick`, stamped by the collector) to its arrival: the
end-to-end latency. With `--interval`, each interval of the run is reported on its own (ticks/s, latency
p50/p99/max, every service's resident memory), so a long run shows drift. At the end, once the collector
has stopped (flushing what it had) and the cache_writer has caught up, the counts of the analyses of
message systems: `acknowledged` is what JetStream acknowledged to the collector (its publisher's own tally,
logged as it stops), `lost` the tick ids in stream TICKS missing from PostgreSQL plus the acknowledged
ticks missing from TICKS, `duplicated` the tick ids more than once in TICKS or in PostgreSQL; and each
service's memory growth against `--max-rss-growth-mib`.

    python bench/pipeline.py --rate 500 --duration 20
    python bench/pipeline.py --rate 500 --clients 500 --duration 600 --interval 60    # the soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import msgspec

from pricewire_cli.embedded import free_port
from pricewire_cli.stack import embedded_servers, settings_for
from pricewire_common import events, subjects
from pricewire_common.bus import connect
from pricewire_common.config import Settings

SERVICES = ("pricewire_cache_writer", "pricewire_validator", "pricewire_gateway", "pricewire_collector")


class _Data(msgspec.Struct):
    ts_tick: int


class _Frame(msgspec.Struct):
    type: str
    data: _Data | None = None


_DECODE = msgspec.json.Decoder(_Frame)


LATENCY_CLIENTS = 10
CATCH_UP_S = 120.0


@dataclass
class Observed:
    latencies_ns: list[int] = field(default_factory=list)
    frames: int = 0
    """price_update frames received by every client together."""


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index] / 1e6


async def listen(session: aiohttp.ClientSession, url: str, observed: Observed, *, timed: bool) -> None:
    async with session.ws_connect(url) as ws:
        await ws.send_json({"type": "join_room", "room": "prices"})
        async for message in ws:
            now = time.time_ns()
            frame = _DECODE.decode(message.data)
            if frame.type == "price_update" and frame.data is not None:
                observed.frames += 1
                if timed:
                    observed.latencies_ns.append(now - frame.data.ts_tick)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def latency_ms(values: list[int]) -> dict[str, float | None]:
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values) / 1e6, 2) if values else None,
    }


async def stream_messages(settings: Settings, stream: str) -> int:
    nc = await connect(settings.nats_url, name="bench", auth=settings.nats_auth)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def consumer_lag(settings: Settings) -> dict[str, int]:
    """Messages each durable consumer has yet to be delivered: near zero when it keeps up."""
    nc = await connect(settings.nats_url, name="bench", auth=settings.nats_auth)
    try:
        js = nc.jetstream()
        lag = {}
        for stream, durable in (
            (subjects.TICKS_STREAM, "validator"),
            (subjects.TICKS_STREAM, "cache-db-ticks"),
            (subjects.PRICES_STREAM, "cache-redis"),
        ):
            info = await js.consumer_info(stream, durable)
            lag[durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return lag
    finally:
        await nc.close()


async def stored_ids(settings: Settings) -> Counter[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return Counter(row["id"] for row in await conn.fetch("SELECT id FROM ticks"))
    finally:
        await conn.close()


async def ids_in_log(settings: Settings) -> Counter[str]:
    """The tick id of every message in stream TICKS, counted."""
    nc = await connect(settings.nats_url, name="bench", auth=settings.nats_auth)
    try:
        js = nc.jetstream()
        expected = (await js.stream_info(subjects.TICKS_STREAM)).state.messages
        sub = await js.pull_subscribe(subjects.ALL_TICKS, stream=subjects.TICKS_STREAM)
        ids: Counter[str] = Counter()
        while sum(ids.values()) < expected:
            for msg in await sub.fetch(1000, timeout=5):
                ids[events.decode_tick(msg.data).id] += 1
                await msg.ack()
        await sub.unsubscribe()
        return ids
    finally:
        await nc.close()


def start_services(env: dict[str, str], workdir: Path) -> dict[str, subprocess.Popen[bytes]]:
    processes = {}
    for module in SERVICES:
        log = (workdir / f"{module}.log").open("ab")
        # The collector logs at info: its `publisher_closed` line is the ledger of what JetStream acknowledged.
        own = {**env, "PRICEWIRE_LOG_LEVEL": "info"} if module == "pricewire_collector" else env
        processes[module] = subprocess.Popen([sys.executable, "-m", module], env=own, stdout=log, stderr=log)
    return processes


def acknowledged(workdir: Path) -> int | None:
    """How many ticks JetStream acknowledged to the collector, less duplicates (its last `publisher_closed`)."""
    closed = [
        json.loads(line)
        for line in (workdir / "pricewire_collector.log").read_text().splitlines()
        if '"publisher_closed"' in line
    ]
    return int(closed[-1]["published"]) - int(closed[-1]["duplicates"]) if closed else None


def stop_services(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in processes.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


async def wait_healthy(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


def memory(processes: dict[str, subprocess.Popen[bytes]]) -> dict[str, float]:
    return {module.removeprefix("pricewire_"): rss_mb(p.pid) for module, p in processes.items()}


@dataclass
class Run:
    """What the measured window saw."""

    intervals: list[dict[str, object]] = field(default_factory=list)
    worst_p99_ms: float | None = None
    elapsed_s: float = 0.0
    ticks: int = 0


async def measure(
    settings: Settings, observed: Observed, processes: dict[str, subprocess.Popen[bytes]], args: argparse.Namespace
) -> Run:
    """Run for `args.duration`, one report per `args.interval` (or one for the whole run)."""
    run = Run()
    every = args.interval or args.duration
    ticks_start = await stream_messages(settings, subjects.TICKS_STREAM)
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < args.duration - 1e-3:
        observed.latencies_ns.clear()
        frames_before = observed.frames
        ticks_before = await stream_messages(settings, subjects.TICKS_STREAM)
        step_t0 = time.monotonic()
        await asyncio.sleep(min(every, args.duration - elapsed))
        step = time.monotonic() - step_t0
        ticks = await stream_messages(settings, subjects.TICKS_STREAM)
        latency = latency_ms(list(observed.latencies_ns))
        p99 = latency["p99"]
        if p99 is not None and not math.isnan(p99):  # NaN: the interval had no prices
            run.worst_p99_ms = max(run.worst_p99_ms or 0.0, p99)
        run.intervals.append(
            {
                "t_s": round(time.monotonic() - t0, 1),
                "ticks_per_s": round((ticks - ticks_before) / step, 1),
                "frames_per_s": round((observed.frames - frames_before) / step, 1),
                "latency_ms": latency,
                "rss_mb": memory(processes),
            }
        )
    run.elapsed_s = time.monotonic() - t0
    run.ticks = await stream_messages(settings, subjects.TICKS_STREAM) - ticks_start
    return run


async def counts_after_catch_up(
    settings: Settings, collector: subprocess.Popen[bytes], workdir: Path
) -> dict[str, int | None]:
    """Stop the feed, let the cache_writer catch up, then count (see the module's docstring)."""
    collector.send_signal(signal.SIGTERM)
    collector.wait(timeout=20)
    in_log = await ids_in_log(settings)
    caught_up_by = time.monotonic() + CATCH_UP_S
    stored = await stored_ids(settings)
    while len(stored) < len(in_log) and time.monotonic() < caught_up_by:
        await asyncio.sleep(0.5)  # the bench's own catch-up window, polled
        stored = await stored_ids(settings)
    acked = acknowledged(workdir)
    duplicated = {i for i, n in in_log.items() if n > 1} | {i for i, n in stored.items() if n > 1}
    return {
        "acknowledged": acked,
        "ticks_in_log": sum(in_log.values()),
        "ticks_stored": sum(stored.values()),
        "lost": len(set(in_log) - set(stored)) + (0 if acked is None else max(0, acked - len(in_log))),
        "duplicated": len(duplicated),
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    with embedded_servers(workdir / "servers", os.environ) as servers:
        settings = await settings_for(Settings.from_env(), servers)
        port = free_port()
        env = {
            **os.environ,
            "NATS_URL": settings.nats_url,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "PRICEWIRE_SIM_RATE": str(args.rate),
            "PRICEWIRE_SIM_SEED": "1",
            # No quiet spells: the offered rate is then the target rate.
            "PRICEWIRE_SIM_QUIET_RATE": "0",
            "PRICEWIRE_GATEWAY_PORT": str(port),
            "PRICEWIRE_GATEWAY_HOST": "127.0.0.1",
            "PRICEWIRE_LOG_LEVEL": "warning",
            "PRICEWIRE_LOG_FORMAT": "json",
            "PRICEWIRE_METRICS_PORT": "0",
        }
        processes = start_services(env, workdir)
        listeners: list[asyncio.Task[None]] = []
        try:
            await wait_healthy(port)
            observed = Observed()
            url = f"http://127.0.0.1:{port}/ws"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                listeners = [
                    asyncio.create_task(listen(session, url, observed, timed=i < LATENCY_CLIENTS))
                    for i in range(args.clients)
                ]
                await asyncio.sleep(args.warmup)
                memory_start = memory(processes)
                run = await measure(settings, observed, processes, args)
                memory_end = memory(processes)
                growth = {name: round(memory_end[name] - memory_start[name], 1) for name in memory_end}
                lag = await consumer_lag(settings)
                for listener in listeners:
                    listener.cancel()
            counts = await counts_after_catch_up(settings, processes["pricewire_collector"], workdir)
        finally:
            for listener in listeners:
                listener.cancel()
            stop_services(processes)
    return {
        "rate_target": args.rate,
        "clients": args.clients,
        "duration_s": round(run.elapsed_s, 2),
        "ticks_per_s": round(run.ticks / run.elapsed_s, 1),
        "intervals": run.intervals,
        "latency_ms_p99_worst_interval": run.worst_p99_ms,
        "rss_mb_start": memory_start,
        "rss_mb_end": memory_end,
        "rss_growth_mb": growth,
        "max_rss_growth_mb": args.max_rss_growth_mib,
        "memory_within_bound": all(g <= args.max_rss_growth_mib for g in growth.values()),
        "consumer_pending_at_end": lag,
        **counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="sim ticks per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--clients", type=int, default=1, help="WebSocket clients in the prices room")
    parser.add_argument("--interval", type=float, default=0.0, help="report every this many seconds (0: once)")
    parser.add_argument(
        "--max-rss-growth-mib", type=float, default=32.0, help="the memory each service may gain from start to end"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
