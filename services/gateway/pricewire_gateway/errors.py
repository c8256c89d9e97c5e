"""Errors of the gateway.

    PricewireError                (pricewire_common.errors)
    └── GatewayError
        ├── NotReady              a dependency answered a readiness probe wrongly
        └── RequestError          a request that cannot be served: becomes a typed error frame/body
            ├── StoreUnavailable  Redis did not answer
            └── CorruptEntry      a cached price that does not decode (a projection defect, not the client's)
"""

from __future__ import annotations

from typing import Literal

from pricewire_common.errors import PricewireError

ErrorCode = Literal[
    "bad_message",
    "unknown_type",
    "unknown_asset",
    "unknown_room",
    "no_price",
    "store_unavailable",
    "bad_cache_entry",
]


class GatewayError(PricewireError):
    """Base of the gateway's errors."""


class RequestError(GatewayError):
    """A request the gateway answers with `{"type":"error","code":...,"message":...}`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


class StoreUnavailable(RequestError):
    """Redis refused or timed out."""

    def __init__(self, detail: str) -> None:
        super().__init__("store_unavailable", f"price store unavailable: {detail}")
        self.detail = detail


class CorruptEntry(RequestError):
    """The Redis entry of an asset is not a valid Price event."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__("bad_cache_entry", f"cached price {key} is unreadable")
        self.key = key
        self.detail = detail


class NotReady(GatewayError):
    """A readiness probe got an answer, but not the expected one."""
