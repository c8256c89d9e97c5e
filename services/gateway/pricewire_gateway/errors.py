"""Errors of the gateway.

PricewireError                (pricewire_common.errors)
└── GatewayError
    ├── NotReady              a dependency answered a readiness probe wrongly
    └── RequestError          a request that cannot be served: becomes a typed error frame/body
        ├── BadParameter      a query parameter the endpoint cannot use (a 400)
        ├── StoreUnavailable  Redis or PostgreSQL did not answer (or PostgreSQL is not migrated yet)
        ├── CorruptEntry      a cached price that does not decode (a projection defect, not the client's)
        ├── Unauthorized      no token, or one that does not verify (a 401)
        ├── Forbidden         a valid token without the role the request needs (a 403)
        ├── NotFound          no such resource for this user (a 404; others' resources look the same)
        └── NoCollector       no collector answered an admin's command (a 503)

RejectedInput                 (pricewire_common.errors)
└── UnprocessableEvent        also a GatewayError: a consensus event the alert worker failed on too often
"""

from __future__ import annotations

from typing import Literal

from pricewire_common.errors import PricewireError, RejectedInput

ErrorCode = Literal[
    "bad_message",
    "bad_parameter",
    "unknown_type",
    "unknown_asset",
    "unknown_room",
    "no_price",
    "store_unavailable",
    "bad_cache_entry",
    "unauthorized",
    "forbidden",
    "not_found",
    "collector_unavailable",
    "too_many_subscriptions",
    "internal",
]


class GatewayError(PricewireError):
    """Base of the gateway's errors."""


class RequestError(GatewayError):
    """A request the gateway answers with `{"type":"error","code":...,"message":...}`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


Store = Literal["redis", "postgres"]


class BadParameter(RequestError):
    """A query parameter that is unknown, repeated, unparsable or out of range; the message says which."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__("bad_parameter", message)
        self.name = name


class StoreUnavailable(RequestError):
    """A store refused, timed out, or (PostgreSQL) lacks a table or column a migration has yet to add."""

    def __init__(self, store: Store, detail: str) -> None:
        super().__init__("store_unavailable", f"{store} unavailable: {detail}")
        self.store: Store = store
        self.detail = detail


class CorruptEntry(RequestError):
    """The Redis entry of an asset is not a valid Price event."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__("bad_cache_entry", f"cached price {key} is unreadable")
        self.key = key
        self.detail = detail


class Unauthorized(RequestError):
    """A request for per-user data without a token that verifies; the message says what was wrong."""

    def __init__(self, message: str) -> None:
        super().__init__("unauthorized", message)


class Forbidden(RequestError):
    """A verified user without the role the request needs."""

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


class NotFound(RequestError):
    """No resource of that id for this user."""

    def __init__(self, message: str) -> None:
        super().__init__("not_found", message)


class NoCollector(RequestError):
    """No collector answered a source command in time."""

    def __init__(self, message: str) -> None:
        super().__init__("collector_unavailable", message)


class NotReady(GatewayError):
    """A readiness probe got an answer, but not the expected one."""


class UnprocessableEvent(GatewayError, RejectedInput):
    """A consensus event that keeps the contract but that deciding its alerts raised on every delivery.

    It is dead-lettered (reason `unprocessable`) and terminated, so one poison event never stalls its asset.
    """

    reason = "unprocessable"
