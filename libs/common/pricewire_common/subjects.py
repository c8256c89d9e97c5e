"""Every NATS subject and stream name Pricewire uses, in one place.

Subject tokens must not contain '.', '*', '>' or whitespace; the builders here check that,
so a bad venue or symbol name fails loudly instead of landing on a wildcard.
"""

from __future__ import annotations

import re

from pricewire_common.errors import InvalidEvent

TICKS_STREAM = "TICKS"
PRICES_STREAM = "PRICES"
DLQ_STREAM = "DLQ"
SOURCES_STREAM = "SOURCES"

TICK_ROOT = "md.tick"
PRICE_ROOT = "md.price"
DLQ_ROOT = "md.dlq"
SOURCE_ROOT = "md.source"
VENUE_ROOT = "venue"
ALERT_ROOT = "md.alert"
PORTFOLIO_ROOT = "md.portfolio"
SOURCE_CONTROL_ROOT = "md.control.source"

ALL_TICKS = f"{TICK_ROOT}.>"
ALL_PRICES = f"{PRICE_ROOT}.*"
ALL_DEAD_LETTERS = f"{DLQ_ROOT}.>"
ALL_SOURCES = f"{SOURCE_ROOT}.*"
ALL_ALERTS = f"{ALERT_ROOT}.*"
ALL_PORTFOLIOS = f"{PORTFOLIO_ROOT}.*"
ALL_SOURCE_CONTROLS = f"{SOURCE_CONTROL_ROOT}.*"
ALERTS_DURABLE = "gateway-alerts"
"""Prefix of the consumers of stream PRICES (one per asset) that every gateway replica shares to decide alerts."""

_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ASSET = re.compile(r"^[A-Z0-9]{1,20}$")
_USER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SERVICE = re.compile(r"^[a-z0-9_-]{1,64}$")


def check_source(source: str) -> str:
    """Return `source` if it is a valid venue name (lowercase token), else raise InvalidEvent."""
    if not _SOURCE.match(source):
        raise InvalidEvent(f"bad source name {source!r}", reason="bad_source")
    return source


def check_asset(asset: str) -> str:
    """Return `asset` if it is a valid asset code (uppercase token), else raise InvalidEvent."""
    if not _ASSET.match(asset):
        raise InvalidEvent(f"bad asset code {asset!r}", reason="bad_symbol")
    return asset


def symbol(base: str, quote: str) -> str:
    """The canonical `BASE-QUOTE` form of a pair."""
    return f"{check_asset(base)}-{check_asset(quote)}"


def tick(source: str, base: str, quote: str) -> str:
    """`md.tick.<source>.<BASE>-<QUOTE>`: one venue's normalized quote."""
    return f"{TICK_ROOT}.{check_source(source)}.{symbol(base, quote)}"


def price(asset: str) -> str:
    """`md.price.<ASSET>`: the consensus price of one asset."""
    return f"{PRICE_ROOT}.{check_asset(asset)}"


def dead_letter(service: str) -> str:
    """`md.dlq.<service>`: input a service rejected, with the reason."""
    if not _SERVICE.match(service):
        raise ValueError(f"bad service name {service!r}")
    return f"{DLQ_ROOT}.{service}"


def asset_of_price_subject(subject: str) -> str:
    """The asset token of an `md.price.<ASSET>` subject."""
    root, _, asset = subject.rpartition(".")
    if root != PRICE_ROOT:
        raise InvalidEvent(f"not a price subject: {subject!r}", reason="bad_subject")
    return check_asset(asset)


def source_status(source: str) -> str:
    """`md.source.<source>`: a venue connection's state changes."""
    return f"{SOURCE_ROOT}.{check_source(source)}"


def venue_input(source: str) -> str:
    """`venue.<source>`: names where a raw venue frame came from, in a dead letter (never published to)."""
    return f"{VENUE_ROOT}.{check_source(source)}"


def check_user(user: str) -> str:
    """Return `user` if it is a valid user name (letters, digits, `_`, `-`; at most 64), else raise InvalidEvent."""
    if not _USER.match(user):
        raise InvalidEvent(f"bad user name {user!r}", reason="bad_user")
    return user


def alert(user: str) -> str:
    """`md.alert.<user>`: a user's alert fired (core NATS, for the gateway replicas and other services)."""
    return f"{ALERT_ROOT}.{check_user(user)}"


def portfolio_changed(user: str) -> str:
    """`md.portfolio.<user>`: a user's holdings changed (core NATS; every gateway replica reloads them)."""
    return f"{PORTFOLIO_ROOT}.{check_user(user)}"


def source_control(source: str) -> str:
    """`md.control.source.<source>`: an admin pauses or resumes a source (a core NATS request the collector answers)."""
    return f"{SOURCE_CONTROL_ROOT}.{check_source(source)}"
