"""The gateway's wire schemas (REST bodies and WebSocket frames) and their codecs, built once.

Decimals leave the gateway as JSON *numbers* carrying the event's exact digits (`47000.50`,
never `47000.5` or `47000.499999`): the encoder writes the Decimal's text, no float is involved.
Every server frame is tagged by `type`; client frames are decoded as a tagged union on `type`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

from pricewire_common.clock import NS_PER_MS, iso_from_ns
from pricewire_common.events import Price, SourceQuote, Status
from pricewire_gateway.errors import ErrorCode, RequestError
from pricewire_gateway.quality import AssetQuality, QualityList
from pricewire_gateway.user_messages import AlertCreate

# --- the price object (REST body and `price_update.data`) -------------------------------------


class PriceData(msgspec.Struct, frozen=True, kw_only=True):
    """One asset's consensus price as clients see it: the seed's `price_update.data` plus the consensus."""

    symbol: str
    price: Decimal
    change_24h: Decimal | None
    change_percent_24h: Decimal | None
    volume_24h: Decimal | None
    timestamp: str
    """ISO 8601 UTC of the consensus (`Price.ts`)."""
    currency: str
    confidence: Decimal
    status: Status
    method: str
    """How the admitted quotes were aggregated (`weighted_median`, `median`, `mean`, `vwap`)."""
    cv_pct: Decimal | None
    """Coefficient of variation of the admitted prices, %; null with fewer than two."""
    anomaly: bool
    """The price is unusual against the asset's recent consensus prices (published all the same)."""
    z_score: Decimal | None
    n_sources: int
    n_used: int
    sources: tuple[SourceQuote, ...]
    seq: int
    ts_tick: int
    """ns since the epoch of the newest tick behind the consensus (end-to-end latency starts here)."""
    stale: bool = False
    """Served from PostgreSQL because Redis had no live price (down, or the key expired)."""
    age_s: Decimal | None = None
    """Seconds from the consensus (`timestamp`) to the gateway's answer, to the ms; never negative."""


def age_s(now_ns: int, ts_ns: int) -> Decimal:
    """Seconds from `ts_ns` to `now_ns`, ms precision, 0 when `ts_ns` is ahead (another host's clock)."""
    return Decimal(max(0, now_ns - ts_ns) // NS_PER_MS).scaleb(-3)


def price_data(price: Price, *, now_ns: int | None = None, stale: bool = False) -> PriceData:
    """The client view of a consensus Price event; with `now_ns`, its age then."""
    return PriceData(
        symbol=price.asset,
        price=price.price,
        change_24h=price.change_24h,
        change_percent_24h=price.change_pct_24h,
        volume_24h=price.volume_24h,
        timestamp=iso_from_ns(price.ts),
        currency=price.currency,
        confidence=price.confidence,
        status=price.status,
        method=price.method,
        cv_pct=price.cv_pct,
        anomaly=price.anomaly,
        z_score=price.z_score,
        n_sources=price.n_sources,
        n_used=price.n_used,
        sources=price.sources,
        seq=price.seq,
        ts_tick=price.ts_tick,
        stale=stale,
        age_s=None if now_ns is None else age_s(now_ns, price.ts),
    )


# --- REST bodies -----------------------------------------------------------------------------


class PriceList(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /api/v1/prices`."""

    prices: list[PriceData]
    timestamp: str


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /healthz`."""

    status: Literal["ok"] = "ok"


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One dependency probed by `/readyz`."""

    name: str
    ok: bool
    error: str | None = None


ReadinessStatus = Literal["ready", "degraded", "unavailable"]


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /readyz`: `ready` when every check is ok, `degraded` when one store is not (see health.py)."""

    status: ReadinessStatus
    checks: list[Check]


# --- server -> client frames (also the REST error body) ---------------------------------------


class _Frame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every server frame: the tag is written first, as `"type"`."""


class PriceUpdate(_Frame, frozen=True, tag="price_update"):
    data: PriceData
    timestamp: str
    """When the gateway sent it, ISO 8601 UTC."""


class Subscribed(_Frame, frozen=True, tag="subscribed"):
    symbols: list[str]


class Unsubscribed(_Frame, frozen=True, tag="unsubscribed"):
    symbols: list[str]


class RoomJoined(_Frame, frozen=True, tag="room_joined"):
    room: str


class RoomLeft(_Frame, frozen=True, tag="room_left"):
    room: str


class Pong(_Frame, frozen=True, tag="pong"):
    pass


class Authenticated(_Frame, frozen=True, tag="authenticated"):
    """The answer to `auth`: this socket now receives the user's `alert_triggered` and `portfolio_update`."""

    user: str
    admin: bool


class Error(_Frame, frozen=True, tag="error"):
    code: ErrorCode
    message: str


def error_frame(error: RequestError) -> Error:
    """The error frame (or REST error body) of a request that could not be served."""
    return Error(code=error.code, message=error.message)


ServerFrame = PriceUpdate | Subscribed | Unsubscribed | RoomJoined | RoomLeft | Pong | Authenticated | Error

# --- client -> server frames ------------------------------------------------------------------


class _Request(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every client frame."""


class Subscribe(_Request, frozen=True, tag="subscribe"):
    symbol: str | None = None
    symbols: list[str] | None = None


class Unsubscribe(_Request, frozen=True, tag="unsubscribe"):
    symbol: str | None = None
    symbols: list[str] | None = None


class JoinRoom(_Request, frozen=True, tag="join_room"):
    room: str


class LeaveRoom(_Request, frozen=True, tag="leave_room"):
    room: str


class GetPrice(_Request, frozen=True, tag="get_price"):
    symbol: str


class Ping(_Request, frozen=True, tag="ping"):
    pass


class Auth(_Request, frozen=True, tag="auth"):
    """Sign this socket in with a bearer token (or give `?token=` on the upgrade request)."""

    token: str


class PriceAlert(_Request, frozen=True, tag="price_alert"):
    """Seed 004's alert creation on a signed-in socket: `data` as the body of `POST /api/v1/alerts`."""

    data: AlertCreate


Request = Subscribe | Unsubscribe | JoinRoom | LeaveRoom | GetPrice | Ping | Auth | PriceAlert
REQUEST_TYPES = frozenset(
    str(cls.__struct_config__.tag)
    for cls in (Subscribe, Unsubscribe, JoinRoom, LeaveRoom, GetPrice, Ping, Auth, PriceAlert)
)


class _Envelope(msgspec.Struct, frozen=True):
    """Only the tag of a client frame: tells an unknown `type` from a malformed known one."""

    type: str


_ENCODER = msgspec.json.Encoder(decimal_format="number")
_REQUEST_DECODER: msgspec.json.Decoder[Request] = msgspec.json.Decoder(Request)
_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)


def encode(message: ServerFrame | PriceData | PriceList | Health | Readiness | AssetQuality | QualityList) -> bytes:
    """JSON bytes of a frame or body; Decimals as numbers with their exact digits."""
    return _ENCODER.encode(message)


def decode_request(payload: str | bytes) -> Request:
    """Decode a client frame, or raise RequestError with `bad_message` or `unknown_type`."""
    try:
        return _REQUEST_DECODER.decode(payload)
    except msgspec.ValidationError as exc:
        try:
            kind = _ENVELOPE_DECODER.decode(payload).type
        # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
        except (msgspec.DecodeError, RecursionError):
            raise RequestError("bad_message", f"not a frame with a string `type`: {exc}") from exc
        if kind not in REQUEST_TYPES:
            raise RequestError("unknown_type", f"unknown type {kind!r}") from exc
        raise RequestError("bad_message", str(exc)) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RequestError("bad_message", str(exc)) from exc
