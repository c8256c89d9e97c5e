"""`pricewire alert add|list|rm`: one's price alerts on a running gateway, over its REST API."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Annotated, Any

import aiohttp
import typer

from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError, InvalidEvent
from pricewire_gateway.auth import mint

alert_app = typer.Typer(help="Price alerts on a running gateway: add, list, rm.", no_args_is_help=True)

GatewayUrl = Annotated[str, typer.Option("--url", help="gateway base URL")]
Token = Annotated[
    str | None, typer.Option("--token", envvar="PRICEWIRE_TOKEN", help="bearer token (or mint one with --user)")
]
User = Annotated[str | None, typer.Option("--user", help="mint a token for this user with PRICEWIRE_JWT_SECRET")]
DEFAULT_URL = "http://localhost:8000"
TIMEOUT_S = 10.0


def _token(token: str | None, user: str | None) -> str:
    if token is not None:
        return token
    if user is None:
        typer.echo("give --token (or PRICEWIRE_TOKEN), or --user to mint one with PRICEWIRE_JWT_SECRET", err=True)
        raise typer.Exit(2)
    try:
        return mint(Settings.from_env().auth, user=user, now_s=int(time.time()))
    except (ValueError, ConfigError, InvalidEvent) as exc:
        typer.echo(f"cannot mint a token: {exc}", err=True)
        raise typer.Exit(2) from exc


async def _call(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session,
        session.request(method, url, json=body, headers=headers) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text, parse_float=Decimal) if text else None


def _request(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    try:
        status, answer = asyncio.run(_call(method, url, token, body))
    except (aiohttp.ClientError, TimeoutError) as exc:
        typer.echo(f"gateway at {url} did not answer: {exc!r}", err=True)
        raise typer.Exit(1) from exc
    if status >= 400:
        message = answer.get("message") if isinstance(answer, dict) else answer
        typer.echo(f"error {status}: {message}", err=True)
        raise typer.Exit(1)
    return answer


def _line(alert: dict[str, Any]) -> str:
    if alert["alert_type"] == "change_pct":
        condition = f"change {alert['pct']}% in {alert['window_s']}s"
    else:
        condition = f"{alert['alert_type']} {alert['target_price']}"
    state = "armed" if alert["armed"] else "fired, waiting to re-arm"
    return f"{alert['id']}\t{alert['symbol']}\t{condition}\t{state}\tfired {alert['fired_count']}x"


@alert_app.command("add")
def add(  # noqa: PLR0917 - a command's options are its parameters
    symbol: Annotated[str, typer.Argument(help="asset or pair: BTC, btcusdt")],
    above: Annotated[str | None, typer.Option(help="fire when the price reaches this")] = None,
    below: Annotated[str | None, typer.Option(help="fire when the price falls to this")] = None,
    change_pct: Annotated[str | None, typer.Option(help="fire on a move of this signed % ...")] = None,
    window: Annotated[int | None, typer.Option(help="... within this many seconds")] = None,
    webhook: Annotated[str | None, typer.Option(help="also POST each firing to this URL")] = None,
    note: Annotated[str | None, typer.Option(help="a note carried by each firing")] = None,
    url: GatewayUrl = DEFAULT_URL,
    token: Token = None,
    user: User = None,
) -> None:
    """Create an alert; prints it."""
    chosen = [name for name, value in (("above", above), ("below", below), ("change_pct", change_pct)) if value]
    # Numbers go as text: the gateway reads them as exact decimals and says what is wrong with a bad one.
    if len(chosen) != 1:
        typer.echo("give exactly one of --above, --below, --change-pct", err=True)
        raise typer.Exit(2)
    body: dict[str, Any] = {"symbol": symbol, "alert_type": chosen[0], "webhook_url": webhook, "note": note}
    if change_pct is not None:
        body.update(pct=change_pct, window_s=window)
    else:
        body["target_price"] = above if above is not None else below
    typer.echo(_line(_request("POST", f"{url}/api/v1/alerts", _token(token, user), body)))


@alert_app.command("list")
def list_alerts(url: GatewayUrl = DEFAULT_URL, token: Token = None, user: User = None) -> None:
    """List one's alerts: id, asset, condition, state."""
    for alert in _request("GET", f"{url}/api/v1/alerts", _token(token, user))["alerts"]:
        typer.echo(_line(alert))


@alert_app.command("rm")
def remove(
    alert_id: Annotated[int, typer.Argument(help="the alert's id (from `pricewire alert list`)")],
    url: GatewayUrl = DEFAULT_URL,
    token: Token = None,
    user: User = None,
) -> None:
    """Delete one of one's alerts."""
    _request("DELETE", f"{url}/api/v1/alerts/{alert_id}", _token(token, user))
    typer.echo(f"deleted alert {alert_id}")
