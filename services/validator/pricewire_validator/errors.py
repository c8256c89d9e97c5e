"""Errors of the validator.

PricewireError
├── ValidatorError
│   ├── RecoveryError        the log holds a last price the validator cannot read (fails at start)
│   ├── PublishLost          a committed price the log did not take: the decider restarts from the log
│   └── UnprocessableTick    a valid tick the consensus cannot compute with (dead letter + term)
└── RejectedInput (pricewire_common.errors)
    └── UnprocessableTick
"""

from __future__ import annotations

from pricewire_common.errors import PricewireError, RejectedInput


class ValidatorError(PricewireError):
    """Base of the validator's own errors."""


class RecoveryError(ValidatorError):
    """The last price of an asset in stream PRICES cannot be read, so seq cannot safely continue."""

    def __init__(self, asset: str, detail: str) -> None:
        super().__init__(f"{asset}: {detail}")
        self.asset = asset
        self.detail = detail


class PublishLost(ValidatorError):
    """A price the book committed when it was sent was not stored as sent (refused, timed out, or its seq
    already taken in the log): the book is ahead of the log, so its decider must start again from the log."""

    def __init__(self, asset: str, seq: int, detail: str) -> None:
        super().__init__(f"{asset} seq {seq}: {detail}")
        self.asset = asset
        self.seq = seq
        self.detail = detail


class UnprocessableTick(ValidatorError, RejectedInput):
    """A tick that keeps the contract but whose quote makes its asset's consensus arithmetic raise.

    It is dead-lettered (reason `unprocessable`) and left out of the book, so one poison quote never
    stalls its asset, nor the batch it arrived in.
    """

    reason = "unprocessable"
