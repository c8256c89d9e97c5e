"""The validator's publisher on a real JetStream: events committed as sent, confirmed by the log after."""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams, stream_configs
from pricewire_common.config import Settings, StreamSettings
from pricewire_common.events import Tick, decode_price
from pricewire_common.js_publish import AckedPublisher
from pricewire_validator.consensus import ConsensusBook, ConsensusRule
from pricewire_validator.errors import PublishLost
from pricewire_validator.ownership import HOLD_MARGIN, Hold
from pricewire_validator.publisher import PricePublisher

ASSETS = ("BTC", "ETH", "SOL")


def tick(source: str, base: str, price: str) -> Tick:
    now = time.time_ns()
    return Tick(
        id=f"{source}-{base}-{now}",
        source=source,
        symbol=f"{base}-USDT",
        base=base,
        quote="USDT",
        price=Decimal(price),
        ts_exchange=now - 1_000_000,
        ts_received=now,
    )


def book_with_quotes() -> ConsensusBook:
    book = ConsensusBook(ConsensusRule.from_settings(Settings()))
    for base, price in zip(ASSETS, ("100", "10", "1"), strict=True):
        for source in ("sim-a", "sim-b"):
            book.update(tick(source, base, price))
    return book


async def test_every_asset_due_is_stored_and_committed_once(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    book = book_with_quotes()
    publisher = PricePublisher(AckedPublisher(nc), book, clock=time.time_ns)

    published = await publisher.publish_due(ASSETS)

    assert sorted((p.asset, p.seq) for p in published.sent) == [("BTC", 1), ("ETH", 1), ("SOL", 1)]
    assert publisher.published == 3
    stored = {}
    for asset in ASSETS:
        raw = await js.get_last_msg(subjects.PRICES_STREAM, subjects.price(asset))
        stored[asset] = decode_price(raw.data or b"")
    assert {a: (p.price, p.seq) for a, p in stored.items()} == {
        "BTC": (Decimal(100), 1),
        "ETH": (Decimal(10), 1),
        "SOL": (Decimal(1), 1),
    }
    assert all(book.last(asset) == stored[asset] for asset in ASSETS)
    assert (await publisher.publish_due(ASSETS)).sent == []  # nothing moved: nothing due


async def test_a_refused_publish_loses_the_publisher_for_good(nc: NATS) -> None:
    js = nc.jetstream()
    # A PRICES stream that takes BTC only: the bus refuses ETH's and SOL's events (no stream answers).
    configs = {c.name: c for c in stream_configs(StreamSettings())}
    prices: StreamConfig = replace(configs[subjects.PRICES_STREAM], subjects=[subjects.price("BTC")])
    await js.add_stream(prices)
    book = book_with_quotes()
    publisher = PricePublisher(AckedPublisher(nc), book, clock=time.time_ns)

    with pytest.raises(PublishLost) as lost:
        await publisher.publish_due(ASSETS)

    # The first event the log did not take is named; the book went ahead of the log with it.
    assert (lost.value.asset, lost.value.seq) == ("ETH", 1)
    assert "NoStreamResponseError" in lost.value.detail
    assert publisher.lost is lost.value and publisher.lost_event.is_set()
    assert decode_price((await js.get_last_msg(subjects.PRICES_STREAM, subjects.price("BTC"))).data or b"").seq == 1
    # Once lost, nothing more is sent: only a decider rebuilt from the log may go on.
    await js.update_stream(replace(prices, subjects=[subjects.ALL_PRICES]))
    book.update(tick("sim-a", "BTC", "200"))
    with pytest.raises(PublishLost):
        await publisher.send_due(["BTC"])
    assert (await js.stream_info(subjects.PRICES_STREAM)).state.messages == 1


async def test_a_seq_already_in_the_log_loses_the_publisher(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    # Another writer (say a replica that held the lease before) already stored BTC's seq 1.
    await js.publish(subjects.price("BTC"), b"{}", headers={MSG_ID_HEADER: "price:BTC:1"})
    publisher = PricePublisher(AckedPublisher(nc), book_with_quotes(), clock=time.time_ns)

    with pytest.raises(PublishLost) as lost:
        await publisher.publish_due(["BTC"])

    assert (lost.value.asset, lost.value.seq) == ("BTC", 1)
    assert "already in the log" in lost.value.detail
    assert (await js.stream_info(subjects.PRICES_STREAM)).state.messages == 1


async def test_sent_events_are_confirmed_later_in_seq_order(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    book = book_with_quotes()
    publisher = PricePublisher(AckedPublisher(nc), book, clock=time.time_ns)

    first = await publisher.send_due(ASSETS)
    book.update(tick("sim-a", "BTC", "120"))
    book.update(tick("sim-b", "BTC", "120"))
    second = await publisher.send_due(["BTC"])  # decided before the first round is confirmed

    assert [(p.asset, p.seq) for p in second.sent] == [("BTC", 2)]
    assert publisher.published == 0  # nothing confirmed yet
    await publisher.confirm(second)
    await publisher.confirm(first)
    assert publisher.published == 4
    stored = decode_price((await js.get_last_msg(subjects.PRICES_STREAM, subjects.price("BTC"))).data or b"")
    assert (stored.seq, stored.price) == (2, Decimal(120))


async def test_a_publisher_whose_lease_is_not_surely_held_sends_nothing_and_is_lost(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_streams(js, StreamSettings())
    book = book_with_quotes()
    held = [True]
    publisher = PricePublisher(AckedPublisher(nc), book, clock=time.time_ns, fence=lambda: held[0])
    assert len((await publisher.publish_due(["BTC"])).sent) == 1
    for base in ("ETH", "SOL"):  # the fence is asked per price: the one in the middle of a round goes too
        book.update(tick("sim-c", base, "12" if base == "ETH" else "1.2"))
    held[0] = False  # the process stalled past its hold

    with pytest.raises(PublishLost) as lost:
        await publisher.send_due(ASSETS)

    assert "lease" in lost.value.detail
    assert publisher.lost is lost.value and publisher.lost_event.is_set()
    assert book.last("ETH") is None and book.last("SOL") is None  # proposed, never committed
    info = await js.stream_info(subjects.PRICES_STREAM)
    assert info.state.messages == 1  # only BTC's first price, sent while the lease was held


def test_a_hold_ends_a_margin_before_a_lease_from_the_renewal_it_sent() -> None:
    now = time.monotonic()
    assert Hold(lease_s=10.0, sent_at=now).valid()
    assert Hold(lease_s=10.0, sent_at=now - 8.9).valid()
    assert not Hold(lease_s=10.0, sent_at=now - (10.0 * (1 - HOLD_MARGIN))).valid()
    assert not Hold(lease_s=10.0, sent_at=now - 10.0).valid()
