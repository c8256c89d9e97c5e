"""Errors shared by every Pricewire service.

PricewireError
├── ConfigError          a setting is missing or malformed (fails at start)
└── RejectedInput        input that can never be processed (term + dead letter)
    ├── DecodeError      the bytes are not a valid event of the expected schema
    └── InvalidEvent     the event decodes but breaks a rule (NaN price, unknown asset...)
"""

from __future__ import annotations


class PricewireError(Exception):
    """Base of every error raised by Pricewire code."""


class ConfigError(PricewireError):
    """A setting is missing or malformed."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class RejectedInput(PricewireError):
    """Input that will never succeed: it is terminated and sent to the dead-letter subject."""

    reason: str = "rejected"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class DecodeError(RejectedInput):
    """The payload is not a valid event of the expected schema."""

    reason = "decode_error"


class InvalidEvent(RejectedInput):
    """The event decodes but breaks a rule of the contract."""

    reason = "invalid_event"
