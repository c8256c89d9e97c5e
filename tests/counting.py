"""The fault campaign's counts, shared by its scenarios, as the analyses of message systems count them.

Every write (a tick) has a unique id. A `Ledger` holds what a feed attempted and what JetStream acknowledged;
after the fault, lost = acknowledged - observed and duplicated = observed more than once. "Consensus again"
is a price decided from a tick received after the fault ended (`ts_tick`), with status `ok`, for every asset:
a heartbeat or a stale re-publish of an older consensus carries an older `ts_tick`, so it never counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from pricewire_common import subjects
from pricewire_common.events import Price, Tick, decode_price
from tests.projections import prices_in_log


@dataclass
class Ledger:
    """What a feed attempted and what JetStream acknowledged, by tick id."""

    attempted: list[str] = field(default_factory=list)
    acknowledged: Counter[str] = field(default_factory=Counter)

    def attempt(self, tick: Tick) -> None:
        self.attempted.append(tick.id)

    def ack(self, tick: Tick) -> None:
        self.acknowledged[tick.id] += 1

    def never_acknowledged(self) -> set[str]:
        """Ids attempted that JetStream never acknowledged (dropped, or still unsent)."""
        return set(self.attempted) - set(self.acknowledged)


def lost(acknowledged: Iterable[str], observed: Iterable[str]) -> set[str]:
    return set(acknowledged) - set(observed)


def duplicated(*observed: Counter[str]) -> set[str]:
    """Ids any of `observed` holds more than once."""
    return {i for counts in observed for i, n in counts.items() if n > 1}


def decided_twice(prices: Iterable[Price]) -> set[tuple[str, int]]:
    """(asset, seq) pairs the log holds more than once: two events for one decision."""
    counts = Counter((p.asset, p.seq) for p in prices)
    return {key for key, n in counts.items() if n > 1}


def seq_gaps(prices: Iterable[Price]) -> dict[str, list[int]]:
    """Per asset whose seqs are not 1, 2, 3... in log order, those seqs (empty: every asset contiguous)."""
    by_asset: dict[str, list[int]] = {}
    for price in prices:
        by_asset.setdefault(price.asset, []).append(price.seq)
    return {a: seqs for a, seqs in by_asset.items() if seqs != list(range(seqs[0], seqs[0] + len(seqs)))}


def fresh(price: Price | None, after_ns: int) -> bool:
    """An `ok` consensus decided from a tick received after `after_ns`."""
    return price is not None and price.status == "ok" and price.ts_tick > after_ns


async def last_price(js: JetStreamContext, asset: str) -> Price | None:
    try:
        raw = await js.get_last_msg(subjects.PRICES_STREAM, subjects.price(asset))
    except (NotFoundError, NatsError, TimeoutError):  # no price yet, or the server still coming back
        return None
    return decode_price(raw.data or b"")


def fresh_assets(
    js: JetStreamContext, assets: Collection[str], after_ns: int
) -> Callable[[], Awaitable[frozenset[str]]]:
    """A probe for `eventually`: the assets whose newest price has been fresh at some look since it began (a
    fresh price followed by a heartbeat still counts)."""
    seen: set[str] = set()

    async def probe() -> frozenset[str]:
        for asset in set(assets) - seen:
            if fresh(await last_price(js, asset), after_ns):
                seen.add(asset)
        return frozenset(seen)

    return probe


async def first_fresh(js: JetStreamContext, assets: Collection[str], after_ns: int) -> dict[str, Price]:
    """Per asset, the first fresh price (see `fresh`) stream PRICES holds: read from the log, so exact."""
    first: dict[str, Price] = {}
    for price in await prices_in_log(js):
        if price.asset in assets and price.asset not in first and fresh(price, after_ns):
            first[price.asset] = price
    return first


def consensus_again_s(first: Mapping[str, Price], assets: Collection[str], after_ns: int) -> float:
    """Seconds from `after_ns` until every asset had a fresh consensus (the slowest asset's)."""
    missing = set(assets) - set(first)
    assert not missing, f"no fresh ok consensus for {sorted(missing)}"
    return max(first[a].ts - after_ns for a in assets) / 1e9


async def acked_through(js: JetStreamContext, stream: str, durable: str) -> int:
    """The stream sequence through which `durable` has acknowledged every message of its filter.

    Checked settled first (nothing pending, nothing awaiting its ack): everything at or below the ack floor
    was then taken and acknowledged by the consumer's reader.
    """
    info = await js.consumer_info(stream, durable)
    assert (info.num_pending, info.num_ack_pending) == (0, 0), (durable, info.num_pending, info.num_ack_pending)
    assert info.ack_floor is not None
    return int(info.ack_floor.stream_seq)
