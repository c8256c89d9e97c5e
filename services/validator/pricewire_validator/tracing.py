"""Traces through the validator: a sampled tick's `process` span, and under it the `publish` span of the
price it fed, whose traceparent the price event carries on to the cache_writer and the gateway.

Only a batch with a sampled tick makes any of this (`PriceSpans.open` is None otherwise), and at most one
sampled tick per asset and batch is followed: the price of an asset has one parent.
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.aio.msg import Msg
from opentelemetry.trace import Span

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.events import Price
from pricewire_common.tracing import TRACEPARENT, Tracing, end_all, traceparent

__all__ = ["PriceSpans"]


class PriceSpans:
    """The spans of one round of `PricePublisher.send_due`: one `process` span per traced asset, opened
    when the round starts, and the `publish` span of each price sent for such an asset."""

    def __init__(self, tracing: Tracing, traced: Mapping[str, Msg]) -> None:
        self._tracing = tracing
        self._processing: dict[str, Span] = {}
        for asset, msg in traced.items():
            span = tracing.process(msg, attributes={"pricewire.asset": asset})
            if span is not None:
                self._processing[asset] = span
        self._publishing: list[Span] = []

    @classmethod
    def open(cls, tracing: Tracing | None, traced: Mapping[str, Msg] | None) -> PriceSpans | None:
        """The spans of a round, or None (nothing made) when tracing is off or no tick of it was sampled."""
        if tracing is None or not traced:
            return None
        return cls(tracing, traced)

    def publishing(self, price: Price, headers: dict[str, str]) -> None:
        """A `publish` span for `price` when a sampled tick of its asset is in the round; its traceparent
        goes into `headers`."""
        parent = self._processing.get(price.asset)
        if parent is None:
            return
        span = self._tracing.publish(subjects.price(price.asset), message_id=headers.get(MSG_ID_HEADER), parent=parent)
        if span is None:
            return
        span.set_attribute("pricewire.price.seq", price.seq)
        span.set_attribute("pricewire.price.status", price.status)
        parent.set_attribute("pricewire.price.seq", price.seq)
        headers[TRACEPARENT] = traceparent(span)
        self._publishing.append(span)

    def end(self) -> None:
        """End the round's spans: a `process` span with no `pricewire.price.seq` fed no price this round."""
        end_all(self._publishing)
        end_all(self._processing.values())
