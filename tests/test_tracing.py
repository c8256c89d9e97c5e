"""Traces: one trace from a sim frame to a WebSocket client message, across the four services, on one
in-memory exporter; sampling at the frame; trace ids in log lines."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import aiohttp
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pricewire_cache_writer.service import run as run_cache_writer
from pricewire_collector.service import run as run_collector
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER, ensure_streams
from pricewire_common.config import Settings, TracingSettings
from pricewire_common.errors import ConfigError
from pricewire_common.events import encode
from pricewire_common.logs import add_trace_ids
from pricewire_common.tracing import TRACEPARENT, Tracing, open_tracing, traceparent
from pricewire_gateway.service import run as run_gateway
from pricewire_validator.service import run as run_validator
from tests.factories import make_tick
from tests.pipeline import ServiceProcess, running, service_env
from tests.projections import stored_messages
from tests.waiting import eventually

pytestmark = pytest.mark.slow

SERVICES = ("collector", "validator", "cache_writer", "gateway")
CACHE_CONSUMERS = {"cache-redis": "redis", "cache-db-prices": "postgres", "cache-db-ticks": "postgres"}
"""The cache_writer's durable consumers, and the store each writes."""


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """One provider for every service of the test (its default sampler follows the parent, samples roots)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def traced_stack(
    settings: Settings, stop: asyncio.Event, provider: TracerProvider, bound: asyncio.Future[int]
) -> None:
    """The four services in this process, each with its own `Tracing` on the one provider; every frame sampled."""

    def tracing(service: str) -> Tracing:
        return Tracing(provider, service=service, sample_ratio=1.0)

    async with asyncio.TaskGroup() as group:
        group.create_task(run_cache_writer(settings, stop, tracing=tracing("cache_writer")))
        group.create_task(run_validator(settings, stop, tracing=tracing("validator")))
        group.create_task(run_gateway(settings, stop, bound=bound, tracing=tracing("gateway")))
        group.create_task(run_collector(settings, stop, tracing=tracing("collector")))


def scope(span: ReadableSpan) -> str:
    assert span.instrumentation_scope is not None
    return span.instrumentation_scope.name.removeprefix("pricewire.")


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    parents = [s for s in spans if s.context is not None and s.context.span_id == span.parent.span_id]
    assert len(parents) == 1, f"the parent of {span.name} is not in its trace"
    return parents[0]


def consumers(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    """The cache_writer's spans, by the consumer that made each."""
    found = {}
    for span in spans:
        if scope(span) == "cache_writer" and span.attributes is not None:
            found[str(span.attributes["messaging.consumer.group.name"])] = span
    return found


def full_trace(spans: Sequence[ReadableSpan]) -> list[ReadableSpan] | None:
    """The spans of a trace that reached a client and was written by the cache_writer, if one is complete."""
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        assert span.context is not None
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for members in by_trace.values():
        names = {(scope(s), s.name) for s in members}
        if ("gateway", "send price_update") in names and set(CACHE_CONSUMERS) <= set(consumers(members)):
            return members
    return None


async def test_one_trace_runs_from_a_sim_frame_to_a_websocket_client_message(
    settings: Settings, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    settings = replace(settings, assets=("BTC", "ETH"), gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with running(asyncio.create_task(traced_stack(settings, stop, provider, bound)), stop):
        port = await asyncio.wait_for(bound, timeout=20)
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await ws.send_json({"type": "subscribe", "symbols": ["BTC"]})

            async def probe() -> list[ReadableSpan] | None:
                return full_trace(exporter.get_finished_spans())

            spans = await eventually(probe, lambda found: found is not None, timeout=30, what="a complete trace")
            while (frame := msgspec.json.decode(await ws.receive_str()))["type"] != "price_update":
                pass  # the client got price frames: the one traced was among them (its send span says so)
            assert frame["data"]["symbol"] == "BTC"
    assert spans is not None

    assert {scope(s) for s in spans} == set(SERVICES)
    send = next(s for s in spans if s.name == "send price_update")
    assert send.kind is SpanKind.PRODUCER and scope(send) == "gateway"
    assert send.attributes is not None and send.attributes["network.protocol.name"] == "websocket"

    # Up the chain, one parent at a time: each hop is the span the conventions call for.
    gateway_process = parent_of(send, spans)
    price_publish = parent_of(gateway_process, spans)
    tick_process = parent_of(price_publish, spans)
    tick_publish = parent_of(tick_process, spans)
    frame_root = parent_of(tick_publish, spans)
    asset = "BTC"
    price_subject = f"md.price.{asset}"
    expected = [
        (gateway_process, "gateway", SpanKind.CONSUMER, f"process {price_subject}", "process"),
        (price_publish, "validator", SpanKind.PRODUCER, f"publish {price_subject}", "send"),
        (tick_process, "validator", SpanKind.CONSUMER, None, "process"),
        (tick_publish, "collector", SpanKind.PRODUCER, None, "send"),
    ]
    for span, service, kind, name, operation in expected:
        attributes = span.attributes
        assert attributes is not None
        assert (scope(span), span.kind) == (service, kind), span.name
        assert attributes["messaging.system"] == "nats"
        assert attributes["messaging.operation.type"] == operation
        operation_name, destination = attributes["messaging.operation.name"], attributes["messaging.destination.name"]
        assert span.name == f"{operation_name!s} {destination!s}"
        if name is not None:
            assert span.name == name
    tick_subject = tick_publish.attributes and tick_publish.attributes["messaging.destination.name"]
    assert isinstance(tick_subject, str) and tick_subject.startswith("md.tick.sim-") and f".{asset}-" in tick_subject
    assert tick_process.name == f"process {tick_subject}"
    assert (scope(frame_root), frame_root.kind, frame_root.parent) == ("collector", SpanKind.CONSUMER, None)
    assert frame_root.name == "receive sim"

    # The cache_writer continued the same trace: its Redis and PostgreSQL consumers each processed the
    # price, and its tick consumer the tick.
    cache = consumers(spans)
    for consumer, store in CACHE_CONSUMERS.items():
        span = cache[consumer]
        assert span.kind is SpanKind.CONSUMER and span.attributes is not None
        assert span.attributes["pricewire.store"] == store
        assert span.attributes["messaging.operation.type"] == "process"
    assert parent_of(cache["cache-redis"], spans) is price_publish
    assert parent_of(cache["cache-db-prices"], spans) is price_publish
    assert parent_of(cache["cache-db-ticks"], spans) is tick_publish
    assert cache["cache-redis"].name == f"process {price_subject}"
    assert cache["cache-db-ticks"].name == f"process {tick_subject}"


def test_a_frame_not_drawn_makes_no_span_and_its_ticks_no_traceparent(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    draws = itertools.cycle([0.25, 0.75])  # a ratio of 0.5: the first frame is sampled, the second is not
    tracing = Tracing(provider, service="collector", sample_ratio=0.5, random_source=lambda: next(draws))

    with tracing.frame("binance") as sampled:
        publish = tracing.publish("md.tick.binance.BTC-USD", message_id="t1")
        assert sampled is not None and publish is not None
        header = traceparent(publish)
        publish.end()
    with tracing.frame("binance") as skipped:
        assert skipped is None
        assert tracing.publish("md.tick.binance.BTC-USD", message_id="t2") is None

    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["publish md.tick.binance.BTC-USD", "receive binance"]
    version, trace_id, span_id, flags = header.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2)
    assert int(flags, 16) & 1 == 1  # sampled: downstream, the parent-based sampler follows it
    assert TRACEPARENT == "traceparent"


def test_tracing_off_makes_nothing() -> None:
    tracing = Tracing.off(service="collector")
    with tracing.frame("binance") as span:
        assert span is None
        assert tracing.publish("md.tick.binance.BTC-USD") is None
    assert tracing.process_traced([], consumer="cache-redis") == []


def test_log_lines_carry_the_current_span_ids(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    assert add_trace_ids(None, "info", {"event": "outside"}) == {"event": "outside"}
    with tracer.start_as_current_span("work") as span:
        line = add_trace_ids(None, "info", {"event": "inside"})
    context = span.get_span_context()
    assert line == {"event": "inside", "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
    assert trace.get_current_span().get_span_context().is_valid is False


def test_a_malformed_traceparent_starts_no_trace(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    tracing = Tracing(provider, service="validator")
    msg = Msg(_client=None, subject="md.tick.binance.BTC-USD", headers={TRACEPARENT: "00-not-a-trace-01"})  # type: ignore[arg-type]
    assert tracing.process(msg) is None
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    span = tracing.process(Msg(_client=None, subject="md.tick.binance.BTC-USD", headers={TRACEPARENT: good}))  # type: ignore[arg-type]
    assert span is not None
    span.end()
    [done] = exporter.get_finished_spans()
    assert done.parent is not None and f"{done.parent.span_id:016x}" == "b7ad6b7169203331"
    assert done.context is not None and f"{done.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


async def test_an_endpoint_turns_tracing_on_and_none_leaves_it_off() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/", "PRICEWIRE_TRACE_SAMPLE_RATIO": "0.25"}
    settings = Settings.from_env(environ).tracing
    assert settings == TracingSettings(otlp_endpoint="http://127.0.0.1:4318", service_name=None, sample_ratio=0.25)
    async with AsyncExitStack() as stack:  # closing it shuts the provider down, flushing nothing here
        on = open_tracing(stack, settings, service="validator")
        off = open_tracing(stack, Settings.from_env({}).tracing, service="validator")
        assert on.enabled and not off.enabled
    with pytest.raises(ConfigError, match="PRICEWIRE_TRACE_SAMPLE_RATIO"):
        Settings.from_env({"PRICEWIRE_TRACE_SAMPLE_RATIO": "1.5"})


def test_a_line_about_a_traced_message_names_its_trace_when_no_span_is_current(provider: TracerProvider) -> None:
    sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    line = add_trace_ids(None, "warning", {"event": "input_rejected", "traceparent": sent})
    assert line == {
        "event": "input_rejected",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "parent_span_id": "b7ad6b7169203331",
    }
    assert add_trace_ids(None, "warning", {"event": "e", "traceparent": "00-garbage-01"}) == {"event": "e"}
    assert add_trace_ids(None, "warning", {"event": "e", "traceparent": f"00-{'0' * 32}-b7ad6b7169203331-01"}) == {
        "event": "e"
    }
    with provider.get_tracer("test").start_as_current_span("work") as span:  # a span of our own wins
        inside = add_trace_ids(None, "warning", {"event": "e", "traceparent": sent})
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}" and "parent_span_id" not in inside


async def test_a_traced_tick_the_validator_rejects_keeps_its_trace_in_the_letter_and_the_log(
    settings: Settings, nc: NATS, tmp_path: Path
) -> None:
    # Tracing off in the validator (as a 1 % sample leaves most ticks): its log still names the tick's trace.
    js = nc.jetstream()
    await ensure_streams(js, settings.streams)
    sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tick = make_tick(id="traced:unknown-asset", base="ZZZ", symbol="ZZZ-USDT")
    with ServiceProcess("pricewire_validator", service_env(settings), tmp_path / "validator.log") as validator:
        validator.start()
        await eventually(validator.started_count, lambda n: n >= 1, timeout=30, what="validator up")
        await js.publish(
            subjects.tick("sim-a", "ZZZ", "USDT"), encode(tick), headers={MSG_ID_HEADER: tick.id, TRACEPARENT: sent}
        )
        await eventually(lambda: validator.logged("input_rejected"), lambda n: n >= 1, timeout=15, what="the rejection")
        assert validator.terminate() == 0
    [letter] = await stored_messages(js, subjects.DLQ_STREAM)
    assert (letter.headers or {}).get(TRACEPARENT) == sent
    [line] = [json.loads(raw) for raw in validator.log_path.read_text().splitlines() if '"input_rejected"' in raw]
    assert (line["reason"], line["trace_id"], line["parent_span_id"]) == (
        "unknown_asset", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    )  # fmt: skip
