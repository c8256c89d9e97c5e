"""The `pricewire` command: the whole stack, one service, or a live terminal monitor."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import structlog
import typer

from pricewire_cli.alert_cmd import alert_app
from pricewire_common.config import FEEDS, Settings, parse_feed, redact_url
from pricewire_common.errors import ConfigError
from pricewire_common.lifecycle import stop_on_signals
from pricewire_common.logs import configure_logging
from pricewire_common.runner import ServiceRun, serve

app = typer.Typer(help="Pricewire: one trusted, validated real-time crypto price stream.", no_args_is_help=True)
log = structlog.get_logger(__name__)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def up(
    feed: Annotated[str, typer.Option(help=f"collector feed: {', '.join(FEEDS)}")] = "sim",
    port: Annotated[int | None, typer.Option(help="gateway HTTP port (default PRICEWIRE_GATEWAY_PORT or 8000)")] = None,
    data_dir: Annotated[Path, typer.Option(help="where embedded servers keep their data")] = Path(".pricewire"),
) -> None:
    """Run the whole stack; starts embedded NATS/Redis/PostgreSQL for every URL left unset."""
    from pricewire_cli.stack import embedded_servers, run_stack, settings_for  # noqa: PLC0415

    try:
        parse_feed(feed)
    except ValueError:
        typer.echo(f"unknown feed {feed!r}: choose one of {', '.join(FEEDS)}", err=True)
        raise typer.Exit(2) from None
    base = _settings()
    base = replace(base, feed=feed)
    if port is not None:
        base = replace(base, gateway=replace(base.gateway, port=port))
    configure_logging(level=base.log_level, fmt=base.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        with embedded_servers(data_dir.resolve(), os.environ) as servers:
            settings = await settings_for(base, servers)
            bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def announce(port: asyncio.Future[int]) -> None:
                if port.cancelled() or port.exception() is not None:
                    return
                url = f"http://localhost:{port.result()}/"
                nats, redis = redact_url(settings.nats_url), redact_url(settings.redis_url)
                log.info("pricewire_up", page=url, feed=feed, nats=nats, redis=redis)
                typer.echo(f"Pricewire is up: open {url}  (Ctrl-C to stop)")

            bound.add_done_callback(announce)
            await run_stack(settings, stop, bound=bound)

    asyncio.run(main())


def _service(run: ServiceRun, name: str, settings: Settings | None = None) -> None:
    serve(run, service=name, settings=settings or _settings())


@app.command()
def collector() -> None:
    """Run the collector (publishes md.tick.*)."""
    from pricewire_collector.service import run  # noqa: PLC0415

    _service(run, "collector")


@app.command()
def validator() -> None:
    """Run the validator (publishes md.price.*)."""
    from pricewire_validator.service import run  # noqa: PLC0415

    _service(run, "validator")


@app.command("cache-writer")
def cache_writer() -> None:
    """Run the cache_writer (Redis and PostgreSQL projections)."""
    from pricewire_cache_writer.service import run  # noqa: PLC0415

    _service(run, "cache_writer")


@app.command()
def gateway(
    port: Annotated[int | None, typer.Option(help="HTTP port (default PRICEWIRE_GATEWAY_PORT or 8000)")] = None,
) -> None:
    """Run the gateway (REST, WebSocket, live page)."""
    from pricewire_gateway.service import run  # noqa: PLC0415

    settings = _settings()
    if port is not None:
        settings = replace(settings, gateway=replace(settings.gateway, port=port))
    _service(run, "gateway", settings)


_PROJECTION_HELP = "redis (latest prices), db (PostgreSQL ticks, prices, candles) or all"
_BATCH_HELP = "messages per batch (default PRICEWIRE_DB_BATCH or 500)"


@app.command()
def replay(
    projection: Annotated[str, typer.Option(help=_PROJECTION_HELP)] = "all",
    since: Annotated[
        str | None, typer.Option("--from", help="start at this time, ISO 8601 with a zone: 2026-11-22T10:00:00Z")
    ] = None,
    seq: Annotated[int | None, typer.Option(help="start at this stream sequence (in each stream replayed)")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help=_BATCH_HELP)] = None,
) -> None:
    """Apply the log again to projections (idempotent), from a time, a sequence or the start; then exit."""
    from pricewire_cli.replay_cmd import replay_command  # noqa: PLC0415

    replay_command(_settings(), projection=projection, seq=seq, since=since, batch=batch)


@app.command()
def rebuild(
    projection: Annotated[str, typer.Option(help=_PROJECTION_HELP)] = "all",
    batch: Annotated[int | None, typer.Option(min=1, help=_BATCH_HELP)] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if PostgreSQL holds rows the log no longer has")] = False,
) -> None:
    """Empty projections and replay the whole retained log into them; then exit."""
    from pricewire_cli.replay_cmd import rebuild_command  # noqa: PLC0415

    rebuild_command(_settings(), projection=projection, batch=batch, force=force)


@app.command()
def capture(
    out: Annotated[Path, typer.Option(help="capture file to write (NDJSON), for --feed replay:FILE")],
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds (default: Ctrl-C)")] = None,
    sources: Annotated[str | None, typer.Option(help="venues, comma-separated (default PRICEWIRE_SOURCES)")] = None,
) -> None:
    """Record the raw frames of the live venues to a file (no NATS needed)."""
    from pricewire_cli.capture_cmd import command  # noqa: PLC0415

    command(out=out, duration_s=duration, sources=sources)


@app.command()
def monitor(
    url: Annotated[str, typer.Option(help="gateway WebSocket URL")] = "ws://localhost:8000/ws",
) -> None:
    """A live terminal table of consensus prices, fed by the gateway's WebSocket."""
    from pricewire_cli.monitor import watch  # noqa: PLC0415

    asyncio.run(watch(url))


@app.command()
def status(
    url: Annotated[str, typer.Option(help="gateway base URL")] = "http://localhost:8000",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
) -> None:
    """Services (NATS service API), sources and projection lag of a running stack; exit 1 unless all is well."""
    from pricewire_cli.status_cmd import status_command  # noqa: PLC0415

    settings = _settings()
    # Logs to stderr, and only warnings: stdout is the report (JSON with --json), not the NATS client's chatter.
    configure_logging(level="warning", fmt=settings.log_format)
    code = status_command(gateway_url=url, nats_url=settings.nats_url, nats_auth=settings.nats_auth, as_json=as_json)
    raise typer.Exit(code)


@app.command()
def token(
    user: Annotated[str, typer.Option(help="the token's subject: letters, digits, _ or -")],
    admin: Annotated[bool, typer.Option(help="grant the admin role (pause and resume sources)")] = False,
    ttl: Annotated[
        float | None, typer.Option(help="lifetime in seconds (default PRICEWIRE_TOKEN_TTL_S or 1 day)")
    ] = None,
    private_key: Annotated[Path | None, typer.Option(help="PEM private key, when the gateway uses RS256")] = None,
) -> None:
    """Mint a bearer token for the gateway's per-user API, with the configured key."""
    from pricewire_cli.token_cmd import token_command  # noqa: PLC0415

    token_command(_settings().auth, user=user, admin=admin, ttl_s=ttl, private_key=private_key)


app.add_typer(alert_app, name="alert")


def main() -> None:
    app()
