"""`/api/v1/alerts`: create, list and delete one's own price alerts, and read their firing history.

Every route needs a bearer token (401 without one that verifies). A user sees and deletes only their
own alerts: another user's alert id answers 404, exactly as an id that does not exist.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from pricewire_common.clock import iso_from_ns, ns_from_datetime
from pricewire_gateway import user_messages
from pricewire_gateway.alert_store import Alert, AlertStore
from pricewire_gateway.alerts import checked_rule
from pricewire_gateway.appkeys import RESOLVER
from pricewire_gateway.auth import require_user
from pricewire_gateway.errors import BadParameter, NotFound, RequestError
from pricewire_gateway.rest import json_response

__all__ = ["ALERTS", "install"]

PATH: Final = "/api/v1/alerts"
MAX_BODY_BYTES: Final = 16 * 1024
MAX_NOTE_CHARS: Final = 200
MAX_ALERTS: Final = 100
"""Alerts one user may have at once (each one is decided on every price of its asset)."""
MAX_URL_CHARS: Final = 2048
DEFAULT_HISTORY: Final = 100
MAX_HISTORY: Final = 1000
_WHOLE_NUMBER: Final = re.compile(r"[0-9]{1,18}")
"""ASCII digits only (an id fits a bigint): `str.isdigit` also passes "²", which `int` refuses."""

ALERTS = web.AppKey("alerts", AlertStore)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else iso_from_ns(ns_from_datetime(dt))


def alert_view(alert: Alert) -> user_messages.AlertView:
    return user_messages.AlertView(
        id=alert.id,
        symbol=alert.asset,
        alert_type=alert.rule.kind,
        target_price=alert.rule.target_price,
        pct=alert.rule.pct,
        window_s=alert.rule.window_s,
        webhook_url=alert.webhook_url,
        note=alert.note,
        armed=alert.armed,
        fired_count=alert.fired_count,
        created_at=iso_from_ns(ns_from_datetime(alert.created_at)),
        last_fired_at=_iso(alert.last_fired_at),
    )


def _webhook(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL_CHARS:
        raise BadParameter("webhook_url", "webhook_url must be an http:// or https:// URL of at most 2048 characters")
    return url


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadParameter("body", f"the body may have at most {MAX_BODY_BYTES} bytes")
    return await request.read()


async def create_for(app: web.Application, user: str, body: user_messages.AlertCreate) -> user_messages.AlertView:
    """Check and store a new alert of `user` (REST `POST` and the WebSocket `price_alert` alike)."""
    try:
        asset = app[RESOLVER].require(body.symbol)
    except RequestError as exc:
        raise BadParameter("symbol", exc.message) from exc
    rule = checked_rule(body.alert_type, target_price=body.target_price, pct=body.pct, window_s=body.window_s)
    if body.note is not None and len(body.note) > MAX_NOTE_CHARS:
        raise BadParameter("note", f"note may have at most {MAX_NOTE_CHARS} characters")
    alert = await app[ALERTS].create(
        user=user, asset=asset, rule=rule, webhook_url=_webhook(body.webhook_url), note=body.note, limit=MAX_ALERTS
    )
    if alert is None:
        raise BadParameter("body", f"you have {MAX_ALERTS} alerts, the most one user may have: delete one first")
    return alert_view(alert)


async def create_alert(request: web.Request) -> web.Response:
    """`POST /api/v1/alerts`: 201 with the alert; 400 naming the bad field."""
    principal = require_user(request)
    body = user_messages.decode_alert_create(await _body(request))
    view = await create_for(request.app, principal.user, body)
    return json_response(user_messages.encode(view), status=201)


async def list_alerts(request: web.Request) -> web.Response:
    """`GET /api/v1/alerts`: the caller's alerts, oldest first."""
    principal = require_user(request)
    alerts = await request.app[ALERTS].of_user(principal.user)
    return json_response(user_messages.encode(user_messages.AlertList(alerts=[alert_view(a) for a in alerts])))


async def delete_alert(request: web.Request) -> web.Response:
    """`DELETE /api/v1/alerts/{id}`: 204; 400 for an id that is no number; 404 when the caller has no such alert."""
    principal = require_user(request)
    raw = request.match_info["id"]
    if _WHOLE_NUMBER.fullmatch(raw) is None:
        raise BadParameter("id", f"an alert id is a whole number of at most 18 digits; got {raw!r}")
    if not await request.app[ALERTS].delete(user=principal.user, alert_id=int(raw)):
        raise NotFound(f"you have no alert {raw!r}")
    return web.Response(status=204)


async def alert_history(request: web.Request) -> web.Response:
    """`GET /api/v1/alerts/history?limit=N`: the caller's firings, newest first."""
    principal = require_user(request)
    raw = request.query.get("limit", str(DEFAULT_HISTORY))
    if _WHOLE_NUMBER.fullmatch(raw) is None or not 1 <= int(raw) <= MAX_HISTORY:
        raise BadParameter("limit", f"limit must be a whole number from 1 to {MAX_HISTORY}; got {raw!r}")
    events = await request.app[ALERTS].history(principal.user, limit=int(raw))
    return json_response(user_messages.encode(user_messages.AlertHistory(events=events)))


def install(app: web.Application, store: AlertStore) -> None:
    """Serve the alert routes over `store` (the app must hold a TokenVerifier under auth.VERIFIER)."""
    app[ALERTS] = store
    app.router.add_post(PATH, create_alert)
    app.router.add_get(PATH, list_alerts)
    app.router.add_get(f"{PATH}/history", alert_history)
    app.router.add_delete(PATH + "/{id}", delete_alert)
