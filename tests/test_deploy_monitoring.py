"""Prometheus and Grafana, checked offline: `promtool check config`, `check rules` and `test rules` (Debian's
`prometheus`, which .ci/run installs); every metric the dashboard and the alerts read is in deploy/metrics-names.txt
and is asked of the metric catalogue only with labels and functions it fits."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess

import yaml

from pricewire_common.metrics import CATALOGUE, MetricSpec
from tests.deploy_manifests import DEPLOY, Manifest
from tests.tools import require


@functools.cache
def _metric_names() -> frozenset[str]:
    lines = (DEPLOY / "metrics-names.txt").read_text().splitlines()
    return frozenset(lines)


def promql_metric_names(expr: str) -> set[str]:
    """The pricewire_ metric names `expr` reads; a histogram's `_bucket`, `_sum`, `_count` series count as its name."""
    names = set()
    for name in re.findall(r"\bpricewire_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in _metric_names() else name)
    return names


def test_metric_names_follow_prometheus_conventions() -> None:
    lines = (DEPLOY / "metrics-names.txt").read_text().splitlines()
    assert len(lines) == len(set(lines)) >= 16
    kinds = {spec.name: spec.kind for spec in CATALOGUE}
    for name in lines:
        assert re.fullmatch(r"pricewire_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kilobytes|megabytes)(_|$)", name), f"{name}: base units"
        # A counter and only a counter ends in _total (a histogram's series get their own suffixes).
        assert name.endswith("_total") == (kinds.get(name) == "counter"), f"{name} is a {kinds.get(name)}"
    assert promql_metric_names("histogram_quantile(0.95, rate(pricewire_venue_latency_seconds_bucket[5m]))") == {
        "pricewire_venue_latency_seconds"
    }
    assert promql_metric_names("rate(pricewire_no_such_total[5m])") == {"pricewire_no_such_total"}


def dashboard_targets() -> list[tuple[str, Manifest]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pricewire.json").read_text())
    targets = []
    for panel in dashboard["panels"]:
        targets += [(panel["title"], target) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        targets.append(
            (f"variable {variable['name']}", {"expr": variable["definition"], "datasource": variable["datasource"]})
        )
    return targets


def test_dashboard_reads_only_metrics_the_services_export() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    used: set[str] = set()
    for title, target in dashboard_targets():
        names = promql_metric_names(target["expr"])
        assert names, f"{title}: {target['expr']} reads no pricewire metric"
        assert names <= _metric_names(), f"{title}: {sorted(names - _metric_names())} not in deploy/metrics-names.txt"
        assert target["datasource"]["uid"] in uids, title
        used |= names
    exprs = " ".join(t["expr"] for _, t in dashboard_targets())
    # The panels issue 7 asks for: prices, confidence, venue latency p50/p95, source health, outliers, lag, clients.
    assert {
        "pricewire_consensus_price",
        "pricewire_consensus_confidence",
        "pricewire_venue_latency_seconds",
        "pricewire_source_up",
        "pricewire_consensus_exclusions_total",
        "pricewire_projection_lag_events",
        "pricewire_jetstream_consumer_pending",
        "pricewire_websocket_clients",
    } <= used
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs


def test_alert_rules_read_only_metrics_the_services_export() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 10
    guide = (DEPLOY / "README.md").read_text()
    for alert in alerts:
        names = promql_metric_names(alert["expr"])
        assert names <= _metric_names(), alert["alert"]
        anchor = alert["annotations"]["runbook"].partition("#")[2]
        assert anchor in _anchors(guide), f"{alert['alert']}: no section #{anchor} in deploy/README.md"
        assert alert["alert"] in guide, f"{alert['alert']} is not explained in deploy/README.md"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


SCRAPE_LABELS = {"job", "instance", "service"}
"""Labels Prometheus adds to every series (deploy/prometheus/prometheus.yml, the ServiceMonitors' relabelings)."""


def promql_problems(expr: str, catalogue: dict[str, MetricSpec]) -> list[str]:
    """What `expr` asks of the catalogue that it does not have: a label a metric lacks, a rate of a gauge,
    a quantile of what is no histogram, a grouping by a label none of its metrics carries."""
    problems = []
    labels_in_expr = set(SCRAPE_LABELS)
    for match in re.finditer(r"\b(pricewire_[a-z0-9_]+)(\{[^}]*\})?", expr):
        series, matchers = match.group(1), match.group(2) or ""
        base = re.sub(r"_(bucket|sum|count)$", "", series)
        spec = catalogue.get(series) or catalogue.get(base)
        if spec is None:
            problems.append(f"{series} is not in the catalogue")
            continue
        labels = set(spec.labels) | ({"le"} if series.endswith("_bucket") and spec.kind == "histogram" else set())
        labels_in_expr |= labels
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in labels | SCRAPE_LABELS:
                problems.append(f"{series} has no label {label}")
        if series != spec.name and spec.kind != "histogram":
            problems.append(f"{series}: {spec.name} is a {spec.kind}, not a histogram")
    for function, series in re.findall(r"\b(rate|increase|irate)\((pricewire_[a-z0-9_]+)", expr):
        spec = catalogue.get(series)
        if spec is not None and spec.kind != "counter":
            problems.append(f"{function}({series}) of a {spec.kind}")
    if "histogram_quantile(" in expr and "_bucket" not in expr:
        problems.append("histogram_quantile of no histogram buckets")
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (g.strip() for g in grouping.split(",")):
            if label not in labels_in_expr:
                problems.append(f"grouped by {label}, which none of its metrics carries")
    return problems


def test_dashboard_and_alerts_ask_the_catalogue_only_what_it_has() -> None:
    catalogue = {spec.name: spec for spec in CATALOGUE}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [(f"panel {title}", target["expr"]) for title, target in dashboard_targets()]
    exprs += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    for where, expr in exprs:
        assert promql_problems(expr, catalogue) == [], f"{where}: {expr}"
    # The check has teeth: each of these asks for something the catalogue lacks.
    wrong = [
        'pricewire_source_up{asset="BTC"}',
        "rate(pricewire_websocket_clients[5m])",
        "sum by (venue) (rate(pricewire_source_frames_total[5m]))",
        "histogram_quantile(0.5, rate(pricewire_consensus_price[5m]))",
        "pricewire_consensus_price_bucket",
    ]
    for expr in wrong:
        assert promql_problems(expr, catalogue), expr


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require(
        shutil.which("promtool"), "promtool is not installed (Debian package prometheus; .ci/run installs it)"
    )
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False, cwd=DEPLOY / "prometheus"
    )


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        done = _promtool(*args)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    done = _promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
