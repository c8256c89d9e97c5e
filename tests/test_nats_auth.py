"""NATS credentials and TLS: a real nats-server that demands them, services that bring them, strangers refused.

Each test starts its own embedded nats-server with a config file (authorization users, nkeys, tls blocks).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nkeys  # type: ignore[import-untyped]  # nats-py's own nkeys dependency ships no types
import pytest
import trustme
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from pricewire_cli.embedded import NatsServer, free_port
from pricewire_common import subjects
from pricewire_common.bus import CLOSE_AFTER_REFUSAL_S, NatsAccessRefused, connect
from pricewire_common.config import NatsAuthSettings, Settings, SimSettings, ValidatorSettings
from pricewire_common.errors import ConfigError
from pricewire_common.events import decode_price
from tests.pipeline import ServiceProcess, service_env
from tests.waiting import eventually

USER, PASSWORD, TOKEN = "pricewire", "correct horse battery staple", "s3cret-token-for-nats"
USERS_CONF = f'authorization {{ users = [ {{ user: "{USER}", password: "{PASSWORD}" }} ] }}'
TOKEN_CONF = f'authorization {{ token: "{TOKEN}" }}'


class _ConfiguredNats(NatsServer):
    """The embedded nats-server (JetStream, loopback port) with a config file of the test's own."""

    def __init__(self, data_dir: Path, config: str, *, scheme: str = "nats") -> None:
        super().__init__(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = data_dir / "server.conf"
        self.config_path.write_text(config)
        self.scheme = scheme

    def _command(self) -> list[str]:
        return [*super()._command(), "-c", str(self.config_path)]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


@contextlib.contextmanager
def secured_nats(data_dir: Path, config: str, *, scheme: str = "nats") -> Iterator[_ConfiguredNats]:
    server = _ConfiguredNats(data_dir, config, scheme=scheme)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _nkey_user(tmp_path: Path, name: str = "user") -> tuple[str, Path]:
    """A fresh user nkey: its public key (for the server) and the seed file (for the client)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / f"{name}.nk"
    seed_file.write_bytes(seed + b"\n")
    return nkeys.from_seed(bytearray(seed)).public_key.decode(), seed_file


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _nats_jwt(issuer: Any, subject: str, nats: dict[str, object]) -> str:
    """A NATS v2 JWT of `nats` claims about `subject`, signed by the nkey pair `issuer` (ed25519-nkey)."""
    claims: dict[str, object] = {
        "iat": int(time.time()), "iss": issuer.public_key.decode(), "sub": subject, "name": subject[:8],
        "nats": {**nats, "version": 2},
    }  # fmt: skip
    # The id nsc gives (a hash of the claims); the server checks the signature chain, not this.
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(claims).encode()).digest()).decode()
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def _key(prefix: int) -> Any:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


_NO_LIMITS: dict[str, object] = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1
}  # fmt: skip


def _operator(tmp_path: Path) -> tuple[str, Path, Path]:
    """Decentralised auth as `nsc` sets it up: an operator, a system account, an account with JetStream,
    and a user of it. Returns the server config, the user's .creds file, and a .creds file of a user
    signed by an account the operator never issued."""
    operator, system, account = (
        _key(nkeys.PREFIX_BYTE_OPERATOR),
        _key(nkeys.PREFIX_BYTE_ACCOUNT),
        _key(nkeys.PREFIX_BYTE_ACCOUNT),
    )
    # JetStream for the account the services use; the system account may not have it.
    jetstream = {"disk_storage": -1, "mem_storage": -1, "streams": -1, "consumer": -1}
    accounts = {
        key.public_key.decode(): _nats_jwt(operator, key.public_key.decode(), {"type": "account", "limits": limits})
        for key, limits in ((system, _NO_LIMITS), (account, {**_NO_LIMITS, **jetstream}))
    }
    preload = ", ".join(f'{name}: "{token}"' for name, token in accounts.items())
    operator_jwt = _nats_jwt(operator, operator.public_key.decode(), {"type": "operator"})
    config = (
        f'operator: "{operator_jwt}"\nsystem_account: {system.public_key.decode()}\n'
        f"resolver: MEMORY\nresolver_preload: {{ {preload} }}\n"
    )
    paths = []
    for name, issuer in (("user", account), ("stranger", _key(nkeys.PREFIX_BYTE_ACCOUNT))):
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        user = nkeys.from_seed(bytearray(seed)).public_key.decode()
        token = _nats_jwt(issuer, user, {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
        path = tmp_path / f"{name}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        paths.append(path)
    return config, paths[0], paths[1]


class _Tls(msgspec.Struct, frozen=True):
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _tls_files(tmp_path: Path) -> _Tls:
    """A CA made for this test, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("pricewire-client")
    files = _Tls(*(tmp_path / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


def _tls_conf(files: _Tls, *, verify_clients: bool) -> str:
    lines = [f'cert_file: "{files.server_cert}"', f'key_file: "{files.server_key}"', f'ca_file: "{files.ca}"']
    lines += ["verify: true"] if verify_clients else []
    return "tls {\n  " + "\n  ".join(lines) + "\n}"


async def _round_trip(url: str, auth: NatsAuthSettings) -> bytes:
    """Connect through bus.connect, send a message to ourselves and return what came back."""
    nc = await connect(url, name="auth-test", auth=auth)
    try:
        sub = await nc.subscribe("auth.check")
        await nc.publish("auth.check", b"signed in")
        return (await sub.next_msg(timeout=5)).data
    finally:
        await nc.close()


async def _refusal(url: str, **options: object) -> BaseException:
    """What a plain nats-py client, connecting once with `options`, is refused with."""
    nc = NATS()
    try:
        with pytest.raises((NatsError, OSError)) as caught:
            await nc.connect(servers=[url], allow_reconnect=False, connect_timeout=3, **options)  # type: ignore[arg-type]
    finally:
        # nats-py's close never returns after a failed TLS handshake (its stream never reports closed).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_AFTER_REFUSAL_S):
                await nc.close()
    return caught.value


# --- configuration ---------------------------------------------------------------------------------------------


def test_credentials_are_read_once_and_hide_in_repr(tmp_path: Path) -> None:
    _, seed_file = _nkey_user(tmp_path)
    files = _tls_files(tmp_path)
    users = Settings.from_env({"NATS_USER": USER, "NATS_PASSWORD": PASSWORD, "NATS_TLS_CA_FILE": str(files.ca)})
    assert users.nats_auth.method == "user_password"
    assert users.nats_auth.tls_ca_file == str(files.ca)
    token = Settings.from_env({"NATS_TOKEN": TOKEN}).nats_auth
    nkey = Settings.from_env({"NATS_NKEY_SEED_FILE": str(seed_file)}).nats_auth
    assert (token.method, nkey.method) == ("token", "nkey")
    assert nkey.nkey_seed == seed_file.read_text().strip()
    for shown in (repr(users), repr(token), repr(nkey)):
        assert PASSWORD not in shown and TOKEN not in shown and "SU" not in shown
    assert USER in repr(users)  # a user name is no secret, and says who we sign in as
    mtls = Settings.from_env({"NATS_TLS_CERT_FILE": str(files.client_cert), "NATS_TLS_KEY_FILE": str(files.client_key)})
    assert mtls.nats_auth.tls_cert_file == str(files.client_cert)
    assert Settings.from_env({}).nats_auth == NatsAuthSettings()
    in_url = Settings.from_env({"NATS_URL": f"nats://{USER}:{TOKEN}@127.0.0.1:4222"})  # nats-py reads these too
    assert TOKEN not in repr(in_url)


@pytest.mark.parametrize(
    ("env", "blamed"),
    [
        ({"NATS_USER": USER}, "NATS_PASSWORD"),
        ({"NATS_PASSWORD": PASSWORD}, "NATS_USER"),
        ({"NATS_USER": USER, "NATS_PASSWORD": PASSWORD, "NATS_TOKEN": TOKEN}, "NATS_TOKEN"),
        ({"NATS_NKEY_SEED_FILE": "{tmp}/missing.nk"}, "NATS_NKEY_SEED_FILE"),
        ({"NATS_NKEY_SEED_FILE": "{tmp}/ca.pem"}, "NATS_NKEY_SEED_FILE"),
        ({"NATS_CREDS_FILE": "{tmp}/missing.creds"}, "NATS_CREDS_FILE"),
        ({"NATS_CREDS_FILE": "{tmp}/ca.pem"}, "NATS_CREDS_FILE"),
        ({"NATS_TLS_CA_FILE": "{tmp}/missing.pem"}, "NATS_TLS_CA_FILE"),
        ({"NATS_TLS_CA_FILE": "{tmp}/client.key"}, "NATS_TLS_CA_FILE"),
        ({"NATS_TLS_CERT_FILE": "{tmp}/client.pem"}, "NATS_TLS_KEY_FILE"),
        ({"NATS_TLS_KEY_FILE": "{tmp}/client.key"}, "NATS_TLS_CERT_FILE"),
        ({"NATS_TLS_CERT_FILE": "{tmp}/client.pem", "NATS_TLS_KEY_FILE": "{tmp}/server.key"}, "NATS_TLS_CERT_FILE"),
    ],
)
def test_a_bad_credential_setting_fails_at_start_naming_its_variable(
    env: dict[str, str], blamed: str, tmp_path: Path
) -> None:
    _tls_files(tmp_path)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value.format(tmp=tmp_path) for name, value in env.items()})
    assert err.value.name == blamed


# --- sign-in against a real server -----------------------------------------------------------------------------


async def test_a_client_without_credentials_is_refused(tmp_path: Path) -> None:
    with secured_nats(tmp_path / "nats", USERS_CONF) as server:
        for options in ({}, {"user": USER, "password": "wrong"}, {"token": TOKEN}):
            refusal = await _refusal(server.url, **options)
            assert "Authorization Violation" in str(refusal), options
        # A service gives up at once, with a typed error, instead of retrying a refusal forever.
        with pytest.raises(NatsAccessRefused) as refused:
            await asyncio.wait_for(connect(server.url, name="stranger"), timeout=10)
        assert "Authorization Violation" in str(refused.value.cause)
        assert await _round_trip(server.url, NatsAuthSettings(user=USER, password=PASSWORD)) == b"signed in"


async def test_a_token_signs_in_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    with secured_nats(tmp_path / "nats", TOKEN_CONF) as server:
        assert await _round_trip(server.url, NatsAuthSettings(token=TOKEN)) == b"signed in"
        with pytest.raises(NatsAccessRefused):
            await asyncio.wait_for(connect(server.url, name="stranger", auth=NatsAuthSettings(token="nope")), 10)


async def test_an_nkey_signs_in_and_another_key_is_refused(tmp_path: Path) -> None:
    public_key, seed_file = _nkey_user(tmp_path)
    _, other_seed = _nkey_user(tmp_path, "other")
    conf = f'authorization {{ users = [ {{ nkey: "{public_key}" }} ] }}'
    with secured_nats(tmp_path / "nats", conf) as server:
        auth = Settings.from_env({"NATS_NKEY_SEED_FILE": str(seed_file)}).nats_auth
        assert await _round_trip(server.url, auth) == b"signed in"
        stranger = Settings.from_env({"NATS_NKEY_SEED_FILE": str(other_seed)}).nats_auth
        with pytest.raises(NatsAccessRefused):
            await asyncio.wait_for(connect(server.url, name="stranger", auth=stranger), timeout=10)


async def test_a_creds_file_signs_in_and_one_from_an_unknown_account_is_refused(tmp_path: Path) -> None:
    config, creds, strangers = _operator(tmp_path)
    with secured_nats(tmp_path / "nats", config) as server:
        auth = Settings.from_env({"NATS_CREDS_FILE": str(creds)}).nats_auth
        assert auth.method == "creds"
        assert await _round_trip(server.url, auth) == b"signed in"
        for stranger in (NatsAuthSettings(), Settings.from_env({"NATS_CREDS_FILE": str(strangers)}).nats_auth):
            with pytest.raises(NatsAccessRefused):
                await asyncio.wait_for(connect(server.url, name="stranger", auth=stranger), timeout=10)


async def test_tls_with_our_ca_connects_and_a_client_that_does_not_trust_it_is_refused(tmp_path: Path) -> None:
    files = _tls_files(tmp_path)
    with secured_nats(tmp_path / "nats", _tls_conf(files, verify_clients=False), scheme="tls") as server:
        assert await _round_trip(server.url, NatsAuthSettings(tls_ca_file=str(files.ca))) == b"signed in"
        # The system's CAs do not know ours: the server's certificate fails verification.
        with pytest.raises(NatsAccessRefused) as refused:
            await asyncio.wait_for(connect(server.url, name="stranger"), timeout=10)
        assert isinstance(refused.value.cause, ssl.SSLCertVerificationError)
        # Any client that trusts only the system's CAs, even one dialling nats:// (the server asks for TLS).
        plain = server.url.replace("tls://", "nats://")
        assert isinstance(await _refusal(plain), ssl.SSLCertVerificationError)


async def test_a_server_that_verifies_clients_takes_our_certificate_and_refuses_none(tmp_path: Path) -> None:
    files = _tls_files(tmp_path)
    with secured_nats(tmp_path / "nats", _tls_conf(files, verify_clients=True), scheme="tls") as server:
        env = {
            "NATS_TLS_CA_FILE": str(files.ca),
            "NATS_TLS_CERT_FILE": str(files.client_cert),
            "NATS_TLS_KEY_FILE": str(files.client_key),
        }
        assert await _round_trip(server.url, Settings.from_env(env).nats_auth) == b"signed in"
        no_cert = ssl.create_default_context(cafile=str(files.ca))
        refusal = await _refusal(server.url, tls=no_cert)
        assert isinstance(refusal, ssl.SSLError | ConnectionError), refusal  # not a timeout: a refusal
        with pytest.raises(NatsAccessRefused):
            auth = NatsAuthSettings(tls_ca_file=str(files.ca))
            await asyncio.wait_for(connect(server.url, name="no-certificate", auth=auth), timeout=10)


# --- every service as its own process, signed in ---------------------------------------------------------------


class _Priced(msgspec.Struct):
    symbol: str


class _Prices(msgspec.Struct):
    prices: list[_Priced]


SERVICES = ("pricewire_collector", "pricewire_validator", "pricewire_cache_writer", "pricewire_gateway")


def _settings(nats_url: str, redis_url: str, database_url: str) -> Settings:
    return replace(
        Settings(),
        nats_url=nats_url,
        redis_url=redis_url,
        database_url=database_url,
        sim=SimSettings(rate=200.0, seed=7, venues=3, outlier_probability=0.0, quiet_rate=0.0),
        validator=replace(ValidatorSettings(), heartbeat_s=1.0),
    )


async def _first_price(url: str, auth: NatsAuthSettings, started: list[ServiceProcess]) -> str:
    """Start the processes, then the asset of the first consensus price NATS carries."""
    nc = await connect(url, name="auth-watch", auth=auth)
    try:
        sub = await nc.subscribe(subjects.ALL_PRICES)
        for process in started:
            process.start()
        return decode_price((await sub.next_msg(timeout=60)).data).asset
    finally:
        await nc.close()


@pytest.mark.slow
async def test_every_service_works_signed_in_with_user_and_password(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    with secured_nats(tmp_path / "nats", USERS_CONF) as server:
        settings = _settings(server.url, redis_url, database_url)
        port = free_port()
        env = {
            **service_env(settings),
            "NATS_USER": USER,
            "NATS_PASSWORD": PASSWORD,
            "PRICEWIRE_GATEWAY_PORT": str(port),
        }
        with contextlib.ExitStack() as stack:
            processes = [stack.enter_context(ServiceProcess(m, env, tmp_path / f"{m}.log")) for m in SERVICES]
            auth = NatsAuthSettings(user=USER, password=PASSWORD)
            assert await _first_price(server.url, auth, processes) in settings.assets

            async def priced() -> set[str]:
                async with aiohttp.ClientSession() as http:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/api/v1/prices") as answer:
                            body = await answer.read()
                    except aiohttp.ClientConnectionError:
                        return set()  # the gateway is not listening yet
                return {price.symbol for price in msgspec.json.decode(body, type=_Prices).prices}

            # The gateway serves what the cache_writer projected from the validator's prices of the collector's ticks.
            await eventually(priced, bool, timeout=60, what="prices served by the gateway")
            for process in processes:
                assert await process.logged("nats_connected") >= 1, process.module
                assert await process.logged("nats_access_refused") == 0, process.module


@pytest.mark.slow
async def test_collector_and_validator_work_signed_in_with_an_nkey(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    public_key, seed_file = _nkey_user(tmp_path)
    with secured_nats(tmp_path / "nats", f'authorization {{ users = [ {{ nkey: "{public_key}" }} ] }}') as server:
        env = {**service_env(_settings(server.url, redis_url, database_url)), "NATS_NKEY_SEED_FILE": str(seed_file)}
        with contextlib.ExitStack() as stack:
            processes = [stack.enter_context(ServiceProcess(m, env, tmp_path / f"{m}.log")) for m in SERVICES[:2]]
            auth = Settings.from_env({"NATS_NKEY_SEED_FILE": str(seed_file)}).nats_auth
            assert await _first_price(server.url, auth, processes)
            for process in processes:
                assert process.terminate() == 0


@pytest.mark.slow
async def test_collector_and_validator_work_signed_in_with_a_creds_file(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    config, creds, _ = _operator(tmp_path)
    with secured_nats(tmp_path / "nats", config) as server:
        env = {**service_env(_settings(server.url, redis_url, database_url)), "NATS_CREDS_FILE": str(creds)}
        with contextlib.ExitStack() as stack:
            processes = [stack.enter_context(ServiceProcess(m, env, tmp_path / f"{m}.log")) for m in SERVICES[:2]]
            auth = Settings.from_env({"NATS_CREDS_FILE": str(creds)}).nats_auth
            assert await _first_price(server.url, auth, processes)


@pytest.mark.slow
async def test_collector_and_validator_work_over_tls_with_our_ca(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    files = _tls_files(tmp_path)
    conf = f"{_tls_conf(files, verify_clients=True)}\n{USERS_CONF}"
    with secured_nats(tmp_path / "nats", conf, scheme="tls") as server:
        tls_env = {
            "NATS_TLS_CA_FILE": str(files.ca),
            "NATS_TLS_CERT_FILE": str(files.client_cert),
            "NATS_TLS_KEY_FILE": str(files.client_key),
            "NATS_USER": USER,
            "NATS_PASSWORD": PASSWORD,
        }
        env = {**service_env(_settings(server.url, redis_url, database_url)), **tls_env}
        with contextlib.ExitStack() as stack:
            processes = [stack.enter_context(ServiceProcess(m, env, tmp_path / f"{m}.log")) for m in SERVICES[:2]]
            assert await _first_price(server.url, Settings.from_env(tls_env).nats_auth, processes)


@pytest.mark.slow
async def test_a_service_with_the_wrong_password_exits_at_start(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    with secured_nats(tmp_path / "nats", USERS_CONF) as server:
        env = {**service_env(_settings(server.url, redis_url, database_url)), "NATS_USER": USER, "NATS_PASSWORD": "no"}
        with ServiceProcess("pricewire_validator", env, tmp_path / "validator.log") as process:
            process.start()
            assert process.process is not None
            code = await asyncio.to_thread(process.process.wait, 30)
        assert code != 0
        assert await process.logged("nats_access_refused") == 1
