"""Bearer tokens: verify (the gateway) and mint (`pricewire token`), with the algorithm pinned by configuration.

A token's own `alg` header never picks the algorithm: the verifier accepts exactly the one its key
is for (HS256 with a secret, RS256 with a public key), so `alg: none` and an HS256 token signed with
an RS256 public key as its secret are refused. `exp` and `sub` are required; clock skew is bounded
by the settings' leeway.
"""

from __future__ import annotations

import math
from typing import Final

import jwt
import msgspec
from aiohttp import web

from pricewire_common import subjects
from pricewire_common.config import AuthSettings, JwtAlgorithm
from pricewire_common.errors import InvalidEvent
from pricewire_gateway.errors import Forbidden, Unauthorized

__all__ = [
    "ADMIN_ROLE",
    "PUBLIC_PRICES",
    "Principal",
    "TokenVerifier",
    "bearer",
    "mint",
    "require_admin",
    "require_price_reader",
    "require_user",
]

ADMIN_ROLE: Final = "admin"
_REQUIRED: Final = ["exp", "sub"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a verified token speaks for."""

    user: str
    admin: bool = False
    expires_s: int | None = None
    """The token's `exp` plus the leeway: a signed-in WebSocket stops getting the user's frames after it."""


class TokenVerifier:
    """Checks tokens against the configured key; raises Unauthorized saying why a token is refused."""

    def __init__(self, settings: AuthSettings) -> None:
        self._algorithm: JwtAlgorithm | None = settings.algorithm
        self._key = settings.jwt_public_key if settings.algorithm == "RS256" else settings.jwt_secret
        self._leeway_s = settings.leeway_s

    @property
    def configured(self) -> bool:
        return self._algorithm is not None

    def verify(self, token: str) -> Principal:
        if self._algorithm is None or self._key is None:
            raise Unauthorized("auth is not configured: set PRICEWIRE_JWT_SECRET or PRICEWIRE_JWT_PUBLIC_KEY_FILE")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                leeway=self._leeway_s,
                options={"require": _REQUIRED, "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise Unauthorized(f"token algorithm not accepted: only {self._algorithm}") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        return _principal(claims, leeway_s=int(self._leeway_s))


def _principal(claims: dict[str, object], *, leeway_s: int) -> Principal:
    user = claims.get("sub")
    if not isinstance(user, str):
        raise Unauthorized("token `sub` must be a string")
    try:
        subjects.check_user(user)
    except InvalidEvent as exc:
        raise Unauthorized("token `sub` must be 1-64 letters, digits, `_` or `-`") from exc
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Unauthorized("token `roles` must be a list of strings")
    exp = claims.get("exp")
    # A NumericDate is any JSON number: PyJWT takes 1.7e9 and "1700000000" alike, but a sign-in that
    # kept no expiry for a float would outlive its token. A bool is an int to Python, never a date.
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthorized("token `exp` must be a number (seconds since the epoch)")
    return Principal(user=user, admin=ADMIN_ROLE in roles, expires_s=math.floor(exp) + leeway_s)


def mint(settings: AuthSettings, *, user: str, admin: bool = False, now_s: int, private_key: str | None = None) -> str:
    """A token for `user` that expires `settings.token_ttl_s` after `now_s`.

    HS256 with the configured secret; RS256 (when a public key is configured) needs `private_key` (PEM).
    """
    subjects.check_user(user)
    claims: dict[str, object] = {"sub": user, "iat": now_s, "exp": now_s + int(settings.token_ttl_s)}
    if admin:
        claims["roles"] = [ADMIN_ROLE]
    if settings.algorithm == "RS256":
        if private_key is None:
            raise ValueError("RS256 is configured: minting needs the private key")
        return jwt.encode(claims, private_key, algorithm="RS256")
    if settings.jwt_secret is None:
        raise ValueError("no key configured: set PRICEWIRE_JWT_SECRET (or PRICEWIRE_JWT_PUBLIC_KEY_FILE)")
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")


def bearer(request: web.Request) -> str:
    """The token of an `Authorization: Bearer <token>` header; Unauthorized without one."""
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized("send `Authorization: Bearer <token>`")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    return token.strip()


VERIFIER = web.AppKey("verifier", TokenVerifier)
PUBLIC_PRICES = web.AppKey("public_prices", bool)
"""Whether price reads need no token (GatewaySettings.public_prices); an app without it serves them publicly."""


def require_user(request: web.Request) -> Principal:
    """The verified principal of a request; Unauthorized (401) without a good token."""
    return request.app[VERIFIER].verify(bearer(request))


def require_price_reader(request: web.Request, *, token_param: bool = False) -> None:
    """Unauthorized (401) unless prices are public here or the request carries a good token.

    `token_param`: a `?token=` is taken as well as the header (a browser's EventSource cannot send headers).
    """
    if request.app.get(PUBLIC_PRICES, True):
        return
    token = request.query.get("token") if token_param else None
    if token is None:
        require_user(request)
    else:
        request.app[VERIFIER].verify(token)


def require_admin(request: web.Request) -> Principal:
    """As `require_user`, and Forbidden (403) unless the token carries the admin role."""
    principal = require_user(request)
    if not principal.admin:
        raise Forbidden("this needs the admin role")
    return principal
