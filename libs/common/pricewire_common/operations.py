"""What a service opens for its operators: its ops port (`ops_http`) and its NATS service registration
(`discovery`), both closed through the service's exit stack before its NATS connection drains."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.client import Client as NATS

from pricewire_common.discovery import Registration
from pricewire_common.metrics import Exposition
from pricewire_common.ops_http import Check, OpsServer, readiness

__all__ = ["OPS_HOST", "Operations", "open_operations"]

log = structlog.get_logger(__name__)

OPS_HOST = "0.0.0.0"  # a service in a container is scraped from outside it


@dataclass(frozen=True, slots=True)
class Operations:
    """A running service's ops port (None when PRICEWIRE_METRICS_PORT is off) and registration."""

    server: OpsServer | None
    registration: Registration


async def open_operations(
    stack: AsyncExitStack,
    nc: NATS,
    *,
    service: str,
    description: str,
    exposition: Exposition,
    checks: Sequence[Check],
    port: int | None,
) -> Operations:
    """Serve `exposition` and `checks` on `port` (if any) and register the instance with the service API."""
    server = None
    metadata: dict[str, str] = {}
    if port is not None:
        server = OpsServer(service=service, exposition=exposition, checks=checks, host=OPS_HOST, port=port)
        stack.push_async_callback(server.close)
        try:
            await server.start()
        except OSError as exc:
            # Taken (another service of this machine, a second `pricewire up`): the service still does its
            # work rather than die for its metrics; the error says so, its registration shows no port, and
            # a probe of the port (Kubernetes, Compose) fails where it is configured.
            log.error("ops_port_unavailable", port=port, error=repr(exc))
            server = None
        else:
            metadata["metrics_port"] = str(server.port)

    async def status() -> bytes:
        return msgspec.json.encode(await readiness(service, checks))

    registration = Registration(
        nc, service=service, description=description, status=status, metrics=exposition.render, metadata=metadata
    )
    await registration.open()
    stack.push_async_callback(registration.close)
    return Operations(server=server, registration=registration)
