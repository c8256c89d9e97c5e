"""Publishes the consensus events the book proposes, one asset at a time, seq committed once stored."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.clock import Clock
from pricewire_common.events import Price, decode_price, encode
from pricewire_validator.consensus import ConsensusBook

log = structlog.get_logger(__name__)


def msg_id(price: Price) -> str:
    """The `Nats-Msg-Id` of a price event: a retried publish of the same seq is stored once."""
    return f"price:{price.asset}:{price.seq}"


class PricePublisher:
    """Turns the book's due evaluations into events on `md.price.<ASSET>`.

    One lock serialises propose -> publish -> commit, so the tick path and the heartbeat never hand
    out the same seq twice. A failed publish raises before the commit: seq stays where the log is.
    """

    def __init__(self, js: JetStreamContext, book: ConsensusBook, *, clock: Clock) -> None:
        self._js = js
        self._book = book
        self._clock = clock
        self._lock = asyncio.Lock()
        self.published = 0

    async def publish_due(self, assets: Iterable[str]) -> list[Price]:
        """Publish every event due now for `assets`; returns them. Bus errors propagate."""
        sent: list[Price] = []
        async with self._lock:
            now = self._clock()
            for asset in assets:
                price = self._book.propose(asset, now)
                if price is None:
                    continue
                sent.append(await self._publish(price))
        return sent

    async def _publish(self, price: Price) -> Price:
        ack = await self._js.publish(subjects.price(price.asset), encode(price), headers={MSG_ID_HEADER: msg_id(price)})
        if ack.duplicate:
            # An earlier attempt at this seq was stored but its ack was lost: the stored event is the truth.
            stored = await self._js.get_msg(subjects.PRICES_STREAM, ack.seq)
            price = decode_price(stored.data or b"")
        self._book.commit(price)
        self.published += 1
        log.debug(
            "price_published",
            asset=price.asset,
            seq=price.seq,
            price=str(price.price),
            status=price.status,
            n_used=price.n_used,
            duplicate=bool(ack.duplicate),
        )
        return price
