"""Which partitions this replica decides: a loop that keeps its leases in step with the live replicas.

Every third of a lease it says it is alive, renews each lease it holds, lists the bucket and follows the
`partitions.plan`: each partition it takes gets its own worker (book, publisher, durable consumer, sweep),
each one it gives back has its worker finish the batch in hand before the lease is deleted, so the next
holder starts from an acknowledged consumer and a stored last price. A lease it fails to renew was taken
over or expired: that worker is cancelled at once, mid-batch if need be (its unacked ticks come back to the
next holder, and a seq both publish is stored once by its `Nats-Msg-Id`). On stop it hands every partition
back the same way and leaves the members, so the others take over within a round instead of a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from nats.errors import Error as NatsError

from pricewire_common.waits import wait_event
from pricewire_validator.leases import LeaseBucket
from pricewire_validator.partitions import Partition, plan

log = structlog.get_logger(__name__)

Work = Callable[[Partition, asyncio.Event, "Hold"], Coroutine[Any, Any, None]]
"""Decide one partition's assets until the event is set, then return; publish only while the hold is valid."""

ROUNDS_PER_LEASE = 3
"""Leases are renewed this many times per lease: one lost or late write never loses one."""
HOLD_MARGIN = 0.1
"""The share of a lease a hold gives up at its end, for clocks that run at slightly different rates."""


@dataclass(slots=True)
class Hold:
    """How long this replica surely still holds a partition's lease, by its own monotonic clock.

    The server expires a lease `lease_s` after the write that renewed it, and that write went out after
    `sent_at`, so the lease lives at least until `sent_at + lease_s`; the hold ends a margin before. A
    decider that stalled past it (a paused process, a frozen bus) stops before it sends again, instead of
    deciding its assets beside their next holder until its next renewal is refused.
    """

    lease_s: float
    sent_at: float
    """`time.monotonic()` just before the last renewal (or the take) that the bus accepted was sent."""

    def valid(self) -> bool:
        return time.monotonic() < self.sent_at + self.lease_s * (1 - HOLD_MARGIN)


_BUS_ERRORS: tuple[type[BaseException], ...] = (NatsError, TimeoutError)


@dataclass(slots=True, kw_only=True)
class _Held:
    partition: Partition
    revision: int
    hold: Hold
    stop: asyncio.Event
    task: asyncio.Task[None]
    releasing: bool = False


class Ownership:
    """Holds partition leases for one replica and runs `work` for each partition held."""

    def __init__(self, bucket: LeaseBucket, partitions: Sequence[Partition], work: Work) -> None:
        self._bucket = bucket
        # An empty partition has nothing to decide: it is never leased.
        self._partitions = {p.name: p for p in partitions if p.assets}
        self._work = work
        self._held: dict[str, _Held] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        """Set with the replica's stop: a rebalancing round ends at its next step, each of which waits on the bus."""
        self._failures: list[BaseException] = []

    @property
    def held(self) -> tuple[str, ...]:
        """The partitions this replica holds now, releasing ones included."""
        return tuple(self._held)

    @property
    def round_s(self) -> float:
        return self._bucket.lease_s / ROUNDS_PER_LEASE

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the fair share of partitions until `stop`, then hand them all back; a worker's error is raised."""
        waker = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                await self._round(rebalance=True)
                if self._failures:
                    raise self._failures[0]
                await self._pause()
        finally:
            waker.cancel()
            await self._hand_back_all()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._wake.set()

    async def _pause(self) -> None:
        """Wait one round, or less when a worker ends or the replica stops."""
        await wait_event(self._wake, self.round_s)
        self._wake.clear()

    async def _round(self, *, rebalance: bool) -> None:
        if rebalance:
            try:
                await self._bucket.beat()
            except _BUS_ERRORS:
                log.warning("member_beat_failed", replica=self._bucket.replica, exc_info=True)
        for name in list(self._held):
            await self._keep(name)
        if not rebalance or self._stopping:
            return
        try:
            listing = await self._bucket.listing(timeout_s=self.round_s)
        except _BUS_ERRORS:
            log.warning("lease_listing_failed", replica=self._bucket.replica, exc_info=True)
            return
        if self._stopping:
            return  # nothing new is taken on the way out
        moves = plan(
            self._bucket.replica,
            partitions=self._partitions,
            members=listing.members,
            held=[name for name, held in self._held.items() if not held.releasing],
            taken=listing.taken,
        )
        for name in moves.release:
            self._give_back(name)
        for name in moves.acquire:
            await self._take(name)

    async def _keep(self, name: str) -> None:
        """Renew one lease, or delete it once its worker is done, or drop the worker if the lease is gone."""
        held = self._held[name]
        if held.task.done():
            del self._held[name]
            self._collect(held)
            await self._delete_lease(held)
            return
        sent_at = time.monotonic()
        try:
            revision = await self._bucket.renew(name, held.revision)
        except _BUS_ERRORS:
            if held.hold.valid():
                log.warning("lease_renew_failed", partition=name, replica=self._bucket.replica, exc_info=True)
                return
            revision = None  # the hold ran out unrenewed: the server may have expired the lease, someone may hold it
        if revision is None:
            del self._held[name]
            held.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held.task
            self._collect(held)
            log.warning("partition_lost", partition=name, replica=self._bucket.replica)
            return
        held.revision = revision
        held.hold.sent_at = sent_at

    def _collect(self, held: _Held) -> None:
        """Keep a worker's error, to be raised by `run` once its lease is back."""
        if not held.task.cancelled() and (error := held.task.exception()) is not None:
            log.error("partition_failed", partition=held.partition.name, exc_info=error)
            self._failures.append(error)

    async def _delete_lease(self, held: _Held) -> None:
        name = held.partition.name
        # Said before the delete: once it is done, the next holder may log its own take at any moment.
        log.info("partition_released", partition=name, replica=self._bucket.replica)
        try:
            if not await self._bucket.release(name, held.revision):
                log.warning("lease_already_gone", partition=name, replica=self._bucket.replica)
        except _BUS_ERRORS:
            # Not lost: the lease expires by itself one lease from its last renewal.
            log.warning("lease_release_failed", partition=name, replica=self._bucket.replica, exc_info=True)

    def _give_back(self, name: str) -> None:
        held = self._held[name]
        held.releasing = True
        held.stop.set()
        log.info("partition_releasing", partition=name, replica=self._bucket.replica)

    async def _take(self, name: str) -> None:
        sent_at = time.monotonic()
        try:
            revision = await self._bucket.acquire(name)
        except _BUS_ERRORS:
            log.warning("lease_acquire_failed", partition=name, replica=self._bucket.replica, exc_info=True)
            return
        if revision is None:
            return  # taken meanwhile, or its holder is still handing it back: next round
        partition = self._partitions[name]
        stop = asyncio.Event()
        hold = Hold(lease_s=self._bucket.lease_s, sent_at=sent_at)
        task = asyncio.create_task(self._work(partition, stop, hold), name=f"validator-{name}")
        task.add_done_callback(lambda _: self._wake.set())
        self._held[name] = _Held(partition=partition, revision=revision, hold=hold, stop=stop, task=task)
        log.info("partition_acquired", partition=name, replica=self._bucket.replica, assets=partition.assets)

    async def _hand_back_all(self) -> None:
        """Stop every worker (each finishes its batch), keep their leases renewed meanwhile, then delete them."""
        for held in self._held.values():
            held.releasing = True
            held.stop.set()
        while self._held:
            await self._round(rebalance=False)
            if self._held:
                await self._pause()
        try:
            await self._bucket.leave()
        except _BUS_ERRORS:
            log.warning("member_leave_failed", replica=self._bucket.replica, exc_info=True)
