"""Shared contract of Pricewire services: events, subjects, settings, bus and logging."""

from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError, DecodeError, InvalidEvent, PricewireError, RejectedInput
from pricewire_common.events import DeadLetter, Price, SourceQuote, Tick

__all__ = [
    "ConfigError",
    "DeadLetter",
    "DecodeError",
    "InvalidEvent",
    "Price",
    "PricewireError",
    "RejectedInput",
    "Settings",
    "SourceQuote",
    "Tick",
]
