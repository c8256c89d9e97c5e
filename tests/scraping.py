"""Helpers for tests of the services' operations side: finding an instance through the NATS service API,
scraping its metrics, and reading samples out of the text exposition."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from prometheus_client.parser import text_string_to_metric_families

from pricewire_common.discovery import service_name
from tests.waiting import eventually

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class Scrape:
    """One exposition: its text, and each sample by name and labels."""

    text: str
    samples: dict[Key, float]
    families: dict[str, str]
    """Family name (counters without `_total`) -> type."""

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[Key, float] = {}
        families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            families[family.name] = family.type
            for sample in family.samples:
                samples[sample.name, frozenset(sample.labels.items())] = sample.value
        return cls(text=text, samples=samples, families=families)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample `name` with exactly `labels`, or None."""
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample `name` whose labels include `labels` (0 when there is none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(ls)[label] for (n, ls) in self.samples if n == name and label in dict(ls)}


async def service_info(nc: NATS, service: str, *, timeout: float = 20.0) -> dict[str, Any]:
    """`$SRV.INFO` of one instance of `service` (the first to answer), once one has registered."""

    async def ask() -> bytes | None:
        try:
            reply = await nc.request(f"$SRV.INFO.{service_name(service)}", b"", timeout=5)
        except NoRespondersError:
            return None  # not registered yet
        return reply.data

    data = await eventually(ask, lambda d: d is not None, timeout=timeout, what=f"{service} registered")
    assert data is not None
    info: dict[str, Any] = json.loads(data)
    return info


async def ops_base(nc: NATS, service: str) -> str:
    """`http://127.0.0.1:<port>` of a service's ops port, as its registration advertises it."""
    info = await service_info(nc, service)
    return f"http://127.0.0.1:{info['metadata']['metrics_port']}"


async def scrape(http: aiohttp.ClientSession, base: str) -> Scrape:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape.parse(await response.text())


def promtool_check(text: str) -> str:
    """Problems `promtool check metrics` finds in `text` ('' when none)."""
    result = subprocess.run(  # a fixed binary reading our text on stdin
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    return "" if result.returncode == 0 else (result.stdout + result.stderr).decode()
