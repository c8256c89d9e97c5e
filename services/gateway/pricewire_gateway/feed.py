"""The live feed: consensus prices from a core NATS subscription to `md.price.*`, checked once, fanned out.

A core subscription (not a durable consumer): a gateway only needs what happens from now on, and
the latest state on (re)connect comes from Redis. A message that breaks the contract goes to
`md.dlq.gateway`; the feed carries on.
"""

from __future__ import annotations

from collections.abc import Collection

import structlog
from nats.aio.msg import Msg

from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.events import decode_price
from pricewire_common.rules import check_price
from pricewire_gateway.hub import Hub

log = structlog.get_logger(__name__)


class PriceFeed:
    """The subscription callback: decode once, check, hand to the hub; reject what is broken."""

    def __init__(self, hub: Hub, dead_letters: DeadLetters, *, assets: Collection[str]) -> None:
        self._hub = hub
        self._dead_letters = dead_letters
        self._assets = frozenset(assets)
        self.received = 0
        self.failed = 0
        """Rejections that could not be dead-lettered (each one logged with its traceback)."""

    @property
    def rejected(self) -> int:
        return self._dead_letters.total

    async def on_message(self, msg: Msg) -> None:
        self.received += 1
        try:
            price = check_price(decode_price(msg.data), subject=msg.subject, assets=self._assets)
        except RejectedInput as err:
            await self._reject(err, msg)
            return
        self._hub.publish(price)

    async def _reject(self, err: RejectedInput, msg: Msg) -> None:
        try:
            await self._dead_letters.reject(err, subject=msg.subject, payload=msg.data)
        except Exception:
            # The boundary of the subscription: a core message has no redelivery, so the loss is
            # logged with its reason, counted, and the feed goes on with the next price.
            self.failed += 1
            log.exception("dead_letter_failed", subject=msg.subject, reason=err.reason, failed_total=self.failed)
