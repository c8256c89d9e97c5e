"""How fast the validator service decides, as its own process on a real NATS, and print one JSON line.

Two figures from one run, each on fresh streams:

- `drain`: the validator binds its consumer, is paused, and N ticks of the seeded sim feed
  (5 assets x `--venues` venues) are stored in TICKS; it is resumed and we time until every
  durable consumer on TICKS has nothing pending and nothing unacked: ticks per second through it.
  The rule's max age is an hour here, so no quote goes stale while the backlog is worked off.
- `sustained`: a separate publisher process (core NATS publishes with `Nats-Msg-Id`, paced in 1 ms
  steps, written as NATS protocol by hand unless `--publisher nats-py`; JetStream stores them as the
  collector's acked publishes would be) sends `--rate` ticks
  per second for `--warmup` + `--duration` seconds, each stamped `ts_received` just before it is
  sent. The publish policy is the service's default (a move of 1 bp, a status change or the
  heartbeat) unless `--deviation-bps` says otherwise (0: every change of a consensus is published,
  the worst case for the validator); for each price published
  stamped in the measured window, the decision latency is `Price.ts - Price.ts_tick` (`ts_tick`:
  the newest tick behind it), and the delivery latency is its arrival at a subscriber here minus
  `ts_tick` (adds the JetStream store). `every_tick` comes from the validator's own histogram
  (`pricewire_validator_decision_latency_seconds`, scraped before and after the window): each tick's
  age when the prices decided from its batch were sent, the poll's gathering included.
  `pending_at_end` is what the validator had yet to settle when the publisher stopped: near 0 when it
  kept up.

With `--replicas N`, N validator processes share N partitions of the assets (each its own filtered
durable consumer), as a scaled-out deployment would; the bench waits until each holds a partition.

CPU is each process's user+system time over the measured window, in cores (1.0 = one core busy).
NATS: `NATS_URL` when set (its Pricewire streams are deleted first, so only with `--reset` if it
holds any), else an embedded server in a temporary directory.

    python bench/validator.py --ticks 300000 --rate 30000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from pricewire_cli.embedded import NatsServer, free_port
from pricewire_cli.stack import embedded_servers
from pricewire_collector.sim import SimFeed
from pricewire_common import events, subjects
from pricewire_common.bus import MSG_ID_HEADER, connect, ensure_streams
from pricewire_common.config import DEFAULT_ASSETS, Settings
from pricewire_common.logs import configure_logging
from pricewire_validator.leases import BUCKET as LEASES_BUCKET

STREAMS = (
    subjects.TICKS_STREAM,
    subjects.PRICES_STREAM,
    subjects.SOURCES_STREAM,
    subjects.DLQ_STREAM,
    f"KV_{LEASES_BUCKET}",  # a lease left by the last run's validator would hold the next one back
)
POLL_S = 0.02
STEP_S = 0.001
"""The publisher's pacing step: every step it sends what the rate says is due by then."""
POOL_S = 2.0
"""Seconds of sim feed the publisher generates up front and then cycles (with fresh ids)."""
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
CATCH_UP_S = 30.0
DRAIN_MAX_AGE_S = 3600.0
DRAIN_SHARED_LEASE_S = 30.0
"""The drain's lease with several replicas: shared within ~20 s, longer than the pause while the backlog is stored."""


class _Stamped(msgspec.Struct):
    ts: int
    ts_tick: int


_DECODE_PRICE = msgspec.json.Decoder(_Stamped)


def percentile(values: list[int], q: float) -> float:
    """The `q` quantile of `values` (ns), in ms; NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] / 1e6


def latency_summary(values: list[int]) -> dict[str, float | None]:
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values) / 1e6, 2) if values else None,
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_server_pid(url: str, embedded: NatsServer | None) -> int | None:
    """The pid of the nats-server behind `url`: ours, or a local one started with `-p <port>`."""
    if embedded is not None:
        return embedded.pid
    port = url.rpartition(":")[2].strip("/")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if args and args[0].endswith(b"nats-server") and port.encode() in args:
                return int(proc.name)
    return None


def machine_busy_s() -> float:
    """CPU seconds all processors of the machine have been busy so far (from /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds of some processes between `start` and `stop`, as cores busy; `others`: the rest of the machine.

    On a small machine what else runs (a test suite, say) takes cores from the processes measured: `others`
    says how much.
    """

    pids: dict[str, int | None]
    began: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.began = {name: cpu_s(pid) for name, pid in self.pids.items() if pid is not None}
        self.began["machine"] = machine_busy_s()

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.t0
        used = {name: cpu_s(pid) - self.began[name] for name, pid in self.pids.items() if pid is not None}
        machine = machine_busy_s() - self.began["machine"]
        cores = {name: round(seconds / elapsed, 2) for name, seconds in used.items()}
        cores["others"] = round(max(0.0, machine - sum(used.values())) / elapsed, 2)
        return cores


_BUCKET = re.compile(r'^pricewire_validator_decision_latency_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.MULTILINE)


def bucket_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, object]:
    """The ticks decided between two scrapes: how many, the share decided within 5 ms of their receipt, the
    bucket bounds (ms) that hold half and 99 % of them (an upper bound of each quantile), and the p99 read as
    Prometheus's `histogram_quantile` reads it (linear within its bucket: an estimate)."""
    cumulative = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    ticks = cumulative.get(float("inf"), 0.0)
    if not ticks:
        return {"ticks": 0}

    def bound_of(q: float) -> float | None:
        bound = next(b for b, n in cumulative.items() if n >= q * ticks)
        return None if bound == float("inf") else round(bound * 1000, 1)

    def interpolated(q: float) -> float | None:
        lower, below = 0.0, 0.0
        for bound, n in cumulative.items():
            if n >= q * ticks:
                if bound == float("inf"):
                    return None
                return round((lower + (bound - lower) * (q * ticks - below) / (n - below)) * 1000, 2)
            lower, below = bound, n
        return None

    return {
        "ticks": int(ticks),
        "within_5ms": round(cumulative.get(0.005, 0.0) / ticks, 4),
        "p50_at_most_ms": bound_of(0.50),
        "p99_at_most_ms": bound_of(0.99),
        "p99_interpolated_ms": interpolated(0.99),
    }


def sim_ticks(count: int, *, venues: int, spacing_ns: int, end_ns: int) -> Iterator[events.Tick]:
    """`count` ticks of the seeded sim feed, `spacing_ns` apart, the last one received at `end_ns`."""
    feed = SimFeed(DEFAULT_ASSETS, venues=venues, seed=1, outlier_probability=0.01, quiet_rate=0.0)
    start_ns = end_ns - count * spacing_ns
    made = 0
    step = 0
    while made < count:
        step += 1
        tick = feed.next_tick(start_ns + step * spacing_ns)
        if tick is not None:
            made += 1
            yield tick


class Subjects:
    """Tick subjects by (source, base, quote), built (and checked) once."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, str, str], str] = {}

    def __call__(self, tick: events.Tick) -> str:
        key = (tick.source, tick.base, tick.quote)
        subject = self._built.get(key)
        if subject is None:
            subject = self._built[key] = subjects.tick(*key)
        return subject


# --- the publisher process --------------------------------------------------------------------


class TickPool:
    """`POOL_S` seconds of the seeded sim feed at `rate`, sent again and again with fresh ids and times."""

    def __init__(self, rate: float, venues: int) -> None:
        self.size = max(1, round(rate * POOL_S))
        spacing_ns = round(1e9 / rate)
        self.ticks = list(sim_ticks(self.size, venues=venues, spacing_ns=spacing_ns, end_ns=time.time_ns()))
        self.lags = [t.ts_received - t.ts_exchange for t in self.ticks]
        subject_of = Subjects()
        self.subjects = [subject_of(t) for t in self.ticks]

    def stamped(self, n: int) -> tuple[str, str, bytes]:
        """The `n`th tick sent: (subject, id, payload), received just now."""
        i = n % self.size
        tick = self.ticks[i]
        tick_id = f"{tick.id}:{n // self.size}"
        ts = time.time_ns()
        stamped = msgspec.structs.replace(tick, id=tick_id, ts_received=ts, ts_exchange=ts - self.lags[i])
        return self.subjects[i], tick_id, events.encode(stamped)


async def publish_at_rate(url: str, *, rate: float, seconds: float, venues: int, client: str) -> dict[str, object]:
    """Send `rate` ticks/s for `seconds`, each stamped `ts_received` just before it goes out.

    `client` `raw` writes the NATS protocol itself (HPUB with the `Nats-Msg-Id` header, a step's ticks in one
    write): the load generator shares the 2 cores with the validator and the server, and nats-py's publish
    costs it twice the CPU; `nats-py` sends through nats-py, as the collector does. Either way JetStream
    stores each tick as it would a collector's.
    """
    pool = TickPool(rate, venues)
    send = await (RawSender.connect(url) if client == "raw" else NatsPySender.connect(url))
    print("ready", flush=True)  # the bench starts its warm-up clock on this line
    sent = 0
    began_cpu = cpu_s(os.getpid())
    t0 = time.monotonic()
    end = t0 + seconds
    try:
        while (now := time.monotonic()) < end:
            due = int((now - t0) * rate)
            if sent < due:
                await send.step([pool.stamped(n) for n in range(sent, due)])
                sent = due
            await asyncio.sleep(STEP_S)
        elapsed = time.monotonic() - t0
    finally:
        await send.close()
    return {
        "client": client,
        "sent": sent,
        "elapsed_s": round(elapsed, 2),
        "rate": round(sent / elapsed, 1),
        "cpu_cores": round((cpu_s(os.getpid()) - began_cpu) / elapsed, 2),
    }


@dataclass
class NatsPySender:
    nc: NATS

    @classmethod
    async def connect(cls, url: str) -> NatsPySender:
        return cls(await connect(url, name="bench-validator-publisher"))

    async def step(self, ticks: list[tuple[str, str, bytes]]) -> None:
        for subject, tick_id, payload in ticks:
            await self.nc.publish(subject, payload, headers={MSG_ID_HEADER: tick_id})

    async def close(self) -> None:
        await self.nc.flush()
        await self.nc.close()


@dataclass
class RawSender:
    """A NATS client of the least kind: CONNECT, HPUB, PONG to the server's PINGs (no auth, no TLS)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ponger: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str) -> RawSender:
        host, _, port = url.removeprefix("nats://").rstrip("/").rpartition(":")
        reader, writer = await asyncio.open_connection(host or "127.0.0.1", int(port))
        if not (await reader.readline()).startswith(b"INFO"):
            raise SystemExit(f"no NATS server at {url}")
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\nPING\r\n')
        if (line := await reader.readline()).strip() != b"PONG":
            raise SystemExit(f"the NATS server at {url} answered {line!r}")
        sender = cls(reader, writer)
        sender.ponger = asyncio.create_task(sender._pong())
        return sender

    async def _pong(self) -> None:
        while line := await self.reader.readline():
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise SystemExit(f"the NATS server refused a publish: {line!r}")

    async def step(self, ticks: list[tuple[str, str, bytes]]) -> None:
        frames = []
        for subject, tick_id, payload in ticks:
            header = b"NATS/1.0\r\n%s: %s\r\n\r\n" % (MSG_ID_HEADER.encode(), tick_id.encode())
            size = len(header)
            frames.append(b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), size, size + len(payload), header, payload))
        self.writer.write(b"".join(frames))
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.write(b"PING\r\n")  # answered once the server has read every publish before it
        await self.writer.drain()
        if self.ponger is not None:
            self.ponger.cancel()
        self.writer.close()


# --- the bench ----------------------------------------------------------------------------------


async def fresh_streams(js: JetStreamContext, *, reset: bool) -> None:
    """Delete Pricewire's streams (refusing, unless `reset`, when any already holds messages), make them anew."""
    for stream in STREAMS:
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            continue
        if info.state.messages and not reset:
            raise SystemExit(f"stream {stream} holds {info.state.messages} messages: rerun with --reset to delete it")
        await js.delete_stream(stream)
    # The streams as the validator will find them: PRICEWIRE_DUPLICATE_WINDOW_S and the like apply to both.
    await ensure_streams(js, Settings.from_env(os.environ).streams)


async def durables(js: JetStreamContext) -> list[tuple[int, int]]:
    """(pending, ack pending) of each durable consumer on TICKS (the validator's, however many it has)."""
    infos = await js.consumers_info(subjects.TICKS_STREAM)
    return [(int(i.num_pending or 0), int(i.num_ack_pending or 0)) for i in infos if i.config.durable_name]


async def unsettled(js: JetStreamContext) -> int:
    """Ticks the validator has yet to be given or to settle."""
    return sum(pending + ack_pending for pending, ack_pending in await durables(js))


def start_validator(url: str, env: dict[str, str], log: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pricewire_validator"]
    if profile is not None:
        command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pricewire_validator"]
    full_env = {
        **os.environ,
        "NATS_URL": url,
        "PRICEWIRE_ASSETS": ",".join(DEFAULT_ASSETS),
        "PRICEWIRE_LOG_LEVEL": "warning",
        "PRICEWIRE_LOG_FORMAT": "json",
        "PRICEWIRE_METRICS_PORT": "off",  # each replica is given a port of its own (Validators.start)
        **env,
    }
    with log.open("ab") as out:
        return subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Validators:
    """`replicas` validator processes sharing as many partitions (one process: the default deployment)."""

    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]
    ports: list[int]
    """Each replica's ops port: its /metrics holds the decision latency histogram."""

    @classmethod
    def start(
        cls, url: str, env: dict[str, str], workdir: Path, name: str, *, replicas: int, profile: Path | None
    ) -> Validators:
        if replicas > 1:
            env = {**env, "PRICEWIRE_VALIDATOR_PARTITIONS": str(replicas)}
        logs = [workdir / f"{name}-{i}.log" for i in range(replicas)]
        ports = [free_port() for _ in range(replicas)]
        # cProfile only the first replica: one profile file is read per run.
        processes = [
            start_validator(url, {**env, "PRICEWIRE_METRICS_PORT": str(port)}, log, profile if i == 0 else None)
            for i, (log, port) in enumerate(zip(logs, ports, strict=True))
        ]
        return cls(processes, logs, ports)

    async def decision_buckets(self) -> dict[float, float]:
        """The replicas' decision latency histograms, summed: observations at or below each bound (s)."""
        total: dict[float, float] = {}
        async with aiohttp.ClientSession() as http:
            for port in self.ports:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                for bound, count in _BUCKET.findall(text):
                    key = float("inf") if bound == "+Inf" else float(bound)
                    total[key] = total.get(key, 0.0) + float(count)
        return total

    def pids(self) -> dict[str, int | None]:
        if len(self.processes) == 1:
            return {"validator": self.processes[0].pid}
        return {f"validator_{i}": process.pid for i, process in enumerate(self.processes)}

    def check(self, doing: str) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                raise exited(process, log, doing)

    def signal(self, sig: signal.Signals) -> None:
        for process in self.processes:
            process.send_signal(sig)

    def stop(self) -> int:
        """Stop every replica; the first non-zero exit code, else 0."""
        codes = [stop_process(process) for process in self.processes]
        return next((code for code in codes if code), 0)

    async def wait_deciding(self, js: JetStreamContext) -> None:
        """Until every partition's consumer is bound, each held by a replica of its own."""
        count = len(self.processes)
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(await durables(js)) < count or (count > 1 and len(set(await lease_holders(js, count))) < count):
            self.check("before consuming")
            if time.monotonic() > deadline:
                raise SystemExit("the validators did not bind their consumers and share the partitions in time")
            await asyncio.sleep(POLL_S)


async def lease_holders(js: JetStreamContext, count: int) -> list[str]:
    """The replicas holding the `count` partitions' leases now (one entry per held partition)."""
    try:
        kv = await js.key_value(LEASES_BUCKET)
    except BucketNotFoundError:
        return []
    held = []
    for i in range(count):
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(f"p{i}of{count}")
            if entry.value:
                held.append(entry.value.decode())
    return held


def exited(process: subprocess.Popen[bytes], log: Path, doing: str) -> SystemExit:
    """The error for a validator that exited while `doing`, with the end of its log."""
    tail = log.read_bytes()[-4000:].decode(errors="replace")
    return SystemExit(f"the validator exited with code {process.returncode} {doing}; its log ends:\n{tail}")


def stop_process(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def preload(js: JetStreamContext, count: int, venues: int) -> None:
    """Store `count` sim ticks in TICKS (async publishes, the client's bounded window), as if sent at 30k/s."""
    subject_of = Subjects()
    spacing_ns = round(1e9 / 30_000)
    futures = [
        await js.publish_async(subject_of(t), events.encode(t), headers={MSG_ID_HEADER: t.id})
        for t in sim_ticks(count, venues=venues, spacing_ns=spacing_ns, end_ns=time.time_ns())
    ]
    acks = await asyncio.gather(*futures)
    if duplicates := sum(1 for ack in acks if ack.duplicate):
        raise SystemExit(f"{duplicates} ticks were duplicates")


async def bench_drain(
    nc: NATS, url: str, server_pid: int | None, args: argparse.Namespace, workdir: Path
) -> dict[str, object]:
    """Ticks/s the validator works off a backlog it has never seen.

    The validator binds its consumer on an empty stream and is then paused (SIGSTOP) while the
    backlog is stored: started on a full stream, it would replay the backlog into its book at start
    and find nothing new in it.
    """
    js = nc.jetstream()
    await fresh_streams(js, reset=args.reset)
    env = {
        "PRICEWIRE_MAX_AGE_S": str(DRAIN_MAX_AGE_S),
        "PRICEWIRE_MAX_AGE_POLL_S": str(DRAIN_MAX_AGE_S),
        # Paused past its lease, the validator would hand its assets back on waking and start them again
        # from the log (replaying the backlog into its book): the lease outlasts the pause instead. Several
        # replicas share the partitions only after a round or two (a third of a lease each): a shorter one.
        "PRICEWIRE_VALIDATOR_LEASE_S": str(DRAIN_MAX_AGE_S if args.replicas == 1 else DRAIN_SHARED_LEASE_S),
    }
    validators = Validators.start(
        url, env, workdir, "validator-drain", replicas=args.replicas, profile=args.profile_drain
    )
    try:
        await validators.wait_deciding(js)
        validators.signal(signal.SIGSTOP)
        try:
            await preload(js, args.ticks, args.venues)
        finally:
            validators.signal(signal.SIGCONT)
        t0 = time.monotonic()
        cpu = CpuMeter({**validators.pids(), "nats_server": server_pid})
        cpu.start()
        while await unsettled(js) > 0:
            validators.check("while draining")
            await asyncio.sleep(POLL_S)
        elapsed = time.monotonic() - t0
        cores = cpu.stop()
        prices = int((await js.stream_info(subjects.PRICES_STREAM)).state.messages)
    finally:
        code = validators.stop()
    return {
        "ticks": args.ticks,
        "drain_s": round(elapsed, 2),
        "ticks_per_s": round(args.ticks / elapsed),
        "prices_published": prices,
        "cpu_cores": cores,
        "exit_code": code,
    }


@dataclass
class Latencies:
    since_ns: int = 0
    until_ns: int = 2**63
    decision: list[int] = field(default_factory=list)
    delivery: list[int] = field(default_factory=list)

    async def on_price(self, msg: Msg) -> None:
        now = time.time_ns()
        price = _DECODE_PRICE.decode(msg.data)
        if self.since_ns <= price.ts_tick <= self.until_ns:
            self.decision.append(price.ts - price.ts_tick)
            self.delivery.append(now - price.ts_tick)


async def bench_sustained(
    nc: NATS, url: str, server_pid: int | None, args: argparse.Namespace, workdir: Path
) -> dict[str, object]:
    js = nc.jetstream()
    await fresh_streams(js, reset=args.reset or args.ticks > 0)  # the drain's own, or checked by it
    policy = {} if args.deviation_bps is None else {"PRICEWIRE_DEVIATION_BPS": str(args.deviation_bps)}
    validators = Validators.start(url, policy, workdir, "validator", replicas=args.replicas, profile=args.profile)
    observed = Latencies()
    sub = await nc.subscribe(subjects.ALL_PRICES, cb=observed.on_price)
    publisher = None
    try:
        await validators.wait_deciding(js)
        command = [sys.executable, __file__, "--publish", "--nats-url", url, "--rate", str(args.rate)]
        command += ["--venues", str(args.venues), "--duration", str(args.warmup + args.duration)]
        command += ["--publisher", args.publisher]
        publisher = subprocess.Popen(command, stdout=subprocess.PIPE)  # our own script
        ready = await asyncio.to_thread(publisher.stdout.readline) if publisher.stdout else b""
        if ready.strip() != b"ready":
            raise SystemExit("the publisher did not start")
        await asyncio.sleep(args.warmup)
        observed.since_ns = time.time_ns()
        cpu = CpuMeter({**validators.pids(), "publisher": publisher.pid, "nats_server": server_pid})
        cpu.start()
        before = int((await js.stream_info(subjects.TICKS_STREAM)).state.messages)
        buckets_before = await validators.decision_buckets()
        await asyncio.sleep(args.duration - 0.2)  # the publisher stops at warmup + duration
        stored = int((await js.stream_info(subjects.TICKS_STREAM)).state.messages) - before
        cores = cpu.stop()
        every_tick = bucket_summary(buckets_before, await validators.decision_buckets())
        measured_s = time.monotonic() - cpu.t0
        observed.until_ns = time.time_ns()
        pending_at_end = await unsettled(js)
        out, _ = await asyncio.to_thread(publisher.communicate, timeout=STOP_TIMEOUT_S)
        sent = json.loads(out)
        t_end = time.monotonic()
        left = await unsettled(js)
        while left > 0 and time.monotonic() - t_end < CATCH_UP_S:
            await asyncio.sleep(POLL_S)
            left = await unsettled(js)
        caught_up_s = time.monotonic() - t_end
        prices = int((await js.stream_info(subjects.PRICES_STREAM)).state.messages)
    finally:
        await sub.unsubscribe()
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        code = validators.stop()
    return {
        "rate_target": args.rate,
        "deviation_bps": args.deviation_bps,
        "duration_s": round(measured_s, 2),
        "publisher": sent,
        "ticks_stored_per_s": round(stored / measured_s),
        "prices_published": prices,
        "prices_measured": len(observed.decision),
        "decision_latency_ms": latency_summary(observed.decision),
        "every_tick": every_tick,
        "delivery_latency_ms": latency_summary(observed.delivery),
        "pending_at_end": pending_at_end,
        "unsettled_after_catch_up": left,
        "catch_up_s": round(caught_up_s, 2),
        "cpu_cores": cores,
        "exit_code": code,
    }


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    with embedded_servers(workdir, os.environ, nats_only=True) as servers:
        url = servers.nats.url if servers.nats is not None else os.environ["NATS_URL"]
        nc = await connect(url, name="bench-validator")
        try:
            server_pid = nats_server_pid(url, servers.nats)
            result: dict[str, object] = {
                "venues": args.venues,
                "assets": len(DEFAULT_ASSETS),
                "replicas": args.replicas,
            }
            if args.ticks:
                result["drain"] = await bench_drain(nc, url, server_pid, args, workdir)
            if args.duration:
                result["sustained"] = await bench_sustained(nc, url, server_pid, args, workdir)
            for stream in STREAMS:  # leave nothing behind on a shared server
                with contextlib.suppress(NotFoundError):
                    await nc.jetstream().delete_stream(stream)
            return result
        finally:
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=300_000, help="ticks for the drain (0: skip it)")
    parser.add_argument("--venues", type=int, default=5, help="sim venues per asset")
    parser.add_argument("--rate", type=float, default=30_000.0, help="ticks per second for the sustained run")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds of it (0: skip it)")
    parser.add_argument(
        "--deviation-bps", type=float, help="the sustained run's publish threshold (default: the service's)"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the rate before measuring")
    parser.add_argument(
        "--replicas", type=int, default=1, help="validator processes, sharing as many partitions (default 1)"
    )
    parser.add_argument(
        "--publisher",
        choices=("raw", "nats-py"),
        default="raw",
        help="how the load generator sends: the NATS protocol written by hand (default, the lighter) or nats-py",
    )
    parser.add_argument("--reset", action="store_true", help="delete Pricewire's streams on NATS_URL first")
    parser.add_argument("--profile", type=Path, help="cProfile the validator of the sustained run into this file")
    parser.add_argument("--profile-drain", type=Path, help="cProfile the validator of the drain into this file")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (the validators' logs)")
    parser.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)  # the publisher process
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging(level="warning", fmt="json")  # to stderr: stdout carries only the result
    if args.publish:
        sent = asyncio.run(
            publish_at_rate(
                args.nats_url, rate=args.rate, seconds=args.duration, venues=args.venues, client=args.publisher
            )
        )
        print(json.dumps(sent))
        return
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(bench(args, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="pricewire-bench-") as tmp:
            result = asyncio.run(bench(args, Path(tmp)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
