"""The validator: turns venue ticks into one consensus price per asset (see `consensus`)."""

from pricewire_validator.consensus import (
    ConsensusBook,
    ConsensusRule,
    Evaluation,
    evaluate_quotes,
    median,
    publish_due,
)
from pricewire_validator.errors import RecoveryError, ValidatorError

__all__ = [
    "ConsensusBook",
    "ConsensusRule",
    "Evaluation",
    "RecoveryError",
    "ValidatorError",
    "evaluate_quotes",
    "median",
    "publish_due",
]
