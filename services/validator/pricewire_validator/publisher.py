"""Publishes the consensus events the book proposes, one asset at a time, seq committed once stored."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.clock import Clock
from pricewire_common.events import Price, decode_price, encode
from pricewire_validator.consensus import ConsensusBook

log = structlog.get_logger(__name__)


@dataclass(slots=True, kw_only=True)
class Published:
    """What one `publish_due` did: the events stored and the assets whose consensus raised, at `now_ns`."""

    now_ns: int
    sent: list[Price] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


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
        self.failures: Counter[str] = Counter()
        """Per asset, how many evaluations raised."""

    async def publish_due(self, assets: Iterable[str]) -> Published:
        """Publish every event due now for `assets`. Bus errors propagate.

        One asset whose consensus cannot be computed (ArithmeticError) is logged, counted in `failures`
        and reported in `Published.failed`; it never holds back the other assets. The due events go
        out together and are committed as their acks come back: one round trip per call, not one per
        asset. If a publish fails, the events stored are committed all the same, then the error is raised.
        """
        published = Published(now_ns=self._clock())
        async with self._lock:
            due: list[Price] = []
            for asset in assets:
                try:
                    price = self._book.propose(asset, published.now_ns)
                except ArithmeticError:
                    self.failures[asset] += 1
                    log.exception("consensus_failed", asset=asset, failures=self.failures[asset])
                    published.failed.append(asset)
                    continue
                if price is not None:
                    due.append(price)
            if len(due) == 1:
                published.sent.append(self._commit(await self._store(due[0])))
            elif due:
                stored = await asyncio.gather(*(self._store(price) for price in due), return_exceptions=True)
                failure: BaseException | None = None
                for outcome in stored:
                    if isinstance(outcome, BaseException):
                        failure = failure or outcome
                    else:
                        published.sent.append(self._commit(outcome))
                if failure is not None:
                    raise failure
        return published

    async def _store(self, price: Price) -> tuple[Price, bool]:
        """Publish `price`; the event the log holds for its seq, and whether it was there already."""
        ack = await self._js.publish(subjects.price(price.asset), encode(price), headers={MSG_ID_HEADER: msg_id(price)})
        if ack.duplicate:
            # An earlier attempt at this seq was stored but its ack was lost: the stored event is the truth.
            stored = await self._js.get_msg(subjects.PRICES_STREAM, ack.seq)
            return decode_price(stored.data or b""), True
        return price, False

    def _commit(self, stored: tuple[Price, bool]) -> Price:
        price, duplicate = stored
        self._book.commit(price)
        self.published += 1
        log.debug(
            "price_published",
            asset=price.asset,
            seq=price.seq,
            price=str(price.price),
            status=price.status,
            n_used=price.n_used,
            duplicate=duplicate,
        )
        return price
