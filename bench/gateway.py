"""How fast the gateway serves, as its own process on real NATS, Redis and PostgreSQL, and print one JSON line.

Two figures, each against a gateway and a cache_writer started for the run (NATS_URL, REDIS_URL and
DATABASE_URL when set, else embedded servers in a temporary directory):

- `rest`: `wrk` (Debian's package) asks `GET /api/v1/prices/BTC` over `--connections` keep-alive
  connections for `--rest-duration` seconds, with its own two threads; requests per second and the
  latency percentiles wrk measured. The price is in Redis first (published to PRICES, projected by the
  cache_writer), so every answer is a cache hit, as in a healthy deployment.
- `fanout`: `--clients` WebSocket clients (spread over `--client-processes` processes of this script, so the
  clients' own reading is not all on one core) each subscribe to every asset;
  then `--rate` consensus events per second (round robin over the assets) are published to JetStream for
  `--fanout-duration` seconds, each stamped `ts_tick` just before it is published. A client's latency for
  an update is its arrival minus that stamp: from consensus publish to client, through JetStream and the
  gateway. Also: updates each client received against updates sent (the gateway conflates a slow client's
  backlog to the latest per asset, so fewer is allowed, never more).

    python bench/gateway.py --clients 1000 --rate 20 --connections 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aiohttp
import msgspec

from pricewire_cli.embedded import free_port
from pricewire_cli.stack import embedded_servers, settings_for
from pricewire_common import events, subjects
from pricewire_common.bus import MSG_ID_HEADER, connect, ensure_streams
from pricewire_common.config import DEFAULT_ASSETS, Settings

SERVICES = ("pricewire_cache_writer", "pricewire_gateway")
START_TIMEOUT_S = 60.0
DRAIN_S = 3.0
"""After the last event, how long clients may still receive before counting."""


class _Data(msgspec.Struct):
    symbol: str
    ts_tick: int
    seq: int


class _Frame(msgspec.Struct):
    type: str
    data: _Data | None = None


_DECODE = msgspec.json.Decoder(_Frame)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] / 1e6


FIRST_MEASURED_SEQ = 1000
"""The fan-out's events start at this seq; the snapshot each client gets on subscribing is older."""


@dataclass
class Fanout:
    latencies_ns: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    """Updates per client."""


async def client(session: aiohttp.ClientSession, url: str, index: int, fanout: Fanout, ready: asyncio.Event) -> None:
    async with session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_json({"type": "subscribe", "symbols": list(DEFAULT_ASSETS)})
        ready.set()
        async for message in ws:
            now = time.time_ns()
            frame = _DECODE.decode(message.data)
            if frame.type == "price_update" and frame.data is not None and frame.data.seq >= FIRST_MEASURED_SEQ:
                fanout.received[index] += 1
                fanout.latencies_ns.append(now - frame.data.ts_tick)


async def client_worker(url: str, clients: int) -> None:
    """A process of `clients` clients (`--client-processes`): prints `ready`, then its counts when told to stop."""
    fanout = Fanout(received=[0] * clients)
    readies = [asyncio.Event() for _ in range(clients)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(client(session, url, i, fanout, readies[i])) for i in range(clients)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), timeout=START_TIMEOUT_S)
        print("ready", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
    print(json.dumps({"received": fanout.received, "latencies_ns": fanout.latencies_ns}), flush=True)


def price_event(asset: str, seq: int) -> events.Price:
    now = time.time_ns()
    return events.Price(
        asset=asset,
        price=Decimal("47000.50") + seq,
        confidence=Decimal("1.25"),
        status="ok",
        n_sources=3,
        n_used=3,
        sources=(),
        ts=now,
        ts_tick=now,
        seq=seq,
    )


async def publish_prices(settings: Settings, *, rate: float, duration: float, first_seq: int) -> int:
    """Publish `rate` events per second for `duration` seconds, round robin over the assets; how many."""
    nc = await connect(settings.nats_url, name="bench-gateway")
    js = nc.jetstream()
    sent = 0
    t0 = time.monotonic()
    try:
        while (elapsed := time.monotonic() - t0) < duration:
            due = int(elapsed * rate)
            while sent < due:
                asset = DEFAULT_ASSETS[sent % len(DEFAULT_ASSETS)]
                seq = first_seq + sent // len(DEFAULT_ASSETS)
                price = price_event(asset, seq)  # stamped now: the latency starts here
                await js.publish(
                    subjects.price(asset), events.encode(price), headers={MSG_ID_HEADER: f"price:{asset}:{seq}"}
                )
                sent += 1
            await asyncio.sleep(0.002)  # the pace of the load, not a wait for a state
    finally:
        await nc.close()
    return sent


async def bench_fanout(settings: Settings, port: int, args: argparse.Namespace) -> dict[str, object]:
    """The clients in `--client-processes` processes of their own, so their reading is not one core's work."""
    url = f"http://127.0.0.1:{port}/ws"
    share = [args.clients // args.client_processes + (i < args.clients % args.client_processes)
             for i in range(args.client_processes)]  # fmt: skip
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client-worker", url, "--clients", str(n), stdout=asyncio.subprocess.PIPE
        )
        for n in share
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), timeout=START_TIMEOUT_S)
            if line.strip() != b"ready":
                raise SystemExit("a client process did not start")
        await asyncio.sleep(1.0)  # the subscriptions' snapshots arrive before the measured events
        sent = await publish_prices(
            settings, rate=args.rate, duration=args.fanout_duration, first_seq=FIRST_MEASURED_SEQ
        )
        await asyncio.sleep(DRAIN_S)  # the last updates on their way to every socket
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
    received: list[int] = []
    latencies: list[int] = []
    for worker in workers:
        out, _ = await worker.communicate()
        counts = json.loads(out.splitlines()[-1])
        received += counts["received"]
        latencies += counts["latencies_ns"]
    return {
        "clients": args.clients,
        "client_processes": args.client_processes,
        "updates_sent": sent,
        "updates_per_client_min": min(received),
        "updates_per_client_max": max(received),
        "frames_received": sum(received),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies) / 1e6, 2) if latencies else None,
        },
    }


_WRK_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_WRK_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def bench_rest(port: int, args: argparse.Namespace) -> dict[str, object]:
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    out = subprocess.run(  # a fixed tool with our own arguments
        [
            wrk, "--latency", "-t2", f"-c{args.connections}", f"-d{args.rest_duration}s",
            f"http://127.0.0.1:{port}/api/v1/prices/BTC",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = _WRK_RATE.search(out)
    errors = _WRK_ERRORS.search(out)
    return {
        "connections": args.connections,
        "requests_per_s": round(float(rate.group(1))) if rate else None,
        "latency_ms": {q: round(float(v) * _UNITS_MS[u], 2) for q, v, u in _WRK_LATENCY.findall(out)},
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


async def wait_ready(port: int, processes: list[subprocess.Popen[bytes]]) -> None:
    """Until the gateway answers a cached BTC price (its own start, the projection's first write)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in processes):
                raise SystemExit("a service exited during start")
            try:
                async with session.get(f"http://127.0.0.1:{port}/api/v1/prices/BTC") as response:
                    if response.status == 200 and b'"stale":false' in await response.read():
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.2)
    raise SystemExit("the gateway did not serve a cached price in time")


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    with embedded_servers(workdir / "servers", os.environ) as servers:
        settings = await settings_for(Settings.from_env(), servers)
        nc = await connect(settings.nats_url, name="bench-gateway")
        await ensure_streams(nc.jetstream(), settings.streams)
        await nc.close()
        port = free_port()
        env = {
            **os.environ,
            "NATS_URL": settings.nats_url,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "PRICEWIRE_GATEWAY_PORT": str(port),
            "PRICEWIRE_GATEWAY_HOST": "127.0.0.1",
            "PRICEWIRE_LOG_LEVEL": "warning",
            "PRICEWIRE_LOG_FORMAT": "json",
            "PRICEWIRE_METRICS_PORT": "0",
        }
        processes = []
        for module in SERVICES:
            log = (workdir / f"{module}.log").open("ab")
            processes.append(subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=log))
        try:
            await publish_prices(settings, rate=50, duration=0.2, first_seq=1)  # one price per asset
            await wait_ready(port, processes)
            result: dict[str, object] = {}
            if args.rest_duration:
                result["rest"] = await asyncio.to_thread(bench_rest, port, args)
            if args.fanout_duration:
                result["fanout"] = await bench_fanout(settings, port, args)
            return result
        finally:
            for p in processes:
                p.send_signal(signal.SIGTERM)
            for p in processes:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64, help="wrk's keep-alive connections")
    parser.add_argument("--rest-duration", type=int, default=10, help="seconds of wrk (0: skip)")
    parser.add_argument("--clients", type=int, default=1000, help="WebSocket clients subscribed to every asset")
    parser.add_argument("--rate", type=float, default=20.0, help="consensus events per second during the fan-out")
    parser.add_argument("--fanout-duration", type=float, default=10.0, help="seconds of events (0: skip)")
    parser.add_argument("--client-processes", type=int, default=2, help="processes the clients are spread over")
    parser.add_argument("--client-worker", help=argparse.SUPPRESS)  # a client process: the gateway's /ws URL
    args = parser.parse_args()
    if args.client_worker:
        asyncio.run(client_worker(args.client_worker, args.clients))
        return
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
