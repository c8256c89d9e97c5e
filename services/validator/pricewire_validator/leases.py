"""Partition leases and replica presence in a JetStream key-value bucket whose entries expire after the lease.

Keys: `member.<replica>` says a replica is alive, `p<index>of<count>` says who decides a partition (its value
is the holder's id). Both are written again every third of the lease; an entry not written for a whole lease
is expired by the server, so a replica that crashed drops out of the members and its partitions come free
with no one having to notice the crash. Taking a lease is `create` (refused while anyone holds it), renewing
it is `update` against the revision last written (refused once it expired or changed hands), giving it back
is a `delete` against that revision. The bus decides every race; replicas' clocks never do.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError, BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = structlog.get_logger(__name__)

BUCKET = "validator_leases"
MEMBER_PREFIX = "member."
_NOT_IN_KEY = re.compile(r"[^A-Za-z0-9_-]")
_WRONG_LAST_SEQUENCE = (10071, 10164)
"""JetStream's error codes for a write whose expected last revision is not the subject's."""


def replica_id() -> str:
    """`<host>-<pid>-<random>`: names this process among the replicas (a pod's host name is the pod's)."""
    host = _NOT_IN_KEY.sub("-", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """What the bucket holds now: the live replicas and the partitions someone holds."""

    members: frozenset[str]
    taken: frozenset[str]


class LeaseBucket:
    """One replica's view of the lease bucket: it writes only its own member key and the leases it holds."""

    def __init__(self, kv: KeyValue, *, replica: str, lease_s: float) -> None:
        self._kv = kv
        self.replica = replica
        self.lease_s = lease_s
        """The bucket's entry lifetime: what the server enforces, whatever this replica was configured with."""
        self._value = replica.encode()

    @classmethod
    async def open(cls, js: JetStreamContext, *, replica: str, lease_s: float, replicas: int = 1) -> LeaseBucket:
        """Bind to the bucket, creating it with entries that live `lease_s` when it does not exist yet."""
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            config = KeyValueConfig(bucket=BUCKET, history=1, ttl=lease_s, replicas=replicas)
            try:
                kv = await js.create_key_value(config)
            except APIError:
                # Another replica created it first (with this config or its own): use theirs.
                kv = await js.key_value(BUCKET)
        bucket_lease_s = (await kv.status()).ttl or lease_s
        if abs(bucket_lease_s - lease_s) > 1e-3:
            # Replicas must agree on the lease: the bucket's, set by whoever created it, is the one in force.
            log.warning("lease_bucket_differs", configured_s=lease_s, bucket_s=bucket_lease_s, bucket=BUCKET)
        return cls(kv, replica=replica, lease_s=bucket_lease_s)

    async def beat(self) -> None:
        """Say this replica is alive for one more lease."""
        await self._kv.put(MEMBER_PREFIX + self.replica, self._value)

    async def leave(self) -> None:
        """Drop out of the members now rather than a lease from now, so the others rebalance at once."""
        await self._kv.delete(MEMBER_PREFIX + self.replica)

    async def listing(self, *, timeout_s: float) -> Listing:
        """The live members and the taken partitions (deleted and expired entries are neither).

        Raises TimeoutError after `timeout_s`. nats-py's `KeyValue.keys()` waits with no bound for the marker
        that ends a watcher's initial values, and that marker never comes when entries expire between the
        watcher's start and their delivery: after a freeze of the bus every lease expires at once, and a
        validator stuck there never saw its SIGTERM.
        """
        watcher = await self._kv.watchall(ignore_deletes=True, meta_only=True)
        keys: list[str] = []
        try:
            async with asyncio.timeout(timeout_s):
                async for entry in watcher:
                    if entry is None:  # the end of the initial values
                        break
                    keys.append(entry.key)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
        members = frozenset(k.removeprefix(MEMBER_PREFIX) for k in keys if k.startswith(MEMBER_PREFIX))
        taken = frozenset(k for k in keys if not k.startswith(MEMBER_PREFIX))
        return Listing(members=members, taken=taken)

    async def acquire(self, partition: str) -> int | None:
        """Take the lease of `partition`: its revision, or None while someone else holds it."""
        try:
            return await self._kv.create(partition, self._value)
        except KeyWrongLastSequenceError:
            return None

    async def renew(self, partition: str, revision: int) -> int | None:
        """Extend a lease held at `revision`: the new revision, or None when it expired or changed hands."""
        try:
            return await self._kv.update(partition, self._value, last=revision)
        except KeyWrongLastSequenceError:
            return None

    async def release(self, partition: str, revision: int) -> bool:
        """Give the lease back if it is still the one written at `revision`; False when it was not ours anymore."""
        try:
            await self._kv.delete(partition, last=revision)
        except APIError as err:
            if err.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True
