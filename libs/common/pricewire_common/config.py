"""Settings, read from the environment once, at start, into frozen objects passed down.

No other module reads the environment. A malformed value fails at start with ConfigError.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pricewire_common.errors import ConfigError

T = TypeVar("T")
LogFormat = Literal["json", "console", "auto"]
ConsensusMethod = Literal["weighted_median", "median", "mean", "vwap"]
CONSENSUS_METHODS: tuple[ConsensusMethod, ...] = ("weighted_median", "median", "mean", "vwap")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/pricewire"
DEFAULT_ASSETS = ("BTC", "ETH", "SOL", "ADA", "DOT")
DEFAULT_USD_QUOTES = ("USD", "USDT", "USDC")
FEEDS = ("sim", "live", "replay:<file>")
DEFAULT_RETENTION_S: int | None = 90 * 86_400
DEFAULT_METRICS_PORT: int | None = 9100
LIVE_SOURCES = ("binance", "coinbase", "kraken", "coingecko", "ccxt")


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings:
    """Retention of the JetStream streams (the event log)."""

    ticks_max_age_s: float = 24 * 3600
    prices_max_age_s: float = 7 * 24 * 3600
    dead_letters_max_age_s: float = 7 * 24 * 3600
    max_bytes: int = -1
    duplicate_window_s: float = 120.0
    replicas: int = 1
    ack_wait_s: float = 10.0
    """How long a consumer's delivered, unacked message waits before redelivery (after a crash, say)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSettings:
    """The simulated feed."""

    rate: float = 20.0
    """Ticks per second, all venues and assets together."""
    seed: int | None = None
    venues: int = 3
    outlier_probability: float = 0.01
    quiet_rate: float = 0.005
    """Quiet spells (20-60 s) a venue starts per second, on average: 0.005 is one every 200 s."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveSettings:
    """The live venues: where they are, and how hard we may press them."""

    sources: tuple[str, ...] = LIVE_SOURCES
    binance_ws_url: str = "wss://stream.binance.com:9443"
    binance_rest_url: str = "https://api.binance.com"
    coinbase_ws_url: str = "wss://ws-feed.exchange.coinbase.com"
    coinbase_rest_url: str = "https://api.exchange.coinbase.com"
    kraken_ws_url: str = "wss://ws.kraken.com/v2"
    kraken_rest_url: str = "https://api.kraken.com"
    coingecko_rest_url: str = "https://api.coingecko.com/api/v3"
    ccxt_exchanges: tuple[str, ...] = ("bitstamp",)
    ccxt_api_url: str | None = None
    """Overrides every ccxt exchange's REST base URL (a proxy, a testnet, a test's fake venue)."""
    watchdog_s: float = 30.0
    """A stream with no frame (data or heartbeat) for this long is reconnected."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    breaker_failures: int = 5
    breaker_reset_s: float = 60.0
    max_connection_age_s: float = 23.5 * 3600
    """Binance closes a connection after 24 h: a new one is opened before that, with no gap."""
    binance_weight_per_min: int = 6000
    coingecko_calls_per_min: int = 30
    coingecko_poll_s: float = 15.0
    ccxt_poll_s: float = 10.0
    replay_speed: float = 1.0
    """Replay at recorded speed (1), faster (>1), or as fast as possible (0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatorSettings:
    """The consensus rule, its publish policy, and how replicas share the assets."""

    max_age_s: float = 30.0
    """A streamed quote (WebSocket) older than this is stale."""
    max_age_poll_s: float = 120.0
    """A polled quote (REST: CoinGecko, ccxt, a stream's REST fallback) older than this is stale."""
    outlier_pct: Decimal = Decimal(5)
    """A quote further than this from the median of the fresh quotes, in %, is an outlier."""
    mad_k: float = 5.0
    """...or further than `mad_k` robust standard deviations (1.4826 x MAD) with 3 quotes or more..."""
    mad_min_pct: Decimal = Decimal(1)
    """...and further than this, in %: venues agreeing to a hair do not make a 0.1 % quote an outlier."""
    jump_pct: Decimal = Decimal(20)
    """A venue's quote that moved more than this, in %, from its previous one is held out once (`jump`)."""
    method: ConsensusMethod = "weighted_median"
    spread_ref_bps: float = 10.0
    """A quote with a bid-ask spread of this many bps weighs half as much as one with no spread."""
    aggregators: tuple[str, ...] = ("coingecko",)
    """Sources whose 24h volume is the whole market's: it neither weighs their quote nor adds to `volume_24h`."""
    min_sources: int = 2
    deviation_bps: float = 1.0
    """A new consensus is published when it moved at least this much (bps) since the last one published..."""
    heartbeat_s: float = 5.0
    """...or when the status or the admitted venues changed, or this long after the last one."""
    anomaly_window: int = 20
    """Consensus prices per asset the rolling z-score looks back over."""
    anomaly_z: float = 3.0
    """A consensus price with |z| above this is flagged `anomaly`."""
    partitions: int = 1
    """Assets are split into this many partitions; each is decided by one replica at a time."""
    lease_s: float = 10.0
    """A replica holds a partition this long without renewing it before another may take it over."""
    gather_s: float = 0.0005
    """How long ticks may gather on the server between two polls of the validator's consumer, when the last
    poll came back short (0: keep a request open, decide each batch as it lands). Each batch costs a decision
    per asset touched, an ack and a write (README, Speed); the price is up to this much more for a tick."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """The Redis and PostgreSQL projections."""

    price_ttl_s: int = 60
    batch_size: int = 500
    batch_wait_s: float = 0.2
    timescaledb: bool = True
    """Use TimescaleDB when its extension can be created (`auto`); `off` keeps plain PostgreSQL."""
    compress_after_s: int = 7 * 86_400
    """TimescaleDB: chunks of ticks and prices older than this are compressed."""
    retention_s: int | None = DEFAULT_RETENTION_S
    """TimescaleDB: chunks older than this are dropped; None (`0` in the environment) keeps every row."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    """The HTTP/WebSocket front door."""

    host: str = "0.0.0.0"  # a service in a container listens on every interface
    port: int = 8000
    ws_max_frame_bytes: int = 64 * 1024
    """Largest client WebSocket frame; a bigger one closes that connection with 1009."""
    ws_max_messages_per_s: float = 20.0
    """Client frames per second a connection may send (bursts up to one second's worth); more closes it with 1008."""
    ws_max_subscriptions: int = 64
    """Assets one connection may follow by `subscribe`; a frame that would go past it is refused."""
    ws_slow_client_s: float = 10.0
    """How long a client may leave one frame unread (its pipe full) before it is closed as too slow."""
    sse_heartbeat_s: float = 15.0
    """Quiet time after which `GET /api/v1/stream` sends a comment, so proxies keep the stream open."""
    public_prices: bool = True
    """Price reads (REST prices, history, ticks, quality, the SSE stream, WebSocket price frames) need no token;
    False: they need a valid bearer token (a JWT key must then be configured)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """OpenTelemetry traces: off unless an OTLP endpoint is given."""

    otlp_endpoint: str | None = None
    """OTEL_EXPORTER_OTLP_ENDPOINT: the collector's OTLP/HTTP base URL (spans go to `<it>/v1/traces`)."""
    service_name: str | None = None
    """OTEL_SERVICE_NAME; default `pricewire-<service>`."""
    sample_ratio: float = 0.01
    """PRICEWIRE_TRACE_SAMPLE_RATIO: the share of venue frames traced; what follows a frame follows its choice."""


NatsAuthMethod = Literal["none", "user_password", "token", "nkey", "creds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsAuthSettings:
    """How a service signs in to NATS (at most one way) and checks the server over TLS.

    TLS is used when the URL is `tls://`, when the server requires it, or when a CA or client certificate is given.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed: str | None = field(default=None, repr=False)
    """The user nkey seed (`SU...`), read from NATS_NKEY_SEED_FILE."""
    creds: str | None = field(default=None, repr=False)
    """A .creds file's text (user JWT and seed), read from NATS_CREDS_FILE."""
    tls_ca_file: str | None = None
    """PEM of the CAs the server's certificate must chain to; None: the system's."""
    tls_cert_file: str | None = None
    """Client certificate (PEM), for a server that verifies clients; with tls_key_file."""
    tls_key_file: str | None = None

    @property
    def method(self) -> NatsAuthMethod:
        if self.user is not None:
            return "user_password"
        if self.token is not None:
            return "token"
        if self.nkey_seed is not None:
            return "nkey"
        return "creds" if self.creds is not None else "none"


JwtAlgorithm = Literal["HS256", "RS256"]
MIN_JWT_SECRET_BYTES = 32
"""RFC 7518 3.2: an HS256 key at least as long as the hash (256 bits)."""
MAX_JWT_LEEWAY_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """Bearer tokens for per-user data: HS256 with a shared secret, or RS256 with a public key.

    The algorithm follows from which key is configured and is pinned: a token's own `alg` header never
    chooses it. With neither key, per-user endpoints answer 401 saying auth is not configured.
    """

    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    """PEM text of the RS256 public key (read from PRICEWIRE_JWT_PUBLIC_KEY_FILE)."""
    leeway_s: float = 30.0
    """Clock skew allowed on `exp`/`iat`/`nbf`; at most MAX_JWT_LEEWAY_S."""
    token_ttl_s: float = 24 * 3600.0
    """Lifetime of a token minted by `pricewire token`."""

    @property
    def algorithm(self) -> JwtAlgorithm | None:
        if self.jwt_public_key is not None:
            return "RS256"
        return "HS256" if self.jwt_secret is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertSettings:
    """Price alerts: re-arming, and webhook delivery."""

    hysteresis_pct: Decimal = Decimal("0.5")
    """A fired alert re-arms only once the price is back this far (in %) past its threshold."""
    webhook_timeout_s: float = 5.0
    webhook_attempts: int = 5
    webhook_backoff_s: float = 0.5
    """First delay between webhook attempts; doubled each time up to webhook_backoff_max_s."""
    webhook_backoff_max_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a Pricewire service is configured with."""

    nats_url: str = field(default=DEFAULT_NATS_URL, repr=False)
    """May carry `user:password@` (nats-py reads it): out of repr, logged through `redact_url`."""
    nats_auth: NatsAuthSettings = field(default_factory=NatsAuthSettings)
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    assets: tuple[str, ...] = DEFAULT_ASSETS
    usd_quotes: tuple[str, ...] = DEFAULT_USD_QUOTES
    log_level: str = "info"
    log_format: LogFormat = "auto"
    feed: str = "sim"
    """Which collector feed runs: `sim` for now; live venues come with their connectors."""
    metrics_port: int | None = None
    """The ops port (/metrics, /healthz, /readyz) of collector, validator and cache_writer; 0: any free port;
    None: none. PRICEWIRE_METRICS_PORT, default 9100 (`off` for none); the gateway serves them on its own port."""
    streams: StreamSettings = field(default_factory=StreamSettings)
    sim: SimSettings = field(default_factory=SimSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    validator: ValidatorSettings = field(default_factory=ValidatorSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    clock_offset_s: float = 0.0
    """Added to the service's wall clock: fault injection (a host whose clock is off), 0 in production."""

    @property
    def database_url_redacted(self) -> str:
        return redact_url(self.database_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from `environ` (default: the process environment)."""
        env = _Env(os.environ if environ is None else environ)
        return cls(
            nats_url=env.get("NATS_URL", str, DEFAULT_NATS_URL),
            nats_auth=_nats_auth(env),
            redis_url=env.get("REDIS_URL", str, DEFAULT_REDIS_URL),
            database_url=env.get("DATABASE_URL", str, DEFAULT_DATABASE_URL),
            assets=env.get("PRICEWIRE_ASSETS", _codes, DEFAULT_ASSETS),
            usd_quotes=env.get("PRICEWIRE_USD_QUOTES", _codes, DEFAULT_USD_QUOTES),
            log_level=env.get("PRICEWIRE_LOG_LEVEL", _log_level, "info"),
            clock_offset_s=env.get("PRICEWIRE_CLOCK_OFFSET_S", _finite_float, 0.0),
            log_format=env.get("PRICEWIRE_LOG_FORMAT", _log_format, "auto"),
            feed=env.get("PRICEWIRE_FEED", _feed, "sim"),
            metrics_port=env.get("PRICEWIRE_METRICS_PORT", _port_or_off, DEFAULT_METRICS_PORT),
            streams=StreamSettings(
                ticks_max_age_s=env.get("PRICEWIRE_TICKS_MAX_AGE_S", _positive_float, 24 * 3600.0),
                prices_max_age_s=env.get("PRICEWIRE_PRICES_MAX_AGE_S", _positive_float, 7 * 24 * 3600.0),
                dead_letters_max_age_s=env.get("PRICEWIRE_DLQ_MAX_AGE_S", _positive_float, 7 * 24 * 3600.0),
                max_bytes=env.get("PRICEWIRE_STREAM_MAX_BYTES", int, -1),
                duplicate_window_s=env.get("PRICEWIRE_DUPLICATE_WINDOW_S", _positive_float, 120.0),
                replicas=env.get("PRICEWIRE_STREAM_REPLICAS", _positive_int, 1),
                ack_wait_s=env.get("PRICEWIRE_ACK_WAIT_S", _positive_float, 10.0),
            ),
            sim=SimSettings(
                rate=env.get("PRICEWIRE_SIM_RATE", _positive_float, 20.0),
                seed=env.get("PRICEWIRE_SIM_SEED", int, None),
                venues=env.get("PRICEWIRE_SIM_VENUES", _positive_int, 3),
                outlier_probability=env.get("PRICEWIRE_SIM_OUTLIER_P", _probability, 0.01),
                quiet_rate=env.get("PRICEWIRE_SIM_QUIET_RATE", _non_negative_float, 0.005),
            ),
            live=LiveSettings(
                sources=env.get("PRICEWIRE_SOURCES", _sources, LIVE_SOURCES),
                binance_ws_url=env.get("PRICEWIRE_BINANCE_WS_URL", _url, "wss://stream.binance.com:9443"),
                binance_rest_url=env.get("PRICEWIRE_BINANCE_REST_URL", _url, "https://api.binance.com"),
                coinbase_ws_url=env.get("PRICEWIRE_COINBASE_WS_URL", _url, "wss://ws-feed.exchange.coinbase.com"),
                kraken_ws_url=env.get("PRICEWIRE_KRAKEN_WS_URL", _url, "wss://ws.kraken.com/v2"),
                coinbase_rest_url=env.get("PRICEWIRE_COINBASE_REST_URL", _url, "https://api.exchange.coinbase.com"),
                kraken_rest_url=env.get("PRICEWIRE_KRAKEN_REST_URL", _url, "https://api.kraken.com"),
                coingecko_rest_url=env.get("PRICEWIRE_COINGECKO_REST_URL", _url, "https://api.coingecko.com/api/v3"),
                ccxt_exchanges=env.get("PRICEWIRE_CCXT_EXCHANGES", _ccxt_exchanges, ("bitstamp",)),
                ccxt_api_url=env.get("PRICEWIRE_CCXT_API_URL", _url, None),
                watchdog_s=env.get("PRICEWIRE_WATCHDOG_S", _positive_float, 30.0),
                backoff_initial_s=env.get("PRICEWIRE_BACKOFF_INITIAL_S", _positive_float, 0.5),
                backoff_max_s=env.get("PRICEWIRE_BACKOFF_MAX_S", _positive_float, 30.0),
                breaker_failures=env.get("PRICEWIRE_BREAKER_FAILURES", _positive_int, 5),
                breaker_reset_s=env.get("PRICEWIRE_BREAKER_RESET_S", _positive_float, 60.0),
                max_connection_age_s=env.get("PRICEWIRE_MAX_CONNECTION_AGE_S", _positive_float, 23.5 * 3600),
                binance_weight_per_min=env.get("PRICEWIRE_BINANCE_WEIGHT_PER_MIN", _positive_int, 6000),
                coingecko_calls_per_min=env.get("PRICEWIRE_COINGECKO_CALLS_PER_MIN", _positive_int, 30),
                coingecko_poll_s=env.get("PRICEWIRE_COINGECKO_POLL_S", _positive_float, 15.0),
                ccxt_poll_s=env.get("PRICEWIRE_CCXT_POLL_S", _positive_float, 10.0),
                replay_speed=env.get("PRICEWIRE_REPLAY_SPEED", _non_negative_float, 1.0),
            ),
            validator=ValidatorSettings(
                max_age_s=env.get("PRICEWIRE_MAX_AGE_S", _positive_float, 30.0),
                max_age_poll_s=env.get("PRICEWIRE_MAX_AGE_POLL_S", _positive_float, 120.0),
                outlier_pct=env.get("PRICEWIRE_OUTLIER_PCT", _positive_decimal, Decimal(5)),
                mad_k=env.get("PRICEWIRE_OUTLIER_MAD_K", _positive_float, 5.0),
                mad_min_pct=env.get("PRICEWIRE_OUTLIER_MAD_MIN_PCT", _non_negative_decimal, Decimal(1)),
                jump_pct=env.get("PRICEWIRE_JUMP_PCT", _positive_decimal, Decimal(20)),
                method=env.get("PRICEWIRE_CONSENSUS_METHOD", _method, "weighted_median"),
                spread_ref_bps=env.get("PRICEWIRE_SPREAD_REF_BPS", _positive_float, 10.0),
                aggregators=env.get("PRICEWIRE_AGGREGATOR_SOURCES", _names_or_none, ("coingecko",)),
                min_sources=env.get("PRICEWIRE_MIN_SOURCES", _positive_int, 2),
                deviation_bps=env.get("PRICEWIRE_DEVIATION_BPS", _non_negative_float, 1.0),
                heartbeat_s=env.get("PRICEWIRE_HEARTBEAT_S", _positive_float, 5.0),
                anomaly_window=env.get("PRICEWIRE_ANOMALY_WINDOW", _anomaly_window, 20),
                anomaly_z=env.get("PRICEWIRE_ANOMALY_Z", _positive_float, 3.0),
                partitions=env.get("PRICEWIRE_VALIDATOR_PARTITIONS", _positive_int, 1),
                lease_s=env.get("PRICEWIRE_VALIDATOR_LEASE_S", _positive_float, 10.0),
                gather_s=env.get("PRICEWIRE_VALIDATOR_GATHER_S", _non_negative_float, 0.0005),
            ),
            cache=CacheSettings(
                price_ttl_s=env.get("PRICEWIRE_PRICE_TTL_S", _positive_int, 60),
                batch_size=env.get("PRICEWIRE_DB_BATCH", _positive_int, 500),
                batch_wait_s=env.get("PRICEWIRE_DB_BATCH_WAIT_S", _positive_float, 0.2),
                timescaledb=env.get("PRICEWIRE_TIMESCALEDB", _auto_or_off, True),
                compress_after_s=env.get("PRICEWIRE_COMPRESS_AFTER_S", _positive_int, 7 * 86_400),
                retention_s=env.get("PRICEWIRE_RETENTION_S", _seconds_or_forever, DEFAULT_RETENTION_S),
            ),
            gateway=_gateway(env),
            auth=_auth(env),
            tracing=TracingSettings(
                otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", _url, None),
                service_name=env.get("OTEL_SERVICE_NAME", str, None),
                sample_ratio=env.get("PRICEWIRE_TRACE_SAMPLE_RATIO", _probability, 0.01),
            ),
            alerts=AlertSettings(
                hysteresis_pct=env.get("PRICEWIRE_ALERT_HYSTERESIS_PCT", _non_negative_decimal, Decimal("0.5")),
                webhook_timeout_s=env.get("PRICEWIRE_WEBHOOK_TIMEOUT_S", _positive_float, 5.0),
                webhook_attempts=env.get("PRICEWIRE_WEBHOOK_ATTEMPTS", _positive_int, 5),
                webhook_backoff_s=env.get("PRICEWIRE_WEBHOOK_BACKOFF_S", _positive_float, 0.5),
                webhook_backoff_max_s=env.get("PRICEWIRE_WEBHOOK_BACKOFF_MAX_S", _positive_float, 30.0),
            ),
        )


def _gateway(env: _Env) -> GatewaySettings:
    public_prices = env.get("PRICEWIRE_PUBLIC_PRICES", _boolean, True)
    keyed = any(env.get(name, str, None) for name in ("PRICEWIRE_JWT_SECRET", "PRICEWIRE_JWT_PUBLIC_KEY_FILE"))
    if not public_prices and not keyed:
        # Not a gateway that answers every price read with 401: the operator meant to give a key.
        raise ConfigError(
            "PRICEWIRE_PUBLIC_PRICES", "false needs tokens: set PRICEWIRE_JWT_SECRET or PRICEWIRE_JWT_PUBLIC_KEY_FILE"
        )
    return GatewaySettings(
        host=env.get("PRICEWIRE_GATEWAY_HOST", str, "0.0.0.0"),
        port=env.get("PRICEWIRE_GATEWAY_PORT", _port, 8000),
        ws_max_frame_bytes=env.get("PRICEWIRE_WS_MAX_FRAME_BYTES", _positive_int, 64 * 1024),
        ws_max_messages_per_s=env.get("PRICEWIRE_WS_MAX_MESSAGES_PER_S", _positive_float, 20.0),
        ws_max_subscriptions=env.get("PRICEWIRE_WS_MAX_SUBSCRIPTIONS", _positive_int, 64),
        ws_slow_client_s=env.get("PRICEWIRE_WS_SLOW_CLIENT_S", _positive_float, 10.0),
        sse_heartbeat_s=env.get("PRICEWIRE_SSE_HEARTBEAT_S", _positive_float, 15.0),
        public_prices=public_prices,
    )


def _boolean(raw: str) -> bool:
    """The gateway's switches: true/false (also 1/0, yes/no, on/off), any case."""
    value = raw.lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _nats_auth(env: _Env) -> NatsAuthSettings:
    user = env.get("NATS_USER", str, None)
    password = env.get("NATS_PASSWORD", str, None)
    if (user is None) != (password is None):
        missing = "NATS_PASSWORD" if password is None else "NATS_USER"
        raise ConfigError(missing, "NATS_USER and NATS_PASSWORD go together")
    ways = {
        "NATS_USER": user,
        "NATS_TOKEN": env.get("NATS_TOKEN", str, None),
        "NATS_NKEY_SEED_FILE": env.get("NATS_NKEY_SEED_FILE", _nkey_seed_file, None),
        "NATS_CREDS_FILE": env.get("NATS_CREDS_FILE", _creds_file, None),
    }
    given = [name for name, value in ways.items() if value is not None]
    if len(given) > 1:
        raise ConfigError(given[1], f"set one way to sign in to NATS, not {' and '.join(given)}")
    cert = env.get("NATS_TLS_CERT_FILE", _pem_text_file, None)
    key = env.get("NATS_TLS_KEY_FILE", _pem_text_file, None)
    if (cert is None) != (key is None):
        missing = "NATS_TLS_KEY_FILE" if key is None else "NATS_TLS_CERT_FILE"
        raise ConfigError(missing, "a client certificate and its key go together")
    if cert is not None and key is not None:
        try:
            ssl.create_default_context().load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigError("NATS_TLS_CERT_FILE", f"cannot use it with NATS_TLS_KEY_FILE: {exc}") from exc
    return NatsAuthSettings(
        user=user,
        password=password,
        token=ways["NATS_TOKEN"],
        nkey_seed=ways["NATS_NKEY_SEED_FILE"],
        creds=ways["NATS_CREDS_FILE"],
        tls_ca_file=env.get("NATS_TLS_CA_FILE", _ca_file, None),
        tls_cert_file=cert,
        tls_key_file=key,
    )


def _auth(env: _Env) -> AuthSettings:
    secret = env.get("PRICEWIRE_JWT_SECRET", _jwt_secret, None)
    public_key = env.get("PRICEWIRE_JWT_PUBLIC_KEY_FILE", _pem_file, None)
    if secret is not None and public_key is not None:
        raise ConfigError("PRICEWIRE_JWT_SECRET", "set it or PRICEWIRE_JWT_PUBLIC_KEY_FILE, not both: one algorithm")
    return AuthSettings(
        jwt_secret=secret,
        jwt_public_key=public_key,
        leeway_s=env.get("PRICEWIRE_JWT_LEEWAY_S", _jwt_leeway, 30.0),
        token_ttl_s=env.get("PRICEWIRE_TOKEN_TTL_S", _positive_float, 24 * 3600.0),
    )


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, InvalidOperation) as exc:
            raise ConfigError(name, f"cannot use {raw!r}: {exc}") from exc


def _codes(raw: str) -> tuple[str, ...]:
    codes = tuple(dict.fromkeys(c.strip().upper() for c in raw.split(",") if c.strip()))
    if not codes:
        raise ValueError("expected a comma-separated list such as BTC,ETH")
    for code in codes:
        if not code.isalnum():
            raise ValueError(f"{code!r} is not an alphanumeric code")
    return codes


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _finite_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError("must be a number >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _anomaly_window(raw: str) -> int:
    value = int(raw)
    if value < 2:
        raise ValueError("must be at least 2: a z-score needs a spread")
    return value


def _positive_decimal(raw: str) -> Decimal:
    value = Decimal(raw)
    if not value.is_finite() or value <= 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_decimal(raw: str) -> Decimal:
    value = Decimal(raw)
    if not value.is_finite() or value < 0:
        raise ValueError("must be a number >= 0")
    return value


def _method(raw: str) -> ConsensusMethod:
    for method in CONSENSUS_METHODS:
        if raw == method:
            return method
    raise ValueError(f"must be one of {', '.join(CONSENSUS_METHODS)}")


def _auto_or_off(raw: str) -> bool:
    if raw in ("auto", "off"):
        return raw == "auto"
    raise ValueError("must be auto or off")


def _seconds_or_forever(raw: str) -> int | None:
    value = int(raw)
    if value < 0:
        raise ValueError("must be a number of seconds, or 0 for no limit")
    return value or None


def _jwt_secret(raw: str) -> str:
    if len(raw.encode()) < MIN_JWT_SECRET_BYTES:
        raise ValueError(f"an HS256 secret needs at least {MIN_JWT_SECRET_BYTES} bytes")
    return raw


def _pem_file(raw: str) -> str:
    try:
        with open(raw, encoding="ascii") as pem:
            text = pem.read()
    except OSError as exc:
        raise ValueError(str(exc)) from exc
    if "-----BEGIN PUBLIC KEY-----" not in text:
        raise ValueError("not a PEM public key (-----BEGIN PUBLIC KEY-----)")
    return text


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc


def _nkey_seed_file(raw: str) -> str:
    seed = _read_text(raw).strip()
    if not seed.startswith("SU"):
        raise ValueError("not a user nkey seed (SU...)")
    return seed


def _creds_file(raw: str) -> str:
    text = _read_text(raw)
    if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
        raise ValueError("not a NATS .creds file (a user JWT and its nkey seed)")
    return text


def _pem_text_file(raw: str) -> str:
    if "-----BEGIN " not in _read_text(raw):
        raise ValueError("not a PEM file")
    return raw


def _ca_file(raw: str) -> str:
    _pem_text_file(raw)
    try:
        ssl.create_default_context(cafile=raw)
    except ssl.SSLError as exc:
        raise ValueError(f"no CA certificate in it: {exc}") from exc
    return raw


def _jwt_leeway(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= MAX_JWT_LEEWAY_S:
        raise ValueError(f"must be between 0 and {MAX_JWT_LEEWAY_S:g} seconds")
    return value


def _probability(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise ValueError("must be between 0 and 1")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port")
    return value


def _port_or_off(raw: str) -> int | None:
    return None if raw == "off" else _port(raw)


def _log_level(raw: str) -> str:
    level = raw.lower()
    if level not in {"debug", "info", "warning", "error", "critical"}:
        raise ValueError("must be debug, info, warning, error or critical")
    return level


def _log_format(raw: str) -> LogFormat:
    if raw == "json":
        return "json"
    if raw == "console":
        return "console"
    if raw == "auto":
        return "auto"
    raise ValueError("must be json, console or auto")


def parse_feed(raw: str) -> str:
    """`sim`, `live` or `replay:<file>`; ValueError otherwise."""
    return _feed(raw)


def _feed(raw: str) -> str:
    if raw in ("sim", "live") or (raw.startswith("replay:") and len(raw) > len("replay:")):
        return raw
    raise ValueError(f"must be one of {', '.join(FEEDS)}")


def _names(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if not names or not all(n.replace("_", "").replace("-", "").isalnum() for n in names):
        raise ValueError("expected a comma-separated list of names")
    return names


def _names_or_none(raw: str) -> tuple[str, ...]:
    return () if raw == "none" else _names(raw)


def _ccxt_exchanges(raw: str) -> tuple[str, ...]:
    names = _names(raw)
    native = [n for n in names if n in LIVE_SOURCES]
    if native:
        # Two feeds under one source name would share md.source.<name> and count as one venue in the consensus.
        raise ValueError(f"{', '.join(native)} has its own connector: use PRICEWIRE_SOURCES, not ccxt, for it")
    return names


def _sources(raw: str) -> tuple[str, ...]:
    names = _names(raw)
    unknown = [n for n in names if n not in LIVE_SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {', '.join(unknown)}; known: {', '.join(LIVE_SOURCES)}")
    return names


def _url(raw: str) -> str:
    if "://" not in raw:
        raise ValueError("must be a URL such as wss://host:port")
    return raw.rstrip("/")
