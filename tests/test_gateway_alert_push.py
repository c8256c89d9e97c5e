"""Alerts pushed to signed-in WebSockets: a socket that does not read never delays another user's alert, and is
closed with a reason once it cannot take one."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS

from pricewire_common import subjects
from pricewire_common.config import Settings
from pricewire_gateway.alerts import AlertFired, encode_fired
from pricewire_gateway.client import PUSH_LIMIT
from tests.test_gateway import FRAME_TIMEOUT_S, decode, frame, publish, request, small_receive_buffer, wide_price
from tests.test_gateway_auth import token, user_gateway

EXTRA = 10
"""Alerts for the stuck user past what her queue takes."""


def firing(user: str, event_id: int) -> bytes:
    return encode_fired(
        AlertFired(
            id=event_id,
            alert_id=1,
            user=user,
            symbol="BTC",
            alert_type="above",
            target_price=Decimal(1),
            price=Decimal(2),
            price_seq=event_id,
            price_timestamp="2026-12-01T10:00:00Z",
            fired_at="2026-12-01T10:00:00Z",
        )
    )


async def next_alert(ws: aiohttp.ClientWebSocketResponse, *, timeout: float) -> dict[str, Any]:
    while (message := decode(await ws.receive_str(timeout=timeout)))["type"] != "alert_triggered":
        pass
    return message


async def scrape(http: aiohttp.ClientSession, url: str, line_start: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


async def test_a_socket_that_does_not_read_never_delays_another_users_alert(settings: Settings, nc: NATS) -> None:
    # Frames left unread for a minute would close alice's socket as too slow: here only her alerts may.
    patient = replace(settings, gateway=replace(settings.gateway, ws_slow_client_s=60.0))
    async with (
        user_gateway(patient) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)) as slow_http,
        aiohttp.ClientSession() as http,
        slow_http.ws_connect(f"{gw.ws_url}?token={token('alice')}") as alice,
        http.ws_connect(f"{gw.ws_url}?token={token('bob')}") as bob,
    ):
        for ws in (alice, bob):
            assert decode(await ws.receive_str(timeout=FRAME_TIMEOUT_S))["type"] == "authenticated"
            assert (await request(ws, {"type": "subscribe", "symbol": "BTC"}))["type"] == "subscribed"
        # Alice never reads: her pipe fills and her writer waits on one frame; bob reads every one.
        for seq in range(1, 121):
            await publish(nc, wide_price(seq))
            assert (await frame(bob))["data"]["seq"] == seq

        for event_id in range(1, PUSH_LIMIT + EXTRA + 1):
            await nc.publish(subjects.alert("alice"), firing("alice", event_id))
        await nc.publish(subjects.alert("bob"), firing("bob", 10_000))
        await nc.flush()
        # Before: the one md.alert.* callback waited 0.5 s on each alert alice had no room for, so bob's came
        # minutes later. Now nothing waits: it is there at once.
        got = await next_alert(bob, timeout=2.0)
        assert (got["data"]["user"], got["data"]["id"]) == ("bob", 10_000)

        # Alice gets what was already on its way, then a close that says why: she missed alerts.
        while (message := await alice.receive(timeout=FRAME_TIMEOUT_S)).type is aiohttp.WSMsgType.TEXT:
            pass
        assert message.type is aiohttp.WSMsgType.CLOSE, message
        assert (message.data, message.extra) == (aiohttp.WSCloseCode.POLICY_VIOLATION, "too slow: alerts left unread")
        dropped = 'pricewire_alert_deliveries_total{channel="websocket",outcome="dropped"} '
        assert await scrape(http, gw.url, dropped) == EXTRA
