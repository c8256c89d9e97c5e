"""The live feed: consensus prices from a core NATS subscription to `md.price.*`, checked once, fanned out.

A core subscription (not a durable consumer): a gateway only needs what happens from now on, and
the latest state on (re)connect comes from Redis. A message that breaks the contract goes to
`md.dlq.gateway`; the feed carries on.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext

import structlog
from nats.aio.msg import Msg
from opentelemetry.trace import use_span

from pricewire_common.deadletters import DeadLetters
from pricewire_common.errors import RejectedInput
from pricewire_common.events import decode_price
from pricewire_common.rules import check_price
from pricewire_common.tracing import Tracing, traceparent_of
from pricewire_gateway.hub import Hub

log = structlog.get_logger(__name__)

_UNTRACED: AbstractContextManager[object] = nullcontext()


class PriceFeed:
    """The subscription callback: decode once, check, hand to the hub; reject what is broken."""

    def __init__(
        self, hub: Hub, dead_letters: DeadLetters, *, assets: Collection[str], tracing: Tracing | None = None
    ) -> None:
        self._hub = hub
        self._tracing = tracing if tracing is not None and tracing.enabled else None
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
        # A price that carries a trace is handled under its `process` span (current: the hub's frames see it).
        span = None if self._tracing is None else self._tracing.process(msg)
        with _UNTRACED if span is None else use_span(span, end_on_exit=True):
            try:
                price = check_price(decode_price(msg.data), subject=msg.subject, assets=self._assets)
            except RejectedInput as err:
                await self._reject(err, msg)
                return
            self._hub.publish(price)

    async def _reject(self, err: RejectedInput, msg: Msg) -> None:
        try:
            await self._dead_letters.reject(err, subject=msg.subject, payload=msg.data, traceparent=traceparent_of(msg))
        except Exception:
            # The boundary of the subscription: a core message has no redelivery, so the loss is
            # logged with its reason, counted, and the feed goes on with the next price.
            self.failed += 1
            log.exception("dead_letter_failed", subject=msg.subject, reason=err.reason, failed_total=self.failed)
