"""What reading the log costs a consumer, per message, and print one JSON line per mode.

`--messages` seeded sim ticks are stored in a stream of their own, then a `PullReader` drains them through a
durable consumer and we count the reader's CPU per message:

- `read`: the messages only, through the client `bus.connect` makes (`direct.DirectClient`);
- `read-nats-py`: the same through a plain nats-py client (a callback subscription: its queue and task);
- `decode`: `read`, and each tick decoded;
- `ack`: `decode`, and each tick acked on its own (an explicit ack policy, as the validator did before).

NATS: `NATS_URL` when set, else an embedded server in a temporary directory.

    python bench/pull_reader.py --messages 200000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, PubAck, StreamConfig
from nats.js.errors import NotFoundError

from pricewire_cli.stack import embedded_servers
from pricewire_collector.sim import SimFeed
from pricewire_common import events, subjects
from pricewire_common.bus import MSG_ID_HEADER, connect
from pricewire_common.config import DEFAULT_ASSETS
from pricewire_common.consumer import PullReader
from pricewire_common.logs import configure_logging

STREAM = "BENCH_PULL_READER"
MODES = ("read", "read-nats-py", "decode", "ack")


async def fill(nc: NATS, count: int) -> None:
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(StreamConfig(name=STREAM, subjects=["bench.pull.>"]))
    feed = SimFeed(DEFAULT_ASSETS, venues=5, seed=1, outlier_probability=0.01, quiet_rate=0.0)
    futures: list[asyncio.Future[PubAck]] = []
    ts_ns = time.time_ns() - count * 30_000
    while len(futures) < count:
        ts_ns += 30_000
        tick = feed.next_tick(ts_ns)
        if tick is not None:
            subject = f"bench.pull.{subjects.tick(tick.source, tick.base, tick.quote)}"
            headers = {MSG_ID_HEADER: tick.id}
            futures.append(await js.publish_async(subject, events.encode(tick), headers=headers))
    await asyncio.gather(*futures)


async def drain(url: str, mode: str, count: int) -> dict[str, object]:
    nc = await (nats.connect(url) if mode == "read-nats-py" else connect(url, name="bench-pull-reader"))
    js = nc.jetstream()
    durable = f"bench-{mode}"
    acked = mode == "ack"
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT if acked else AckPolicy.NONE,
        max_ack_pending=20_000 if acked else -1,
    )
    await js.add_consumer(STREAM, config)
    sub = await js.pull_subscribe_bind(durable=durable, stream=STREAM)
    reader = await PullReader.bind(nc, sub, batch=256, wait_s=0.5)
    stop = asyncio.Event()
    got = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        while got < count:
            msgs = await reader.next_batch(stop)
            got += len(msgs)
            if mode in ("decode", "ack"):
                for msg in msgs:
                    events.decode_tick(msg.data)
            if acked:
                for msg in msgs:
                    await msg.ack()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await reader.close()
        await js.delete_consumer(STREAM, durable)
        await nc.close()
    return {
        "mode": mode,
        "messages": count,
        "messages_per_s": round(count / elapsed),
        "cpu_us_per_message": round(cpu / count * 1e6, 2),
        "cpu_cores": round(cpu / elapsed, 2),
    }


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    with embedded_servers(workdir, os.environ, nats_only=True) as servers:
        url = servers.nats.url if servers.nats is not None else os.environ["NATS_URL"]
        nc = await connect(url, name="bench-pull-reader-fill")
        try:
            await fill(nc, args.messages)
            for mode in args.modes:
                print(json.dumps(await drain(url, mode, args.messages)), flush=True)
            await nc.jetstream().delete_stream(STREAM)
        finally:
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    configure_logging(level="warning", fmt="json")
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
