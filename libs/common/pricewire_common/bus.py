"""NATS connection and JetStream provisioning: the event log every service shares."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.errors import AuthorizationError, ConnectionReconnectingError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from pricewire_common import subjects
from pricewire_common.config import NatsAuthSettings, StreamSettings
from pricewire_common.direct import DirectClient
from pricewire_common.errors import PricewireError

log = structlog.get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
CLOSE_AFTER_REFUSAL_S = 1.0


class NatsAccessRefused(PricewireError):
    """NATS turned our credentials down, or its certificate is not one we trust: trying again cannot help."""

    def __init__(self, client: str, cause: Exception) -> None:
        super().__init__(f"{client}: {cause}")
        self.client = client
        self.cause = cause


# TLS alerts a server sends when it will not take our certificate (or our lack of one).
REFUSED_TLS_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")


def refused(exc: Exception) -> bool:
    """True for a sign-in the server refused, a server certificate that failed verification, or a TLS
    server that refused our client certificate."""
    if isinstance(exc, AuthorizationError | ssl.SSLCertVerificationError):
        return True
    if isinstance(exc, ssl.SSLError):
        return any(alert in (exc.reason or "") for alert in REFUSED_TLS_ALERTS)
    return isinstance(exc, NatsError) and "authorization violation" in str(exc).lower()


def tls_context(auth: NatsAuthSettings) -> ssl.SSLContext | None:
    """The TLS context that trusts the configured CA and shows the client certificate; None: nats-py's default."""
    if auth.tls_ca_file is None and auth.tls_cert_file is None:
        return None
    context = ssl.create_default_context(cafile=auth.tls_ca_file)
    if auth.tls_cert_file is not None:
        context.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
    return context


def credentials(auth: NatsAuthSettings) -> dict[str, Any]:
    """nats-py's connect options for the one configured way to sign in."""
    options: dict[str, Any] = {}
    if auth.user is not None:
        options.update(user=auth.user, password=auth.password)
    if auth.token is not None:
        options["token"] = auth.token
    if auth.nkey_seed is not None:
        options["nkeys_seed_str"] = auth.nkey_seed
    if auth.creds is not None:
        options["user_credentials"] = RawCredentials(auth.creds)
    tls = tls_context(auth)
    if tls is not None:
        options["tls"] = tls
    return options


async def connect(url: str, *, name: str, auth: NatsAuthSettings | None = None) -> NATS:
    """Connect to NATS, reconnecting forever; publishes during a reconnect are buffered by the client.

    `auth` is how to sign in and which CA to trust (Settings.nats_auth); None: no credentials, system CAs.
    """
    auth = auth or NatsAuthSettings()
    first_connect = True

    async def on_error(exc: Exception) -> None:
        if first_connect and refused(exc):
            # Raised through nats-py's connect loop, which would otherwise retry the same refusal forever:
            # the service fails at start instead. Once connected, a refusal (credentials revoked) is retried.
            raise NatsAccessRefused(name, exc) from exc
        log.warning("nats_error", error=str(exc), client=name)

    async def on_disconnected() -> None:
        if nc.is_closed or nc.is_draining:
            log.info("nats_closed", client=name)
        else:
            log.warning("nats_disconnected", client=name)

    async def on_reconnected() -> None:
        url = nc.connected_url.netloc if nc.connected_url else ""
        log.info("nats_reconnected", client=name, url=url)

    nc = DirectClient()
    try:
        await nc.connect(
            servers=[url],
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            pending_size=64 * 1024 * 1024,
            **credentials(auth),
        )
    except NatsAccessRefused:
        # After a failed TLS upgrade nats-py's close waits for a stream that never reports closed: bounded.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_AFTER_REFUSAL_S):
                await nc.close()
        log.error("nats_access_refused", client=name, auth=auth.method)
        raise
    first_connect = False
    log.info("nats_connected", client=name, auth=auth.method)
    return nc


async def drain_or_close(nc: NATS) -> None:
    """Drain a live connection (pending publishes flushed, subscriptions finished); close one that is
    reconnecting, since nats-py refuses to drain then, or do nothing if it is closed already."""
    if nc.is_closed:
        return
    if nc.is_connected:
        try:
            await nc.drain()
        except ConnectionReconnectingError:
            log.warning("nats_drain_refused_while_reconnecting")
        else:
            return
    await nc.close()


def stream_configs(settings: StreamSettings) -> list[StreamConfig]:
    """The streams of the log: ticks, consensus prices, source states and dead letters."""
    common = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.OLD,
        "duplicate_window": settings.duplicate_window_s,
        "num_replicas": settings.replicas,
        "max_bytes": settings.max_bytes,
    }
    return [
        StreamConfig(
            name=subjects.TICKS_STREAM,
            subjects=[subjects.ALL_TICKS],
            max_age=settings.ticks_max_age_s,
            description="Normalized venue quotes, one message per tick",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=subjects.PRICES_STREAM,
            subjects=[subjects.ALL_PRICES],
            max_age=settings.prices_max_age_s,
            description="Consensus prices per asset",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=subjects.SOURCES_STREAM,
            subjects=[subjects.ALL_SOURCES],
            max_age=settings.dead_letters_max_age_s,
            max_msgs_per_subject=100,
            description="Venue connection states, the last 100 per source",
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=subjects.DLQ_STREAM,
            subjects=[subjects.ALL_DEAD_LETTERS],
            max_age=settings.dead_letters_max_age_s,
            description="Rejected input with its reason",
            **common,  # type: ignore[arg-type]
        ),
    ]


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> None:
    """Create the streams, or bring their limits to `settings`; safe to run from many replicas at once."""
    for config in stream_configs(settings):
        try:
            await js.stream_info(config.name or "")
        except NotFoundError:
            # add_stream with an identical config is idempotent server-side, so a race is harmless.
            await js.add_stream(config)
            log.info("stream_created", stream=config.name)
        else:
            await js.update_stream(config)
            log.debug("stream_updated", stream=config.name)
