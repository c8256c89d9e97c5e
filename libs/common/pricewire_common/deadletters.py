"""The dead-letter publisher: rejected input is logged, counted and kept on `md.dlq.<service>`."""

from __future__ import annotations

from collections import Counter

import structlog
from nats.js import JetStreamContext

from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.errors import RejectedInput
from pricewire_common.events import DeadLetter, encode
from pricewire_common.tracing import TRACEPARENT

log = structlog.get_logger(__name__)


class DeadLetters:
    """Publishes rejections of one service; `counts` holds how many per reason."""

    def __init__(self, js: JetStreamContext, *, service: str, clock: Clock = wall_clock) -> None:
        self._js = js
        self._service = service
        self._subject = subjects.dead_letter(service)
        self._clock = clock
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def reject(
        self,
        error: RejectedInput,
        *,
        subject: str,
        payload: bytes,
        stream_seq: int | None = None,
        traceparent: str | None = None,
    ) -> None:
        """Publish the rejection durably. Raises if the bus refuses it, so the caller keeps the input.

        `traceparent`: the rejected message's, if it carried one; the letter carries it on and the log line
        names its trace.
        """
        letter = DeadLetter(
            service=self._service,
            subject=subject,
            reason=error.reason,
            detail=error.detail,
            payload=payload,
            ts=self._clock(),
            stream_seq=stream_seq,
        )
        # One letter per input: the same stream message rejected again (redelivered, or seen by a second
        # consumer of this service) is de-duplicated by JetStream and not counted twice.
        headers = {} if stream_seq is None else {MSG_ID_HEADER: f"dlq:{self._service}:{subject}:{stream_seq}"}
        if traceparent is not None:
            headers[TRACEPARENT] = traceparent
        ack = await self._js.publish(self._subject, encode(letter), headers=headers or None)
        if ack.duplicate:
            log.debug("rejection_already_recorded", subject=subject, stream_seq=stream_seq)
            return
        self.counts[error.reason] += 1
        log.warning(
            "input_rejected",
            reason=error.reason,
            detail=error.detail,
            subject=subject,
            stream_seq=stream_seq,
            rejected_total=self.counts[error.reason],
            traceparent=traceparent,
        )
