"""How validator replicas share the assets: a fixed partition per asset, and a plan of which partitions to hold.

Pure: no I/O. `leases` keeps the plan on the bus, `ownership` runs it.

An asset's partition depends on nothing but the asset and the partition count (the first 8 bytes of the
SHA-1 of its code, big-endian, modulo the count: the same in every process and Python version, unlike
`hash()`): replicas agree without talking, and adding an asset to PRICEWIRE_ASSETS moves no other asset.
The cost of that stability is balance: a hash spreads a few assets unevenly, so a partition can be empty;
it is then never leased. (SHA-1 spreads the five default assets 2 + 3, 1 + 2 + 2 and 1 + 1 + 1 + 2 over
two, three and four partitions; crc32, tried first, put all five into one of three.)

Tick subjects carry the pair as one token (`md.tick.<source>.<BASE>-<QUOTE>`), so no NATS wildcard selects
a base asset: a partition's consumer lists its subjects, `md.tick.*.<ASSET>-<QUOTE>` for each of its assets
and each USD quote.

Who decides a partition is whoever holds its lease. Each live replica aims at its fair share,
ceil(leased partitions / live replicas): one over it releases the partitions it ranks lowest, one under it
tries the free partitions it ranks highest (the rank is a rendezvous weight of replica and partition, so
replicas prefer different partitions and never argue about an order). Nobody releases a partition while
within its share, so a replica's death moves only its own partitions (the share of the others only grows),
a newcomer takes partitions only from replicas above the new share, and no replica holds more than
ceil(partitions / replicas): the least a busiest replica can hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from pricewire_common import subjects

FILTER_SUBJECTS_SINCE = (2, 10)
"""The NATS server version whose consumers take several filter subjects."""
LEASE_PREFIX = "p"
"""Lease keys read `p<index>of<count>`: replicas configured with another count never share a lease."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    """One slice of the assets: decided by one replica at a time, through its own durable consumer."""

    index: int
    count: int
    assets: tuple[str, ...]
    filter_subjects: tuple[str, ...]

    @property
    def name(self) -> str:
        """`p<index>of<count>`: the lease key, and the tail of the durable consumer's name."""
        return f"{LEASE_PREFIX}{self.index}of{self.count}"

    @property
    def durable(self) -> str:
        """`validator-p<index>of<count>`: a new count means new consumers, never one left with other filters."""
        return f"validator-{self.name}"


def partition_of(asset: str, count: int) -> int:
    """The partition of `asset` among `count`: SHA-1 of its code (first 8 bytes, big-endian), modulo `count`."""
    if count < 1:
        raise ValueError(f"partition count must be at least 1, not {count}")
    digest = hashlib.sha1(subjects.check_asset(asset).encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % count


def supports_filter_subjects(major: int, minor: int) -> bool:
    """True when a NATS server of this version can filter one consumer on several subjects."""
    return (major, minor) >= FILTER_SUBJECTS_SINCE


def tick_filters(assets: Iterable[str], quotes: Iterable[str]) -> tuple[str, ...]:
    """`md.tick.*.<ASSET>-<QUOTE>` for every asset and quote: the ticks a consumer of these assets reads."""
    return tuple(f"{subjects.TICK_ROOT}.*.{subjects.symbol(asset, quote)}" for asset in assets for quote in quotes)


def partitions(assets: Sequence[str], quotes: Sequence[str], count: int) -> tuple[Partition, ...]:
    """All `count` partitions of `assets` (each asset in exactly one), empty ones included, in index order."""
    members: list[list[str]] = [[] for _ in range(count)]
    for asset in dict.fromkeys(assets):
        members[partition_of(asset, count)].append(asset)
    return tuple(
        Partition(index=i, count=count, assets=tuple(held), filter_subjects=tick_filters(held, quotes))
        for i, held in enumerate(members)
    )


def weight(replica: str, partition: str) -> int:
    """The rendezvous weight of `replica` for `partition`: higher means the replica would rather hold it."""
    digest = hashlib.blake2b(f"{replica}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def fair_share(partitions: int, replicas: int) -> int:
    """The most partitions one of `replicas` live replicas should hold: ceil(partitions / replicas)."""
    return -(-partitions // max(replicas, 1))


@dataclass(frozen=True, slots=True)
class Plan:
    """What a replica does this round: leases to give back, then free partitions to try, best first."""

    release: tuple[str, ...] = ()
    acquire: tuple[str, ...] = ()


def plan(
    replica: str,
    *,
    partitions: Collection[str],
    members: Collection[str],
    held: Collection[str],
    taken: Collection[str],
) -> Plan:
    """The moves that bring `replica` to its fair share.

    `partitions` are the lease keys worth holding (partitions with assets), `members` the live replicas,
    `held` the leases `replica` holds and keeps, `taken` every lease held by anyone (its own included).
    """
    live = {*members, replica}
    share = fair_share(len(partitions), len(live))
    mine = [p for p in partitions if p in held]
    if len(mine) > share:
        by_rank = sorted(mine, key=lambda p: weight(replica, p))
        return Plan(release=tuple(by_rank[: len(mine) - share]))
    free = [p for p in partitions if p not in taken and p not in held]
    by_rank = sorted(free, key=lambda p: weight(replica, p), reverse=True)
    return Plan(acquire=tuple(by_rank[: share - len(mine)]))
