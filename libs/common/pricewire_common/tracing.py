"""OpenTelemetry traces across the bus: spans per the messaging conventions, W3C `traceparent` in NATS headers.

One `Tracing` per service, built in its `run()` by `open_tracing` from `TracingSettings` (or handed in by a
test, on a provider of its own): nothing here touches OpenTelemetry's global provider or propagator.
With no OTLP endpoint it is off, and every hook costs one attribute test.

Sampling is decided once, at the root: the collector's frame (`Tracing.frame`), by one `random()` against
the ratio, before any span exists. Only a sampled frame's ticks carry a `traceparent`; a consumer starts
spans only for the messages that carry one (a look-up in the headers nats-py has already parsed), and the
provider's sampler follows the parent. The hot paths (30,000 ticks/s) thus make no span, context or
header for the ticks that are not sampled.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, AsyncExitStack, nullcontext
from typing import Final

import structlog
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.config import TracingSettings

__all__ = [
    "TRACEPARENT",
    "Tracing",
    "end_all",
    "open_tracing",
    "provider_from",
    "traceparent",
    "traceparent_of",
    "with_traceparent",
]

log = structlog.get_logger(__name__)

TRACEPARENT: Final = "traceparent"
"""The W3C trace-context header, carried in NATS message headers."""
SYSTEM: Final = "nats"
SCOPE_PREFIX: Final = "pricewire."
"""A service's tracer is named `pricewire.<service>` (the instrumentation scope of its spans)."""

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_NO_FRAME: Final[AbstractContextManager[Span | None]] = nullcontext(None)
_ROOT: Final = otel_context.Context()
"""An empty context: a frame's span is a root, whatever happens to be current."""


class Tracing:
    """A service's tracer, and the hooks its consume and publish paths call.

    `enabled` is False without a provider: every hook then returns at once, with nothing made.
    """

    __slots__ = ("_random", "_ratio", "_tracer", "enabled", "service")

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        *,
        service: str,
        sample_ratio: float = 1.0,
        random_source: Callable[[], float] = random.random,
    ) -> None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"a sample ratio is between 0 and 1, not {sample_ratio}")
        self.service = service
        self.enabled = provider is not None
        self._tracer = (provider or trace.NoOpTracerProvider()).get_tracer(SCOPE_PREFIX + service)
        self._ratio = sample_ratio
        self._random = random_source

    @classmethod
    def off(cls, *, service: str) -> Tracing:
        return cls(None, service=service)

    def frame(self, source: str, *, size: int | None = None) -> AbstractContextManager[Span | None]:
        """The root span of one venue frame (or one turn of the sim), current inside the block, or a
        no-op when tracing is off or the frame is not sampled: then its ticks carry no trace."""
        if not self.enabled or (self._ratio < 1.0 and self._random() >= self._ratio):
            return _NO_FRAME
        attributes: dict[str, str | int] = {"pricewire.source": source}
        if size is not None:
            attributes["pricewire.frame.bytes"] = size
        span = self._tracer.start_span(
            f"receive {source}", context=_ROOT, kind=SpanKind.CONSUMER, attributes=attributes
        )
        return trace.use_span(span, end_on_exit=True)

    def publish(self, subject: str, *, message_id: str | None = None, parent: Span | None = None) -> Span | None:
        """A PRODUCER span `publish <subject>` under `parent` (default: the current span), or None when
        that is not a sampled span: a message without a trace gets no span and no header."""
        if not self.enabled:
            return None
        parent = parent if parent is not None else trace.get_current_span()
        if not parent.is_recording():
            return None
        attributes = _messaging(subject, "send", "publish")
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        return self._tracer.start_span(
            f"publish {subject}",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )

    def process(
        self, msg: Msg, *, consumer: str | None = None, attributes: Mapping[str, str | int] | None = None
    ) -> Span | None:
        """A CONSUMER span `process <subject>` continuing the trace of `msg`, or None when it carries none
        (or one that is not a valid `traceparent`: it must not start a trace of its own)."""
        header = traceparent_of(msg) if self.enabled else None
        if header is None:
            return None
        parent = _PROPAGATOR.extract({TRACEPARENT: header})
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return None
        attrs: dict[str, str | int] = {**_messaging(msg.subject, "process", "process"), **(attributes or {})}
        if consumer is not None:
            attrs["messaging.consumer.group.name"] = consumer
        message_id = msg.headers.get(MSG_ID_HEADER) if msg.headers else None
        if message_id is not None:
            attrs["messaging.message.id"] = message_id
        return self._tracer.start_span(
            f"process {msg.subject}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attrs,
        )

    def process_traced(
        self, msgs: Iterable[Msg], *, consumer: str, attributes: Mapping[str, str | int] | None = None
    ) -> list[Span]:
        """`process` spans of the messages of a batch that carry a trace; [] (and no span) for the others."""
        if not self.enabled:
            return []
        spans = []
        for msg in msgs:
            headers = msg.headers
            if headers and TRACEPARENT in headers:
                span = self.process(msg, consumer=consumer, attributes=attributes)
                if span is not None:
                    spans.append(span)
        return spans

    def child(
        self,
        name: str,
        parent: Span,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, str | int] | None = None,
    ) -> Span:
        """A span `name` under `parent` (a sampled span, ended or not)."""
        return self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), kind=kind, attributes=attributes
        )


def _messaging(subject: str, operation_type: str, operation_name: str) -> dict[str, str | int]:
    return {
        "messaging.system": SYSTEM,
        "messaging.destination.name": subject,
        "messaging.operation.type": operation_type,
        "messaging.operation.name": operation_name,
    }


def traceparent(span: Span) -> str:
    """The W3C `traceparent` header value that makes a message a child of `span`."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def traceparent_of(msg: Msg) -> str | None:
    """The `traceparent` a message carries, if any."""
    headers = msg.headers
    return headers.get(TRACEPARENT) if headers else None


def with_traceparent(headers: dict[str, str], span: Span | None) -> dict[str, str]:
    """`headers`, with the `traceparent` of `span` added when there is one."""
    if span is not None:
        headers[TRACEPARENT] = traceparent(span)
    return headers


def end_all(spans: Iterable[Span], error: BaseException | None = None) -> None:
    """End every span; with `error`, each records it and ends in error."""
    for span in spans:
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


def provider_from(settings: TracingSettings, *, service: str) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP to `settings.otlp_endpoint`, or None when there is no endpoint.

    Its sampler follows the parent and samples every root: roots are only made by `Tracing.frame`, which
    has already drawn them at `sample_ratio` (so an unsampled frame costs no span at all).
    """
    if settings.otlp_endpoint is None:
        return None
    # Imported only when traces are exported: the exporter pulls in protobuf and requests.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

    resource = Resource(
        {
            "service.name": settings.service_name or f"pricewire-{service}",
            "service.namespace": "pricewire",
            "pricewire.service": service,
        }
    )
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    exporter = OTLPSpanExporter(endpoint=f"{settings.otlp_endpoint}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def open_tracing(
    stack: AsyncExitStack, settings: TracingSettings, *, service: str, given: Tracing | None = None
) -> Tracing:
    """`given` if there is one (a test's), else this service's tracing from `settings`: its provider is
    shut down (the last spans flushed) when `stack` closes. Off without an endpoint."""
    if given is not None:
        return given
    provider = provider_from(settings, service=service)
    if provider is None:
        return Tracing.off(service=service)
    stack.push_async_callback(asyncio.to_thread, provider.shutdown)  # a last export may take a while
    log.info("tracing_enabled", endpoint=settings.otlp_endpoint, sample_ratio=settings.sample_ratio)
    return Tracing(provider, service=service, sample_ratio=settings.sample_ratio)
