"""Traces through the gateway: a sampled price's `process` span, and a `send` span each time a client's
writer sends its frame, so a trace ends where the client got the price.

A price is encoded once for all its followers and sent later by each client's own writer: the frame of a
sampled price is known by identity and kept with its `process` span, only the newest `keep` of them.
"""

from __future__ import annotations

from typing import Final

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from pricewire_common.tracing import Tracing

__all__ = ["SentFrames"]

KEEP: Final = 64
"""Frames of sampled prices remembered; one sent after that many newer ones were offered gets no span."""


class SentFrames:
    """Frames of sampled prices waiting in mailboxes, and the spans of their sending."""

    def __init__(self, tracing: Tracing, *, keep: int = KEEP) -> None:
        self._tracing = tracing
        self._keep = keep
        self._frames: dict[int, tuple[bytes, Span]] = {}

    @classmethod
    def of(cls, tracing: Tracing) -> SentFrames | None:
        """The hub's frames, or None when tracing is off (the hub and the writers then do nothing more)."""
        return cls(tracing) if tracing.enabled else None

    def offered(self, frame: bytes) -> None:
        """Remember `frame` when it is offered under a sampled span (the feed's `process` span)."""
        parent = trace.get_current_span()
        if not parent.is_recording():
            return
        self._frames[id(frame)] = (frame, parent)  # the frame is held, so its id is not reused meanwhile
        if len(self._frames) > self._keep:
            del self._frames[next(iter(self._frames))]

    def sending(self, frame: bytes, *, client: int) -> Span | None:
        """A `send price_update` span for a client's writer about to send `frame`, if it is a sampled price's."""
        entry = self._frames.get(id(frame))
        if entry is None or entry[0] is not frame:
            return None
        attributes: dict[str, str | int] = {"network.protocol.name": "websocket", "pricewire.ws.client": client}
        return self._tracing.child("send price_update", entry[1], kind=SpanKind.PRODUCER, attributes=attributes)
