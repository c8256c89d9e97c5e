"""`GET /api/v1/stream` (Server-Sent Events) on real NATS, Redis and PostgreSQL, read by aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as redis_asyncio
from nats.aio.client import Client as NATS
from structlog.testing import capture_logs

from pricewire_cache_writer.migrate import apply_migrations
from pricewire_common.config import Settings
from pricewire_gateway.stream_api import event_bytes
from tests.test_gateway import FRAME_TIMEOUT_S, Gateway, cache, publish, serving, small_receive_buffer, wide_price
from tests.test_gateway_core import make_price
from tests.waiting import eventually


@dataclass
class Event:
    """One SSE block: its fields, or the comment it carried."""

    event: str | None = None
    id: str | None = None
    data: str | None = None
    comment: str | None = None

    def json(self) -> dict[str, Any]:
        assert self.data is not None
        value = json.loads(self.data)
        assert isinstance(value, dict)
        return value


async def next_event(response: aiohttp.ClientResponse) -> Event:
    """The next block of the stream (fields up to a blank line), skipping the `retry:` preamble."""
    event = Event()
    seen = False
    while True:
        line = (await asyncio.wait_for(response.content.readline(), FRAME_TIMEOUT_S)).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if not line:
            if seen:
                return event
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "retry":
            continue
        seen = True
        if name == "":
            event.comment = value
        else:
            setattr(event, name, value)


@asynccontextmanager
async def streaming(settings: Settings, **gateway: Any) -> AsyncIterator[Gateway]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    async with serving(replace(settings, gateway=replace(settings.gateway, **gateway))) as gw:
        yield gw


def test_an_event_is_one_block_with_its_id() -> None:
    assert event_bytes("BTC", 7, b'{"a":1}') == b'event: price_update\nid: BTC-7\ndata: {"a":1}\n\n'


async def test_the_stream_sends_the_latest_then_live_prices_of_its_symbols_and_heartbeats(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis
) -> None:
    await cache(redis_client, make_price("BTC", 3), make_price("ETH", 4))
    async with (
        streaming(settings, sse_heartbeat_s=0.5) as gw,
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/api/v1/stream", params={"symbols": "btcusdt,SOL"}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await next_event(response)
        assert (first.event, first.id) == ("price_update", "BTC-3")
        frame = first.json()
        assert (frame["type"], frame["data"]["symbol"], frame["data"]["seq"]) == ("price_update", "BTC", 3)

        await publish(nc, make_price("ETH", 5))  # not followed: never sent
        await publish(nc, make_price("SOL", 6))
        await publish(nc, make_price("BTC", 7))
        ids = [(await next_event(response)).id for _ in range(2)]
        assert ids == ["SOL-6", "BTC-7"]
        quiet = await next_event(response)
        assert (quiet.comment, quiet.event, quiet.data) == ("heartbeat", None, None)


async def test_bad_symbols_get_a_400(settings: Settings) -> None:
    async with streaming(settings) as gw, aiohttp.ClientSession() as http:
        for params in ({"symbols": "BTC,DOGE"}, {"symbols": ","}, {"asset": "BTC"}):
            async with http.get(f"{gw.url}/api/v1/stream", params=params) as response:
                assert response.status == 400, params
                body = await response.json()
                assert (body["type"], body["code"]) == ("error", "bad_parameter")


async def test_a_slow_reader_gets_conflated_latest_values_and_does_not_delay_others(
    settings: Settings, nc: NATS
) -> None:
    rounds = 120
    async with (
        streaming(settings) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as slow_http,
        aiohttp.ClientSession() as http,
        slow_http.get(f"{gw.url}/api/v1/stream", params={"symbols": "BTC"}) as slow,
        http.get(f"{gw.url}/api/v1/stream", params={"symbols": "BTC"}) as fast,
    ):
        for seq in range(1, rounds + 1):
            await publish(nc, wide_price(seq))
            assert (await next_event(fast)).id == f"BTC-{seq}"
        seen: list[int] = []
        while not seen or seen[-1] != rounds:
            seen.append((await next_event(slow)).json()["data"]["seq"])
        assert seen == sorted(set(seen))
        assert len(seen) < rounds  # replaced while its pipe was full


async def test_a_reader_that_stays_behind_is_dropped_and_the_others_go_on(settings: Settings, nc: NATS) -> None:
    async def events() -> list[str]:
        return [str(entry["event"]) for entry in logs]

    with capture_logs() as logs:
        async with (
            streaming(settings, ws_slow_client_s=1.0) as gw,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as slow_http,
            aiohttp.ClientSession() as http,
            slow_http.get(f"{gw.url}/api/v1/stream", params={"symbols": "BTC"}) as slow,
            http.get(f"{gw.url}/api/v1/stream", params={"symbols": "BTC"}) as fast,
        ):
            for seq in range(1, 121):
                await publish(nc, wide_price(seq))
                assert (await next_event(fast)).id == f"BTC-{seq}"
            await eventually(events, lambda seen: "sse_slow_client_dropped" in seen, what="the slow reader dropped")
            await publish(nc, wide_price(121))
            assert (await next_event(fast)).id == "BTC-121"

            # The slow reader gets what its buffers held, then the end of the stream: never the latest.
            seqs: list[int] = []
            with contextlib.suppress(AssertionError, aiohttp.ClientPayloadError, ConnectionError):
                while True:
                    seqs.append((await next_event(slow)).json()["data"]["seq"])
            assert seqs == sorted(set(seqs))
            assert 121 not in seqs


async def test_a_stop_ends_open_streams(settings: Settings, redis_client: redis_asyncio.Redis) -> None:
    await cache(redis_client, make_price("BTC", 3))
    async with (
        streaming(settings) as gw,
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/api/v1/stream") as response,
    ):
        assert (await next_event(response)).id == "BTC-3"
        gw.stop.set()
        rest = await asyncio.wait_for(response.content.read(), FRAME_TIMEOUT_S)  # to the end of the stream
        assert b"price_update" not in rest
        await asyncio.wait_for(gw.task, 10)  # not held up by the open stream
