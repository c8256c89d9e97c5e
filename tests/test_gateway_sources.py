"""`GET /api/v1/sources` on a real gateway and NATS: the latest state per source, live and after a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client as NATS

from pricewire_common import subjects
from pricewire_common.bus import ensure_streams
from pricewire_common.config import Settings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.events import SourceState, SourceStatus, decode_dead_letter, encode
from pricewire_gateway.sources_api import SourceBoard
from tests.test_collector import stream_messages
from tests.test_gateway import Gateway, serving
from tests.waiting import eventually

T0 = 1_700_000_000_123_000_000  # 2023-11-14T22:13:20.123Z


def status(source: str, state: SourceState, ts: int, **changes: Any) -> SourceStatus:
    fields: dict[str, Any] = {"source": source, "state": state, "transport": "websocket", "ts": ts}
    fields.update(changes)
    return SourceStatus(**fields)


async def store(nc: NATS, *statuses: SourceStatus) -> None:
    """Publish as the collector does: into stream SOURCES (core subscribers hear it too)."""
    js = nc.jetstream()
    for item in statuses:
        await js.publish(subjects.source_status(item.source), encode(item))


async def sources(http: aiohttp.ClientSession, gateway: Gateway) -> dict[str, Any]:
    async with http.get(f"{gateway.url}/api/v1/sources") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert isinstance(body, dict)
    return body


def states(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["source"], s["state"]) for s in body["sources"]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_gateway_started_after_the_events_shows_the_last_state_of_each_source(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    await ensure_streams(nc.jetstream(), settings.streams)
    await store(
        nc,
        status("kraken", "connected", T0),
        status("binance", "connecting", T0 + 1),
        status("binance", "connected", T0 + 2),
        status(
            "binance",
            "reconnecting",
            T0 + 3,
            detail="close code 1006",
            frames=120,
            ticks=118,
            rejected=2,
            reconnects=1,
        ),
        status("coingecko", "fallback", T0 + 4, transport="rest"),
    )
    async with serving(settings) as gateway:
        body = await sources(http, gateway)
    assert states(body) == [("binance", "reconnecting"), ("coingecko", "fallback"), ("kraken", "connected")]
    assert body["sources"][0] == {
        "source": "binance",
        "state": "reconnecting",
        "transport": "websocket",
        "detail": "close code 1006",
        "frames": 120,
        "ticks": 118,
        "rejected": 2,
        "reconnects": 1,
        "ts": "2023-11-14T22:13:20.123Z",
    }
    assert body["sources"][1]["transport"] == "rest"
    assert body["timestamp"].endswith("Z")


async def test_live_states_replace_older_ones_and_never_the_reverse(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    async with serving(settings) as gateway:
        assert (await sources(http, gateway))["sources"] == []
        await store(nc, status("binance", "connected", T0 + 10), status("kraken", "breaker_open", T0 + 10))
        body = await eventually(
            lambda: sources(http, gateway), lambda b: len(b["sources"]) == 2, timeout=5, what="two sources"
        )
        assert states(body) == [("binance", "connected"), ("kraken", "breaker_open")]
        # A late message older than what is shown (ts) is ignored; the newer one after it is taken.
        await store(nc, status("binance", "stopped", T0 + 5), status("kraken", "connected", T0 + 11))
        body = await eventually(
            lambda: sources(http, gateway),
            lambda b: ("kraken", "connected") in states(b),
            timeout=5,
            what="kraken connected",
        )
        assert states(body) == [("binance", "connected"), ("kraken", "connected")]


async def test_a_broken_status_goes_to_the_dead_letters(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    async with serving(settings) as gateway:
        await nc.publish(subjects.source_status("binance"), b"not a status")
        await nc.publish(subjects.source_status("kraken"), encode(status("binance", "connected", T0)))
        await nc.publish(subjects.source_status("kraken"), encode(status("kraken", "connected", T0)))
        await nc.flush()
        await eventually(
            lambda: sources(http, gateway), lambda b: len(b["sources"]) == 1, timeout=5, what="kraken shown"
        )
        letters = await eventually(
            lambda: stream_messages(nc.jetstream(), subjects.DLQ_STREAM),
            lambda found: len(found) == 2,
            timeout=5,
            what="two dead letters",
        )
        assert states(await sources(http, gateway)) == [("kraken", "connected")]
    decoded = [decode_dead_letter(data) for _, data, _ in letters]
    assert sorted((d.service, d.subject, d.reason) for d in decoded) == [
        ("gateway", "md.source.binance", "decode_error"),
        ("gateway", "md.source.kraken", "source_mismatch"),
    ]


async def test_the_board_keeps_the_newest_status_whatever_the_order(nc: NATS) -> None:
    board = SourceBoard(DeadLetters(nc.jetstream(), service="gateway"))
    assert board.update(status("kraken", "connected", T0 + 2))
    assert not board.update(status("kraken", "reconnecting", T0 + 1))
    assert board.update(status("binance", "stopped", T0))
    assert [(s.source, s.state) for s in board.latest()] == [("binance", "stopped"), ("kraken", "connected")]
