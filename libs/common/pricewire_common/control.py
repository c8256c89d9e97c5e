"""Admin commands to the collector over core NATS: pause or resume one source, and the collector's answer.

A request on `md.control.source.<source>`; the collector that runs the source answers with what it did.
No answer means no collector runs it. A pause lasts until a resume or until the collector restarts.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from pricewire_common.errors import DecodeError

CONTROL_VERSION: Final = 1
Action = Literal["pause", "resume"]


class SourceCommand(msgspec.Struct, frozen=True, kw_only=True):
    v: int = CONTROL_VERSION
    action: Action
    by: str
    """The admin who asked (a token's `sub`): it shows in the source's status detail."""
    ts: int


class SourceCommandResult(msgspec.Struct, frozen=True, kw_only=True):
    v: int = CONTROL_VERSION
    source: str
    known: bool
    """False when this collector runs no source of that name (nothing changed)."""
    paused: bool


_ENCODER: Final = msgspec.json.Encoder()
_COMMAND: Final = msgspec.json.Decoder(SourceCommand)
_RESULT: Final = msgspec.json.Decoder(SourceCommandResult)


def encode(message: SourceCommand | SourceCommandResult) -> bytes:
    return _ENCODER.encode(message)


def decode_command(payload: bytes) -> SourceCommand:
    try:
        return _COMMAND.decode(payload)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"source command: {exc}") from exc


def decode_result(payload: bytes) -> SourceCommandResult:
    try:
        return _RESULT.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"source command result: {exc}") from exc
