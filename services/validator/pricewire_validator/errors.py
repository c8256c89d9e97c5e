"""Errors of the validator.

PricewireError
└── ValidatorError
    └── RecoveryError    the log holds a last price the validator cannot read (fails at start)
"""

from __future__ import annotations

from pricewire_common.errors import PricewireError


class ValidatorError(PricewireError):
    """Base of the validator's own errors."""


class RecoveryError(ValidatorError):
    """The last price of an asset in stream PRICES cannot be read, so seq cannot safely continue."""

    def __init__(self, asset: str, detail: str) -> None:
        super().__init__(f"{asset}: {detail}")
        self.asset = asset
        self.detail = detail
