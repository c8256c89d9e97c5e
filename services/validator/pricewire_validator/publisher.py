"""Publishes the consensus events the book proposes: committed as they are sent, confirmed by the log after.

The tick path does not wait a round trip per batch for the log's acks: each due event is committed to the
book and sent at once (a JetStream publish acked asynchronously, `js_publish`), and the batch's acks wait
on the confirmation while the next batch is decided. An event the log did not take as sent (refused,
unanswered within `ack_timeout_s`, or a duplicate: its seq already stored by another writer) leaves the
book ahead of the log; the publisher is then `lost` for good and its decider starts again from the log
(`service.decide`), with the ticks behind the unconfirmed events nak'd so they are decided again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import PubAck

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.clock import Clock
from pricewire_common.events import Price, encode
from pricewire_common.js_publish import AckedPublisher
from pricewire_common.tracing import Tracing
from pricewire_validator.consensus import ConsensusBook
from pricewire_validator.errors import PublishLost
from pricewire_validator.tracing import PriceSpans

log = structlog.get_logger(__name__)

ACK_TIMEOUT_S = 5.0
"""How long a sent event may wait for the log's ack before it counts as lost."""


@dataclass(slots=True, kw_only=True)
class Published:
    """What one round of `send_due` did at `now_ns`: the events committed and sent (their acks in
    `acks`, in the same order), and the assets whose consensus raised."""

    now_ns: int
    sent: list[Price] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    acks: list[asyncio.Future[PubAck]] = field(default_factory=list)


def msg_id(price: Price) -> str:
    """The `Nats-Msg-Id` of a price event: a retried publish of the same seq is stored once."""
    return f"price:{price.asset}:{price.seq}"


class PricePublisher:
    """Turns the book's due evaluations into events on `md.price.<ASSET>`.

    One lock serialises propose -> commit -> send, so the tick path and the heartbeat never hand out the
    same seq twice and the log receives each asset's events in seq order.
    """

    def __init__(
        self,
        sender: AckedPublisher,
        book: ConsensusBook,
        *,
        clock: Clock,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        tracing: Tracing | None = None,
        fence: Callable[[], bool] | None = None,
    ) -> None:
        """`fence`: whether this decider may still send (its partition's lease surely held); once it says no,
        the publisher is lost before it sends, and its decider starts again from the log."""
        self._sender = sender
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._book = book
        self._clock = clock
        self._ack_timeout_s = ack_timeout_s
        self._fence = fence
        self._lock = asyncio.Lock()
        self.published = 0
        self.failures: Counter[str] = Counter()
        """Per asset, how many evaluations raised."""
        self.lost: PublishLost | None = None
        """The first event the log did not take as sent; from then on nothing more is sent."""
        self.lost_event = asyncio.Event()

    async def send_due(self, assets: Iterable[str], *, traced: Mapping[str, Msg] | None = None) -> Published:
        """Commit and send every event due now for `assets`; `confirm` the result before acking what it decided.

        One asset whose consensus cannot be computed (ArithmeticError) is logged, counted in `failures`
        and reported in `Published.failed`; it never holds back the other assets. Raises PublishLost once
        the publisher is lost, and bus errors from sending (the book is then ahead: it marks itself lost).
        `traced`: per asset, a sampled tick whose trace the asset's price continues (tracing.py).
        """
        published = Published(now_ns=self._clock())
        spans = PriceSpans.open(self._tracing, traced)  # None unless a tick of the round was sampled
        async with self._lock:
            if self.lost is not None:
                raise self.lost
            for asset in assets:
                try:
                    price = self._book.propose(asset, published.now_ns)
                except ArithmeticError:
                    self.failures[asset] += 1
                    log.exception("consensus_failed", asset=asset, failures=self.failures[asset])
                    published.failed.append(asset)
                    continue
                if price is None:
                    continue
                if self._fence is not None and not self._fence():
                    raise self._lose(price, "not sent: the partition's lease is no longer surely held")
                self._book.commit(price)
                headers = {MSG_ID_HEADER: msg_id(price)}
                if spans is not None:
                    spans.publishing(price, headers)
                try:
                    ack = await self._sender.publish(subjects.price(asset), encode(price), headers=headers)
                except (NatsError, TimeoutError) as exc:
                    raise self._lose(price, f"not sent: {exc!r}") from exc
                published.sent.append(price)
                published.acks.append(ack)
        if spans is not None:
            spans.end()
        return published

    async def confirm(self, published: Published) -> None:
        """Wait until the log has stored every event of `published` as sent; PublishLost if one was not."""
        if not published.acks:
            return
        done, _ = await asyncio.wait(published.acks, timeout=self._ack_timeout_s)
        lost: PublishLost | None = None
        for price, ack in zip(published.sent, published.acks, strict=True):
            # Every ack is looked at, so none is left with an exception nobody retrieved.
            if ack not in done:
                ack.cancel()
                detail = f"no ack from the log within {self._ack_timeout_s} s"
            elif (error := ack.exception()) is not None:
                detail = f"refused: {error!r}"
            elif ack.result().duplicate:
                detail = "its seq is already in the log (another writer, or an earlier life of this one)"
            else:
                continue
            lost = lost or self._lose(price, detail)
        if lost is not None:
            raise lost
        self.published += len(published.sent)
        for price in published.sent:
            log.debug("price_published", asset=price.asset, seq=price.seq, price=str(price.price), status=price.status)

    async def publish_due(self, assets: Iterable[str]) -> Published:
        """Send every event due now for `assets` and wait until the log has them (`send_due` + `confirm`)."""
        published = await self.send_due(assets)
        await self.confirm(published)
        return published

    def _lose(self, price: Price, detail: str) -> PublishLost:
        if self.lost is None:
            self.lost = PublishLost(price.asset, price.seq, detail)
            self.lost_event.set()
            log.error("price_lost", asset=price.asset, seq=price.seq, detail=detail)
        return self.lost
