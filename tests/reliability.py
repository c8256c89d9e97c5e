"""The reliability report: each fault scenario records its counts; `python -m tests.reliability FILE` prints
the table README quotes. Scenarios record only when PRICEWIRE_RELIABILITY_REPORT names a file (`make
reliability` sets it), so `make test` writes nothing."""

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
    recovery_s: float | None = None
    """From the fault's end to consensus flowing again, when the scenario measures it."""


def record(outcome: Outcome) -> None:
    """Append `outcome` to the report file, if one is asked for."""
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
        recovery = "" if o.recovery_s is None else f"{o.recovery_s:.1f} s"
        rows.append(
            f"| {o.scenario} | {o.load} | {o.fault} | {o.acknowledged:,} | {o.lost} | {o.duplicated} | {recovery} |"
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
