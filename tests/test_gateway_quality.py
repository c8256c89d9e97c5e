"""The data-quality view: the pure core (`pricewire_gateway.quality`), then `GET /api/v1/quality` on a real
gateway over NATS and Redis, with a clock the test moves so ages grow and freshness flips exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from pricewire_common.bus import ensure_streams
from pricewire_common.clock import NS_PER_MS
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.events import Price, SourceQuote, TickKind
from pricewire_gateway import messages
from pricewire_gateway.quality import FreshnessLimits, asset_quality, source_quality
from tests.test_gateway import FRAME_TIMEOUT_S, cache, decode, frame, publish, request, serving
from tests.test_gateway_core import make_price
from tests.test_gateway_sources import status, store
from tests.waiting import eventually

T0 = 1_700_000_000_123_000_000  # 2023-11-14T22:13:20.123Z: when the validator decided
LIMITS = FreshnessLimits(stream_ms=30_000, poll_ms=120_000)  # the validator's defaults


class SteppedClock:
    """The gateway's clock, moved by the test."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def quote(
    source: str,
    price: str,
    *,
    age_ms: int,
    kind: TickKind = "stream",
    deviation_pct: str = "0",
    reason: str | None = None,
    weight: str = "0",
) -> SourceQuote:
    return SourceQuote(
        source=source,
        symbol="BTC-USDT" if kind == "stream" else "BTC-USD",
        price=Decimal(price),
        deviation_pct=Decimal(deviation_pct),
        age_ms=age_ms,
        outlier=reason in ("outlier", "outlier_mad"),
        reason=reason,
        weight=Decimal(weight),
        kind=kind,
    )


# One admitted stream quote, one admitted poll quote, one MAD outlier, one poll quote already stale.
EVIDENCE = (
    quote("binance", "47000.50", age_ms=200, deviation_pct="0.0011", weight="0.6000"),
    quote("coingecko", "47000.00", age_ms=60_000, kind="poll", deviation_pct="-0.0011", weight="0.4000"),
    quote("kraken", "48500.00", age_ms=500, deviation_pct="3.1903", reason="outlier_mad"),
    quote("okx", "46000.10", age_ms=121_000, kind="poll", deviation_pct="-2.1282", reason="stale"),
)


def btc(seq: int = 12, **changes: Any) -> Price:
    fields: dict[str, Any] = {
        "price": Decimal("47000.30"),
        "confidence": Decimal("0.30"),
        "status": "ok",
        "n_sources": 4,
        "n_used": 2,
        "sources": EVIDENCE,
        "ts": T0,
        "method": "weighted_median",
        "cv_pct": Decimal("0.0008"),
        "anomaly": True,
        "z_score": Decimal("3.41"),
    }
    fields.update(changes)
    return make_price("BTC", seq, **fields)


# --- the pure view ---------------------------------------------------------------------------------


def test_the_view_carries_the_evidence_and_ages_it_to_now() -> None:
    view = asset_quality(
        btc(), now_ns=T0 + 1_000 * NS_PER_MS, limits=LIMITS, connections={"binance": "connected", "kraken": "fallback"}
    )
    assert (view.symbol, view.price, view.status, view.method) == ("BTC", Decimal("47000.30"), "ok", "weighted_median")
    assert (view.confidence, view.cv_pct, view.anomaly, view.z_score) == (
        Decimal("0.30"),
        Decimal("0.0008"),
        True,
        Decimal("3.41"),
    )
    assert (view.n_used, view.n_sources, view.seq) == (2, 4, 12)
    assert (view.evaluated_at, view.as_of) == ("2023-11-14T22:13:20.123Z", "2023-11-14T22:13:21.123Z")
    rows = [(s.source, s.admitted, s.reason, s.age_ms, s.max_age_ms, s.fresh, s.connection) for s in view.sources]
    assert rows == [
        ("binance", True, None, 1_200, 30_000, True, "connected"),
        ("coingecko", True, None, 61_000, 120_000, True, None),
        ("kraken", False, "outlier_mad", 1_500, 30_000, True, "fallback"),
        ("okx", False, "stale", 122_000, 120_000, False, None),
    ]
    assert [s.age_ms_at_decision for s in view.sources] == [200, 60_000, 500, 121_000]
    assert [s.weight for s in view.sources] == [Decimal("0.6000"), Decimal("0.4000"), 0, 0]
    assert (view.freshness.fresh, view.freshness.total) == (3, 4)
    assert (view.freshness.oldest_source, view.freshness.oldest_age_ms) == ("okx", 122_000)


@pytest.mark.parametrize(
    ("kind", "age_ms", "fresh"),
    [("stream", 30_000, True), ("stream", 30_001, False), ("poll", 30_001, True), ("poll", 120_001, False)],
)
def test_a_quote_is_fresh_up_to_and_including_the_max_age_of_its_kind(kind: TickKind, age_ms: int, fresh: bool) -> None:
    view = source_quality(quote("v", "1", age_ms=age_ms, kind=kind), elapsed_ms=0, limits=LIMITS, connection=None)
    assert view.fresh is fresh


def test_at_exactly_the_limit_a_quote_the_validator_called_stale_is_not_fresh() -> None:
    # 30,000.5 ms old at the decision: the event says 30000 ms (whole ms) and reason stale.
    stale = quote("v", "1", age_ms=30_000, kind="stream", reason="stale")
    assert not source_quality(stale, elapsed_ms=0, limits=LIMITS, connection=None).fresh


def test_a_gateway_clock_behind_the_validators_does_not_make_quotes_younger() -> None:
    view = asset_quality(btc(), now_ns=T0 - 5_000 * NS_PER_MS, limits=LIMITS, connections={})
    assert [s.age_ms for s in view.sources] == [200, 60_000, 500, 121_000]


def test_a_consensus_without_quotes_has_no_oldest() -> None:
    view = asset_quality(
        btc(sources=(), n_sources=0, n_used=0, status="stale"), now_ns=T0, limits=LIMITS, connections={}
    )
    assert (view.freshness.fresh, view.freshness.total) == (0, 0)
    assert (view.freshness.oldest_source, view.freshness.oldest_age_ms) == (None, None)


def test_the_limits_are_the_validators_settings_in_ms() -> None:
    limits = FreshnessLimits.from_settings(ValidatorSettings(max_age_s=0.25, max_age_poll_s=90.0))
    assert (limits.stream_ms, limits.poll_ms) == (250, 90_000)
    assert (limits.max_age_ms("stream"), limits.max_age_ms("poll")) == (250, 90_000)


@given(
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.sampled_from(["stream", "poll"]),
)
def test_age_only_grows_and_a_stale_quote_never_turns_fresh(at_decision: int, first: int, more: int, kind: str) -> None:
    tick_kind: TickKind = "poll" if kind == "poll" else "stream"
    q = quote("v", "1", age_ms=at_decision, kind=tick_kind)
    earlier = source_quality(q, elapsed_ms=first, limits=LIMITS, connection=None)
    later = source_quality(q, elapsed_ms=first + more, limits=LIMITS, connection=None)
    assert earlier.age_ms == at_decision + first
    assert later.age_ms - earlier.age_ms == more
    assert earlier.fresh or not later.fresh
    assert earlier.fresh == (earlier.age_ms <= LIMITS.max_age_ms(tick_kind))


def test_the_view_writes_decimals_as_numbers_with_their_exact_digits() -> None:
    text = messages.encode(asset_quality(btc(), now_ns=T0, limits=LIMITS, connections={})).decode()
    assert text.startswith('{"symbol":"BTC","price":47000.30,"currency":"USD","status":"ok",')
    for needle in ('"confidence":0.30', '"cv_pct":0.0008', '"z_score":3.41', '"weight":0.6000', '"price":48500.00'):
        assert needle in text


# --- the endpoint on a real gateway ---------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, *, expect: int = 200) -> dict[str, Any]:
    async with http.get(url) as response:
        assert response.status == expect
        assert response.content_type == "application/json"
        return decode(await response.text())


async def test_quality_shows_each_source_and_its_age_grows_until_fresh_flips(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    await ensure_streams(nc.jetstream(), settings.streams)
    await store(nc, status("binance", "connected", T0), status("kraken", "reconnecting", T0))
    await cache(redis_client, make_price("ETH", 3, status="degraded", n_used=1), btc())
    clock = SteppedClock(T0 + 1_000 * NS_PER_MS)
    async with serving(settings, clock=clock) as gateway:
        url = f"{gateway.url}/api/v1/quality"
        body = await get(http, f"{url}/BTC")
        assert body == {
            "symbol": "BTC",
            "price": Decimal("47000.30"),
            "currency": "USD",
            "status": "ok",
            "method": "weighted_median",
            "confidence": Decimal("0.30"),
            "cv_pct": Decimal("0.0008"),
            "anomaly": True,
            "z_score": Decimal("3.41"),
            "n_used": 2,
            "n_sources": 4,
            "seq": 12,
            "evaluated_at": "2023-11-14T22:13:20.123Z",
            "as_of": "2023-11-14T22:13:21.123Z",
            "freshness": {"fresh": 3, "total": 4, "oldest_source": "okx", "oldest_age_ms": 122_000},
            "sources": [
                {
                    "source": "binance",
                    "symbol": "BTC-USDT",
                    "kind": "stream",
                    "price": Decimal("47000.50"),
                    "deviation_pct": Decimal("0.0011"),
                    "admitted": True,
                    "reason": None,
                    "weight": Decimal("0.6000"),
                    "age_ms": 1_200,
                    "age_ms_at_decision": 200,
                    "max_age_ms": 30_000,
                    "fresh": True,
                    "connection": "connected",
                },
                {
                    "source": "coingecko",
                    "symbol": "BTC-USD",
                    "kind": "poll",
                    "price": Decimal("47000.00"),
                    "deviation_pct": Decimal("-0.0011"),
                    "admitted": True,
                    "reason": None,
                    "weight": Decimal("0.4000"),
                    "age_ms": 61_000,
                    "age_ms_at_decision": 60_000,
                    "max_age_ms": 120_000,
                    "fresh": True,
                    "connection": None,
                },
                {
                    "source": "kraken",
                    "symbol": "BTC-USDT",
                    "kind": "stream",
                    "price": Decimal("48500.00"),
                    "deviation_pct": Decimal("3.1903"),
                    "admitted": False,
                    "reason": "outlier_mad",
                    "weight": 0,
                    "age_ms": 1_500,
                    "age_ms_at_decision": 500,
                    "max_age_ms": 30_000,
                    "fresh": True,
                    "connection": "reconnecting",
                },
                {
                    "source": "okx",
                    "symbol": "BTC-USD",
                    "kind": "poll",
                    "price": Decimal("46000.10"),
                    "deviation_pct": Decimal("-2.1282"),
                    "admitted": False,
                    "reason": "stale",
                    "weight": 0,
                    "age_ms": 122_000,
                    "age_ms_at_decision": 121_000,
                    "max_age_ms": 120_000,
                    "fresh": False,
                    "connection": None,
                },
            ],
        }

        def ages(answer: dict[str, Any]) -> list[tuple[str, int, bool]]:
            return [(s["source"], s["age_ms"], s["fresh"]) for s in answer["sources"]]

        # 29.8 s after the decision: binance is exactly at the stream limit (still fresh), kraken over it.
        clock.now_ns = T0 + 29_800 * NS_PER_MS
        body = await get(http, f"{url}/btcusdt")
        assert ages(body) == [
            ("binance", 30_000, True),
            ("coingecko", 89_800, True),
            ("kraken", 30_300, False),
            ("okx", 150_800, False),
        ]
        assert body["freshness"] == {"fresh": 2, "total": 4, "oldest_source": "okx", "oldest_age_ms": 150_800}
        # One ms later binance is stale too; the polled coingecko quote has the longer poll limit.
        clock.now_ns += NS_PER_MS
        body = await get(http, f"{url}/BTC")
        assert ages(body) == [
            ("binance", 30_001, False),
            ("coingecko", 89_801, True),
            ("kraken", 30_301, False),
            ("okx", 150_801, False),
        ]
        assert body["freshness"]["fresh"] == 1
        assert body["as_of"] == "2023-11-14T22:13:49.924Z"

        # All assets, in configured order; the ones without a price are named.
        listing = await get(http, url)
        assert [a["symbol"] for a in listing["assets"]] == ["BTC", "ETH"]
        assert listing["assets"][0] == body
        assert (listing["assets"][1]["status"], listing["assets"][1]["n_used"]) == ("degraded", 1)
        assert listing["no_price"] == ["SOL", "ADA", "DOT"]
        assert listing["timestamp"] == "2023-11-14T22:13:49.924Z"

        # A live status change reaches the view.
        await store(nc, status("okx", "fallback", T0 + 1, transport="rest"))
        body = await eventually(
            lambda: get(http, f"{url}/BTC"),
            lambda b: b["sources"][3]["connection"] == "fallback",
            timeout=5,
            what="okx shown in fallback",
        )
        assert [s["connection"] for s in body["sources"]] == ["connected", None, "reconnecting", "fallback"]


async def test_unknown_asset_and_missing_price_are_typed_404s(
    settings: Settings, http: aiohttp.ClientSession, redis_client: redis_asyncio.Redis
) -> None:
    async with serving(settings) as gateway:
        url = f"{gateway.url}/api/v1/quality"
        body = await get(http, f"{url}/XRP", expect=404)
        assert (body["type"], body["code"]) == ("error", "unknown_asset")
        assert "XRP" in body["message"]
        body = await get(http, f"{url}/SOL", expect=404)
        assert (body["type"], body["code"]) == ("error", "no_price")
        listing = await get(http, url)
        assert listing["assets"] == []
        assert listing["no_price"] == list(settings.assets)


async def test_price_updates_and_rest_prices_carry_the_anomaly_and_dispersion(
    settings: Settings, nc: NATS, redis_client: redis_asyncio.Redis, http: aiohttp.ClientSession
) -> None:
    await cache(redis_client, btc(5, method="median", anomaly=False, z_score=None, cv_pct=None))
    async with serving(settings) as gateway, http.ws_connect(gateway.ws_url) as ws:
        assert (await request(ws, {"type": "subscribe", "symbol": "BTC"}))["type"] == "subscribed"
        snapshot = (await frame(ws))["data"]
        assert (snapshot["seq"], snapshot["method"], snapshot["anomaly"]) == (5, "median", False)
        assert (snapshot["z_score"], snapshot["cv_pct"]) == (None, None)

        await publish(nc, btc(6, z_score=Decimal("-4.20"), cv_pct=Decimal("0.0123")))
        text = await ws.receive_str(timeout=FRAME_TIMEOUT_S)
        assert '"z_score":-4.20' in text
        data = decode(text)["data"]
        assert (data["seq"], data["method"], data["anomaly"]) == (6, "weighted_median", True)
        assert (data["z_score"], data["cv_pct"]) == (Decimal("-4.20"), Decimal("0.0123"))
        assert [(s["source"], s["kind"], s["weight"]) for s in data["sources"]][:2] == [
            ("binance", "stream", Decimal("0.6000")),
            ("coingecko", "poll", Decimal("0.4000")),
        ]

        price = await get(http, f"{gateway.url}/api/v1/prices/BTC")
        assert (price["seq"], price["method"], price["anomaly"], price["z_score"]) == (5, "median", False, None)
