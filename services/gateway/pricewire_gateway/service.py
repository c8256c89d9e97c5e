"""The gateway service: live prices from NATS to WebSocket clients, latest prices from Redis (or, when
Redis has none, PostgreSQL) over REST, history and the projections' status from PostgreSQL."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as redis_asyncio
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS

from pricewire_common import subjects
from pricewire_common.bus import connect, drain_or_close, ensure_streams
from pricewire_common.clock import Clock, wall_clock
from pricewire_common.config import Settings
from pricewire_common.deadletters import DeadLetters
from pricewire_common.discovery import Registration
from pricewire_common.metrics import Exposition
from pricewire_common.ops_http import install_metrics
from pricewire_common.tracing import Tracing, open_tracing
from pricewire_gateway.admin_api import install as install_admin
from pricewire_gateway.alert_store import AlertStore
from pricewire_gateway.alert_worker import DLQ_SERVICE, AlertWorker, start_alerts
from pricewire_gateway.alerts_api import install as install_alerts
from pricewire_gateway.app import build_app
from pricewire_gateway.appkeys import LATEST
from pricewire_gateway.archive import Archive
from pricewire_gateway.auth import VERIFIER, TokenVerifier
from pricewire_gateway.feed import PriceFeed
from pricewire_gateway.health import PROBE_TIMEOUT_S, Probes
from pricewire_gateway.history_api import install as install_history
from pricewire_gateway.hub import Hub
from pricewire_gateway.limits import install as install_limits
from pricewire_gateway.metrics import METRICS, GatewayMetrics
from pricewire_gateway.portfolio_api import feed_for as portfolio_feed_for
from pricewire_gateway.portfolio_api import install as install_portfolio
from pricewire_gateway.portfolio_store import PortfolioStore
from pricewire_gateway.quality import FreshnessLimits
from pricewire_gateway.quality_api import install as install_quality
from pricewire_gateway.sources_api import SourceBoard
from pricewire_gateway.sources_api import install as install_sources
from pricewire_gateway.status_api import StatusReader
from pricewire_gateway.status_api import install as install_status
from pricewire_gateway.store import PriceStore
from pricewire_gateway.symbols import SymbolResolver
from pricewire_gateway.tracing import SentFrames
from pricewire_gateway.user_sockets import SOCKETS, UserSockets
from pricewire_gateway.webhook import Webhooks

log = structlog.get_logger(__name__)

SERVICE = "gateway"
SHUTDOWN_TIMEOUT_S = 5.0
DB_POOL_SIZE = 4
DB_COMMAND_TIMEOUT_S = 5.0
"""Longest a history query may run before the request gets a 503."""


async def run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    bound: asyncio.Future[int] | None = None,
    clock: Clock = wall_clock,
    tracing: Tracing | None = None,
) -> None:
    """Serve REST, WebSocket and the page until `stop` is set; `bound` gets the port once serving."""
    async with AsyncExitStack() as stack:
        tracing = open_tracing(stack, settings.tracing, service=SERVICE, given=tracing)  # `tracing`: a test's
        # Closed last (the stack unwinds in reverse): Redis and PostgreSQL outlive the NATS drain.
        # Both connect lazily, so readiness (not start-up) reports them down.
        redis = redis_asyncio.Redis.from_url(
            settings.redis_url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
        )
        stack.push_async_callback(redis.aclose)
        # min_size=0: no connection before the first query, so the gateway starts and serves live
        # prices with PostgreSQL down; every connect and query is bounded, so a request fails fast.
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=0,
            max_size=DB_POOL_SIZE,
            timeout=PROBE_TIMEOUT_S,
            command_timeout=DB_COMMAND_TIMEOUT_S,
        )
        stack.push_async_callback(pool.close)
        archive = Archive(pool)

        nc = await connect(settings.nats_url, name=SERVICE, auth=settings.nats_auth)
        stack.push_async_callback(drain_or_close, nc)  # a reconnecting client is closed, not drained
        js = nc.jetstream()
        await ensure_streams(js, settings.streams)

        hub = Hub(clock=clock, traces=SentFrames.of(tracing), slow_client_s=settings.gateway.ws_slow_client_s)
        feed_letters, board_letters = (
            DeadLetters(js, service=SERVICE, clock=clock),
            DeadLetters(js, service=SERVICE, clock=clock),
        )
        feed = PriceFeed(hub, feed_letters, assets=settings.assets, tracing=tracing)
        await nc.subscribe(subjects.ALL_PRICES, cb=feed.on_message)
        board = SourceBoard(board_letters)
        await nc.subscribe(subjects.ALL_SOURCES, cb=board.on_message)
        await nc.flush()  # the server knows the interest before anyone is told we serve
        await board.load(js)  # after subscribing: no state change falls between the two

        store = PriceStore(redis)
        probes = Probes(nc, redis, pool)
        app = build_app(
            hub=hub,
            store=store,
            archive=archive,
            resolver=SymbolResolver(settings.assets, settings.usd_quotes),
            probes=probes,
            clock=clock,
            public_prices=settings.gateway.public_prices,
        )
        metrics = GatewayMetrics(
            service=SERVICE, hub=hub, store=store, latest=app[LATEST], dead_letters=(feed_letters, board_letters)
        )
        app[METRICS] = metrics
        install_limits(app, settings.gateway)
        exposition = Exposition(SERVICE)
        exposition.add(metrics.collect)
        install_metrics(app, exposition)
        install_sources(app, board)
        install_quality(app, FreshnessLimits.from_settings(settings.validator))
        install_history(app)
        install_status(app, StatusReader(nc, redis, archive))
        await _serve_user_data(app, settings, stack, nc, pool, clock=clock)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.gateway.host, settings.gateway.port)
        await site.start()
        stack.push_async_callback(hub.close_all)  # first on the way out: clients hear 1001 before the socket goes

        port = int(runner.addresses[0][1])

        async def status() -> bytes:
            return msgspec.json.encode(await probes.readiness())

        registration = Registration(
            nc,
            service=SERVICE,
            description="REST, WebSocket and the live page over the consensus prices",
            status=status,
            metrics=exposition.render,
            metadata={"http_port": str(port)},
        )
        await registration.open()
        stack.push_async_callback(registration.close)
        log.info("gateway_listening", host=settings.gateway.host, port=port, assets=list(settings.assets))
        if bound is not None and not bound.done():
            bound.set_result(port)
        await stop.wait()
        log.info(
            "gateway_stopping",
            clients=len(hub),
            received=feed.received,
            rejected=feed.rejected,
            published=hub.published,
        )


async def _serve_user_data(
    app: web.Application,
    settings: Settings,
    stack: AsyncExitStack,
    nc: NATS,
    pool: asyncpg.Pool,
    *,
    clock: Clock,
) -> None:
    """Auth, alerts (API, the shared alert consumer, delivery to this replica's sockets) and portfolios."""
    js = nc.jetstream()
    sockets = UserSockets(clock=clock)
    app[VERIFIER] = TokenVerifier(settings.auth)
    app[SOCKETS] = sockets
    alert_store = AlertStore(pool)
    install_alerts(app, alert_store)
    install_admin(app, nc)
    portfolios = portfolio_feed_for(app, PortfolioStore(pool), sockets, nc, clock=clock)
    install_portfolio(app, portfolios)
    await nc.subscribe(subjects.ALL_ALERTS, cb=sockets.on_alert)
    await nc.subscribe(subjects.ALL_PRICES, cb=portfolios.on_price)
    await nc.subscribe(subjects.ALL_PORTFOLIOS, cb=portfolios.on_change)
    await nc.flush()  # as above: the interest is known before the gateway says it serves

    session = aiohttp.ClientSession()
    stack.push_async_callback(session.close)
    webhooks = Webhooks(session, settings.alerts)
    stack.push_async_callback(webhooks.close)
    alert_letters = DeadLetters(js, service=DLQ_SERVICE, clock=clock)
    worker = AlertWorker(
        nc,
        js,
        alert_store,
        webhooks,
        alert_letters,
        settings=settings.alerts,
        ack_wait_s=settings.streams.ack_wait_s,
    )
    app[METRICS].watch_alerts(worker, webhooks, alert_letters)
    app[METRICS].watch_sockets(sockets)
    worker_stop = asyncio.Event()
    task = await start_alerts(worker, pool, worker_stop, assets=settings.assets)

    async def stop_worker() -> None:
        # Before NATS drains (the stack unwinds in reverse): the consumer's pull stops first.
        worker_stop.set()
        await task
        log.info("alert_worker_stopped", decided=worker.decided, fired=worker.fired, retried=worker.retried)

    stack.push_async_callback(stop_worker)
