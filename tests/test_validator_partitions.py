"""Validator replicas sharing the assets: the partition function, the lease plan, and replicas on a real NATS."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from decimal import Decimal

import msgspec
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from structlog.testing import capture_logs

from pricewire_cli.embedded import NatsServer
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import Settings, StreamSettings, ValidatorSettings
from pricewire_common.events import Price, Tick, decode_price, encode
from pricewire_validator.leases import BUCKET
from pricewire_validator.partitions import (
    fair_share,
    partition_of,
    partitions,
    plan,
    supports_filter_subjects,
    weight,
)
from pricewire_validator.service import partition_pull, run
from tests.waiting import eventually

ASSETS = ("BTC", "ETH", "SOL", "ADA", "DOT")
"""In two partitions: BTC, SOL, ADA in p0of2; ETH, DOT in p1of2."""
BASE = {"BTC": "47000", "ETH": "3000", "SOL": "150", "ADA": "0.5", "DOT": "7"}
VENUES = (("sim-a", "USDT", "0.9995"), ("sim-b", "USD", "1"), ("sim-c", "USDC", "1.0004"))
LEASE_S = 1.0
WAIT_S = 15.0
_ids = itertools.count()


# --- the partition function and the plan (pure) ---------------------------------------------------


def test_an_assets_partition_depends_on_the_asset_and_the_count_only() -> None:
    # SHA-1 of the code: the same in every process, whatever PYTHONHASHSEED or the other assets.
    assert [partition_of(a, 2) for a in ASSETS] == [0, 1, 1, 0, 1]
    assert [partition_of(a, 3) for a in ASSETS] == [2, 1, 0, 0, 2]
    assert [p.assets for p in partitions(ASSETS, ("USD",), 2)] == [("BTC", "ADA"), ("ETH", "SOL", "DOT")]
    assert [p.assets for p in partitions(("DOT", "ETH"), ("USD",), 2)] == [(), ("DOT", "ETH")]
    with pytest.raises(ValueError, match="at least 1"):
        partition_of("BTC", 0)


def test_a_partition_reads_its_assets_in_every_usd_quote_and_names_its_count() -> None:
    p0, p1 = partitions(ASSETS, ("USD", "USDT"), 2)
    assert p1.filter_subjects == tuple(f"md.tick.*.{a}-{q}" for a in ("ETH", "SOL", "DOT") for q in ("USD", "USDT"))
    assert (p0.name, p0.durable, p1.durable) == ("p0of2", "validator-p0of2", "validator-p1of2")
    assert partitions(ASSETS, ("USD",), 4)[1].durable == "validator-p1of4"  # another count, another consumer


def test_several_filter_subjects_need_nats_2_10() -> None:
    assert [supports_filter_subjects(*v) for v in ((2, 9), (2, 10), (2, 11), (3, 0))] == [False, True, True, True]


_codes = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=6)


@given(assets=st.lists(_codes, min_size=1, max_size=30, unique=True), count=st.integers(1, 9))
def test_every_asset_is_in_exactly_one_partition(assets: list[str], count: int) -> None:
    shares = partitions(assets, ("USD",), count)
    assert [p.index for p in shares] == list(range(count))
    placed = [a for p in shares for a in p.assets]
    assert sorted(placed) == sorted(assets)
    for p in shares:
        assert all(partition_of(a, count) == p.index for a in p.assets)
        assert all(partitions([a], ("USD",), count)[p.index].assets == (a,) for a in p.assets)


def converge(members: list[str], holders: Mapping[str, str], keys: list[str]) -> dict[str, str]:
    """Every member follows its plan in turn, a take of a taken lease failing as on the bus, until nobody moves."""
    held = dict(holders)
    for _ in range(50):
        moved = False
        for member in members:
            mine = [k for k, h in held.items() if h == member]
            moves = plan(member, partitions=keys, members=members, held=mine, taken=set(held))
            for key in moves.release:
                del held[key]
            for key in moves.acquire:
                assert key not in held
                held[key] = member
            moved = moved or bool(moves.release or moves.acquire)
        if not moved:
            return held
    raise AssertionError(f"no fixed point: {held}")


_replicas = st.lists(
    st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=8), min_size=1, max_size=5, unique=True
)


@given(replicas=_replicas, count=st.integers(1, 12), dead=st.integers(0, 4))
def test_a_dead_replicas_partitions_move_and_no_other(replicas: list[str], count: int, dead: int) -> None:
    keys = [p.name for p in partitions([f"A{i}" for i in range(count)], ("USD",), count) if p.assets]
    before = converge(replicas, {}, keys)
    assert set(before) == set(keys)  # every partition is decided...
    share = fair_share(len(keys), len(replicas))
    assert all(n <= share for n in Counter(before.values()).values())  # ...and nobody holds more than its share

    gone = replicas[dead % len(replicas)]
    survivors = [r for r in replicas if r != gone]
    if not survivors:
        return
    after = converge(survivors, {k: h for k, h in before.items() if h != gone}, keys)
    assert set(after) == set(keys)
    assert {k: h for k, h in after.items() if before[k] != gone} == {k: h for k, h in before.items() if h != gone}


@given(replicas=_replicas, count=st.integers(1, 12))
def test_a_new_replica_takes_partitions_only_from_replicas_above_the_new_share(replicas: list[str], count: int) -> None:
    keys = [f"p{i}of{count}" for i in range(count)]
    first, *others = replicas
    before = converge([first], {}, keys)
    assert before == dict.fromkeys(keys, first)
    after = converge(replicas, before, keys)
    share = fair_share(count, len(replicas))
    assert set(after) == set(keys)
    assert all(n <= share for n in Counter(after.values()).values())
    if others:
        # The first replica keeps its share and hands over the rest: a second one takes half.
        assert Counter(after.values())[first] == share
    assert weight("a", "p0of2") == weight("a", "p0of2") != weight("b", "p0of2")


# --- replicas on a real NATS ------------------------------------------------------------------------


def make_tick(asset: str, source: str, quote: str, price: Decimal, *, now: int) -> Tick:
    return Tick(
        id=f"{source}-{asset}-{next(_ids)}",
        source=source,
        symbol=f"{asset}-{quote}",
        base=asset,
        quote=quote,
        price=price,
        ts_exchange=now - 1_000_000,
        ts_received=now,
    )


def tick_round(step: int, assets: tuple[str, ...] = ASSETS, *, outlier: bool = False) -> list[Tick]:
    """One quote per venue and asset, moved `step` tenths of a percent; with `outlier`, SOL's sim-c is 10 % off."""
    now = time.time_ns()
    ticks = []
    for asset in assets:
        for source, quote, bias in VENUES:
            price = Decimal(BASE[asset]) * Decimal(bias) * (1 + Decimal(step) / 1000)
            if outlier and asset == "SOL" and source == "sim-c":
                price *= Decimal("1.1")
            ticks.append(make_tick(asset, source, quote, price.quantize(Decimal("0.000001")), now=now))
    return ticks


async def publish(js: JetStreamContext, ticks: list[Tick]) -> None:
    for tick in ticks:
        await js.publish(
            subjects.tick(tick.source, tick.base, tick.quote), encode(tick), headers={MSG_ID_HEADER: tick.id}
        )


def validator_settings(nats_url: str, *, partitions: int) -> Settings:
    return replace(
        Settings(),
        nats_url=nats_url,
        assets=ASSETS,
        validator=replace(
            ValidatorSettings(), heartbeat_s=1.0, deviation_bps=0.0, partitions=partitions, lease_s=LEASE_S
        ),
        # A stopped fetch may still have been handed ticks: they come back to the next holder after this.
        streams=replace(StreamSettings(), ack_wait_s=2.0),
    )


@asynccontextmanager
async def replica(settings: Settings, name: str | None = None) -> AsyncIterator[asyncio.Event]:
    """One validator replica in this loop; set the event it yields to stop it early."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, replica=name))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=WAIT_S)
    assert task.done()


async def holders(js: JetStreamContext, count: int = 2) -> dict[str, str | None]:
    """Who holds each partition's lease now."""
    found: dict[str, str | None] = dict.fromkeys((f"p{i}of{count}" for i in range(count)), None)
    try:
        kv = await js.key_value(BUCKET)
    except BucketNotFoundError:
        return found
    for i in range(count):
        try:
            entry = await kv.get(f"p{i}of{count}")
        except KeyNotFoundError:
            continue
        else:
            found[f"p{i}of{count}"] = (entry.value or b"").decode()
    return found


async def settled(js: JetStreamContext, durables: list[str]) -> None:
    """Every tick read and acknowledged by these consumers, so every price due is in the log."""

    async def probe() -> list[tuple[int, int]]:
        counts = []
        for durable in durables:
            try:
                info = await js.consumer_info(subjects.TICKS_STREAM, durable)
            except NotFoundError:
                counts.append((-1, -1))
            else:
                counts.append((info.num_pending or 0, info.num_ack_pending or 0))
        return counts

    await eventually(probe, lambda c: all(pair == (0, 0) for pair in c), timeout=WAIT_S, what="consumers settled")


async def last_prices(js: JetStreamContext) -> dict[str, Price]:
    return {
        a: decode_price((await js.get_last_msg(subjects.PRICES_STREAM, subjects.price(a))).data or b"") for a in ASSETS
    }


def consensus(price: Price) -> tuple[object, ...]:
    """What the consensus decided, without what depends on when it was decided or on its history."""
    sources = tuple((q.source, q.price, q.reason) for q in price.sources)
    return (price.price, price.status, price.confidence, price.n_sources, price.n_used, price.cv_pct, sources)


async def all_events(js: JetStreamContext) -> list[Price]:
    """Every event of stream PRICES, in stream order."""
    info = await js.stream_info(subjects.PRICES_STREAM)
    sub = await js.pull_subscribe(subjects.ALL_PRICES, stream=subjects.PRICES_STREAM)
    events: list[Price] = []
    try:
        while len(events) < info.state.messages:
            events += [decode_price(m.data) for m in await sub.fetch(500, timeout=5)]
    finally:
        await sub.unsubscribe()
    return events


def assert_seq_contiguous(events: list[Price]) -> None:
    """Per asset, seq 1, 2, 3... in log order: no event lost, repeated, or decided twice."""
    by_asset: dict[str, list[int]] = {}
    for event in events:
        by_asset.setdefault(event.asset, []).append(event.seq)
    for asset, seqs in by_asset.items():
        assert seqs == list(range(1, len(seqs) + 1)), asset


def assert_one_decider_at_a_time(logs: Sequence[Mapping[str, object]]) -> int:
    """Replay the replicas' logs: a partition is taken only when free, and only its holder publishes its prices.

    Returns how many prices the replicas published.
    """
    holder: dict[object, object] = {}
    published = 0
    for entry in logs:
        event, where, who = entry["event"], entry.get("partition"), entry.get("replica")
        if where == "p0of1":
            continue  # the one-partition baseline (a single replica) of the same test
        if event == "partition_acquired":
            assert holder.get(where) is None, entry
            holder[where] = who
        elif event in ("partition_released", "partition_lost"):
            assert holder.get(where) == who, entry
            holder[where] = None
        elif event == "price_lost":
            raise AssertionError(entry)  # a seq another replica had published, or a refused event
        elif event == "price_published" and who is not None:
            assert holder.get(where) == who, entry
            assert f"p{partition_of(str(entry['asset']), 2)}of2" == where, entry
            published += 1
    return published


async def test_two_replicas_decide_what_one_decides_each_asset_by_one_of_them_at_a_time(
    nats_url: str, nc: NATS, nats_server: NatsServer, replicas_nats: NATS
) -> None:
    one, two = nc.jetstream(), replicas_nats.jetstream()
    await ensure_streams(one, StreamSettings())
    alone = validator_settings(nats_url, partitions=1)
    split = validator_settings(nats_server.url, partitions=2)
    first = tick_round(1)
    first.append(msgspec.structs.replace(first[0], id="bad", price=Decimal("-1")))  # dead-lettered by whoever holds BTC
    for js in (one, two):
        await publish(js, first)

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with replica(alone), replica(split, "a"):
            await eventually(lambda: holders(two), lambda h: set(h.values()) == {"a"}, timeout=WAIT_S)
            async with replica(split, "b") as stop_b:
                # A second replica starts while ticks flow: the first hands it one of its two partitions.
                second = tick_round(2)
                for js in (one, two):
                    await publish(js, second)
                await eventually(lambda: holders(two), lambda h: set(h.values()) == {"a", "b"}, timeout=WAIT_S)
                third = tick_round(3, outlier=True)
                for js in (one, two):
                    await publish(js, third)
                await settled(one, ["validator"])
                await settled(two, ["validator-p0of2", "validator-p1of2"])
                expected, got = await last_prices(one), await last_prices(two)

                # One replica stops: the other takes its partition over within a round and prices its assets.
                b_holds = next(name for name, who in (await holders(two)).items() if who == "b")
                b_assets = partitions(ASSETS, (), 2)[int(b_holds[1])].assets
                stop_b.set()
                await eventually(lambda: holders(two), lambda h: set(h.values()) == {"a"}, timeout=2 * LEASE_S + 1)
                await publish(two, tick_round(5, b_assets))
                await settled(two, ["validator-p0of2", "validator-p1of2"])
                taken_over = await last_prices(two)

    assert {a: consensus(p) for a, p in got.items()} == {a: consensus(p) for a, p in expected.items()}
    assert all(p.status == "ok" and p.n_used == 3 for a, p in expected.items() if a != "SOL")
    assert expected["SOL"].n_used == 2
    assert expected["SOL"].sources[2].reason in ("outlier", "outlier_mad")  # sim-c, 10 % off
    assert expected["BTC"].price == Decimal("47000") * Decimal("1.003")  # the venues' median, round 3
    for asset in b_assets:
        assert taken_over[asset].price == Decimal(BASE[asset]) * Decimal("1.005"), asset
        assert taken_over[asset].seq > got[asset].seq
    for js in (one, two):
        assert (await js.stream_info(subjects.DLQ_STREAM)).state.messages == 1
    assert_seq_contiguous(await all_events(two))
    assert assert_one_decider_at_a_time(logs) > 0
    split_published = [e for e in logs if e["event"] == "price_published" and e.get("partition") != "p0of1"]
    assert {e.get("replica") for e in split_published} == {"a", "b"}


async def test_a_partition_consumer_follows_a_change_of_assets(replicas_nats: NATS) -> None:
    js = replicas_nats.jetstream()
    before = partitions(("BTC",), ("USD",), 2)[0]
    after = partitions(("BTC", "ADA"), ("USD", "USDT"), 2)[0]
    sub, _ = await partition_pull(js, before, ack_wait_s=5, start_ns=time.time_ns())
    await sub.unsubscribe()
    sub, _ = await partition_pull(js, after, ack_wait_s=5, start_ns=time.time_ns())
    await sub.unsubscribe()
    await publish(js, [make_tick("ADA", "sim-a", "USDT", Decimal("0.5"), now=time.time_ns())])

    # The server counts a filtered consumer's pending asynchronously: wait for it, not on it.
    info = await eventually(
        lambda: js.consumer_info(subjects.TICKS_STREAM, after.durable),
        lambda i: i.num_pending == 1,
        timeout=WAIT_S,
        what="the ADA tick pending on the updated consumer",
    )
    assert sorted(info.config.filter_subjects or []) == sorted(after.filter_subjects)


async def test_with_one_partition_a_second_replica_waits_as_a_hot_standby(nats_url: str, nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    alone = validator_settings(nats_url, partitions=1)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with replica(alone, "a") as stop_a:
            await eventually(lambda: holders(js, 1), lambda h: h == {"p0of1": "a"}, timeout=WAIT_S)
            async with replica(alone, "b"):
                await publish(js, tick_round(1))
                await settled(js, ["validator"])
                assert await holders(js, 1) == {"p0of1": "a"}  # b waits: it neither reads nor decides
                handover = len(logs)
                stop_a.set()
                await eventually(lambda: holders(js, 1), lambda h: h == {"p0of1": "b"}, timeout=2 * LEASE_S + 1)
                await publish(js, tick_round(2))
                await settled(js, ["validator"])
                prices = await last_prices(js)

    assert {e["replica"] for e in logs[:handover] if e["event"] == "price_published"} == {"a"}
    assert {e["replica"] for e in logs[handover:] if e["event"] == "price_published"} == {"b"}
    assert all(p.price == Decimal(BASE[a]) * Decimal("1.002") for a, p in prices.items())
    assert_seq_contiguous(await all_events(js))
