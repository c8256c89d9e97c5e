"""`pricewire status`: the services, sources and projection lag of a running stack, then exit.

Two places answer, asked at once:
- NATS's service API: `$SRV.INFO` and `$SRV.STATS` gather every registered instance (all replicas reply),
  and each service's `pricewire.<service>.status` endpoint its readiness;
- the gateway's REST API: `GET /api/v1/status` (projections, streams, stores) and `GET /api/v1/sources`.
A part that does not answer is reported as such; the others are still shown. Exit 0 when everything
answered and is ready, 1 otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

import aiohttp
import msgspec
import typer
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from rich.console import Console, Group, RenderableType
from rich.table import Table

from pricewire_common.bus import connect
from pricewire_common.config import NatsAuthSettings
from pricewire_common.discovery import status_subject
from pricewire_gateway.messages import Check
from pricewire_gateway.quality import AssetQuality, QualityList
from pricewire_gateway.sources_api import SourceList, SourceView
from pricewire_gateway.status_view import ProjectionView, StatusBody, StreamView

NAME_PREFIX = "pricewire-"
"""Of discovery.service_name: what our instances register as."""
GATHER_S = 1.0
"""How long `$SRV.INFO`/`$SRV.STATS` replies are collected: every instance answers at once."""
TIMEOUT_S = 5.0


# --- what the service API answers (nats.micro's v1 responses; unknown fields ignored) ----------


class EndpointStats(msgspec.Struct, kw_only=True):
    name: str
    subject: str
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""


class InfoReply(msgspec.Struct, kw_only=True):
    name: str
    id: str
    version: str
    description: str = ""
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class StatsReply(msgspec.Struct, kw_only=True):
    name: str
    id: str
    started: str
    endpoints: list[EndpointStats] = msgspec.field(default_factory=list)


class CheckReply(msgspec.Struct, kw_only=True):
    name: str
    ok: bool
    error: str | None = None


class ReadinessReply(msgspec.Struct, kw_only=True):
    status: str
    checks: list[CheckReply] = msgspec.field(default_factory=list)


# --- what the command reports ------------------------------------------------------------------


class Instance(msgspec.Struct, kw_only=True):
    """One registered instance of a service."""

    service: str
    id: str
    version: str
    started: str | None
    uptime_s: float | None
    requests: int | None
    errors: int | None
    metadata: dict[str, str]


class ServiceReadiness(msgspec.Struct, kw_only=True):
    service: str
    status: str
    """`ready`, `degraded`, `unavailable`, or `no_answer` when no instance answered its status endpoint."""
    failing: list[str]


class SourceSummary(msgspec.Struct, kw_only=True):
    """One venue: its connection state (`md.source.*`, null for a simulated venue that announces none) and
    what its quotes did in the latest consensus of each asset (`GET /api/v1/quality`)."""

    source: str
    state: str | None = None
    transport: str | None = None
    ticks: int | None = None
    rejected: int | None = None
    reconnects: int | None = None
    assets: int = 0
    """Assets whose latest consensus lists a quote of it."""
    admitted: int = 0
    """Of those, the ones where its quote made the price."""
    freshest_age_ms: int | None = None
    """Age now of its newest quote behind a consensus."""


def summarize_sources(states: Sequence[SourceView], quality: Sequence[AssetQuality]) -> list[SourceSummary]:
    """One row per venue heard of by either view, sorted by name."""
    rows: dict[str, SourceSummary] = {}
    for state in states:
        rows[state.source] = SourceSummary(
            source=state.source,
            state=state.state,
            transport=state.transport,
            ticks=state.ticks,
            rejected=state.rejected,
            reconnects=state.reconnects,
        )
    for asset in quality:
        for quote in asset.sources:
            row = rows.setdefault(quote.source, SourceSummary(source=quote.source))
            row.assets += 1
            row.admitted += quote.admitted
            if row.freshest_age_ms is None or quote.age_ms < row.freshest_age_ms:
                row.freshest_age_ms = quote.age_ms
    return sorted(rows.values(), key=lambda r: r.source)


class StackStatus(msgspec.Struct, kw_only=True):
    instances: list[Instance]
    readiness: list[ServiceReadiness]
    sources: list[SourceSummary]
    projections: list[ProjectionView]
    streams: list[StreamView]
    checks: list[Check]
    errors: list[str]
    """Parts that did not answer, and why."""

    @property
    def healthy(self) -> bool:
        return (
            not self.errors
            and bool(self.instances)
            and all(r.status == "ready" for r in self.readiness)
            and all(c.ok for c in self.checks)
        )


R = TypeVar("R", InfoReply, StatsReply)
_INFO = msgspec.json.Decoder(InfoReply)
_STATS = msgspec.json.Decoder(StatsReply)
_READINESS = msgspec.json.Decoder(ReadinessReply)
# The gateway's own body Structs: decimals come as JSON numbers and are read back exactly.
_STATUS_BODY = msgspec.json.Decoder(StatusBody)
_SOURCE_LIST = msgspec.json.Decoder(SourceList)
_QUALITY_LIST = msgspec.json.Decoder(QualityList)
_REPORT = msgspec.json.Encoder(decimal_format="number")


async def gather(nc: NATS, subject: str, *, window_s: float = GATHER_S) -> list[bytes]:
    """Every reply to one request on `subject` that arrives within `window_s` (all instances answer)."""
    inbox = nc.new_inbox()
    replies: list[bytes] = []
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        while True:
            try:
                message = await subscription.next_msg(timeout=window_s)
            except TimeoutError:
                return replies
            replies.append(message.data)
    finally:
        await subscription.unsubscribe()


def _ours(replies: Sequence[bytes], decoder: msgspec.json.Decoder[R]) -> list[R]:
    """The replies of Pricewire's services: a shared bus also carries other services' replies, and an
    empty no-responders status when nothing is registered."""
    found = []
    for raw in replies:
        try:
            reply = decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if reply.name.startswith(NAME_PREFIX):
            found.append(reply)
    return found


def _service_of(info: InfoReply) -> str:
    return info.metadata.get("service") or info.name.removeprefix(NAME_PREFIX)


def instances_from(infos: Sequence[bytes], stats: Sequence[bytes], *, now: datetime) -> list[Instance]:
    """Join `$SRV.INFO` and `$SRV.STATS` replies by instance id; sorted by service."""
    by_id = {s.id: s for s in _ours(stats, _STATS)}
    found = []
    for info in _ours(infos, _INFO):
        stat = by_id.get(info.id)
        started = None if stat is None else datetime.fromisoformat(stat.started.replace("Z", "+00:00"))
        found.append(
            Instance(
                service=_service_of(info),
                id=info.id,
                version=info.version,
                started=None if stat is None else stat.started,
                uptime_s=None if started is None else round((now - started).total_seconds(), 1),
                requests=None if stat is None else sum(e.num_requests for e in stat.endpoints),
                errors=None if stat is None else sum(e.num_errors for e in stat.endpoints),
                metadata=info.metadata,
            )
        )
    return sorted(found, key=lambda i: (i.service, i.id))


async def _readiness(nc: NATS, service: str) -> ServiceReadiness:
    try:
        reply = await nc.request(status_subject(service), b"", timeout=TIMEOUT_S / 2)
        body = _READINESS.decode(reply.data)
    except (NatsError, TimeoutError, msgspec.DecodeError):
        return ServiceReadiness(service=service, status="no_answer", failing=[])
    return ServiceReadiness(service=service, status=body.status, failing=[c.name for c in body.checks if not c.ok])


async def from_nats(url: str, auth: NatsAuthSettings, status: StackStatus) -> None:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            nc = await connect(url, name="pricewire-status", auth=auth)
    except (NatsError, OSError, TimeoutError) as exc:
        status.errors.append(f"nats at {url}: {exc or type(exc).__name__}")
        return
    try:
        infos, stats = await asyncio.gather(gather(nc, "$SRV.INFO"), gather(nc, "$SRV.STATS"))
        status.instances = instances_from(infos, stats, now=datetime.now(UTC))
        services = sorted({i.service for i in status.instances})
        status.readiness = list(await asyncio.gather(*(_readiness(nc, s) for s in services)))
    finally:
        await nc.close()


async def from_gateway(url: str, status: StackStatus) -> None:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{url}/api/v1/status") as response:
                response.raise_for_status()
                body = _STATUS_BODY.decode(await response.read())
            async with session.get(f"{url}/api/v1/sources") as response:
                response.raise_for_status()
                sources = _SOURCE_LIST.decode(await response.read())
            async with session.get(f"{url}/api/v1/quality") as response:
                # 503 while Redis is down: the states above still show; the quotes' part is left empty.
                quality = _QUALITY_LIST.decode(await response.read()).assets if response.status == 200 else []
    except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        status.errors.append(f"gateway at {url}: {exc or type(exc).__name__}")
        return
    status.projections = body.projections
    status.streams = body.streams
    status.checks = body.checks
    status.sources = summarize_sources(sources.sources, quality)


async def collect(*, gateway_url: str, nats_url: str, nats_auth: NatsAuthSettings) -> StackStatus:
    """Ask NATS and the gateway at once."""
    status = StackStatus(instances=[], readiness=[], sources=[], projections=[], streams=[], checks=[], errors=[])
    await asyncio.gather(from_nats(nats_url, nats_auth, status), from_gateway(gateway_url.rstrip("/"), status))
    return status


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def render(status: StackStatus) -> Group:
    """The tables `pricewire status` prints."""
    ready = {r.service: r for r in status.readiness}
    services = Table(title="Services (NATS service API)")
    for column in ("service", "instance", "version", "uptime s", "requests", "errors", "ready"):
        services.add_column(column)
    for i in status.instances:
        r = ready.get(i.service)
        state = "-" if r is None else r.status + (f" ({', '.join(r.failing)})" if r.failing else "")
        services.add_row(i.service, i.id, i.version, _cell(i.uptime_s), _cell(i.requests), _cell(i.errors), state)
    sources = Table(title="Sources")
    for column in ("source", "state", "transport", "ticks", "rejected", "reconnects", "admitted", "freshest ms"):
        sources.add_column(column)
    for s in status.sources:
        sources.add_row(
            s.source,
            _cell(s.state),
            _cell(s.transport),
            _cell(s.ticks),
            _cell(s.rejected),
            _cell(s.reconnects),
            f"{s.admitted}/{s.assets}",
            _cell(s.freshest_age_ms),
        )
    lag = Table(title="Projections")
    for column in ("projection", "stream", "store", "applied", "stream last", "lag", "basis"):
        lag.add_column(column)
    for p in status.projections:
        seqs = (_cell(p.applied_seq), _cell(p.stream_last_seq), _cell(p.lag))
        lag.add_row(p.projection, p.stream, p.store, *seqs, _cell(p.basis))
    stores = " ".join(f"{c.name}={'up' if c.ok else 'DOWN'}" for c in status.checks)
    parts: list[RenderableType] = [services, sources, lag, f"stores: {stores or '-'}"]
    parts += [f"[red]no answer[/]: {e}" for e in status.errors]
    return Group(*parts)


def status_command(*, gateway_url: str, nats_url: str, nats_auth: NatsAuthSettings, as_json: bool) -> int:
    """Print the stack's status; the exit code (0 healthy, 1 not)."""
    status = asyncio.run(collect(gateway_url=gateway_url, nats_url=nats_url, nats_auth=nats_auth))
    if as_json:
        typer.echo(_REPORT.encode(status).decode())
    else:
        Console().print(render(status))
    return 0 if status.healthy else 1
