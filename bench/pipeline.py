"""Drive the whole pipeline at a given tick rate and print JSON.

Each service runs as its own process (as in production) against real NATS, Redis and PostgreSQL:
the URLs from the environment, else embedded servers in a temporary directory. A WebSocket client
joins the `prices` room and times every `price_update` from the receipt of the newest tick behind it
(`ts_tick`, stamped by the collector) to its arrival at the client: the end-to-end latency.

    python bench/pipeline.py --rate 500 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import msgspec

from pricewire_cli.embedded import free_port
from pricewire_cli.stack import embedded_servers, settings_for
from pricewire_common import subjects
from pricewire_common.bus import connect
from pricewire_common.config import Settings

SERVICES = ("pricewire_cache_writer", "pricewire_validator", "pricewire_gateway", "pricewire_collector")


class _Data(msgspec.Struct):
    ts_tick: int


class _Frame(msgspec.Struct):
    type: str
    data: _Data | None = None


_DECODE = msgspec.json.Decoder(_Frame)


@dataclass
class Observed:
    latencies_ns: list[int] = field(default_factory=list)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index] / 1e6


async def listen(url: str, observed: Observed, started: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_json({"type": "join_room", "room": "prices"})
        started.set()
        async for message in ws:
            now = time.time_ns()
            frame = _DECODE.decode(message.data)
            if frame.type == "price_update" and frame.data is not None:
                observed.latencies_ns.append(now - frame.data.ts_tick)


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


async def bench(rate: float, duration: float, warmup: float, workdir: Path) -> dict[str, object]:
    with embedded_servers(workdir / "servers", os.environ) as servers:
        settings = await settings_for(Settings.from_env(), servers)
        port = free_port()
        env = {
            **os.environ,
            "NATS_URL": settings.nats_url,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "PRICEWIRE_SIM_RATE": str(rate),
            "PRICEWIRE_SIM_SEED": "1",
            # No quiet spells: the offered rate is then the target rate.
            "PRICEWIRE_SIM_QUIET_RATE": "0",
            "PRICEWIRE_GATEWAY_PORT": str(port),
            "PRICEWIRE_GATEWAY_HOST": "127.0.0.1",
            "PRICEWIRE_LOG_LEVEL": "warning",
            "PRICEWIRE_LOG_FORMAT": "json",
        }
        processes = []
        for module in SERVICES:
            log = (workdir / f"{module}.log").open("ab")
            processes.append(subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log))
        try:
            observed = Observed()
            started = asyncio.Event()
            url = f"http://127.0.0.1:{port}/ws"
            listener = None
            deadline = time.monotonic() + 30
            while listener is None:
                try:
                    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                        if r.status == 200:
                            listener = asyncio.create_task(listen(url, observed, started))
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            await started.wait()
            await asyncio.sleep(warmup)
            observed.latencies_ns.clear()
            ticks_before = await stream_messages(settings, subjects.TICKS_STREAM)
            t0 = time.monotonic()
            await asyncio.sleep(duration)
            elapsed = time.monotonic() - t0
            ticks_after = await stream_messages(settings, subjects.TICKS_STREAM)
            lag = await consumer_lag(settings)
            latencies = list(observed.latencies_ns)
            listener.cancel()
            pool = await asyncpg.connect(settings.database_url)
            stored = await pool.fetchval("SELECT count(*) FROM ticks")
            await pool.close()
        finally:
            for p in processes:
                p.send_signal(signal.SIGTERM)
            for p in processes:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        return {
            "rate_target": rate,
            "duration_s": round(elapsed, 2),
            "ticks_per_s": round((ticks_after - ticks_before) / elapsed, 1),
            "ticks_stored_total": stored,
            "ticks_published_total": ticks_after,
            "price_updates": len(latencies),
            "latency_ms_p50": round(percentile(latencies, 0.50), 2),
            "latency_ms_p99": round(percentile(latencies, 0.99), 2),
            "latency_ms_max": round(max(latencies) / 1e6, 2) if latencies else None,
            "consumer_pending_at_end": lag,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="sim ticks per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        result = asyncio.run(bench(args.rate, args.duration, args.warmup, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
