"""`WS /ws`: the client protocol (subscribe, rooms, get_price, ping) over JSON text frames.

Every request gets a reply or a typed error frame; an error never closes the connection.
"""

from __future__ import annotations

import socket
import time

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from pricewire_common.clock import NS_PER_S
from pricewire_gateway import messages, user_messages
from pricewire_gateway.alerts_api import create_for
from pricewire_gateway.appkeys import CLOCK, HUB, LATEST, RESOLVER
from pricewire_gateway.auth import PUBLIC_PRICES, VERIFIER, Principal
from pricewire_gateway.client import CLOSE_TIMEOUT_S, ROOMS, Client
from pricewire_gateway.errors import RequestError, StoreUnavailable, Unauthorized
from pricewire_gateway.limits import WS_LIMITS, RateLimit, WsLimits, check_subscriptions
from pricewire_gateway.messages import Auth, GetPrice, JoinRoom, LeaveRoom, Ping, PriceAlert, Subscribe, Unsubscribe
from pricewire_gateway.portfolio_api import PORTFOLIOS
from pricewire_gateway.user_sockets import SOCKETS

log = structlog.get_logger(__name__)

DEFAULT_LIMITS = WsLimits()
"""Limits of an app built without settings (the service installs its own under WS_LIMITS)."""
SEND_BUFFER_BYTES = 256 * 1024
"""Kernel send buffer per client, fixed (no autotuning): with the mailbox, what a stalled client costs."""
HEARTBEAT_S = 30.0
"""Ping interval; a peer that does not pong within half of it is disconnected."""
SIGN_IN_EXPIRED = b"sign-in expired: prices here need a valid token"


async def serve_socket(request: web.Request) -> web.WebSocketResponse:
    """Upgrade, attach to the hub, and answer the client's frames until it goes."""
    hub = request.app[HUB]
    limits = request.app.get(WS_LIMITS, DEFAULT_LIMITS)
    token = request.query.get("token")
    # A bad `?token=` is refused with a 401 before the upgrade; price frames need none unless prices are private.
    principal = None if token is None else _verify(request.app, token)
    # compress=False: a price frame is encoded once and written as-is to every client.
    ws = web.WebSocketResponse(
        max_msg_size=limits.max_frame_bytes, heartbeat=HEARTBEAT_S, compress=False, timeout=CLOSE_TIMEOUT_S
    )
    await ws.prepare(request)
    _bound_send_buffer(request)
    if hub.closing:
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
        return ws
    client = hub.attach(ws, request)
    # A burst of one second's worth: a page that subscribes, joins and asks prices at load is not a flood.
    rate = RateLimit(rate=limits.max_messages_per_s, burst=max(1.0, limits.max_messages_per_s), now=time.monotonic())
    try:
        if principal is not None:
            await sign_in(request.app, client, principal)
        async for message in ws:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY) and not rate.allow(time.monotonic()):
                # Only this connection goes: its frames are read by its own task, the others never wait on it.
                log.info("ws_flood_closed", client=client.id, limit_per_s=limits.max_messages_per_s)
                reason = f"too many messages: at most {limits.max_messages_per_s:g} per second"
                hub.closed["flood"] += 1
                await client.close(code=WSCloseCode.POLICY_VIOLATION, message=reason.encode())
                break
            if message.type is WSMsgType.TEXT:
                await answer(request.app, client, message.data)
            elif message.type is WSMsgType.BINARY:
                error = RequestError("bad_message", "send JSON text frames, not binary ones")
                await client.reply(messages.encode(messages.error_frame(error)))
            elif message.type is WSMsgType.ERROR:
                log.info("ws_protocol_error", client=client.id, error=str(ws.exception()))
    finally:
        sign_out(request.app, client)
        await hub.detach(client)
    return ws


def _verify(app: web.Application, token: str) -> Principal:
    verifier = app.get(VERIFIER)
    if verifier is None:
        raise Unauthorized("this gateway takes no tokens")
    return verifier.verify(token)


async def sign_in(app: web.Application, client: Client, principal: Principal) -> None:
    """From now on `client` gets `principal`'s alerts and portfolio updates; a portfolio snapshot follows."""
    sockets = app.get(SOCKETS)
    if sockets is None:
        raise Unauthorized("this gateway takes no tokens")
    sockets.bind(client, principal)
    if not app.get(PUBLIC_PRICES, True) and principal.expires_s is not None:
        # Private prices: a subscription must not outlive the token that allowed it (a new `auth` moves this on).
        now_s = app[CLOCK]() // NS_PER_S
        client.leave_after(principal.expires_s + 1 - now_s, SIGN_IN_EXPIRED)
    await client.reply(messages.encode(messages.Authenticated(user=principal.user, admin=principal.admin)))
    feed = app.get(PORTFOLIOS)
    if feed is not None:
        try:
            await feed.track(principal.user)
        except StoreUnavailable as exc:  # live prices go on; the portfolio comes with the next change
            log.warning("portfolio_not_loaded", client=client.id, user=principal.user, error=exc.detail)


def sign_out(app: web.Application, client: Client) -> None:
    sockets = app.get(SOCKETS)
    principal = None if sockets is None else sockets.principal(client)
    if sockets is None or principal is None:
        return
    sockets.unbind(client)
    feed = app.get(PORTFOLIOS)
    if feed is not None:
        feed.forget(principal.user)


def _bound_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def answer(app: web.Application, client: Client, text: str) -> None:
    """Decode one client frame and serve it; a RequestError becomes an error frame, and so does a bug."""
    try:
        await serve_request(app, client, messages.decode_request(text))
    except RequestError as err:
        await client.reply(messages.encode(messages.error_frame(err)))
    except Exception:
        # The boundary of one request: the socket and its subscriptions outlive a bug in serving one frame.
        log.exception("ws_request_failed", client=client.id)
        error = RequestError("internal", "the request could not be served; it is logged")
        await client.reply(messages.encode(messages.error_frame(error)))


async def serve_request(app: web.Application, client: Client, request: messages.Request) -> None:
    hub, latest, resolver = app[HUB], app[LATEST], app[RESOLVER]
    if isinstance(request, Subscribe | JoinRoom | GetPrice):
        _require_price_reader(app, client)
    match request:
        case Subscribe(symbol=symbol, symbols=symbols):
            assets = resolver.require_all(symbol, symbols)
            limit = app.get(WS_LIMITS, DEFAULT_LIMITS).max_subscriptions
            check_subscriptions(client.assets, assets, limit=limit)
            hub.subscribe(client, assets)
            await client.reply(messages.encode(messages.Subscribed(symbols=assets)))
            hub.offer_snapshot(client, await latest.get_many(assets))
        case Unsubscribe(symbol=symbol, symbols=symbols):
            assets = resolver.require_all(symbol, symbols)
            hub.unsubscribe(client, assets)
            await client.reply(messages.encode(messages.Unsubscribed(symbols=assets)))
        case JoinRoom(room=room):
            hub.join(client, _room(room))
            await client.reply(messages.encode(messages.RoomJoined(room=room)))
            hub.offer_snapshot(client, await latest.get_many(resolver.assets))
        case LeaveRoom(room=room):
            hub.leave(client, _room(room))
            await client.reply(messages.encode(messages.RoomLeft(room=room)))
        case GetPrice(symbol=symbol):
            served = await latest.get(resolver.require(symbol))
            await client.reply(hub.frame(served.price, stale=served.stale))
        case Ping():
            await client.reply(messages.encode(messages.Pong()))
        case Auth(token=token):
            await sign_in(app, client, _verify(app, token))
        case PriceAlert(data=body):
            sockets = app.get(SOCKETS)
            principal = None if sockets is None else sockets.signed_in(client)
            if principal is None:
                raise Unauthorized('sign this socket in first: send {"type":"auth","token":...}')
            view = await create_for(app, principal.user, body)
            await client.reply(user_messages.encode(user_messages.AlertCreated(data=view)))


def _require_price_reader(app: web.Application, client: Client) -> None:
    if app.get(PUBLIC_PRICES, True):
        return
    sockets = app.get(SOCKETS)
    if sockets is None or sockets.signed_in(client) is None:
        raise Unauthorized('prices here need a signed-in socket: send {"type":"auth","token":...} first')


def _room(room: str) -> str:
    if room not in ROOMS:
        raise RequestError("unknown_room", f"no room {room!r}; rooms: {', '.join(sorted(ROOMS))}")
    return room
