"""The reliability report: each fault scenario records its counts; `python -m tests.reliability FILE` prints
the table README quotes. Scenarios write only when PRICEWIRE_RELIABILITY_REPORT names a file (`make
reliability` sets it), so `make test` writes nothing; either way a `fault` test that records no outcome is
an error (conftest.py), so no scenario is missing from the table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec


class Outcome(msgspec.Struct, kw_only=True):
    """One scenario's run: what was held and done, and what was counted."""

    scenario: str
    load: str
    fault: str
    acknowledged: int
    lost: int
    duplicated: int
    recovery_s: float
    """From the fault's end (or where `fault` says) to consensus flowing again, as the scenario defines it."""


_recorded: list[Outcome] = []
"""Every outcome this test process recorded, whether or not a report file is asked for."""


def recorded() -> int:
    """How many outcomes this test process has recorded."""
    return len(_recorded)


def record(outcome: Outcome) -> None:
    """Count `outcome`, and append it to the report file if one is asked for."""
    _recorded.append(outcome)
    path = os.environ.get("PRICEWIRE_RELIABILITY_REPORT")
    if path:
        with Path(path).open("ab") as out:
            out.write(msgspec.json.encode(outcome) + b"\n")


def table(lines: list[bytes]) -> str:
    """The markdown table of the recorded outcomes, in the order they ran."""
    rows = [
        "| scenario | load | fault | acknowledged | lost | duplicated | consensus again after |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for line in lines:
        o = msgspec.json.decode(line, type=Outcome)
        rows.append(
            f"| {o.scenario} | {o.load} | {o.fault} | {o.acknowledged:,} | {o.lost} | {o.duplicated} "
            f"| {o.recovery_s:.1f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    lines = [line for line in Path(sys.argv[1]).read_bytes().splitlines() if line.strip()]
    sys.stdout.write(table(lines) + "\n")
    outcomes = [msgspec.json.decode(line, type=Outcome) for line in lines]
    failed = [o.scenario for o in outcomes if o.lost or o.duplicated]
    if failed:
        sys.stderr.write(f"lost or duplicated in: {', '.join(failed)}\n")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
