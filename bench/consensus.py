"""How fast the validator's pure consensus core is: quote updates per second, and one evaluation per update.

A baseline before the consensus engine grows (weights, MAD, anomalies): ticks from the seeded sim feed
(5 assets x N venues) are fed to `ConsensusBook.update`, and after each one the touched asset is
evaluated as the service does. Prints one JSON line.

    python bench/consensus.py --ticks 200000 --venues 5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from pricewire_collector.sim import SimFeed
from pricewire_common.config import Settings, SimSettings
from pricewire_validator.consensus import ConsensusBook, ConsensusRule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--venues", type=int, default=5)
    args = parser.parse_args()

    settings = replace(Settings(), sim=SimSettings(seed=1, venues=args.venues, quiet_rate=0.0))
    feed = SimFeed(settings.assets, venues=args.venues, seed=1, outlier_probability=0.01, quiet_rate=0.0)
    start_ns = time.time_ns()
    ticks = []
    for i in range(args.ticks):  # one tick per ms of simulated time, all fresh
        tick = feed.next_tick(start_ns + i * 1_000_000)
        if tick is not None:
            ticks.append(tick)

    book = ConsensusBook(ConsensusRule.from_settings(settings))
    now_ns = ticks[-1].ts_received
    began = time.perf_counter()
    for tick in ticks:
        book.update(tick)
    update_s = time.perf_counter() - began

    book = ConsensusBook(ConsensusRule.from_settings(settings))
    began = time.perf_counter()
    for tick in ticks:
        book.update(tick)
        book.evaluate(tick.base, now_ns)
    both_s = time.perf_counter() - began
    print(
        json.dumps(
            {
                "ticks": len(ticks),
                "venues": args.venues,
                "assets": len(settings.assets),
                "updates_per_s": round(len(ticks) / update_s),
                "update_and_evaluate_per_s": round(len(ticks) / both_s),
                "evaluate_us_mean": round((both_s - update_s) / len(ticks) * 1e6, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
