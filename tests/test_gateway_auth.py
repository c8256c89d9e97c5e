"""Gateway auth: tokens refused for `alg: none`, a wrong key, a past or missing `exp`; per-user routes need one.

Also the helpers the other per-user tests share: a gateway with auth on, tokens, authorized requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pricewire_cache_writer.migrate import apply_migrations
from pricewire_common.clock import wall_clock
from pricewire_common.config import AuthSettings, Settings
from pricewire_common.errors import ConfigError
from pricewire_common.events import decode_tick
from pricewire_gateway.auth import Principal, TokenVerifier, mint
from pricewire_gateway.errors import Unauthorized
from tests.test_gateway import Gateway, decode, serving
from tests.waiting import eventually

SECRET = "test-secret-of-at-least-thirty-two-bytes!"
AUTH = AuthSettings(jwt_secret=SECRET)


def token(user: str, *, admin: bool = False, settings: AuthSettings = AUTH) -> str:
    return mint(settings, user=user, admin=admin, now_s=int(time.time()))


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


def with_auth(settings: Settings) -> Settings:
    return replace(settings, auth=AUTH)


async def migrated(settings: Settings) -> None:
    """The cache_writer's tables (prices, for change alerts), as a running stack has them."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


@asynccontextmanager
async def user_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """A gateway with auth on, over a migrated database."""
    await migrated(settings)
    async with serving(with_auth(settings)) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature, as an attacker would send it."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _refused(verifier: TokenVerifier, text: str) -> str:
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(text)
    assert caught.value.code == "unauthorized"
    return caught.value.message


# --- the verifier -------------------------------------------------------------------------------


def test_a_good_token_names_its_user_and_role() -> None:
    verifier = TokenVerifier(AUTH)
    now = int(time.time())
    alice = verifier.verify(mint(AUTH, user="alice", now_s=now))
    assert alice == Principal(user="alice", admin=False, expires_s=now + int(AUTH.token_ttl_s + AUTH.leeway_s))
    root = verifier.verify(token("root", admin=True))
    assert (root.user, root.admin) == ("root", True)


def test_alg_none_is_refused() -> None:
    assert "algorithm" in _refused(TokenVerifier(AUTH), unsigned_token(_claims()))


def test_a_token_signed_with_another_key_is_refused() -> None:
    forged = jwt.encode(_claims(), "another-secret-of-at-least-thirty-two-bytes", algorithm="HS256")
    assert "signature" in _refused(TokenVerifier(AUTH), forged).lower()


def test_a_past_exp_is_refused_beyond_the_leeway_only() -> None:
    now = int(time.time())
    verifier = TokenVerifier(replace(AUTH, leeway_s=30.0))
    within = jwt.encode(_claims(exp=now - 10), SECRET, algorithm="HS256")
    assert verifier.verify(within).user == "alice"
    expired = jwt.encode(_claims(exp=now - 60), SECRET, algorithm="HS256")
    assert _refused(verifier, expired) == "token expired"


def test_a_float_exp_bounds_the_sign_in_and_a_string_exp_is_refused() -> None:
    verifier = TokenVerifier(replace(AUTH, leeway_s=30.0))
    exp = time.time() + 600.75
    principal = verifier.verify(jwt.encode(_claims(exp=exp), SECRET, algorithm="HS256"))
    assert principal.expires_s == math.floor(exp) + 30
    # PyJWT reads "1234567890" as a date; the gateway wants the number RFC 7519 says a NumericDate is.
    as_text = jwt.encode(_claims(exp=str(int(exp))), SECRET, algorithm="HS256")
    assert "`exp` must be a number" in _refused(verifier, as_text)


def test_a_token_without_exp_or_sub_is_refused() -> None:
    verifier = TokenVerifier(AUTH)
    assert "'exp'" in _refused(verifier, jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"))
    assert "'sub'" in _refused(verifier, jwt.encode(_claims(sub=None), SECRET, algorithm="HS256"))
    assert "sub" in _refused(verifier, jwt.encode(_claims(sub="a.b"), SECRET, algorithm="HS256"))


def test_another_algorithm_of_the_same_family_is_refused() -> None:
    hs512 = jwt.encode(_claims(), SECRET + SECRET, algorithm="HS512")
    assert "algorithm" in _refused(TokenVerifier(AUTH), hs512)


def test_rs256_pins_the_algorithm_against_key_confusion() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = AuthSettings(jwt_public_key=public_pem)
    verifier = TokenVerifier(settings)
    good = mint(settings, user="bob", now_s=int(time.time()), private_key=private_pem)
    assert verifier.verify(good).user == "bob"
    # The classic confusion: HS256 "signed" with the public key as the shared secret.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    mac = hmac.new(public_pem.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert "algorithm" in _refused(verifier, f"{header}.{body}.{_b64(mac)}")
    assert "algorithm" in _refused(verifier, unsigned_token(_claims()))


def test_no_key_configured_refuses_every_token() -> None:
    assert "not configured" in _refused(TokenVerifier(AuthSettings()), token("alice"))


def test_auth_settings_from_env(tmp_path: Path) -> None:
    assert Settings.from_env({"PRICEWIRE_JWT_SECRET": SECRET}).auth.algorithm == "HS256"
    assert Settings.from_env({}).auth.algorithm is None
    with pytest.raises(ConfigError, match="PRICEWIRE_JWT_SECRET"):
        Settings.from_env({"PRICEWIRE_JWT_SECRET": "short"})
    with pytest.raises(ConfigError, match="PRICEWIRE_JWT_LEEWAY_S"):
        Settings.from_env({"PRICEWIRE_JWT_SECRET": SECRET, "PRICEWIRE_JWT_LEEWAY_S": "3600"})
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n")
    assert Settings.from_env({"PRICEWIRE_JWT_PUBLIC_KEY_FILE": str(pem)}).auth.algorithm == "RS256"
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({"PRICEWIRE_JWT_PUBLIC_KEY_FILE": str(pem), "PRICEWIRE_JWT_SECRET": SECRET})
    assert SECRET not in repr(Settings.from_env({"PRICEWIRE_JWT_SECRET": SECRET}))


# --- over HTTP and WebSocket ----------------------------------------------------------------------


async def test_per_user_routes_answer_401_without_a_good_token(settings: Settings, http: aiohttp.ClientSession) -> None:
    bad = {
        "none": {},
        "not bearer": {"Authorization": f"Basic {token('alice')}"},
        "alg none": {"Authorization": f"Bearer {unsigned_token(_claims())}"},
        "wrong key": {"Authorization": f"Bearer {jwt.encode(_claims(), 'x' * 40, algorithm='HS256')}"},
        "expired": {"Authorization": f"Bearer {jwt.encode(_claims(exp=1), SECRET, algorithm='HS256')}"},
        "no exp": {"Authorization": f"Bearer {jwt.encode(_claims(exp=None), SECRET, algorithm='HS256')}"},
    }
    async with user_gateway(settings) as gw:
        for path in ("/api/v1/alerts", "/api/v1/alerts/history", "/api/v1/portfolio"):
            for name, headers in bad.items():
                async with http.get(f"{gw.url}{path}", headers=headers) as response:
                    assert response.status == 401, (path, name)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    body = decode(await response.text())
                assert body["type"] == "error"
                assert body["code"] == "unauthorized"
            async with http.get(f"{gw.url}{path}", headers=bearer("alice")) as response:
                assert response.status == 200, path
        async with http.get(f"{gw.url}/api/v1/prices") as response:
            assert response.status == 200  # prices stay public


async def test_websocket_auth_by_query_or_first_message(settings: Settings, http: aiohttp.ClientSession) -> None:
    async with user_gateway(settings) as gw:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{gw.ws_url}?token={unsigned_token(_claims())}")
        assert refused.value.status == 401
        async with http.ws_connect(f"{gw.ws_url}?token={token('alice')}") as ws:
            assert decode(await ws.receive_str(timeout=5)) == {"type": "authenticated", "user": "alice", "admin": False}
        async with http.ws_connect(gw.ws_url) as ws:
            await ws.send_json({"type": "auth", "token": "not-a-token"})
            error = decode(await ws.receive_str(timeout=5))
            assert error["type"] == "error"
            assert error["code"] == "unauthorized"
            await ws.send_json({"type": "auth", "token": token("root", admin=True)})
            assert decode(await ws.receive_str(timeout=5)) == {"type": "authenticated", "user": "root", "admin": True}
            await ws.send_json({"type": "ping"})  # the socket stayed open through the refusal
            assert decode(await ws.receive_str(timeout=5)) == {"type": "pong"}


async def test_a_socket_signed_in_with_a_token_that_expires_stops_getting_user_frames(
    settings: Settings, nc: NATS, http: aiohttp.ClientSession
) -> None:
    from tests.test_gateway_alerts import consumer_bound, create, publish_prices  # noqa: PLC0415
    from tests.test_gateway_core import make_price  # noqa: PLC0415

    skew = [0]

    def clock() -> int:
        return wall_clock() + skew[0]

    await migrated(settings)
    long_lived = token("gina", settings=replace(AUTH, token_ttl_s=3 * 86_400.0))
    # PyJWT accepts a float `exp`: it must end the sign-in as an int one does.
    float_day = jwt.encode(_claims(sub="gina", exp=time.time() + 86_400.5), SECRET, algorithm="HS256")
    async with serving(with_auth(settings), clock=clock) as gw:
        await consumer_bound(nc)
        await create(http, gw, "gina", {"symbol": "BTC", "target_price": 1, "alert_type": "above"})
        async with (
            http.ws_connect(f"{gw.ws_url}?token={token('gina')}") as day_token,
            http.ws_connect(f"{gw.ws_url}?token={float_day}") as float_day_token,
            http.ws_connect(f"{gw.ws_url}?token={long_lived}") as three_day_token,
        ):
            for ws in (day_token, float_day_token, three_day_token):
                assert decode(await ws.receive_str(timeout=5))["type"] == "authenticated"
            skew[0] = 2 * 86_400 * 10**9  # two days later: the one-day tokens have expired
            await publish_prices(nc, [make_price("BTC", 1, price=Decimal(2))])
            fired = decode(await three_day_token.receive_str(timeout=10))
            assert fired["type"] == "alert_triggered"  # the firing reached this replica's sockets...
            for expired in (day_token, float_day_token):  # ...but not the expired ones
                await expired.send_json({"type": "ping"})
                assert decode(await expired.receive_str(timeout=5)) == {"type": "pong"}


# --- the admin role: pausing and resuming a source -------------------------------------------------


async def test_an_admin_pauses_and_resumes_a_source(settings: Settings, nc: NATS, http: aiohttp.ClientSession) -> None:
    from pricewire_collector.service import run as collector_run  # noqa: PLC0415
    from tests.pipeline import running  # noqa: PLC0415

    admin = {"Authorization": f"Bearer {token('root', admin=True)}"}
    pause = "/api/v1/sources/sim-a/pause"
    async with user_gateway(settings) as gw:
        async with http.post(f"{gw.url}{pause}", headers=admin) as response:
            assert response.status == 503  # no collector runs yet
            assert decode(await response.text())["code"] == "collector_unavailable"
        collector_stop = asyncio.Event()
        async with running(asyncio.create_task(collector_run(settings, collector_stop)), collector_stop):
            ticks: dict[str, list[int]] = {"sim-a": [], "sim-b": []}
            more_a, more_b = asyncio.Event(), asyncio.Event()

            async def on_tick(msg: Msg) -> None:
                tick = decode_tick(msg.data)
                ticks[tick.source].append(tick.ts_received)
                (more_b if tick.source == "sim-b" else more_a).set()

            await nc.subscribe("md.tick.sim-a.>", cb=on_tick)
            await nc.subscribe("md.tick.sim-b.>", cb=on_tick)
            await asyncio.wait_for(more_a.wait(), timeout=10)  # sim-a ticking
            for headers, status in (({}, 401), (bearer("alice"), 403)):
                async with http.post(f"{gw.url}{pause}", headers=headers) as response:
                    assert response.status == status
            for path, status in (("/api/v1/sources/binance/pause", 404), ("/api/v1/sources/A.B/pause", 400)):
                async with http.post(f"{gw.url}{path}", headers=admin) as response:
                    assert response.status == status, path
            async with http.post(f"{gw.url}{pause}", headers=admin) as response:
                assert response.status == 200
                body = decode(await response.text())
            paused_at = wall_clock()
            assert (body["source"], body["paused"], body["by"]) == ("sim-a", True, "root")
            # sim-b goes on; nothing sim-a generated after the answer is published.
            while sum(ts > paused_at for ts in ticks["sim-b"]) < 30:
                more_b.clear()
                await asyncio.wait_for(more_b.wait(), timeout=10)
            assert not [ts for ts in ticks["sim-a"] if ts > paused_at]
            stopped = await eventually(
                lambda: source_state(http, gw.url, "sim-a"), lambda s: s[0] == "stopped", what="sim-a stopped"
            )
            assert stopped == ("stopped", "paused by root")
            async with http.post(f"{gw.url}/api/v1/sources/sim-a/resume", headers=admin) as response:
                assert decode(await response.text())["paused"] is False
            resumed_at = wall_clock()
            while not [ts for ts in ticks["sim-a"] if ts > resumed_at]:  # sim-a again
                more_a.clear()
                await asyncio.wait_for(more_a.wait(), timeout=10)
            assert await eventually(
                lambda: source_state(http, gw.url, "sim-a"), lambda s: s[0] == "connected", what="sim-a connected"
            ) == ("connected", "resumed by root")


async def source_state(http: aiohttp.ClientSession, url: str, source: str) -> tuple[str | None, str | None]:
    async with http.get(f"{url}/api/v1/sources") as response:
        for view in decode(await response.text())["sources"]:
            if view["source"] == source:
                return view["state"], view["detail"]
    return None, None


class _Venue:
    """A live source that runs until told to stop, counting its starts."""

    name = "venue-x"

    def __init__(self) -> None:
        self.started: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def run(self, sink: object, stop: asyncio.Event) -> None:
        await self.started.put(stop)
        await stop.wait()


class _States:
    """A sink that records states (the only part of `Sink` supervise uses without a source's help)."""

    def __init__(self) -> None:
        self.states: list[tuple[str, str | None]] = []

    async def state(self, source: str, state: str, *, transport: str, detail: str | None = None) -> None:
        self.states.append((state, detail))


async def test_a_paused_live_source_is_stopped_and_started_again_on_resume() -> None:
    from pricewire_collector.sources.resilience import Backoff  # noqa: PLC0415
    from pricewire_collector.sources.runtime import supervise  # noqa: PLC0415
    from pricewire_collector.switches import SourceSwitches  # noqa: PLC0415
    from pricewire_common.control import SourceCommand  # noqa: PLC0415

    venue, sink, stop = _Venue(), _States(), asyncio.Event()

    async def announce(source: str, state: Any, detail: str | None) -> None:
        await sink.state(source, state, transport="", detail=detail)

    switches = SourceSwitches([venue.name], announce=announce)
    task = asyncio.create_task(supervise(venue, sink, stop, backoff=Backoff(), switches=switches))  # type: ignore[arg-type]
    first_run = await asyncio.wait_for(venue.started.get(), timeout=5)
    result = await switches.apply(venue.name, SourceCommand(action="pause", by="root", ts=0))
    assert (result.known, result.paused) == (True, True)
    await asyncio.wait_for(first_run.wait(), timeout=5)  # the running source was told to stop
    assert not stop.is_set()
    assert venue.started.empty()
    await switches.apply(venue.name, SourceCommand(action="resume", by="root", ts=0))
    second_run = await asyncio.wait_for(venue.started.get(), timeout=5)
    assert not second_run.is_set()
    assert sink.states == [("stopped", "paused by root"), ("connected", "resumed by root")]
    unknown = await switches.apply("venue-y", SourceCommand(action="pause", by="root", ts=0))
    assert not unknown.known
    stop.set()
    await asyncio.wait_for(task, timeout=5)
