"""How fast the validator's pure consensus core is, in one process, without any I/O.

Ticks come from the seeded sim feed (5 assets x N venues, 0.1 ms apart so every quote is fresh and
every rule runs: no stale shortcut). Four figures, one JSON line:

- `updates_per_s`: `ConsensusBook.update` alone (a quote arrives: newest-wins, jump test);
- `update_and_decide_per_s`: each update followed by a decision of its asset (the consensus answered
  after every single quote: the worst case);
- `batched_per_s`: the service's pattern: batches of `--batch` updates, then each touched asset
  proposed and, when due (`--deviation-bps`), its event built and committed;
- `explain_us`: building one event's evidence (deviations, weights, confidence, 24h figures).

    python bench/consensus.py --ticks 200000 --venues 5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from pricewire_collector.sim import SimFeed
from pricewire_common.config import Settings, SimSettings, ValidatorSettings
from pricewire_common.events import Tick
from pricewire_validator.consensus import ConsensusBook, ConsensusRule


def sim_ticks(settings: Settings, count: int, venues: int) -> list[Tick]:
    feed = SimFeed(settings.assets, venues=venues, seed=1, outlier_probability=0.01, quiet_rate=0.0)
    start_ns = time.time_ns()
    ticks = []
    for i in range(count):
        tick = feed.next_tick(start_ns + i * 100_000)
        if tick is not None:
            ticks.append(tick)
    return ticks


def updates(rule: ConsensusRule, ticks: list[Tick]) -> float:
    book = ConsensusBook(rule)
    began = time.perf_counter()
    for tick in ticks:
        book.update(tick)
    return time.perf_counter() - began


def update_and_decide(rule: ConsensusRule, ticks: list[Tick], now_ns: int) -> float:
    book = ConsensusBook(rule)
    began = time.perf_counter()
    for tick in ticks:
        book.update(tick)
        book.decide(tick.base, now_ns)
    return time.perf_counter() - began


def batched(rule: ConsensusRule, ticks: list[Tick], batch: int) -> tuple[float, int]:
    """Seconds for the service's pattern, and how many events it published."""
    book = ConsensusBook(rule)
    events = 0
    began = time.perf_counter()
    for start in range(0, len(ticks), batch):
        chunk = ticks[start : start + batch]
        for tick in chunk:
            book.update(tick)
        now_ns = chunk[-1].ts_received
        for asset in {t.base for t in chunk}:
            price = book.propose(asset, now_ns)
            if price is not None:
                book.commit(price)
                events += 1
    return time.perf_counter() - began, events


def explain_s(rule: ConsensusRule, ticks: list[Tick], now_ns: int, rounds: int) -> float:
    book = ConsensusBook(rule)
    for tick in ticks[:5000]:
        book.update(tick)
    assets = book.assets
    began = time.perf_counter()
    for i in range(rounds):
        book.evaluate(assets[i % len(assets)], now_ns)
    return (time.perf_counter() - began) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--venues", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--deviation-bps", type=float, default=ValidatorSettings().deviation_bps)
    args = parser.parse_args()

    settings = replace(
        Settings(),
        sim=SimSettings(seed=1, venues=args.venues, quiet_rate=0.0),
        validator=ValidatorSettings(deviation_bps=args.deviation_bps),
    )
    rule = ConsensusRule.from_settings(settings)
    ticks = sim_ticks(settings, args.ticks, args.venues)
    now_ns = ticks[-1].ts_received
    n = len(ticks)

    update_s = updates(rule, ticks)
    decide_s = update_and_decide(rule, ticks, now_ns)
    batch_s, events = batched(rule, ticks, args.batch)
    explain = explain_s(rule, ticks, now_ns, rounds=5000)
    print(
        json.dumps(
            {
                "ticks": n,
                "venues": args.venues,
                "assets": len(settings.assets),
                "method": rule.method,
                "updates_per_s": round(n / update_s),
                "update_and_decide_per_s": round(n / decide_s),
                "decide_us": round((decide_s - update_s) / n * 1e6, 2),
                "batch": args.batch,
                "batched_per_s": round(n / batch_s),
                "batched_events": events,
                "explain_us": round(explain * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
