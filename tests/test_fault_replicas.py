"""Two validator replicas sharing five assets (two partitions, one lease each), one of them killed (SIGKILL) or
paused (SIGSTOP past its lease and the ack wait, then SIGCONT) while ticks are in flight.

What is counted, as in the rest of the campaign:

- lost = acknowledged - consumed = 0: every tick JetStream acknowledged to the feed is in stream TICKS and at
  or below the ack floor of its partition's consumer, which is settled (nothing pending, nothing unacked);
  no cache_writer runs here, so the validator's consumption is what is observed;
- duplicated = 0: no tick id twice in TICKS, no (asset, seq) twice in PRICES, no seq published by both;
- the survivor prices the victim's assets (an `ok` consensus of a tick received after the fault began, for
  each of them) within TAKEOVER_S: the table's "consensus again after", counted from the kill or the SIGSTOP.

"No asset decided twice" is shown three ways, each of which could fail. The Price event and its headers do not
name the replica that decided it, so the deciders come from the replicas' own logs (`price_published`, with
the replica and partition bound to every line; the process logs at debug for it):
1. per asset, the seqs in log order are 1, 2, 3...: every event extends the one stored before it, so no two
   chains of decisions were ever interleaved in the log (a second decider, starting from what it last saw,
   would repeat or skip a seq);
2. no (asset, seq) is stored twice, and no replica logged `price_lost` (a publish the log refused or took as a
   duplicate of a stored seq: the mark of two replicas deciding the same asset at once, which `Nats-Msg-Id`
   resolves) save its own fence refusing to send at all once its lease may have passed (STEPPED_ASIDE);
3. each (asset, seq) is claimed by at most one replica, and per asset the claims in log order change hands no
   more often than the asset's partition changed hands (its `partition_acquired` lines): one decider per
   tenure of the lease.
Not shown: who decided an event stored just before its replica was killed, ahead of its log line; such an event
is in (1) and (2) but unclaimed in (3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from pricewire_cli.embedded import NatsServer
from pricewire_common import subjects
from pricewire_common.bus import MSG_ID_HEADER
from pricewire_common.config import Settings
from pricewire_common.events import Price, decode_tick, encode
from pricewire_common.waits import wait_event
from pricewire_validator.partitions import partition_of, partitions
from tests.counting import Ledger, acked_through, consensus_again_s, decided_twice, first_fresh, fresh_assets
from tests.pipeline import ServiceProcess, service_env
from tests.projections import events_in_log, prices_in_log
from tests.reliability import Outcome, record
from tests.test_validator_partitions import (
    ASSETS,
    LEASE_S,
    WAIT_S,
    assert_seq_contiguous,
    holders,
    replica,
    settled,
    tick_round,
    validator_settings,
)
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.fault]

ROUND_S = 0.05
"""One tick per venue and asset (15 ticks), each acknowledged, then this pause: some 200 ticks/s here."""
PAUSE_S = float(os.environ.get("PRICEWIRE_FAULT_PAUSE_S", "3"))
"""How long the paused replica stays stopped: past its lease (LEASE_S) and the ack wait (2 s)."""
TAKEOVER_S = 3 * LEASE_S + 2.0
"""The stated time for the survivor to price the victim's assets: the lease expires (at most LEASE_S after
its last renewal), the survivor's next round takes it (a third of a lease), and its worker starts and reads."""
DURABLES = ["validator-p0of2", "validator-p1of2"]


async def feed(js: JetStreamContext, ledger: Ledger, stop: asyncio.Event) -> None:
    """Rounds of ticks, each acknowledged by JetStream before the next is sent, until `stop`."""
    step = 0
    while not stop.is_set():
        step += 1
        for tick in tick_round(step % 10):  # prices wander within 1 %: every round is a new consensus
            ledger.attempt(tick)
            await js.publish(
                subjects.tick(tick.source, tick.base, tick.quote), encode(tick), headers={MSG_ID_HEADER: tick.id}
            )
            ledger.ack(tick)
        await wait_event(stop, ROUND_S)  # the load's pace, not a wait for a state


async def in_flight(js: JetStreamContext, durable: str) -> int:
    """Ticks of `durable`'s filter not yet acknowledged by its reader: pending or delivered unacked."""
    info = await js.consumer_info(subjects.TICKS_STREAM, durable)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


STEPPED_ASIDE = "not sent: the partition's lease is no longer surely held"
"""A replica's own fence refusing a decision once its lease may have passed to another (publisher.py)."""


@dataclass(frozen=True)
class Decisions:
    """Who decided what: the replicas' log lines beside stream PRICES."""

    prices: list[Price]
    entries: list[Mapping[str, object]]
    """Both replicas' log lines (the in-process one's captured, the process's read back)."""

    def claimed(self) -> dict[tuple[str, int], set[str]]:
        """(asset, seq) -> the replicas that logged it as published and confirmed by the log."""
        by_seq: dict[tuple[str, int], set[str]] = {}
        for e in self.entries:
            if e["event"] == "price_published":
                by_seq.setdefault((str(e["asset"]), int(str(e["seq"]))), set()).add(str(e["replica"]))
        return by_seq

    def claimed_twice(self) -> set[tuple[str, int]]:
        return {key for key, who in self.claimed().items() if len(who) > 1}

    def tenures(self) -> Counter[str]:
        """How many times each partition was taken."""
        return Counter(str(e["partition"]) for e in self.entries if e["event"] == "partition_acquired")

    def runs(self) -> dict[str, int]:
        """Per asset, how many runs of one decider its claimed events make in log order."""
        claimed = {key: min(who) for key, who in self.claimed().items()}
        runs: dict[str, int] = {}
        last: dict[str, str] = {}
        for price in self.prices:
            who = claimed.get((price.asset, price.seq))
            if who is None:
                continue  # in the log, but its replica was killed before it logged so
            if last.get(price.asset) != who:
                runs[price.asset] = runs.get(price.asset, 0) + 1
                last[price.asset] = who
        return runs

    def collisions(self) -> list[Mapping[str, object]]:
        """`price_lost` lines other than a replica's fence stepping aside: a publish the log refused or did not
        take, such as a seq another replica had stored."""
        return [e for e in self.entries if e["event"] == "price_lost" and e.get("detail") != STEPPED_ASIDE]

    def assert_no_asset_decided_twice(self) -> None:
        """The three proofs of the module's docstring."""
        assert_seq_contiguous(self.prices)  # (1)
        assert decided_twice(self.prices) == set()  # (2)
        assert self.collisions() == []
        assert self.claimed_twice() == set()  # (3)
        turns = self.tenures()
        runs = self.runs()
        assert runs, "no decider claimed a price"
        for asset, n in runs.items():
            assert n <= turns[f"p{partition_of(asset, 2)}of2"], (asset, n, turns)


@contextlib.contextmanager
def faulted(victim: ServiceProcess, how: str) -> Iterator[None]:
    if how == "killed":
        victim.kill()
        yield
    else:
        with victim.paused():
            yield


@dataclass
class Run:
    """One run of the scenario: what was fed, who held what, and when the fault began."""

    ledger: Ledger
    fed_s: float
    """How long the feed ran."""
    victim: str
    """The partition the faulted replica held."""
    victim_assets: tuple[str, ...]
    at_fault: int
    """Ticks of the victim's partition in flight when the fault began."""
    fault_ns: int
    taken: dict[str, str | None]
    """Who held each partition once the victim's assets were priced again."""
    floors: dict[str, int]
    """Each partition consumer's ack floor, once settled."""
    survivor_lost: list[str]
    """Partitions the survivor logged as lost after the fault began."""


async def run_replicas(
    how: str, js: JetStreamContext, settings: Settings, other: ServiceProcess, logs: Sequence[Mapping[str, object]]
) -> Run:
    """Two replicas, `other` (a process) and "a" (in this loop, logging into `logs`), under load; fault `other`;
    settle."""
    ledger = Ledger()
    stop = asyncio.Event()
    other.start()
    async with replica(settings, "a"):
        split = await eventually(
            lambda: holders(js), lambda h: None not in h.values() and len(set(h.values())) == 2, timeout=WAIT_S
        )
        (victim,) = [name for name, who in split.items() if who != "a"]
        victim_assets = partitions(ASSETS, (), 2)[int(victim[1])].assets
        fed_from = time.monotonic()
        feeding = asyncio.create_task(feed(js, ledger, stop))
        try:
            await eventually(fresh_assets(js, ASSETS, time.time_ns()), lambda s: s == set(ASSETS), timeout=WAIT_S)
            # The fault lands while the victim has ticks in hand or on the way, not once it has settled.
            at_fault = await eventually(lambda: in_flight(js, f"validator-{victim}"), lambda n: n > 0, timeout=WAIT_S)
            fault_ns = time.time_ns()
            before = len(logs)
            with faulted(other, how):
                await eventually(
                    fresh_assets(js, victim_assets, fault_ns),
                    lambda s: s == set(victim_assets),
                    timeout=TAKEOVER_S,
                    what="the victim's assets priced by the survivor",
                )
                taken = await holders(js)
                if how == "paused":
                    await asyncio.sleep(max(0.0, PAUSE_S - (time.time_ns() - fault_ns) / 1e9))  # the pause itself
            if how == "paused":  # the paused replica takes a share again: it went back to work
                await eventually(lambda: holders(js), lambda h: set(h.values()) == set(split.values()), timeout=WAIT_S)
            # Every asset is decided again after the fault, by whoever holds it now.
            back_ns = time.time_ns()
            await eventually(fresh_assets(js, ASSETS, back_ns), lambda s: s == set(ASSETS), timeout=TAKEOVER_S)
            await wait_event(stop, 1.0)  # a little more load after recovery
        finally:
            stop.set()
            await feeding
        fed_s = time.monotonic() - fed_from
        await settled(js, DURABLES)
        floors = {durable: await acked_through(js, subjects.TICKS_STREAM, durable) for durable in DURABLES}
    return Run(
        ledger=ledger,
        fed_s=fed_s,
        victim=victim,
        victim_assets=victim_assets,
        at_fault=at_fault,
        fault_ns=fault_ns,
        taken=taken,
        floors=floors,
        survivor_lost=[str(e["partition"]) for e in logs[before:] if e["event"] == "partition_lost"],
    )


@pytest.mark.parametrize("how", ["killed", "paused"])
async def test_a_replica_killed_or_paused_mid_stream_hands_its_assets_over_and_no_asset_is_decided_twice(
    how: str, nats_server: NatsServer, replicas_nats: NATS, tmp_path: Path
) -> None:
    js = replicas_nats.jetstream()
    settings = validator_settings(nats_server.url, partitions=2)
    env = {
        **service_env(settings),
        "PRICEWIRE_VALIDATOR_PARTITIONS": "2",
        "PRICEWIRE_VALIDATOR_LEASE_S": str(LEASE_S),
        "PRICEWIRE_HEARTBEAT_S": "1",
        "PRICEWIRE_DEVIATION_BPS": "0",
        "PRICEWIRE_LOG_LEVEL": "debug",  # its price_published lines name who decided each seq
    }
    with (
        ServiceProcess("pricewire_validator", env, tmp_path / "b.log") as other,
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
    ):
        run = await run_replicas(how, js, settings, other, logs)
        if how == "paused":
            assert other.terminate() == 0  # it stepped aside and went on working: a clean stop
    in_log = await events_in_log(js, subjects.TICKS_STREAM, decode_tick)
    decisions = Decisions(
        prices=await prices_in_log(js),
        entries=[
            *logs,
            *(line for event in ("price_published", "partition_acquired", "price_lost") for line in other.lines(event)),
        ],
    )
    first = await first_fresh(js, run.victim_assets, run.fault_ns)
    consumed = {tick.id for seq, tick in in_log if seq <= run.floors[f"validator-p{partition_of(tick.base, 2)}of2"]}
    missing = set(run.ledger.acknowledged) - consumed
    ticks_twice = {i for i, n in Counter(tick.id for _, tick in in_log).items() if n > 1}
    takeover_s = consensus_again_s(first, run.victim_assets, run.fault_ns)
    fault = (
        f"SIGKILLed with {run.at_fault} ticks in flight"
        if how == "killed"
        else f"SIGSTOPped {PAUSE_S:.0f} s (lease {LEASE_S:.0f} s, ack wait 2 s) with {run.at_fault} ticks in flight,"
        " then SIGCONT"
    )
    record(
        Outcome(
            scenario=f"validator replica {how}",
            load=f"{len(run.ledger.acknowledged) / run.fed_s:.0f} ticks/s, {len(ASSETS)} assets x 3 venues, 2 replicas",
            fault=f"the replica holding {run.victim} {fault}; consensus again counted from the fault's start",
            acknowledged=len(run.ledger.acknowledged),
            lost=len(missing),
            duplicated=len(ticks_twice) + len(decided_twice(decisions.prices)) + len(decisions.claimed_twice()),
            recovery_s=takeover_s,
        )
    )

    assert len(run.ledger.acknowledged) > 150  # a real load went through the fault
    assert missing == set(), f"{len(missing)} acknowledged ticks never consumed"
    assert ticks_twice == set()
    assert {tick.id for _, tick in in_log} == set(run.ledger.attempted)  # the log holds the feed, and only it
    assert run.taken[run.victim] == "a"  # the survivor took the victim's partition over...
    assert takeover_s <= TAKEOVER_S  # ...in the stated time
    assert all(decisions.claimed().get((a, first[a].seq)) == {"a"} for a in run.victim_assets)  # and decided them
    decisions.assert_no_asset_decided_twice()
    assert run.survivor_lost == []  # the survivor never had a lease taken from it
    if how == "paused":
        # Back from its pause it found its lease gone and stepped aside: its fence refused what it had decided,
        # nothing of it reached the log, and it gave the partition up (then took a share again).
        assert [e["partition"] for e in other.lines("partition_lost")] == [run.victim]
        assert {e["detail"] for e in other.lines("price_lost")} <= {STEPPED_ASIDE}
