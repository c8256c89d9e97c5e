"""The validator's publisher on a real JetStream: the events due for several assets go out together."""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from pricewire_common import subjects
from pricewire_common.bus import ensure_streams, stream_configs
from pricewire_common.config import Settings, StreamSettings
from pricewire_common.events import Tick, decode_price
from pricewire_validator.consensus import ConsensusBook, ConsensusRule
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
    publisher = PricePublisher(js, book, clock=time.time_ns)

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


async def test_a_refused_publish_raises_after_the_stored_ones_are_committed(nc: NATS) -> None:
    js = nc.jetstream()
    # A PRICES stream that takes BTC only: the bus refuses ETH's and SOL's events (no stream answers).
    configs = {c.name: c for c in stream_configs(StreamSettings())}
    prices: StreamConfig = replace(configs[subjects.PRICES_STREAM], subjects=[subjects.price("BTC")])
    await js.add_stream(prices)
    book = book_with_quotes()
    publisher = PricePublisher(js, book, clock=time.time_ns)

    with pytest.raises(NoStreamResponseError):
        await publisher.publish_due(ASSETS)

    btc = book.last("BTC")
    assert btc is not None and (btc.price, btc.seq) == (Decimal(100), 1)
    assert book.last("ETH") is None and book.last("SOL") is None  # seq stays where the log is
    assert publisher.published == 1
    # Once the bus takes them, the refused events go out with the seq they were denied.
    await js.update_stream(replace(prices, subjects=[subjects.ALL_PRICES]))
    retried = await publisher.publish_due(ASSETS)
    assert sorted((p.asset, p.seq) for p in retried.sent) == [("ETH", 1), ("SOL", 1)]
