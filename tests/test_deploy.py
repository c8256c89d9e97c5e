"""The Kubernetes manifests, checked offline: no cluster, no network.

`kubectl kustomize` renders each overlay; every built-in object passes `kubernetes-validate` in strict mode (unknown
fields rejected) for the oldest and newest Kubernetes we support, through its Python API and its command line; the
ServiceMonitors, a CRD that kubernetes-validate has no schema for, are checked field by field; every Deployment meets
the hygiene rules of tests/deploy_manifests.py, and broken copies are caught; Services, budgets, monitors, the
autoscaler, the network policies and the NATS Helm values fit together.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from pricewire_common.config import Settings
from tests.deploy_manifests import (
    CRD_KINDS,
    DEPLOY,
    OVERLAYS,
    SERVICES,
    Manifest,
    autoscaled_replicas_problems,
    config_data,
    deployment_problems,
    ip_block_problems,
    label_selector_matches,
    named,
    of_kind,
    pod_labels,
    render,
    selects,
    service_monitor_problems,
    settings_names,
)

# The oldest Kubernetes we support (restricted PSS, autoscaling/v2, policy/v1 are all older) and the newest known.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def docs(overlay: str) -> list[Manifest]:
    """The rendered overlay: a fresh copy, so a test may change it."""
    return copy.deepcopy(list(render(overlay)))


def test_overlay_objects_validate_strictly(docs: list[Manifest], overlay: str) -> None:
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    } <= kinds
    for doc in docs:
        where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            assert service_monitor_problems(doc) == [], where
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not valid for Kubernetes {version}: {exc.message}")
        assert doc["metadata"].get("namespace") == (None if doc["kind"] == "Namespace" else _namespace(docs)), where


def test_kubernetes_validate_command_passes_the_rendered_overlay(docs: list[Manifest], tmp_path: Path) -> None:
    """The command line as CI documents it, on the whole rendered file: passes, and skips only the CRD kinds."""
    command = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert command is not None, "kubernetes-validate (a dev extra) is not installed"
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    done = subprocess.run([command, "--strict", str(rendered)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert len([line for line in lines if line.startswith("INFO") and " passed " in line]) == len(docs) - len(crds)
    assert [line for line in lines if not line.startswith("INFO")] == [
        f"WARN {rendered} Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1 "
        f"for kubernetes version {'.'.join(K8S_VERSIONS[-1].split('.')[:2])}"
    ] * len(crds)
    docs[0]["spec"] = {"bogus": True}
    rendered.write_text(yaml.safe_dump_all(docs))
    done = subprocess.run([command, "--strict", str(rendered)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0


def _namespace(docs: list[Manifest]) -> str:
    (namespace,) = of_kind(docs, "Namespace")
    name: str = namespace["metadata"]["name"]
    return name


def test_strict_validation_rejects_an_unknown_field(docs: list[Manifest]) -> None:
    deployment = named(docs, "Deployment", "gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFS"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    monitor = named(docs, "ServiceMonitor", "gateway")
    monitor["spec"]["endpoints"][0]["path"] = "/metrics/"
    monitor["spec"]["selector"] = {}
    assert len(service_monitor_problems(monitor)) == 2


def test_namespace_enforces_restricted_pod_security(docs: list[Manifest]) -> None:
    (namespace,) = of_kind(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_deployment_meets_the_hygiene_rules(docs: list[Manifest], overlay: str) -> None:
    deployments = of_kind(docs, "Deployment")
    assert set(SERVICES) <= {d["metadata"]["name"] for d in deployments}
    for deployment in deployments:
        assert deployment_problems(deployment, docs, overlay=overlay) == [], deployment["metadata"]["name"]


def _breakages() -> Iterator[tuple[str, Callable[[Manifest], object]]]:
    """(what deployment_problems must then say, how to break the cache-writer's Deployment)."""

    def container(d: Manifest) -> Manifest:
        c: Manifest = d["spec"]["template"]["spec"]["containers"][0]
        return c

    yield "allowPrivilegeEscalation", lambda d: container(d)["securityContext"].pop("allowPrivilegeEscalation")
    yield "root filesystem is writable", lambda d: container(d)["securityContext"].update(readOnlyRootFilesystem=False)
    yield "capabilities are not all dropped", lambda d: container(d)["securityContext"].pop("capabilities")
    yield "seccompProfile", lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")
    yield "runAsNonRoot", lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")
    yield "no memory limit", lambda d: container(d)["resources"].pop("limits")
    yield "no cpu request", lambda d: container(d)["resources"]["requests"].pop("cpu")
    yield "no readinessProbe", lambda d: container(d).pop("readinessProbe")
    yield "livenessProbe asks '/readyz'", lambda d: container(d)["livenessProbe"]["httpGet"].update(path="/readyz")
    yield "no writable /tmp", lambda d: container(d).pop("volumeMounts")
    yield "no pinned tag", lambda d: container(d).update(image="pricewire:latest")
    yield "lacks label app.kubernetes.io/component", lambda d: pod_labels(d).pop("app.kubernetes.io/component")
    yield "neither rendered", lambda d: container(d)["envFrom"][0]["configMapRef"].update(name="nowhere")
    yield "token is mounted", lambda d: d["spec"]["template"]["spec"].pop("automountServiceAccountToken")


@pytest.mark.parametrize(("problem", "breakage"), list(_breakages()), ids=[p for p, _ in _breakages()])
def test_hygiene_check_catches_a_broken_deployment(problem: str, breakage: Callable[[Manifest], object]) -> None:
    docs = copy.deepcopy(list(render("prod")))
    deployment = named(docs, "Deployment", "cache-writer")
    assert deployment_problems(deployment, docs, overlay="prod") == []
    breakage(deployment)
    problems = deployment_problems(deployment, docs, overlay="prod")
    assert any(problem in p for p in problems), problems


def test_every_deployment_has_a_service_budget_and_monitor(docs: list[Manifest]) -> None:
    for deployment in of_kind(docs, "Deployment"):
        name, labels = deployment["metadata"]["name"], pod_labels(deployment)
        container_ports = {
            p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        services = [s for s in of_kind(docs, "Service") if selects(s["spec"].get("selector", {}), labels)]
        assert len(services) == 1, f"{name}: {len(services)} Services select its pods"
        service = services[0]
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports, name
        budgets = [
            b for b in of_kind(docs, "PodDisruptionBudget") if selects(b["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets"
        # maxUnavailable keeps a single replica drainable; minAvailable 1 on one replica would block every drain.
        assert budgets[0]["spec"].get("maxUnavailable") == 1, name
        monitors = [
            m
            for m in of_kind(docs, "ServiceMonitor")
            if selects(m["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        ]
        assert len(monitors) == 1, f"{name}: {len(monitors)} ServiceMonitors"
        assert {e["port"] for e in monitors[0]["spec"]["endpoints"]} <= service_ports, name


def test_validator_replicas_are_its_partitions_and_gateway_scales_on_cpu(docs: list[Manifest]) -> None:
    validator = named(docs, "Deployment", "validator")
    assert validator["spec"]["replicas"] == int(config_data(docs)["PRICEWIRE_VALIDATOR_PARTITIONS"])
    autoscalers = of_kind(docs, "HorizontalPodAutoscaler")
    assert [a["spec"]["scaleTargetRef"]["name"] for a in autoscalers] == ["gateway"]
    (hpa,) = autoscalers
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_no_autoscaled_deployment_sets_its_replicas(docs: list[Manifest]) -> None:
    """The HPA owns the count: a spec.replicas beside it would scale the gateway back at every apply."""
    assert of_kind(docs, "HorizontalPodAutoscaler")
    assert autoscaled_replicas_problems(docs) == []
    named(docs, "Deployment", "gateway")["spec"]["replicas"] = 3
    assert autoscaled_replicas_problems(docs) == ["Deployment gateway sets spec.replicas but HPA gateway scales it"]


def test_config_names_are_settings_the_services_read(docs: list[Manifest]) -> None:
    known = settings_names()
    names = set(config_data(docs))
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    assert names - known == set()


OTLP_ENDPOINT = "http://otel-collector.monitoring:4318"
"""An endpoint as deploy/README.md says to set it: a collector in the namespace monitoring, on OTLP/HTTP's port."""


def test_each_deployment_s_settings_parse_and_trace_only_once_an_endpoint_is_set(docs: list[Manifest]) -> None:
    """What a pod's environment holds (the ConfigMap, then its own env) is read by Settings.from_env as the service
    would at start; tracing is off as shipped, and on, reachable through the network policies, once an overlay sets
    OTEL_EXPORTER_OTLP_ENDPOINT."""
    assert config_data(docs)["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""

    def monitoring(peer: Manifest) -> bool:
        namespace = peer.get("namespaceSelector", {}).get("matchLabels", {})
        return bool(namespace.get("kubernetes.io/metadata.name") == "monitoring")

    service_names: dict[str, str] = {}  # the traces' service.name -> the Deployment whose pods report it
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            environ = config_data(docs) | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            assert Settings.from_env(environ).tracing.otlp_endpoint is None, name
            traced = Settings.from_env(environ | {"OTEL_EXPORTER_OTLP_ENDPOINT": OTLP_ENDPOINT}).tracing
            assert traced.otlp_endpoint == OTLP_ENDPOINT, name
            module = container["command"][-1]  # python -m pricewire_<service>
            service_name = traced.service_name or f"pricewire-{module.removeprefix('pricewire_')}"
            # Two Deployments under one service.name (the prod collectors) could not be told apart in a trace.
            assert service_names.setdefault(service_name, name) == name, f"{name} and {service_names[service_name]}"
        assert _allows_egress(docs, pod_labels(deployment), 4318, monitoring), f"{name} cannot export its traces"
        assert not _allows_egress(docs, pod_labels(deployment), 4317, monitoring), f"{name}: OTLP/HTTP only"


# --- Kubernetes: network policies ---


def _allows_egress(docs: list[Manifest], labels: dict[str, str], port: int, to: Callable[[Manifest], bool]) -> bool:
    for policy in of_kind(docs, "NetworkPolicy"):
        if "Egress" not in policy["spec"]["policyTypes"]:
            continue
        if not label_selector_matches(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("egress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            peers = rule.get("to", [])
            if not peers or any(to(peer) for peer in peers):
                return True
    return False


def _egress_peers(docs: list[Manifest], labels: dict[str, str]) -> list[Manifest]:
    """Every `to` peer of every egress rule that applies to pods with `labels`."""
    return [
        peer
        for policy in of_kind(docs, "NetworkPolicy")
        if "Egress" in policy["spec"]["policyTypes"] and label_selector_matches(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("egress", [])
        for peer in rule.get("to", [])
    ]


def test_network_policies_deny_by_default_and_allow_what_each_service_needs(docs: list[Manifest]) -> None:
    deny = named(docs, "NetworkPolicy", "default-deny-all")
    assert deny["spec"]["podSelector"] == {}
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]

    def nats(peer: Manifest) -> bool:
        return bool(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "nats")

    def dns(peer: Manifest) -> bool:
        return bool(peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns")

    nats_labels = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats"}
    assert _allows_egress(docs, nats_labels, 53, dns), "the NATS servers cannot resolve names"
    assert _allows_egress(docs, nats_labels, 6222, nats), "the NATS servers cannot reach each other"
    for deployment in of_kind(docs, "Deployment"):
        name, labels = deployment["metadata"]["name"], pod_labels(deployment)
        assert _allows_egress(docs, labels, 53, dns), f"{name} cannot resolve names"
        assert _allows_egress(docs, labels, 4222, nats), f"{name} cannot reach NATS"
        reads_stores = any(
            "secretRef" in s for c in deployment["spec"]["template"]["spec"]["containers"] for s in c.get("envFrom", [])
        )
        for port in (5432, 6379):
            assert _allows_egress(docs, labels, port, lambda _: True) == reads_stores, f"{name} to port {port}"
        # Only the collectors (venues) and the gateway (users' alert webhooks) reach outside the cluster.
        outside = labels["app.kubernetes.io/component"] == "ingest" or name == "gateway"
        assert _allows_egress(docs, labels, 443, lambda p: "ipBlock" in p) == outside, f"{name} to the internet"
        for peer in _egress_peers(docs, labels):
            if "ipBlock" in peer:
                assert ip_block_problems(peer["ipBlock"]) == [], name


def test_egress_to_the_internet_reaches_no_private_metadata_or_loopback_range(docs: list[Manifest]) -> None:
    """The users' webhook URLs go through gateway-webhooks-egress: the cloud metadata endpoint (169.254.169.254),
    carrier-grade NAT and loopback are as closed to them as the RFC 1918 ranges."""
    gateway = pod_labels(named(docs, "Deployment", "gateway"))
    (block,) = [peer["ipBlock"] for peer in _egress_peers(docs, gateway) if "ipBlock" in peer]
    assert block["cidr"] == "0.0.0.0/0"
    assert ip_block_problems(block) == []
    assert {"169.254.0.0/16", "100.64.0.0/10", "127.0.0.0/8"} <= set(block["except"])
    for broken, problem in (
        ({**block, "except": [e for e in block["except"] if e != "169.254.0.0/16"]}, "0.0.0.0/0 lets 169.254.0.0/16"),
        ({**block, "except": [*block["except"], "fe80::/10"]}, "except fe80::/10 is not inside it"),
        ({"cidr": "::/0", "except": ["fc00::/7", "::1/128"]}, "::/0 lets fe80::/10 through"),
        ({"cidr": "100.0.0.0/8"}, "100.0.0.0/8 lets 100.64.0.0/10 through"),
    ):
        assert any(problem in p for p in ip_block_problems(broken)), (broken, ip_block_problems(broken))
    assert ip_block_problems({"cidr": "::/0", "except": ["fc00::/7", "fe80::/10", "::1/128"]}) == []


def test_documented_tls_store_urls_name_the_real_host_not_an_external_name() -> None:
    """A TLS client checks the certificate against the URL's host: through an ExternalName Service's name
    (`rediss://...@redis`) that check fails, so deploy/README.md's TLS URLs must name the hosts prod points at."""
    docs = list(render("prod"))
    aliases = {
        s["metadata"]["name"]: s["spec"]["externalName"]
        for s in of_kind(docs, "Service")
        if "externalName" in s["spec"]
    }
    assert set(aliases) == {"redis", "timescaledb"}
    guide = (DEPLOY / "README.md").read_text()
    hosts = {urlsplit(url).hostname for url in re.findall(r"(?:rediss|postgresql)://[^\s'`]+", guide)}
    assert len(hosts) == 2, f"deploy/README.md shows no Secret with both stores' URLs: {hosts}"
    assert hosts <= set(aliases.values()), f"{sorted(hosts)} are not the hosts prod's ExternalName Services alias"


# --- NATS (Helm values) ---


def test_nats_values_run_a_jetstream_cluster_that_matches_the_stream_replicas() -> None:
    values = yaml.safe_load((DEPLOY / "nats" / "values.yaml").read_text())
    cluster, jetstream = values["config"]["cluster"], values["config"]["jetstream"]
    assert cluster["enabled"] is True
    assert cluster["replicas"] == 3
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert jetstream["memoryStore"]["enabled"] is False
    assert re.fullmatch(r"\d+(s|m)|always", jetstream["merge"]["sync_interval"])
    # The namespace enforces the restricted Pod Security Standard: the chart's pods must meet it.
    pod_security = values["podTemplate"]["merge"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for part in ("container", "reloader", "promExporter"):
        security = values[part]["merge"]["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, part
        assert security["capabilities"]["drop"] == ["ALL"], part
    prod = copy.deepcopy(list(render("prod")))
    assert int(config_data(prod)["PRICEWIRE_STREAM_REPLICAS"]) == cluster["replicas"]
    assert config_data(prod)["NATS_URL"] == "nats://nats:4222"  # the Service of a Helm release named `nats`
