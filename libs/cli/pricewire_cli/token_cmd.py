"""`pricewire token`: mint a bearer token for local use, with the key the gateway is configured with."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer

from pricewire_common.config import AuthSettings
from pricewire_common.errors import InvalidEvent
from pricewire_gateway.auth import mint


def token_command(
    settings: AuthSettings, *, user: str, admin: bool, ttl_s: float | None, private_key: Path | None
) -> None:
    """Print a token for `user` (exit 2 when no key is configured or the user name is not usable)."""
    if ttl_s is not None:
        settings = replace(settings, token_ttl_s=ttl_s)
    pem = private_key.read_text(encoding="ascii") if private_key is not None else None
    try:
        text = mint(settings, user=user, admin=admin, now_s=int(time.time()), private_key=pem)
    except (ValueError, InvalidEvent) as exc:  # no key, RS256 without --private-key, or a bad user name
        typer.echo(f"cannot mint a token: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(text)
