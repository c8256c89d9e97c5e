"""Which signed-in user each WebSocket of this replica belongs to, and pushes of per-user frames to them.

Every replica subscribes (core NATS) to `md.alert.*` and hands each firing to the sockets of that user
it holds, so a user hears an alert on every replica they are connected to, whichever replica decided it.
"""

from __future__ import annotations

import itertools
from typing import Final

import structlog
from aiohttp import web
from nats.aio.msg import Msg

from pricewire_common.clock import NS_PER_S, Clock, iso_from_ns
from pricewire_common.errors import DecodeError
from pricewire_gateway import user_messages
from pricewire_gateway.alerts import decode_fired
from pricewire_gateway.auth import Principal
from pricewire_gateway.client import Client

log = structlog.get_logger(__name__)

PORTFOLIO_KEY: Final = "@portfolio"
"""The mailbox slot of portfolio frames: conflated like a price, never an asset name (those are A-Z0-9)."""


class UserSockets:
    """user -> that user's connections on this replica."""

    def __init__(self, *, clock: Clock) -> None:
        self._clock = clock
        self._by_user: dict[str, set[Client]] = {}
        self._principal: dict[Client, Principal] = {}
        self._seq = itertools.count(1)
        self.alerts_pushed = 0
        self.alerts_missed = 0

    def bind(self, client: Client, principal: Principal) -> None:
        """`client` speaks for `principal` from now on (a second auth on one socket replaces the first)."""
        self.unbind(client)
        self._principal[client] = principal
        self._by_user.setdefault(principal.user, set()).add(client)

    def unbind(self, client: Client) -> None:
        principal = self._principal.pop(client, None)
        if principal is None:
            return
        clients = self._by_user.get(principal.user)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._by_user[principal.user]

    def principal(self, client: Client) -> Principal | None:
        return self._principal.get(client)

    def signed_in(self, client: Client) -> Principal | None:
        """Who `client` speaks for now: None when it never signed in or its token has expired (signed out)."""
        principal = self._principal.get(client)
        if principal is None or principal.expires_s is None or principal.expires_s >= self._clock() // NS_PER_S:
            return principal
        self.unbind(client)
        log.info("ws_sign_in_expired", client=client.id, user=principal.user)
        return None

    def clients(self, user: str) -> list[Client]:
        """`user`'s signed-in sockets here; one whose token has expired is signed out on the way (logged)."""
        now_s = self._clock() // NS_PER_S
        clients = []
        for client in list(self._by_user.get(user, ())):
            expires_s = self._principal[client].expires_s
            if expires_s is not None and expires_s < now_s:
                self.unbind(client)
                log.info("ws_sign_in_expired", client=client.id, user=user)
            else:
                clients.append(client)
        return clients

    def users(self) -> list[str]:
        return list(self._by_user)

    def offer_portfolio(self, user: str, frame: bytes) -> int:
        """Queue a portfolio frame for each of `user`'s sockets, replacing one not sent yet."""
        clients = self.clients(user)
        seq = next(self._seq)
        for client in clients:
            client.offer(PORTFOLIO_KEY, seq, frame)
        return len(clients)

    def push(self, user: str, frame: bytes) -> int:
        """Queue a frame (in order, never conflated) for each of `user`'s sockets, waiting for none; how many took it.

        Every firing of every user goes through the one `md.alert.*` callback: a socket that does not read must
        not hold it up. One whose queue is full misses the frame (counted, logged) and is closed with 1008 and
        a reason (client.py), so its user reconnects and reads the history rather than trusting a silent socket.
        """
        sent = 0
        for client in self.clients(user):
            if client.push(frame):
                sent += 1
            else:
                self.alerts_missed += 1
                log.warning("alert_push_skipped", client=client.id, user=user, reason="reply_queue_full")
        return sent

    async def on_alert(self, msg: Msg) -> None:
        """The `md.alert.*` subscription callback: forward a firing to its user's sockets here."""
        try:
            fired = decode_fired(msg.data)
        except DecodeError as exc:
            # A core message from another service: nothing to redeliver; logged and skipped.
            log.warning("alert_undecodable", subject=msg.subject, error=str(exc))
            return
        if fired.user not in self._by_user:
            return
        frame = user_messages.encode(user_messages.AlertTriggered(data=fired, timestamp=iso_from_ns(self._clock())))
        self.alerts_pushed += self.push(fired.user, frame)


SOCKETS = web.AppKey("user_sockets", UserSockets)
