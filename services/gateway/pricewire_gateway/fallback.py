"""Which price to serve when Redis has none to give: the decision alone, pure, no I/O.

Redis holds the live consensus (with a TTL); PostgreSQL keeps every consensus. When Redis is down, or
an asset's key expired (its market has been stale for longer than the TTL), the latest consensus
PostgreSQL holds is served instead, marked `stale` and with its age, rather than an error. Only when
neither store has a price is there an error: `no_price` when both answered and had none,
`store_unavailable` when a store that did not answer might have had one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pricewire_common.events import Price
from pricewire_gateway.errors import RequestError, StoreUnavailable


@dataclass(frozen=True, slots=True)
class Served:
    """A price as answered: `stale` when it came from PostgreSQL because Redis had none to give."""

    price: Price
    stale: bool


Live = Mapping[str, Price | None] | StoreUnavailable
"""Redis's answer: each asset's live price (None: no key), or why Redis could not answer."""
Archived = Mapping[str, Price] | StoreUnavailable
"""PostgreSQL's answer: the latest consensus of the assets it has one for, or why it could not answer."""


def missing(assets: Sequence[str], live: Live) -> list[str]:
    """The assets PostgreSQL must be asked about: all of them when Redis is down, else those with no key.

    An asset absent from `live` has a key that does not decode: it is not looked up elsewhere (the
    defect is reported, not papered over).
    """
    if isinstance(live, StoreUnavailable):
        return list(assets)
    return [asset for asset in assets if asset in live and live[asset] is None]


def choose_one(asset: str, live: Live, archived: Archived | None) -> Served:
    """The answer for one asset, or the RequestError to give; `archived` None when it was not asked."""
    if not isinstance(live, StoreUnavailable):
        price = live.get(asset)
        if price is not None:
            return Served(price, stale=False)
    if isinstance(archived, Mapping) and asset in archived:
        return Served(archived[asset], stale=True)
    for store in (live, archived):
        if isinstance(store, StoreUnavailable):
            raise StoreUnavailable(store.store, f"no price for {asset} in the stores that answered ({store.detail})")
    raise RequestError("no_price", f"no price for {asset} yet")


def choose_many(assets: Sequence[str], live: Live, archived: Archived | None) -> list[Served]:
    """The answer for a list, in `assets` order: every asset either store has a price for.

    Fails only when neither store answered; a store that did not answer leaves out the assets only it
    could have supplied.
    """
    if isinstance(live, StoreUnavailable) and not isinstance(archived, Mapping):
        raise live
    served = []
    for asset in assets:
        price = None if isinstance(live, StoreUnavailable) else live.get(asset)
        if price is not None:
            served.append(Served(price, stale=False))
        elif isinstance(archived, Mapping) and asset in archived:
            served.append(Served(archived[asset], stale=True))
    return served
