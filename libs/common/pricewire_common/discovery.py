"""Registration with the NATS service API (`nats.micro`): every instance answers `$SRV.PING`, `$SRV.INFO`
and `$SRV.STATS` under the name `pricewire-<service>`, with two endpoints of its own.

- `pricewire.<service>.status`: the instance's readiness as JSON (the body of its `/readyz`);
- `pricewire.<service>.metrics`: its Prometheus exposition, for a look without reaching its port.

Both are in the default queue group, so a request reaches one instance; `$SRV.INFO` (or `$SRV.PING`)
with a wait for several replies lists them all, each with its id, version and metadata (the service
name, and `metrics_port` when it has an ops port).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from pricewire_common.metrics import package_version

__all__ = ["Registration", "service_name", "status_subject"]

log = structlog.get_logger(__name__)

Answer = Callable[[], Awaitable[bytes]]


def service_name(service: str) -> str:
    """The name under which `service` registers (`pricewire-collector`)."""
    return f"pricewire-{service.replace('_', '-')}"


def status_subject(service: str) -> str:
    return f"pricewire.{service}.status"


def metrics_subject(service: str) -> str:
    return f"pricewire.{service}.metrics"


class Registration:
    """One instance's registration; `open` registers, `close` withdraws it (before the connection drains)."""

    def __init__(
        self,
        nc: NATS,
        *,
        service: str,
        description: str,
        status: Answer,
        metrics: Answer,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._nc = nc
        self._service = service
        self._description = description
        self._status = status
        self._metrics = metrics
        self._metadata = {"service": service, **(metadata or {})}
        self.micro: Service | None = None

    @property
    def id(self) -> str:
        """The instance id the service API gives it (empty until open)."""
        return "" if self.micro is None else self.micro.id

    async def open(self) -> None:
        config = ServiceConfig(
            name=service_name(self._service),
            version=package_version(),
            description=self._description,
            metadata=dict(self._metadata),
        )
        self.micro = await add_service(self._nc, config)
        await self.micro.add_endpoint(
            EndpointConfig(name="status", subject=status_subject(self._service), handler=self._answer_status)
        )
        await self.micro.add_endpoint(
            EndpointConfig(name="metrics", subject=metrics_subject(self._service), handler=self._answer_metrics)
        )
        log.info("service_registered", name=service_name(self._service), id=self.micro.id)

    async def close(self) -> None:
        micro, self.micro = self.micro, None
        if micro is None or not self._nc.is_connected:
            return  # closed or reconnecting: the registration goes with the connection's subscriptions
        try:
            await micro.stop()
        except (NatsError, OSError) as exc:
            # The connection is going away: its subscriptions go with it, and the registration too.
            log.warning("service_unregister_failed", error=repr(exc))

    async def _answer_status(self, request: Request) -> None:
        await request.respond(await self._status())

    async def _answer_metrics(self, request: Request) -> None:
        await request.respond(await self._metrics())
