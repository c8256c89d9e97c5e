"""The deployment files as data, for tests/test_deploy*.py: the rendered Kubernetes overlays and the rules every
Deployment must meet (deploy/README.md, "What every Deployment has")."""

from __future__ import annotations

import functools
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pricewire_common.config import DEFAULT_METRICS_PORT, Settings
from tests.tools import require

Manifest = dict[str, Any]

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod")
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


def _kubectl() -> str:
    return require(shutil.which("kubectl"), "kubectl is not installed: the Kubernetes overlays cannot be rendered")


@functools.cache
def render(overlay: str) -> tuple[Manifest, ...]:
    """What `kubectl kustomize` makes of an overlay, rendered once per session: copy it before changing it."""
    done = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


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


def config_data(docs: list[Manifest]) -> dict[str, str]:
    (config,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("pricewire-config")]
    data: dict[str, str] = config["data"]
    return data


@functools.cache
def settings_names() -> frozenset[str]:
    """The environment variables config.py reads."""
    source = (REPO / "libs" / "common" / "pricewire_common" / "config.py").read_text()
    names = set(re.findall(r'"((?:PRICEWIRE|NATS|REDIS|DATABASE|OTEL)_[A-Z0-9_]*)"', source))
    assert {"PRICEWIRE_VALIDATOR_PARTITIONS", "PRICEWIRE_METRICS_PORT", "OTEL_EXPORTER_OTLP_ENDPOINT"} <= names
    return frozenset(names)


def autoscaled_replicas_problems(docs: list[Manifest]) -> list[str]:
    """Deployments an HPA scales that set spec.replicas: each `kubectl apply` would reset the HPA's count to it."""
    problems = []
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] != "Deployment":
            continue
        name = target["name"]
        if "replicas" in named(docs, "Deployment", name)["spec"]:
            problems.append(f"Deployment {name} sets spec.replicas but HPA {hpa['metadata']['name']} scales it")
    return problems


NON_PUBLIC = {
    4: ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "127.0.0.0/8"),
    6: ("fc00::/7", "fe80::/10", "::1/128"),
}
"""What an egress ipBlock to the internet must except: private, link-local (cloud metadata), carrier-grade NAT and
loopback ranges; the users' webhook URLs must reach none of them (deploy/README.md, network policies)."""


def ip_block_problems(block: Manifest) -> list[str]:
    """How an egress ipBlock falls short: a range of NON_PUBLIC it lets through, or an exception outside its cidr."""
    cidr = ipaddress.ip_network(block["cidr"])
    excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
    problems = [f"{block['cidr']}: except {e} is not inside it" for e in excepted if not _inside(e, cidr)]
    for wanted in map(ipaddress.ip_network, NON_PUBLIC[cidr.version]):
        if _inside(wanted, cidr) and not any(_inside(wanted, e) for e in excepted):
            problems.append(f"{block['cidr']} lets {wanted} through")
    return problems


def _inside(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network, outer: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> bool:
    return (
        inner.version == outer.version
        and int(outer.network_address) <= int(inner.network_address)
        and int(inner.broadcast_address) <= int(outer.broadcast_address)
    )


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
