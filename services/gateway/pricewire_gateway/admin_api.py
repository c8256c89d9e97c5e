"""`POST /api/v1/sources/{source}/pause|resume`: an admin stops or restarts one source (the seeds' realtime stop/start).

The command goes to the collector as a core NATS request on `md.control.source.<source>`; the answer says
whether the collector runs that source and whether it is paused now. No answer within COMMAND_TIMEOUT_S: 503.
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from pricewire_common import control, subjects
from pricewire_common.clock import iso_from_ns
from pricewire_common.errors import InvalidEvent, RejectedInput
from pricewire_gateway.appkeys import CLOCK
from pricewire_gateway.auth import require_admin
from pricewire_gateway.errors import BadParameter, NoCollector, NotFound
from pricewire_gateway.rest import json_response

__all__ = ["install"]

COMMAND_TIMEOUT_S: Final = 2.0
NATS_CLIENT = web.AppKey("admin_nats", NATS)


class SourceSwitched(msgspec.Struct, frozen=True, kw_only=True):
    """The answer: the source and whether it is paused now."""

    source: str
    paused: bool
    by: str
    timestamp: str


_ENCODER: Final = msgspec.json.Encoder()


async def _switch(request: web.Request, action: control.Action) -> web.Response:
    principal = require_admin(request)
    source = request.match_info["source"]
    try:
        subject = subjects.source_control(source)
    except InvalidEvent as exc:
        raise BadParameter("source", f"{source!r} is not a source name") from exc
    now_ns = request.app[CLOCK]()
    command = control.SourceCommand(action=action, by=principal.user, ts=now_ns)
    try:
        reply = await request.app[NATS_CLIENT].request(subject, control.encode(command), timeout=COMMAND_TIMEOUT_S)
        result = control.decode_result(reply.data)
    except (NatsError, TimeoutError) as exc:
        raise NoCollector(f"no collector answered for {source!r}: {type(exc).__name__}") from exc
    except RejectedInput as exc:
        raise NoCollector(f"the collector's answer does not decode: {exc.detail}") from exc
    if not result.known:
        raise NotFound(f"the collector runs no source {source!r}")
    body = SourceSwitched(source=source, paused=result.paused, by=principal.user, timestamp=iso_from_ns(now_ns))
    return json_response(_ENCODER.encode(body))


async def pause_source(request: web.Request) -> web.Response:
    """`POST /api/v1/sources/{source}/pause` (admin)."""
    return await _switch(request, "pause")


async def resume_source(request: web.Request) -> web.Response:
    """`POST /api/v1/sources/{source}/resume` (admin)."""
    return await _switch(request, "resume")


def install(app: web.Application, nc: NATS) -> None:
    app[NATS_CLIENT] = nc
    app.router.add_post("/api/v1/sources/{source}/pause", pause_source)
    app.router.add_post("/api/v1/sources/{source}/resume", resume_source)
