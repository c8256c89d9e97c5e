"""The consensus engine through the validator service on a real NATS: venues drift, fall quiet, stand alone.

Ticks go to stream TICKS as collectors publish them; what is asserted is read back from
`md.price.<ASSET>`. Time is the validator's injectable clock, shared with the venues that stamp the
ticks, so "a venue went quiet for 3 s" is a step of that clock rather than a wait.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from pricewire_common.bus import ensure_streams
from pricewire_common.clock import NS_PER_MS, NS_PER_S
from pricewire_common.config import Settings, ValidatorSettings
from pricewire_common.events import Price, SourceQuote, Tick, TickKind
from tests.test_validator_service import PriceReader, publish_tick, validator

MAX_AGE_S = 2.0
MAX_AGE_POLL_S = 6.0
_ids = itertools.count()


class SteppedClock:
    """The wall clock plus an offset the test moves forward: the validator's and the venues' time."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns

    def advance(self, seconds: float) -> None:
        self.offset_ns += round(seconds * NS_PER_S)


@pytest.fixture
def settings(nats_url: str) -> Settings:
    """Short max ages and a 0.5 s heartbeat (the sweep runs as often), the other knobs as shipped."""
    return replace(
        Settings(),
        nats_url=nats_url,
        validator=replace(ValidatorSettings(), max_age_s=MAX_AGE_S, max_age_poll_s=MAX_AGE_POLL_S, heartbeat_s=0.5),
    )


@pytest.fixture
async def js(settings: Settings, nc: NATS) -> JetStreamContext:
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    return js


def quote(
    source: str,
    price: str,
    *,
    at_ns: int,
    kind: TickKind = "stream",
    half_spread: str | None = None,
    volume: str | None = "10",
) -> Tick:
    value = Decimal(price)
    book = None if half_spread is None else Decimal(half_spread)
    return Tick(
        id=f"{source}-scenario-{next(_ids)}",
        source=source,
        symbol="BTC-USDT",
        base="BTC",
        quote="USDT",
        price=value,
        bid=None if book is None else value - book,
        ask=None if book is None else value + book,
        volume_24h=None if volume is None else Decimal(volume),
        ts_exchange=at_ns - NS_PER_MS,
        ts_received=at_ns,
        kind=kind,
    )


def of(price: Price, source: str) -> SourceQuote:
    (found,) = [q for q in price.sources if q.source == source]
    return found


def quoting(source: str, value: str) -> Callable[[Price], bool]:
    """Accepts the first event in which `source`'s quote is `value`."""
    return lambda p: any(q.source == source and q.price == Decimal(value) for q in p.sources)


def assert_no_event_lost(reader: PriceReader) -> None:
    seqs = [p.seq for p in reader.seen]
    assert seqs == list(range(1, len(seqs) + 1))


HONEST = {"sim-a": "100.00", "sim-b": "100.01", "sim-c": "99.99"}


async def test_a_venue_drifting_to_ten_percent_is_flagged_and_excluded_and_the_consensus_stays_with_the_others(
    settings: Settings, js: JetStreamContext
) -> None:
    clock = SteppedClock()
    reader = await PriceReader.open(js)
    drift_bps = [0, 50, 200, 400, 600, 800, 1000]  # each step under the 20 % jump limit: a drift, not a spike
    seen: dict[int, Price] = {}
    async with validator(settings, clock=clock):
        for bps in drift_bps:
            now = clock()
            for source, honest in HONEST.items():
                await publish_tick(js, quote(source, honest, at_ns=now, half_spread="0.01"))
            drifted = str(Decimal("100.00") * (10_000 + bps) / 10_000)
            await publish_tick(js, quote("sim-d", drifted, at_ns=now, half_spread="0.01"))
            # A step that changes neither the price nor who is admitted shows at the next heartbeat.
            seen[bps] = await reader.next(quoting("sim-d", drifted))
    await reader.close()

    for bps in (0, 50):  # within the MAD test's 1 % floor: an honest venue a little off, counted
        assert (of(seen[bps], "sim-d").reason, seen[bps].n_used) == (None, 4)
        assert of(seen[bps], "sim-d").weight > 0
    for bps in (200, 400):  # past 1 % while the others agree to 0.01 %: the robust test catches it
        assert of(seen[bps], "sim-d").reason == "outlier_mad"
    for bps in (200, 400, 600, 800, 1000):
        drifter = of(seen[bps], "sim-d")
        assert (drifter.outlier, drifter.weight, seen[bps].n_used, seen[bps].n_sources) == (True, Decimal(0), 3, 4)
    final = seen[1000]
    drifter = of(final, "sim-d")
    assert (drifter.reason, drifter.price) == ("outlier", Decimal(110))
    assert drifter.deviation_pct > 9  # from the median of all four fresh quotes, 100.005
    assert final.status == "ok"
    assert all(of(final, source).reason is None for source in HONEST)
    assert abs(sum((of(final, source).weight for source in HONEST), Decimal(0)) - 1) <= Decimal("0.0002")
    assert final.price == Decimal("100.00")  # the weighted median of the three honest venues
    assert final.confidence == Decimal("0.02")  # 0.01 away plus a half spread of 0.01
    # Not one event along the way left the honest venues' range or their ok status.
    assert all(Decimal("99.99") <= p.price <= Decimal("100.01") for p in reader.seen)
    assert {p.status for p in reader.seen} == {"ok"}
    assert_no_event_lost(reader)


async def test_a_quiet_venue_turns_stale_after_its_max_age_and_a_quiet_poll_venue_later(
    settings: Settings, js: JetStreamContext
) -> None:
    clock = SteppedClock()
    reader = await PriceReader.open(js)
    async with validator(settings, clock=clock):
        start = clock()
        for source in ("sim-a", "sim-b", "sim-c"):
            await publish_tick(js, quote(source, "100", at_ns=start))
        await publish_tick(js, quote("sim-p", "100", at_ns=start, kind="poll"))
        everyone = await reader.next(lambda p: p.n_used == 4)

        # sim-c and sim-p fall silent for 3 s: past a stream's max age (2 s), within a poll's (6 s).
        # The others have quoted for that moment already, so only the silent ones can age.
        for source in ("sim-a", "sim-b"):
            await publish_tick(js, quote(source, "100.2", at_ns=start + 3 * NS_PER_S))
        await reader.next(quoting("sim-b", "100.2"))
        clock.advance(3)
        c_stale = await reader.next(lambda p: of(p, "sim-c").reason == "stale")

        # 7 s of silence: past the poll's max age too.
        for source in ("sim-a", "sim-b"):
            await publish_tick(js, quote(source, "100.4", at_ns=start + 7 * NS_PER_S))
        await reader.next(quoting("sim-b", "100.4"))
        clock.advance(4)
        p_stale = await reader.next(lambda p: of(p, "sim-p").reason == "stale")
    await reader.close()

    assert (everyone.status, everyone.n_sources) == ("ok", 4)
    assert (c_stale.status, c_stale.n_used, c_stale.n_sources) == ("ok", 3, 4)
    assert of(c_stale, "sim-c").age_ms > MAX_AGE_S * 1000
    assert of(c_stale, "sim-c").weight == 0
    polled = of(c_stale, "sim-p")
    assert (polled.reason, polled.kind) == (None, "poll")  # as silent as sim-c, yet fresh
    assert MAX_AGE_S * 1000 < polled.age_ms <= MAX_AGE_POLL_S * 1000
    assert polled.weight > 0
    assert (p_stale.status, p_stale.n_used) == ("ok", 2)
    assert of(p_stale, "sim-p").age_ms > MAX_AGE_POLL_S * 1000
    assert {q.source for q in p_stale.sources if q.reason is None} == {"sim-a", "sim-b"}
    assert p_stale.price == Decimal("100.4")
    assert_no_event_lost(reader)


async def test_a_lone_venue_is_degraded_and_when_it_falls_silent_its_last_price_is_published_stale(
    settings: Settings, js: JetStreamContext
) -> None:
    clock = SteppedClock()
    reader = await PriceReader.open(js)
    async with validator(settings, clock=clock):
        await publish_tick(js, quote("sim-a", "47000.5", at_ns=clock(), half_spread="1.5"))
        alone = await reader.next()
        clock.advance(MAX_AGE_S + 0.5)
        stale = await reader.next(lambda p: p.status == "stale")
        # Nothing comes back: the heartbeat keeps saying so, it never goes quiet on the asset.
        repeated = await reader.next(lambda p: p.seq > stale.seq)
    await reader.close()

    assert (alone.status, alone.n_used, alone.n_sources) == ("degraded", 1, 1)
    assert (alone.price, alone.confidence) == (Decimal("47000.5"), Decimal("1.5"))
    assert of(alone, "sim-a").weight == 1
    assert (stale.price, stale.confidence, stale.n_used, stale.n_sources) == (alone.price, alone.confidence, 0, 1)
    assert (of(stale, "sim-a").reason, of(stale, "sim-a").weight) == ("stale", Decimal(0))
    assert (repeated.status, repeated.price, repeated.seq) == ("stale", alone.price, stale.seq + 1)
    assert {p.status for p in reader.seen} == {"degraded", "stale"}
    assert_no_event_lost(reader)
