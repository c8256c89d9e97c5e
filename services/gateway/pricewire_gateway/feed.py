"""The live feed: consensus prices from a core NATS subscription to `md.price.*`, checked once, fanned out.

A core subscription (not a durable consumer): a gateway only needs what happens from now on, and
the latest state on (re)connect comes from Redis. A message that breaks the contract goes to
`md.dlq.gateway`; the feed carries on.
"""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal

import structlog
from nats.aio.msg import Msg

from pricewire_common import subjects
from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import InvalidEvent, RejectedInput
from pricewire_common.events import Price, decode_price
from pricewire_gateway.hub import Hub

log = structlog.get_logger(__name__)


def _finite(name: str, value: Decimal | None) -> None:
    # JSON has no NaN or Infinity: such a price could not be written as a number to clients.
    if value is not None and not value.is_finite():
        raise InvalidEvent(f"{name} is not finite: {value}", reason="invalid_price")


def check_price(price: Price, *, subject: str, assets: Collection[str]) -> Price:
    """Return `price` if the gateway can serve it, else raise InvalidEvent with a reason code."""
    if subjects.asset_of_price_subject(subject) != price.asset:
        raise InvalidEvent(f"asset {price.asset} published on {subject}", reason="bad_subject")
    if price.asset not in assets:
        raise InvalidEvent(f"asset {price.asset} is not configured", reason="unknown_asset")
    for name in ("price", "confidence", "volume_24h", "change_24h", "change_pct_24h"):
        _finite(name, getattr(price, name))
    if price.price <= 0:
        raise InvalidEvent(f"price is not positive: {price.price}", reason="invalid_price")
    for quote in price.sources:
        _finite(f"sources[{quote.source}].price", quote.price)
        _finite(f"sources[{quote.source}].deviation_pct", quote.deviation_pct)
    return price


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
