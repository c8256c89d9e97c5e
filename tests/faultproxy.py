"""A loopback TCP proxy of our own that a fault test cuts, blackholes or slows (there is no netem or iptables here).

- `cut()`: stop listening and break every open connection: connects are refused, reads and writes fail;
- `blackhole()`: connections stay open and new ones are accepted, but no byte crosses in either direction
  (a partition: the peer hears nothing, not even a reset);
- `delay(seconds)`: every chunk is passed on that long after it arrived (latency; throughput is not capped);
- `restore()`: back to passing bytes at once (a blackholed connection's held bytes are dropped, as a
  partitioned network would have dropped them, and the connection is broken so the client reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pricewire_cli.embedded import free_port

Upstream = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class FaultProxy:
    """Listens on 127.0.0.1:`port` and passes each connection to `upstream`, unless told otherwise."""

    def __init__(self, upstream: Upstream, *, port: int | None = None) -> None:
        self._upstream = upstream
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.delay_s = 0.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def restore(self) -> None:
        """Pass bytes again, at once; listen again if cut; break connections a blackhole held."""
        self.delay_s = 0.0
        if not self._flowing.is_set():
            self._break_all()
            self._flowing.set()
        if self._server is None:
            await self.start()

    async def cut(self) -> None:
        """Refuse connections and break the open ones."""
        if self._server is not None:
            self._server.close()
            self._break_all()
            await self._server.wait_closed()
            self._server = None

    def blackhole(self) -> None:
        """Hold every byte from now on, in both directions, without closing anything."""
        self._flowing.clear()

    def delay(self, seconds: float) -> None:
        self.delay_s = seconds

    async def close(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()

    def _break_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._flowing.wait()  # a blackhole accepts, then says nothing
            up_reader, up_writer = await self._upstream()
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        self._writers |= {writer, up_writer}
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, up_writer))
                group.create_task(self._pipe(up_reader, writer))
        finally:
            for each in (writer, up_writer):
                self._writers.discard(each)
                each.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pass each chunk on `delay_s` after it arrived. The chunks behind it are read meanwhile, so a delay is
        latency, as on a long link, and never a cap on throughput (one chunk per delay, as sleeping before
        each write would make it)."""
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(65536):
                    if not self._flowing.is_set():
                        await self._flowing.wait()
                        return  # held bytes are dropped: the connection is broken by restore()
                    due.put_nowait((loop.time() + self.delay_s, data))
            finally:
                due.put_nowait(None)

        async def write() -> None:
            while (chunk := await due.get()) is not None:
                at, data = chunk
                if (wait_s := at - loop.time()) > 0:
                    await asyncio.sleep(wait_s)  # the fault itself: added latency
                writer.write(data)
                await writer.drain()

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(read())
                group.create_task(write())
        except* (OSError, ConnectionError):
            pass  # a connection broken at either end (or by cut()): what the proxy is for, nothing to report
        writer.transport.abort()


def tcp_upstream(host: str, port: int) -> Upstream:
    return lambda: asyncio.open_connection(host, port)


def proxied_url(url: str, port: int, *, default_port: int) -> tuple[str, Upstream]:
    """`url` rewritten to go through a proxy on `port`, and the upstream that proxy should reach (a
    PostgreSQL URL may name a Unix socket directory in `?host=`, as the embedded server's does)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    socket_dir = query.pop("host", None)
    target_port = parts.port or default_port
    upstream: Upstream
    if socket_dir is not None:
        path = f"{socket_dir}/.s.PGSQL.{target_port}"
        upstream = lambda: asyncio.open_unix_connection(path)  # noqa: E731 - a one-line factory
    else:
        upstream = tcp_upstream(parts.hostname or "127.0.0.1", target_port)
    credentials = ""
    if parts.username:
        credentials = quote(parts.username) + (f":{quote(parts.password)}" if parts.password else "") + "@"
    netloc = f"{credentials}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query))), upstream


@contextlib.asynccontextmanager
async def fault_proxy(url: str, *, default_port: int) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A started proxy in front of the server of `url`, and the URL that goes through it."""
    port = free_port()
    proxied, upstream = proxied_url(url, port, default_port=default_port)
    proxy = FaultProxy(upstream, port=port)
    await proxy.start()
    try:
        yield proxy, proxied
    finally:
        await proxy.close()
