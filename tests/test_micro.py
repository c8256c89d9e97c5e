"""Discovery over the NATS service API: `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` find every service of a
running pipeline, each instance of a service, and their `status` and `metrics` endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import replace
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_cli.embedded import free_port
from pricewire_cli.stack import run_stack
from pricewire_common import subjects
from pricewire_common.config import Settings
from pricewire_common.discovery import service_name
from pricewire_common.metrics import package_version
from pricewire_validator.service import run as run_validator
from tests.pipeline import running
from tests.scraping import Scrape, scrape, service_info
from tests.test_deploy_monitoring import dashboard_targets, promql_metric_names
from tests.waiting import eventually

SERVICES = ("collector", "validator", "cache_writer", "gateway")
ANSWER_WAIT_S = 1.0


async def answers(nc: NATS, subject: str, *, until: int) -> list[dict[str, Any]]:
    """The replies to one request on `subject`, gathered until `until` came or ANSWER_WAIT_S passed."""
    replies: list[dict[str, Any]] = []
    enough = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        replies.append(json.loads(msg.data))
        if len(replies) >= until:
            enough.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):  # fewer answered: the caller looks again
            await asyncio.wait_for(enough.wait(), ANSWER_WAIT_S)
    finally:
        await sub.unsubscribe()
    return replies


async def test_ping_info_and_stats_find_every_service(settings: Settings, nc: NATS) -> None:
    settings = replace(settings, metrics_port=0, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    async with running(asyncio.create_task(run_stack(settings, stop, bound=bound)), stop):
        port = await asyncio.wait_for(bound, timeout=20)
        names = {service_name(s) for s in SERVICES}
        pinged = await eventually(
            lambda: answers(nc, "$SRV.PING", until=len(names)),
            lambda replies: {r["name"] for r in replies} >= names,
            what="every service answering $SRV.PING",
        )
        assert {r["version"] for r in pinged if r["name"] in names} == {package_version()}
        assert len({r["id"] for r in pinged}) == len(pinged), "each instance has an id of its own"

        info = await service_info(nc, "validator")
        assert info["name"] == "pricewire-validator"
        assert {e["name"]: e["subject"] for e in info["endpoints"]} == {
            "status": "pricewire.validator.status",
            "metrics": "pricewire.validator.metrics",
        }
        assert int(info["metadata"]["metrics_port"]) > 0
        assert (await service_info(nc, "gateway"))["metadata"]["http_port"] == str(port)

        status = json.loads((await nc.request("pricewire.validator.status", b"", timeout=5)).data)
        assert status == {
            "service": "validator",
            "status": "ready",
            "checks": [{"name": "nats", "ok": True, "error": None}],
        }
        gateway_status = json.loads((await nc.request("pricewire.gateway.status", b"", timeout=5)).data)
        assert gateway_status["status"] == "ready"

        async def frames() -> float:
            text = (await nc.request("pricewire.collector.metrics", b"", timeout=5)).data.decode()
            return Scrape.parse(text).total("pricewire_source_frames_total")

        await eventually(frames, lambda n: n > 0, what="the collector's frames, over NATS")

        stats = json.loads((await nc.request(f"$SRV.STATS.{service_name('validator')}", b"", timeout=5)).data)
        by_endpoint = {e["name"]: e for e in stats["endpoints"]}
        assert by_endpoint["status"]["num_requests"] == 1
        assert by_endpoint["metrics"]["num_requests"] == 0


async def test_each_instance_of_a_service_answers_ping(settings: Settings, nc: NATS) -> None:
    settings = replace(settings, metrics_port=0)
    first_stop, second_stop = asyncio.Event(), asyncio.Event()
    async with (
        running(asyncio.create_task(run_validator(settings, first_stop)), first_stop),
        running(asyncio.create_task(run_validator(settings, second_stop)), second_stop),
    ):
        replies = await eventually(
            lambda: answers(nc, f"$SRV.PING.{service_name('validator')}", until=2),
            lambda r: len(r) == 2,
            what="both validators answering",
        )
        assert len({r["id"] for r in replies}) == 2
        # The hot standby is registered too: it is ready to take over, not hidden.
        infos = await answers(nc, f"$SRV.INFO.{service_name('validator')}", until=2)
        assert len({info["metadata"]["metrics_port"] for info in infos}) == 2


def three_free_ports() -> int:
    """A port P with P, P+1 and P+2 free now (each bound and released)."""
    for _ in range(50):
        first = free_port()
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + 3):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return first
    raise AssertionError("no three consecutive free ports")


async def test_pricewire_up_gives_each_service_an_ops_port_of_its_own(settings: Settings, nc: NATS) -> None:
    first = three_free_ports()
    settings = replace(settings, metrics_port=first, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    stop = asyncio.Event()
    async with running(asyncio.create_task(run_stack(settings, stop)), stop):
        ports = {s: int((await service_info(nc, s))["metadata"]["metrics_port"]) for s in SERVICES[:3]}
    assert ports == {"collector": first, "validator": first + 1, "cache_writer": first + 2}


def dashboard_metric_names() -> set[str]:
    """Every pricewire_ metric the provisioned Grafana dashboard reads."""
    return set().union(*(promql_metric_names(target["expr"]) for _, target in dashboard_targets()))


SAMPLE_LESS = frozenset(
    {
        # REST requests to a venue, by source and outcome: the simulated feed makes none (live venues' REST
        # fallbacks and the polled venues do), so `pricewire up --feed sim` exposes the family without a sample.
        "pricewire_source_requests_total",
    }
)
"""The dashboard's metrics a calm `pricewire up` run legitimately has no sample of; every other one must have one."""


def exposed_names(scraped: Scrape) -> set[str]:
    """The metric names an exposition offers, HELP and TYPE alone enough, as PromQL asks for them (a counter also by
    its `_total`)."""
    names = {name for name, _ in scraped.samples}
    for family, kind in scraped.families.items():
        names |= {family, f"{family}_total"} if kind == "counter" else {family}
    return names


def sampled_names(scraped: Scrape) -> set[str]:
    """The metric names an exposition has at least one sample of, as PromQL asks for them (a histogram by its
    family name, for its `_bucket` series)."""
    names = {name for name, _ in scraped.samples}
    return names | {f for f, kind in scraped.families.items() if kind == "histogram" and f"{f}_count" in names}


async def test_pricewire_up_exposes_every_metric_the_dashboard_reads(settings: Settings, nc: NATS) -> None:
    """Each metric a dashboard panel reads has a sample on one of the four services' /metrics, not merely its HELP
    and TYPE lines: a panel over a family with no series shows "No data". The traffic a calm run lacks is made:
    a latest-price read (the gateway's cache lookups) and a tick the validator cannot decode (its dead letters)."""
    first = three_free_ports()
    settings = replace(settings, metrics_port=first, gateway=replace(settings.gateway, host="127.0.0.1", port=0))
    wanted = dashboard_metric_names()
    stop = asyncio.Event()
    async with running(asyncio.create_task(run_stack(settings, stop)), stop), aiohttp.ClientSession() as http:
        gateway_port = int((await service_info(nc, "gateway"))["metadata"]["http_port"])
        await service_info(nc, "validator")  # its streams exist, and it consumes the ticks
        bases = [f"http://127.0.0.1:{port}" for port in (first, first + 1, first + 2, gateway_port)]
        async with http.get(f"http://127.0.0.1:{gateway_port}/api/v1/prices/BTC") as response:
            assert response.status in (200, 404), await response.text()  # a hit or a miss: either is counted
        await nc.jetstream().publish(subjects.tick("sim-a", "BTC", "USDT"), b'{"v":1,"id":')

        async def dashboard_names() -> tuple[set[str], set[str]]:
            """The dashboard's metrics the four expositions have a sample of, and those they expose at all."""
            scrapes = [await scrape(http, base) for base in bases]
            sampled = wanted & set().union(*map(sampled_names, scrapes))
            return sampled, wanted & set().union(*map(exposed_names, scrapes))

        # Prices have to flow first: the consensus gauges exist once there is a consensus.
        sampled, exposed = await eventually(
            dashboard_names,
            lambda names: wanted - SAMPLE_LESS <= names[0],
            timeout=30,
            what="a sample of every dashboard metric (sampled, exposed)",
        )

    assert len(wanted) >= 15  # the dashboard reads the catalogue, not a token name or two
    assert wanted - SAMPLE_LESS <= sampled
    assert wanted >= SAMPLE_LESS, "SAMPLE_LESS names a metric the dashboard does not read"
    assert exposed >= SAMPLE_LESS, "a sample-less metric must still be exposed (HELP and TYPE)"
    assert not SAMPLE_LESS & sampled, f"{sorted(SAMPLE_LESS & sampled)} now have samples: take them off SAMPLE_LESS"
