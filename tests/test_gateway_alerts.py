"""Price alerts: the pure rule, the API (own alerts only, clear 400s), and firing over real NATS and PostgreSQL
exactly once per crossing with two gateway replicas, to NATS, WebSockets, the history and a webhook."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from typer.testing import CliRunner, Result

from pricewire_cli.app import app as cli_app
from pricewire_common import subjects
from pricewire_common.clock import datetime_from_ns, wall_clock
from pricewire_common.config import AlertSettings, Settings
from pricewire_common.events import Price, decode_dead_letter, encode
from pricewire_gateway.alert_store import AlertStore
from pricewire_gateway.alert_worker import DLQ_SERVICE, durable_name
from pricewire_gateway.alerts import Rule, checked_rule, decide, decode_fired
from pricewire_gateway.errors import BadParameter
from pricewire_gateway.schema import migrate
from pricewire_gateway.webhook import EVENT_ID_HEADER
from tests.test_gateway import Gateway, decode, serving
from tests.test_gateway_auth import bearer, migrated, token, user_gateway, with_auth
from tests.test_gateway_core import make_price
from tests.waiting import eventually

BAND = Decimal("0.5")
ABOVE = Rule(kind="above", target_price=Decimal(50_000))


# --- the pure rule ------------------------------------------------------------------------------


def run_rule(rule: Rule, prices: list[Decimal], *, reference: Decimal | None = None) -> list[int]:
    """Indexes of the prices that fire, starting armed."""
    armed, fired = True, []
    for index, price in enumerate(prices):
        decision = decide(rule, armed=armed, price=price, reference=reference, band_pct=BAND)
        armed = decision.armed
        if decision.fire:
            fired.append(index)
    return fired


def test_above_fires_once_per_crossing_and_rearms_past_the_band() -> None:
    prices = [49_000, 50_000, 50_500, 49_900, 50_100, 49_700, 50_001, 51_000]
    # 50_000 fires; 49_900 is inside the band (re-arm below 49_750); 49_700 re-arms; 50_001 fires again.
    assert run_rule(ABOVE, [Decimal(p) for p in prices]) == [1, 6]


def test_below_mirrors_above() -> None:
    below = Rule(kind="below", target_price=Decimal(100))
    assert run_rule(below, [Decimal(p) for p in ("101", "100", "99", "100.4", "98", "100.6", "99.9")]) == [1, 6]


def test_change_pct_needs_a_reference_and_has_a_sign() -> None:
    rise = Rule(kind="change_pct", pct=Decimal(5), window_s=300)
    fall = Rule(kind="change_pct", pct=Decimal(-5), window_s=300)
    prices = [Decimal(p) for p in ("104", "105", "106", "104.6", "104.4", "105")]
    assert run_rule(rise, prices, reference=None) == []
    assert run_rule(rise, prices, reference=Decimal(100)) == [1, 5]  # 104.4 is 4.4 %: back past 5 - 0.5
    assert run_rule(fall, [Decimal(p) for p in ("96", "95", "94", "95.6")], reference=Decimal(100)) == [1]


@given(st.lists(st.integers(min_value=48_000, max_value=52_000), max_size=60))
def test_never_fires_twice_without_coming_back_past_the_band(raw: list[int]) -> None:
    prices = [Decimal(p) for p in raw]
    fired = run_rule(ABOVE, prices)
    rearm_below = ABOVE.target_price * (1 - BAND / 100)  # type: ignore[operator]
    for first, second in itertools.pairwise(fired):
        assert any(p < rearm_below for p in prices[first:second])
    # ...and an armed alert never misses a price at or over the target.
    armed = True
    for index, price in enumerate(prices):
        if armed and price >= ABOVE.target_price:  # type: ignore[operator]
            assert index in fired
            armed = False
        elif not armed and price < rearm_below:
            armed = True


def test_create_requests_are_checked_with_clear_messages() -> None:
    def message(kind: str, **fields: Any) -> str:
        with pytest.raises(BadParameter) as caught:
            checked_rule(kind, **{"target_price": None, "pct": None, "window_s": None, **fields})
        return caught.value.message

    assert "needs target_price" in message("above")
    assert "positive" in message("below", target_price=Decimal(-1))
    assert "needs pct" in message("change_pct", pct=Decimal(5))
    assert "window_s" in message("change_pct", pct=Decimal(5), window_s=0)
    assert "non-zero" in message("change_pct", pct=Decimal(0), window_s=60)
    assert "one of above, below, change_pct" in message("sideways")


# --- the API ------------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def create(http: aiohttp.ClientSession, gw: Gateway, user: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{gw.url}/api/v1/alerts", json=body, headers=bearer(user)) as response:
        answer = decode(await response.text())
        assert response.status == 201, answer
    return answer


async def test_users_see_and_delete_only_their_own_alerts(settings: Settings, http: aiohttp.ClientSession) -> None:
    async with user_gateway(settings) as gw:
        mine = await create(http, gw, "alice", {"symbol": "btcusdt", "target_price": "50000.5", "alert_type": "above"})
        assert mine["symbol"] == "BTC"
        assert mine["target_price"] == Decimal("50000.5")
        assert mine["armed"] is True
        theirs = await create(
            http, gw, "bob", {"symbol": "ETH", "alert_type": "change_pct", "pct": -5, "window_s": 3600}
        )
        async with http.get(f"{gw.url}/api/v1/alerts", headers=bearer("alice")) as response:
            assert [a["id"] for a in decode(await response.text())["alerts"]] == [mine["id"]]
        for target in (theirs["id"], 999_999):
            async with http.delete(f"{gw.url}/api/v1/alerts/{target}", headers=bearer("alice")) as response:
                assert response.status == 404, target
                assert decode(await response.text())["code"] == "not_found"
        async with http.get(f"{gw.url}/api/v1/alerts", headers=bearer("bob")) as response:
            assert [a["id"] for a in decode(await response.text())["alerts"]] == [theirs["id"]]  # still there
        async with http.delete(f"{gw.url}/api/v1/alerts/{mine['id']}", headers=bearer("alice")) as response:
            assert response.status == 204
        async with http.get(f"{gw.url}/api/v1/alerts", headers=bearer("alice")) as response:
            assert decode(await response.text())["alerts"] == []


async def test_bad_alerts_get_400s_that_name_the_problem(settings: Settings, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[Any, str]] = [
        ({"symbol": "XRP", "target_price": 1, "alert_type": "above"}, "XRP"),
        ({"symbol": "BTC", "alert_type": "above"}, "needs target_price"),
        ({"symbol": "BTC", "target_price": "abc", "alert_type": "above"}, "target_price"),
        ({"symbol": "BTC", "target_price": 1, "alert_type": "sideways"}, "alert_type"),
        ({"symbol": "BTC", "target_price": 1, "alert_type": "above", "colour": "red"}, "colour"),
        ({"symbol": "BTC", "target_price": 1, "alert_type": "above", "webhook_url": "file:///etc"}, "webhook_url"),
        ({"target_price": 1, "alert_type": "above"}, "symbol"),
        ("not an object", "bad alert"),
    ]
    async with user_gateway(settings) as gw:
        for body, words in cases:
            async with http.post(f"{gw.url}/api/v1/alerts", json=body, headers=bearer("alice")) as response:
                answer = decode(await response.text())
                assert response.status == 400, (body, answer)
            assert answer["code"] == "bad_parameter"
            assert words in answer["message"], (body, answer)
        # "²" and "٣" pass str.isdigit; int() refused the first (a 500) and read the second as 3.
        for limit in ("0", "1001", "²", "٣", "-1", " 5"):
            async with http.get(
                f"{gw.url}/api/v1/alerts/history", params={"limit": limit}, headers=bearer("alice")
            ) as response:
                answer = decode(await response.text())
                assert (response.status, answer["code"]) == (400, "bad_parameter"), (limit, answer)
            assert "limit must be a whole number" in answer["message"]
        for alert_id in ("²", "x", "1.0", "-1", "1" * 19):
            async with http.delete(f"{gw.url}/api/v1/alerts/{alert_id}", headers=bearer("alice")) as response:
                answer = decode(await response.text())
                assert (response.status, answer["code"]) == (400, "bad_parameter"), (alert_id, answer)
            assert "alert id is a whole number" in answer["message"]


# --- exactly once, on the store -----------------------------------------------------------------


@pytest.fixture
async def alert_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


async def test_a_redelivered_or_older_event_changes_nothing(alert_pool: asyncpg.Pool) -> None:
    store = AlertStore(alert_pool)
    alert = await store.create(user="alice", asset="BTC", rule=ABOVE, webhook_url=None, note=None, limit=10)
    assert alert is not None
    first = await store.decide(make_price("BTC", 5, price=Decimal(50_100)), band_pct=BAND)
    assert [p.fired.alert_id for p in first] == [alert.id]
    # Redelivered before it was marked delivered (a crash after commit): the same firing, same id, again.
    again = await store.decide(make_price("BTC", 5, price=Decimal(50_100)), band_pct=BAND)
    assert [p.fired.id for p in again] == [first[0].fired.id]
    await store.mark_delivered([first[0].fired.id])
    assert await store.decide(make_price("BTC", 5, price=Decimal(50_100)), band_pct=BAND) == []
    # An older event that a slower replica got (would re-arm if decided) is turned away...
    assert await store.decide(make_price("BTC", 4, price=Decimal(40_000)), band_pct=BAND) == []
    (state,) = await store.of_user("alice")
    assert (state.armed, state.fired_count) == (False, 1)
    # ...so the next higher price does not fire a second time.
    assert await store.decide(make_price("BTC", 6, price=Decimal(50_200)), band_pct=BAND) == []
    assert len(await store.history("alice", limit=10)) == 1
    # A validator whose seq started over (PRICES recreated) still gets decided: its events are later in time.
    later = make_price("BTC", 1, price=Decimal(40_000)).ts + 10**9
    assert await store.decide(make_price("BTC", 1, price=Decimal(40_000), ts=later), band_pct=BAND) == []
    (refired,) = await store.decide(make_price("BTC", 2, price=Decimal(50_300), ts=later + 1), band_pct=BAND)
    assert refired.fired.price_seq == 2


async def test_a_user_has_at_most_the_limit_of_alerts(alert_pool: asyncpg.Pool) -> None:
    store = AlertStore(alert_pool)
    for _ in range(2):
        assert await store.create(user="hal", asset="BTC", rule=ABOVE, webhook_url=None, note=None, limit=2)
    assert await store.create(user="hal", asset="BTC", rule=ABOVE, webhook_url=None, note=None, limit=2) is None
    assert await store.create(user="ida", asset="BTC", rule=ABOVE, webhook_url=None, note=None, limit=2)
    assert len(await store.of_user("hal")) == 2


async def test_concurrent_deciders_fire_once(alert_pool: asyncpg.Pool) -> None:
    store = AlertStore(alert_pool)
    await store.create(user="alice", asset="BTC", rule=ABOVE, webhook_url=None, note=None, limit=10)
    events = [make_price("BTC", seq, price=Decimal(50_000 + seq)) for seq in range(1, 9)]
    results = await asyncio.gather(*(store.decide(e, band_pct=BAND) for e in events))
    assert sum(len(r) for r in results) == 1
    assert len(await store.history("alice", limit=10)) == 1


async def store_prices(pool: asyncpg.Pool, asset: str, *prices: tuple[int, Decimal]) -> None:
    """Rows of the cache_writer's `prices` for `asset`: (seconds before now, price), seq in the given order."""
    now = wall_clock()
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO prices (asset, seq, price, status, ts, stream_seq) VALUES ($1, $2, $3, 'ok', $4, $2)",
            [(asset, seq, price, datetime_from_ns(now - ago_s * 10**9)) for seq, (ago_s, price) in enumerate(prices)],
        )


async def test_change_pct_compares_with_the_consensus_a_window_earlier(
    alert_pool: asyncpg.Pool, settings: Settings
) -> None:
    await migrated(settings)  # the cache_writer's `prices`, where the reference comes from
    store = AlertStore(alert_pool)
    rule = Rule(kind="change_pct", pct=Decimal(5), window_s=300)
    await store.create(user="alice", asset="ETH", rule=rule, webhook_url=None, note="pump", limit=10)
    # In force at the window's start (a heartbeat before it), then a price inside the window.
    await store_prices(alert_pool, "ETH", (600, Decimal(1000)), (330, Decimal(2000)), (100, Decimal(2080)))
    now = wall_clock()
    assert await store.decide(make_price("ETH", 102, price=Decimal(2090), ts=now), band_pct=BAND) == []  # +4.5 %
    (pending,) = await store.decide(make_price("ETH", 103, price=Decimal(2100), ts=now), band_pct=BAND)
    assert pending.fired.reference_price == Decimal(2000)
    assert pending.fired.change_pct == Decimal("5.0000")
    assert pending.fired.note == "pump"


async def test_change_pct_never_compares_with_a_price_from_before_a_gap(
    alert_pool: asyncpg.Pool, settings: Settings
) -> None:
    await migrated(settings)
    store = AlertStore(alert_pool)
    rule = Rule(kind="change_pct", pct=Decimal(5), window_s=300)
    for asset in ("SOL", "ADA"):
        await store.create(user="alice", asset=asset, rule=rule, webhook_url=None, note=None, limit=10)
    two_days_s = 2 * 86_400
    # SOL: nothing since two days ago. +10 % on that is no change within 5 minutes: no reference, no firing.
    await store_prices(alert_pool, "SOL", (two_days_s, Decimal(100)))
    assert await store.decide(make_price("SOL", 5, price=Decimal(110), ts=wall_clock()), band_pct=BAND) == []
    # ADA: the feed came back 100 s ago after two days away: the change is measured from there.
    await store_prices(alert_pool, "ADA", (two_days_s, Decimal(100)), (100, Decimal(104)), (50, Decimal(106)))
    assert await store.decide(make_price("ADA", 5, price=Decimal(108), ts=wall_clock()), band_pct=BAND) == []
    (pending,) = await store.decide(make_price("ADA", 6, price=Decimal("109.2"), ts=wall_clock()), band_pct=BAND)
    assert pending.fired.reference_price == Decimal(104)
    assert pending.fired.change_pct == Decimal("5.0000")


# --- firing through the gateways ---------------------------------------------------------------


async def consumer_bound(nc: NATS, asset: str = "BTC") -> None:
    js = nc.jetstream()
    await eventually(
        lambda: js.consumer_info(subjects.PRICES_STREAM, durable_name(asset)),
        lambda info: info is not None,
        what="the alert consumer",
    )


async def all_decided(nc: NATS, last_stream_seq: int, asset: str = "BTC") -> None:
    """Wait until the asset's shared consumer has acked everything up to `last_stream_seq`."""
    js = nc.jetstream()
    await eventually(
        lambda: js.consumer_info(subjects.PRICES_STREAM, durable_name(asset)),
        lambda info: info.ack_floor.stream_seq >= last_stream_seq and info.num_ack_pending == 0,
        what="every price decided",
    )


async def publish_prices(nc: NATS, prices: list[Price]) -> int:
    js = nc.jetstream()
    last = 0
    for price in prices:
        last = (await js.publish(subjects.price(price.asset), encode(price))).seq
    return last


class Collected:
    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self.arrived = asyncio.Event()

    async def on(self, msg: Msg) -> None:
        self.messages.append(msg)
        self.arrived.set()


async def alerts_frames(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        message = decode(await ws.receive_str(timeout=10))
        if message["type"] == "alert_triggered":
            frames.append(message)
    return frames


async def test_two_replicas_fire_once_per_crossing_to_nats_and_every_socket(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    await migrated(settings)
    collected = Collected()
    await nc.subscribe(subjects.alert("alice"), cb=collected.on)
    async with serving(with_auth(settings)) as one, serving(with_auth(settings)) as two:
        await consumer_bound(nc)
        created = await create(http, one, "alice", {"symbol": "BTC", "target_price": 50_000, "alert_type": "above"})
        socket_one = await http.ws_connect(f"{one.ws_url}?token={token('alice')}")
        socket_two = await http.ws_connect(two.ws_url)
        await socket_two.send_json({"type": "auth", "token": token("alice")})
        for ws in (socket_one, socket_two):
            assert decode(await ws.receive_str(timeout=5))["type"] == "authenticated"
        # 50,000 fires; 49,900 stays in the band; 49,700 re-arms; 50,500 fires again; 51,000 does not.
        path = [49_000, 50_000, 50_200, 49_900, 50_300, 49_700, 50_500, 51_000, 50_800]
        prices = [make_price("BTC", seq, price=Decimal(p)) for seq, p in enumerate(path, start=1)]
        last = await publish_prices(nc, prices)
        await all_decided(nc, last)
        for ws in (socket_one, socket_two):
            frames = await alerts_frames(ws, 2)
            assert [f["data"]["price_seq"] for f in frames] == [2, 7]
            assert frames[0]["data"]["alert_id"] == created["id"]
            assert frames[0]["data"]["price"] == Decimal(50_000)
            await ws.close()
        await nc.flush()
        fired = [decode_fired(m.data) for m in collected.messages]
        assert [f.price_seq for f in fired] == [2, 7]
        assert fired[1].price == Decimal(50_500)
        async with http.get(f"{two.url}/api/v1/alerts", headers=bearer("alice")) as response:
            (alert,) = decode(await response.text())["alerts"]
        assert (alert["fired_count"], alert["armed"]) == (2, False)


async def test_alert_fires_with_no_client_and_the_webhook_is_retried(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    calls: list[tuple[str | None, dict[str, Any]]] = []
    delivered = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        calls.append((request.headers.get(EVENT_ID_HEADER), json.loads(await request.read())))
        if len(calls) < 3:
            return web.Response(status=503)  # down twice, then up
        delivered.set()
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fast = replace(settings, alerts=AlertSettings(webhook_backoff_s=0.05, webhook_backoff_max_s=0.2))
    collected = Collected()
    await nc.subscribe(subjects.alert("carol"), cb=collected.on)
    try:
        async with user_gateway(fast) as gw:
            await consumer_bound(nc, "SOL")
            hook_url = f"http://127.0.0.1:{port}/hook"
            body = {"symbol": "SOL", "target_price": "100", "alert_type": "below", "webhook_url": hook_url}
            await create(http, gw, "carol", body)
            await publish_prices(
                nc, [make_price("SOL", 1, price=Decimal("101")), make_price("SOL", 2, price=Decimal("99.5"))]
            )
            await asyncio.wait_for(collected.arrived.wait(), timeout=10)
            await asyncio.wait_for(delivered.wait(), timeout=10)
            async with http.get(f"{gw.url}/api/v1/alerts/history", headers=bearer("carol")) as response:
                (event,) = decode(await response.text())["events"]
    finally:
        await runner.cleanup()
    assert event["price"] == Decimal("99.5")
    assert event["symbol"] == "SOL"
    assert event["alert_type"] == "below"
    assert len(calls) == 3
    assert {event_id for event_id, _ in calls} == {str(event["id"])}  # one firing, retried
    assert calls[-1][1]["price"] == "99.5"
    assert decode_fired(collected.messages[0].data).id == event["id"]


# --- the CLI --------------------------------------------------------------------------------------


async def test_cli_adds_lists_and_removes_alerts(settings: Settings) -> None:
    runner = CliRunner()
    async with user_gateway(settings) as gw:
        auth = ["--url", gw.url, "--token", token("dave")]

        async def cli(*args: str) -> Result:
            return await asyncio.to_thread(runner.invoke, cli_app, list(args))

        added = await cli("alert", "add", "eth", "--above", "4000.25", "--note", "moon", *auth)
        assert added.exit_code == 0, added.output
        alert_id = added.output.split("\t")[0]
        assert "ETH\tabove 4000.25\tarmed" in added.output
        change = await cli("alert", "add", "BTC", "--change-pct", "-3", "--window", "600", *auth)
        assert "change -3% in 600s" in change.output
        listed = await cli("alert", "list", *auth)
        assert listed.exit_code == 0
        assert len(listed.output.strip().splitlines()) == 2
        refused = await cli("alert", "add", "BTC", "--above", "-5", *auth)
        assert refused.exit_code == 1
        assert "error 400: target_price must be a positive number" in refused.output
        removed = await cli("alert", "rm", alert_id, *auth)
        assert removed.exit_code == 0, removed.output
        again = await cli("alert", "rm", alert_id, *auth)
        assert again.exit_code == 1
        assert "error 404" in again.output
        assert len((await cli("alert", "list", *auth)).output.strip().splitlines()) == 1


async def test_price_alert_over_a_signed_in_socket_fires_on_it(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    alert: dict[str, Any] = {"symbol": "btcusdt", "target_price": 50000.0, "alert_type": "above"}
    seed_004 = {"type": "price_alert", "data": alert}
    async with user_gateway(settings) as gw, http.ws_connect(gw.ws_url) as ws:
        await consumer_bound(nc)
        await ws.send_json(seed_004)
        refused = decode(await ws.receive_str(timeout=5))
        assert (refused["type"], refused["code"]) == ("error", "unauthorized")
        await ws.send_json({"type": "auth", "token": token("erin")})
        assert decode(await ws.receive_str(timeout=5))["type"] == "authenticated"
        await ws.send_json({**seed_004, "data": {**alert, "alert_type": "sideways"}})
        assert decode(await ws.receive_str(timeout=5))["code"] == "bad_parameter"
        await ws.send_json(seed_004)
        created = decode(await ws.receive_str(timeout=5))
        assert created["type"] == "alert_created"
        assert (created["data"]["symbol"], created["data"]["target_price"]) == ("BTC", Decimal("50000.0"))
        await publish_prices(nc, [make_price("BTC", 1, price=Decimal("50001"))])
        (fired,) = await alerts_frames(ws, 1)
        assert fired["data"]["alert_id"] == created["data"]["id"]
        assert fired["data"]["user"] == "erin"


async def test_a_bad_price_event_is_dead_lettered_not_decided(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    js = nc.jetstream()
    async with user_gateway(settings) as gw:
        await consumer_bound(nc)
        letters = await js.subscribe(subjects.dead_letter(DLQ_SERVICE), stream=subjects.DLQ_STREAM)
        await create(http, gw, "frank", {"symbol": "ETH", "target_price": 1, "alert_type": "above"})
        await create(http, gw, "frank", {"symbol": "BTC", "target_price": 1, "alert_type": "above"})
        # An ETH consensus on the BTC subject must not be decided as either asset's price.
        js_ack = await js.publish(subjects.price("BTC"), encode(make_price("ETH", 1)))
        letter = decode_dead_letter((await letters.next_msg(timeout=10)).data)
        await letters.unsubscribe()
        assert (letter.reason, letter.subject, letter.stream_seq) == ("asset_mismatch", "md.price.BTC", js_ack.seq)
        last = await publish_prices(nc, [make_price("BTC", 2, price=Decimal(5))])
        await all_decided(nc, last)
        async with http.get(f"{gw.url}/api/v1/alerts/history", headers=bearer("frank")) as response:
            events = decode(await response.text())["events"]
        assert [(e["symbol"], e["price_seq"]) for e in events] == [("BTC", 2)]


async def test_stored_decisions_match_the_pure_rule_on_a_random_walk(alert_pool: asyncpg.Pool) -> None:
    """The SQL prefilter only narrows what the pure rule sees: firings equal the rule's, alert by alert."""
    store = AlertStore(alert_pool)
    rules = [Rule(kind=kind, target_price=Decimal(t)) for kind in ("above", "below") for t in (995, 1000, 1003)]
    ids = []
    for rule in rules:
        alert = await store.create(user="walker", asset="ADA", rule=rule, webhook_url=None, note=None, limit=10)
        assert alert is not None
        ids.append(alert.id)
    rng = random.Random(4)
    # Prices drawn anywhere in 1000 +- 12: every target, its band and the space between are hit again and again.
    path = [Decimal(1000) + Decimal(rng.randint(-120, 120)) / 10 for _ in range(300)]
    for seq, step in enumerate(path, start=1):
        await store.decide(make_price("ADA", seq, price=step), band_pct=BAND)
    history = await store.history("walker", limit=1000)
    for alert_id, rule in zip(ids, rules, strict=True):
        stored = sorted(e.price_seq for e in history if e.alert_id == alert_id)
        assert stored == [index + 1 for index in run_rule(rule, path)], rule
    assert len(history) > 3 * len(rules)  # the walk crossed the targets several times each, on the whole
