"""The reliability table `make reliability` prints: one row per recorded scenario, every column filled."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest

from tests import reliability
from tests.reliability import Outcome


def outcome(name: str, *, lost: int = 0) -> Outcome:
    return Outcome(
        scenario=name, load="200 ticks/s", fault="SIGKILL", acknowledged=12_345, lost=lost, duplicated=0,
        recovery_s=1.26,
    )  # fmt: skip


def test_the_table_has_a_row_per_scenario_in_the_order_they_ran_with_every_column() -> None:
    lines = [msgspec.json.encode(outcome(name)) for name in ("b scenario", "a scenario")]
    header, rule, *rows = reliability.table(lines).splitlines()
    assert header == "| scenario | load | fault | acknowledged | lost | duplicated | consensus again after |"
    assert rule.count("|") == header.count("|")
    assert rows == [
        "| b scenario | 200 ticks/s | SIGKILL | 12,345 | 0 | 0 | 1.3 s |",
        "| a scenario | 200 ticks/s | SIGKILL | 12,345 | 0 | 0 | 1.3 s |",
    ]


def test_the_report_fails_when_a_scenario_lost_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "reliability.jsonl"
    monkeypatch.setenv("PRICEWIRE_RELIABILITY_REPORT", str(report))
    before = reliability.recorded()
    reliability.record(outcome("fine"))
    reliability.record(outcome("leaky", lost=1))
    assert reliability.recorded() == before + 2
    monkeypatch.setattr(sys, "argv", ["reliability", str(report)])
    with pytest.raises(SystemExit) as failed:
        reliability.main()
    assert failed.value.code == 1
    out, err = capsys.readouterr()
    assert "| fine |" in out and "| leaky |" in out
    assert err == "lost or duplicated in: leaky\n"
