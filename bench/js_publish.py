"""What a JetStream publish with its ack costs the publisher, per publish, and print one JSON line per run.

`--publishes` price-sized payloads (600 bytes, each with its own `Nats-Msg-Id`) go to a stream of their own
in rounds of `--round` (the validator sends a batch's prices, then waits for their acks), through:

- `nats-py`: `JetStreamContext.publish_async` (a random token a publish, a semaphore, each ack through the
  async-reply subscription's queue and task, parsed by the json module);
- `acked`: `js_publish.AckedPublisher` on the client `bus.connect` makes (acks straight from the read loop,
  decoded by msgspec).

The two alternate, `--runs` times each, so a change in the machine's load shows in both. CPU is the process's
own (user + system), in microseconds a publish, acks included.

NATS: `NATS_URL` when set, else an embedded server in a temporary directory.

    python bench/js_publish.py --publishes 20000 --round 3 --runs 2
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
from typing import Protocol

from nats.js.api import PubAck, StreamConfig
from nats.js.errors import NotFoundError

from pricewire_cli.stack import embedded_servers
from pricewire_common.bus import MSG_ID_HEADER, connect
from pricewire_common.js_publish import AckedPublisher
from pricewire_common.logs import configure_logging

STREAM = "BENCH_JS_PUBLISH"
SUBJECT = "bench.publish.x"
PAYLOAD = b"x" * 600


class Send(Protocol):
    async def __call__(self, subject: str, payload: bytes, *, headers: dict[str, str]) -> asyncio.Future[PubAck]: ...


async def rounds(send: Send, count: int, rounds_of: int, tag: str) -> float:
    """CPU seconds to send `count` publishes through `send`, `rounds_of` at a time, each round's acks awaited."""
    began = time.process_time()
    for start in range(0, count, rounds_of):
        acks = [
            await send(SUBJECT, PAYLOAD, headers={MSG_ID_HEADER: f"{tag}-{i}"})
            for i in range(start, min(count, start + rounds_of))
        ]
        await asyncio.wait(acks)
    return time.process_time() - began


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    with embedded_servers(workdir, os.environ, nats_only=True) as servers:
        url = servers.nats.url if servers.nats is not None else os.environ["NATS_URL"]
        nc = await connect(url, name="bench-js-publish")
        js = nc.jetstream()
        try:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(STREAM)
            await js.add_stream(StreamConfig(name=STREAM, subjects=["bench.publish.>"]))
            for run in range(args.runs):
                row: dict[str, object] = {"run": run + 1, "publishes": args.publishes, "round": args.round}
                nats_py_s = await rounds(js.publish_async, args.publishes, args.round, f"n{run}")
                publisher = AckedPublisher(nc)
                try:
                    acked_s = await rounds(publisher.publish, args.publishes, args.round, f"a{run}")
                finally:
                    await publisher.close()
                row["nats_py_us"] = round(nats_py_s / args.publishes * 1e6, 1)
                row["acked_us"] = round(acked_s / args.publishes * 1e6, 1)
                print(json.dumps(row), flush=True)
            await js.delete_stream(STREAM)
        finally:
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publishes", type=int, default=20_000)
    parser.add_argument("--round", type=int, default=3, help="publishes sent before their acks are awaited")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    configure_logging(level="warning", fmt="json")
    with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
