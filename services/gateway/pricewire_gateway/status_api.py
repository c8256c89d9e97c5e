"""`GET /api/v1/status`: asks JetStream, Redis and PostgreSQL at once, each bounded, and lets `status_view`
combine what they said. A party that does not answer is named in `checks`; the answer is still a 200.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import nats.errors
import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from redis.exceptions import RedisError

from pricewire_cache_writer.progress import ProjectionStatus, decode_status
from pricewire_common.errors import DecodeError
from pricewire_common.keys import PROJECTION_STATUS_KEY, projection_seq_key
from pricewire_gateway.appkeys import CLOCK
from pricewire_gateway.archive import Archive
from pricewire_gateway.errors import StoreUnavailable
from pricewire_gateway.health import PROBE_TIMEOUT_S
from pricewire_gateway.rest import json_response
from pricewire_gateway.status_view import PROJECTIONS, STREAMS, Answer, Observed, StreamView, encode, status_body

__all__ = ["PATH", "READER", "StatusReader", "get_status", "install"]

log = structlog.get_logger(__name__)

PATH = "/api/v1/status"

T = TypeVar("T")


class StatusReader:
    """Gathers, concurrently and each within PROBE_TIMEOUT_S, what the status is made of."""

    def __init__(self, nc: NATS, redis: redis_asyncio.Redis, archive: Archive) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._redis = redis
        self._archive = archive
        self._redis_projections = [p.name for p in PROJECTIONS if p.store == "redis"]
        self.bad_reports = 0
        """`projection:status` values that did not decode (each one logged)."""

    async def observe(self) -> Observed:
        streams, (reports, redis_offsets), postgres_offsets = await asyncio.gather(
            _bounded(self._streams()), self._redis_side(), _bounded(self._postgres_offsets())
        )
        return Observed(
            streams=streams, reports=reports, redis_offsets=redis_offsets, postgres_offsets=postgres_offsets
        )

    async def _streams(self) -> dict[str, StreamView]:
        if not self._nc.is_connected:
            raise nats.errors.ConnectionClosedError  # said as "not connected" below, without a wait
        infos = await asyncio.gather(*(self._stream(name) for name in STREAMS))
        return {view.stream: view for view in infos if view is not None}

    async def _stream(self, name: str) -> StreamView | None:
        try:
            info = await self._js.stream_info(name)
        except NotFoundError:
            return None  # not created yet: nothing to show
        state = info.state
        return StreamView(
            stream=name, messages=state.messages, bytes=state.bytes, first_seq=state.first_seq, last_seq=state.last_seq
        )

    async def _redis_side(self) -> tuple[dict[str, ProjectionStatus] | str, Answer]:
        async def read() -> tuple[dict[bytes, bytes], list[bytes | None]]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(PROJECTION_STATUS_KEY)
            for name in self._redis_projections:
                pipe.get(projection_seq_key(name))
            raw, *seqs = await pipe.execute()
            return raw, seqs

        answer = await _bounded(read())
        if isinstance(answer, str):
            return answer, answer
        raw, seqs = answer
        offsets = {name: int(seq) for name, seq in zip(self._redis_projections, seqs, strict=True) if seq is not None}
        return self._reports(raw), offsets

    def _reports(self, raw: dict[bytes, bytes]) -> dict[str, ProjectionStatus]:
        reports = {}
        for field, value in raw.items():
            try:
                report = decode_status(value)
            except DecodeError as exc:
                self.bad_reports += 1
                log.error("status_report_unreadable", field=field.decode(errors="replace"), error=str(exc))
                continue
            reports[report.projection] = report
        return reports

    async def _postgres_offsets(self) -> dict[str, int]:
        return await self._archive.offsets()


async def _bounded(work: Awaitable[T]) -> T | str:
    """What `work` returns, or (a `str`) why it returned nothing within PROBE_TIMEOUT_S."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            return await work
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S} s"
    except nats.errors.ConnectionClosedError:
        return "not connected"
    except StoreUnavailable as exc:
        return exc.message
    except (nats.errors.Error, RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


READER = web.AppKey("status_reader", StatusReader)


async def get_status(request: web.Request) -> web.Response:
    """Each projection's offset and lag, the streams' counts, and which stores the gateway reaches."""
    app = request.app
    observed = await app[READER].observe()
    return json_response(encode(status_body(observed, now_ns=app[CLOCK]())))


def install(app: web.Application, reader: StatusReader) -> None:
    app[READER] = reader
    app.router.add_get(PATH, get_status)
