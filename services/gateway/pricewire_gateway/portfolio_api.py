"""`GET/PUT /api/v1/portfolio`, and live `portfolio_update` frames to the owner's WebSockets.

Each replica keeps the holdings of the users signed in on its sockets, and the latest consensus of
each asset (its own core subscription to `md.price.*`). A price of a held asset revalues that user's
portfolio and offers the frame to their sockets' mailboxes, where it is conflated like a price (a slow
client gets the latest valuation, never a queue of them). A PUT on any replica is announced on
`md.portfolio.<user>`, and every replica holding that user's sockets reloads the holdings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_common import subjects
from pricewire_common.clock import Clock, iso_from_ns
from pricewire_common.errors import RejectedInput
from pricewire_common.events import Price, decode_price
from pricewire_gateway import user_messages
from pricewire_gateway.appkeys import LATEST, RESOLVER
from pricewire_gateway.auth import require_user
from pricewire_gateway.errors import BadParameter, RequestError, StoreUnavailable
from pricewire_gateway.latest import LatestPrices
from pricewire_gateway.portfolio import MAX_HOLDINGS, Holding, value
from pricewire_gateway.portfolio_store import PortfolioStore
from pricewire_gateway.rest import json_response
from pricewire_gateway.symbols import SymbolResolver
from pricewire_gateway.user_sockets import UserSockets

__all__ = ["PORTFOLIOS", "PortfolioFeed", "install"]

log = structlog.get_logger(__name__)

PATH: Final = "/api/v1/portfolio"
MAX_BODY_BYTES: Final = 16 * 1024


class PortfolioFeed:
    """Holdings of this replica's signed-in users, revalued on each price of an asset they hold."""

    def __init__(
        self, store: PortfolioStore, latest: LatestPrices, sockets: UserSockets, nc: NATS, *, clock: Clock
    ) -> None:
        self.store = store
        self._latest_prices = latest
        self._sockets = sockets
        self._nc = nc
        self._clock = clock
        self._latest: dict[str, Price] = {}
        self._holdings: dict[str, list[Holding]] = {}
        self.pushed = 0

    async def valuation(self, holdings: Sequence[Holding]) -> user_messages.Valuation:
        """`holdings` valued at the latest prices: live ones, and Redis/PostgreSQL's for assets with none yet
        (kept as this replica's latest until a live one comes, so a price event never waits on a store)."""
        missing = [h.asset for h in holdings if h.asset not in self._latest]
        if missing:
            try:
                for served in await self._latest_prices.get_many(missing):
                    self._keep(served.price)
            except StoreUnavailable as exc:
                log.warning("portfolio_prices_unavailable", assets=missing, error=exc.detail)
        return value(holdings, self._latest)

    def _keep(self, price: Price) -> bool:
        held = self._latest.get(price.asset)
        if held is not None and held.seq >= price.seq:
            return False
        self._latest[price.asset] = price
        return True

    async def track(self, user: str) -> None:
        """Load `user`'s holdings (a socket of theirs signed in, or they changed) and push a valuation."""
        if not self._sockets.clients(user):
            self._holdings.pop(user, None)
            return
        holdings = await self.store.get(user)
        self._holdings[user] = holdings
        if holdings:
            await self._push(user, holdings)

    def forget(self, user: str) -> None:
        """Drop `user`'s holdings once none of their sockets is left here."""
        if not self._sockets.clients(user):
            self._holdings.pop(user, None)

    async def on_price(self, msg: Msg) -> None:
        """The `md.price.*` subscription callback (the hub's feed checks and dead-letters; this one only reads)."""
        try:
            price = decode_price(msg.data)
        except RejectedInput:
            return
        if not self._keep(price):
            return
        for user, holdings in list(self._holdings.items()):
            if any(h.asset == price.asset for h in holdings):
                self._offer(user, value(holdings, self._latest))

    async def on_change(self, msg: Msg) -> None:
        """The `md.portfolio.*` subscription callback: some replica replaced a user's holdings."""
        user = msg.subject.rpartition(".")[2]
        if user in self._holdings or self._sockets.clients(user):
            try:
                await self.track(user)
            except StoreUnavailable as exc:
                log.warning("portfolio_reload_failed", user=user, error=exc.detail)

    async def announce(self, user: str) -> None:
        await self._nc.publish(subjects.portfolio_changed(user), b"")

    async def _push(self, user: str, holdings: Sequence[Holding]) -> None:
        self._offer(user, await self.valuation(holdings))

    def _offer(self, user: str, valuation: user_messages.Valuation) -> None:
        update = user_messages.PortfolioUpdate(data=valuation, timestamp=iso_from_ns(self._clock()))
        self.pushed += self._sockets.offer_portfolio(user, user_messages.encode(update))


PORTFOLIOS = web.AppKey("portfolios", PortfolioFeed)


def _holdings(resolver: SymbolResolver, body: user_messages.PortfolioPut) -> list[Holding]:
    if len(body.holdings) > MAX_HOLDINGS:
        raise BadParameter("holdings", f"at most {MAX_HOLDINGS} holdings")
    holdings: dict[str, Holding] = {}
    for index, item in enumerate(body.holdings):
        try:
            asset = resolver.require(item.symbol)
        except RequestError as exc:
            raise BadParameter("holdings", f"holdings[{index}].symbol: {exc.message}") from exc
        if not item.amount.is_finite() or item.amount < 0:
            raise BadParameter("holdings", f"holdings[{index}].amount must be a number >= 0")
        if asset in holdings:
            raise BadParameter("holdings", f"holdings[{index}]: {asset} appears twice")
        holdings[asset] = Holding(asset=asset, amount=item.amount)
    return list(holdings.values())


async def get_portfolio(request: web.Request) -> web.Response:
    """`GET /api/v1/portfolio`: the caller's holdings valued at the latest prices."""
    principal = require_user(request)
    feed = request.app[PORTFOLIOS]
    holdings = await feed.store.get(principal.user)
    return json_response(user_messages.encode(await feed.valuation(holdings)))


async def put_portfolio(request: web.Request) -> web.Response:
    """`PUT /api/v1/portfolio`: replace the caller's holdings; answers the new valuation."""
    principal = require_user(request)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadParameter("body", f"the body may have at most {MAX_BODY_BYTES} bytes")
    body = user_messages.decode_portfolio_put(await request.read())
    holdings = _holdings(request.app[RESOLVER], body)
    feed = request.app[PORTFOLIOS]
    await feed.store.replace(principal.user, holdings)
    await feed.announce(principal.user)
    return json_response(user_messages.encode(await feed.valuation(holdings)))


def install(app: web.Application, feed: PortfolioFeed) -> None:
    app[PORTFOLIOS] = feed
    app.router.add_get(PATH, get_portfolio)
    app.router.add_put(PATH, put_portfolio)


def feed_for(
    app: web.Application, store: PortfolioStore, sockets: UserSockets, nc: NATS, *, clock: Clock
) -> PortfolioFeed:
    """A feed over the app's own latest-price reader."""
    return PortfolioFeed(store, app[LATEST], sockets, nc, clock=clock)
