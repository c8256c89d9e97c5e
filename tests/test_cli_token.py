"""`pricewire token` run as a command: the token it prints is one the gateway's verifier and routes accept."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner, Result

from pricewire_cli.app import app as cli_app
from pricewire_common.config import AuthSettings, Settings
from pricewire_gateway.auth import TokenVerifier
from tests.test_gateway_auth import AUTH, SECRET, user_gateway

HS256_ENV = {"PRICEWIRE_JWT_SECRET": SECRET, "PRICEWIRE_JWT_PUBLIC_KEY_FILE": ""}


def pricewire_token(*args: str, env: dict[str, str] = HS256_ENV) -> Result:
    return CliRunner().invoke(cli_app, ["token", *args], env=env)


def minted(*args: str, env: dict[str, str] = HS256_ENV) -> str:
    result = pricewire_token(*args, env=env)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_token_mints_a_user_token_and_an_admin_one_the_verifier_accepts() -> None:
    verifier = TokenVerifier(AUTH)
    before = int(time.time())
    alice = verifier.verify(minted("--user", "alice"))
    assert (alice.user, alice.admin) == ("alice", False)
    assert alice.expires_s is not None
    # The default lifetime (PRICEWIRE_TOKEN_TTL_S, a day), plus the verifier's leeway.
    assert before + 86_400 <= alice.expires_s - int(AUTH.leeway_s) <= int(time.time()) + 86_400
    root = verifier.verify(minted("--user", "root", "--admin"))
    assert (root.user, root.admin) == ("root", True)
    short = verifier.verify(minted("--user", "bob", "--ttl", "60"))
    assert short.expires_s is not None
    assert short.expires_s - int(AUTH.leeway_s) <= int(time.time()) + 60


def test_token_refuses_without_a_key_or_with_a_bad_user_name() -> None:
    no_key = pricewire_token("--user", "alice", env={"PRICEWIRE_JWT_SECRET": "", "PRICEWIRE_JWT_PUBLIC_KEY_FILE": ""})
    assert no_key.exit_code == 2
    assert "cannot mint a token" in no_key.output
    assert no_key.stdout == ""  # nothing a script would take for a token
    bad_user = pricewire_token("--user", "a.b")
    assert bad_user.exit_code == 2
    assert bad_user.stdout == ""


def test_token_signs_rs256_with_the_private_key_when_a_public_key_is_configured(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public_pem = tmp_path / "public.pem"
    public_pem.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    env = {"PRICEWIRE_JWT_SECRET": "", "PRICEWIRE_JWT_PUBLIC_KEY_FILE": str(public_pem)}
    assert pricewire_token("--user", "carol", env=env).exit_code == 2  # RS256 needs --private-key
    text = minted("--user", "carol", "--admin", "--private-key", str(private_pem), env=env)
    principal = TokenVerifier(AuthSettings(jwt_public_key=public_pem.read_text())).verify(text)
    assert (principal.user, principal.admin) == ("carol", True)


async def test_a_minted_token_opens_the_user_routes_and_only_an_admin_one_the_admin_routes(settings: Settings) -> None:
    # Before the gateway starts: CliRunner swaps the process's environment and stdout while it runs.
    user, admin = minted("--user", "dave"), minted("--user", "root", "--admin")
    pause = "/api/v1/sources/sim-a/pause"
    async with user_gateway(settings) as gw, aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/api/v1/alerts", headers={"Authorization": f"Bearer {user}"}) as response:
            assert response.status == 200
        async with http.post(f"{gw.url}{pause}", headers={"Authorization": f"Bearer {user}"}) as response:
            assert response.status == 403
        async with http.post(f"{gw.url}{pause}", headers={"Authorization": f"Bearer {admin}"}) as response:
            # Past auth and the role check: no collector runs here to take the command.
            assert response.status == 503
