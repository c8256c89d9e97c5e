"""Alerts, their firings and their state in PostgreSQL (tables in migrations/0001_alerts_portfolios.sql).

`decide` is where exactly-once comes from: the price event's armed/fired outcome and its history rows
commit in one transaction that first advances the asset's cursor. The cursor's row lock serializes the
replicas deciding one asset; an event at or below the cursor (a redelivery, or an older event that a
slower replica got) changes nothing. Delivery happens after the commit, from the history rows not yet
marked delivered, so a crash between commit and ack re-sends (same `id`) instead of losing the firing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec

from pricewire_cache_writer.errors import POSTGRES_DOWN
from pricewire_common.clock import NS_PER_S, datetime_from_ns, iso_from_ns, ns_from_datetime
from pricewire_common.events import Price
from pricewire_gateway.alerts import AlertFired, AlertKind, Rule, decide
from pricewire_gateway.errors import StoreUnavailable

ACQUIRE_TIMEOUT_S: Final = 2.0

_ALERT_COLUMNS: Final = "id, user_id, asset, kind, target_price, pct, window_s, webhook_url, note, armed, fired_count, created_at, last_fired_at"  # noqa: E501
_EVENT_COLUMNS: Final = (
    "e.id, e.alert_id, e.user_id, e.asset, e.kind, e.target_price, e.pct, e.window_s, e.note, e.price,"
    " e.reference_price, e.change_pct, e.price_seq, e.price_ts, e.fired_at"
)
_ADVANCE: Final = """
INSERT INTO alert_cursors AS c (asset, last_seq, last_ts_ns) VALUES ($1, $2, $3)
ON CONFLICT (asset) DO UPDATE SET last_seq = EXCLUDED.last_seq, last_ts_ns = EXCLUDED.last_ts_ns
WHERE c.last_seq < EXCLUDED.last_seq OR c.last_ts_ns < EXCLUDED.last_ts_ns
RETURNING last_seq"""
"""Move the asset's cursor to this event, unless it was decided already (same seq and time) or is older in
both (a slower replica's). A later time with a lower seq is a validator whose seq started over: decided."""
_CANDIDATES: Final = f"""
SELECT {_ALERT_COLUMNS} FROM alerts
WHERE asset = $1 AND (
    kind = 'change_pct'
    OR (kind = 'above' AND CASE WHEN armed THEN target_price <= $2::numeric
                                ELSE $2::numeric < target_price * (1 - $3::numeric / 100) END)
    OR (kind = 'below' AND CASE WHEN armed THEN target_price >= $2::numeric
                                ELSE $2::numeric > target_price * (1 + $3::numeric / 100) END)
)
ORDER BY id
FOR UPDATE"""
"""The alerts this price may change: every `change_pct` one, and the above/below ones whose fire or re-arm
condition (alerts.decide, which still decides) holds, so an event reads and locks only those."""
REFERENCE_GRACE_S: Final = 60
"""How long before a change window's start the consensus then in force may have been published: the
validator re-publishes at least every heartbeat (5 s by default), so an older one means a gap in the prices."""
_REFERENCE: Final = """
SELECT price FROM (
    (SELECT price, 0 AS preference FROM prices
     WHERE asset = $1 AND status <> 'stale' AND ts <= $2 AND ts >= $3
     ORDER BY ts DESC, seq DESC LIMIT 1)
    UNION ALL
    (SELECT price, 1 FROM prices
     WHERE asset = $1 AND status <> 'stale' AND ts > $2 AND ts < $4
     ORDER BY ts, seq LIMIT 1)
) AS candidates
ORDER BY preference LIMIT 1"""
"""The reference of a change window [$2, $4) ($3: its start less the grace), from the cache_writer's projection:
the consensus in force at the start, or, after a gap in the prices, the oldest one inside the window. Never one
from before the gap: a change within an hour is not measured against a price of last week."""


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One stored alert with its state."""

    id: int
    user: str
    asset: str
    rule: Rule
    webhook_url: str | None
    note: str | None
    armed: bool
    fired_count: int
    created_at: datetime
    last_fired_at: datetime | None


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    """A committed firing not yet marked delivered, with where its webhook goes."""

    fired: AlertFired
    webhook_url: str | None


@contextmanager
def postgres() -> Iterator[None]:
    """Map "cannot serve now" (down, slow, no schema yet) to StoreUnavailable; let anything else through."""
    try:
        yield
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
        raise StoreUnavailable("postgres", f"alert schema not migrated yet (the gateway migrates it): {exc}") from exc
    except POSTGRES_DOWN as exc:
        raise StoreUnavailable("postgres", str(exc) or type(exc).__name__) from exc


def _alert(row: Mapping[str, Any]) -> Alert:
    kind: AlertKind = row["kind"]
    return Alert(
        id=row["id"],
        user=row["user_id"],
        asset=row["asset"],
        rule=Rule(kind=kind, target_price=row["target_price"], pct=row["pct"], window_s=row["window_s"]),
        webhook_url=row["webhook_url"],
        note=row["note"],
        armed=row["armed"],
        fired_count=row["fired_count"],
        created_at=row["created_at"],
        last_fired_at=row["last_fired_at"],
    )


def _fired(row: Mapping[str, Any]) -> AlertFired:
    return AlertFired(
        id=row["id"],
        alert_id=row["alert_id"],
        user=row["user_id"],
        symbol=row["asset"],
        alert_type=row["kind"],
        target_price=row["target_price"],
        pct=row["pct"],
        window_s=row["window_s"],
        note=row["note"],
        price=row["price"],
        reference_price=row["reference_price"],
        change_pct=row["change_pct"],
        price_seq=row["price_seq"],
        price_timestamp=iso_from_ns(ns_from_datetime(row["price_ts"])),
        fired_at=iso_from_ns(ns_from_datetime(row["fired_at"])),
    )


class AlertStore:
    """Per-user alert CRUD for the API, and the transactional decision for the worker."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = ACQUIRE_TIMEOUT_S) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    async def create(
        self, *, user: str, asset: str, rule: Rule, webhook_url: str | None, note: str | None, limit: int
    ) -> Alert | None:
        """Store a new alert of `user`; None when `user` has `limit` alerts already."""
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                row = await conn.fetchrow(
                    "INSERT INTO alerts (user_id, asset, kind, target_price, pct, window_s, webhook_url, note)"
                    " SELECT $1, $2, $3, $4, $5, $6, $7, $8"
                    " WHERE (SELECT count(*) FROM alerts WHERE user_id = $1) < $9"
                    f" RETURNING {_ALERT_COLUMNS}",
                    user,
                    asset,
                    rule.kind,
                    rule.target_price,
                    rule.pct,
                    rule.window_s,
                    webhook_url,
                    note,
                    limit,
                )
        return None if row is None else _alert(row)

    async def of_user(self, user: str) -> list[Alert]:
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                rows = await conn.fetch(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE user_id = $1 ORDER BY id", user)
        return [_alert(row) for row in rows]

    async def delete(self, *, user: str, alert_id: int) -> bool:
        """Delete one of `user`'s alerts; False when `user` has none of that id (someone else's included)."""
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                deleted = await conn.fetchval(
                    "DELETE FROM alerts WHERE id = $1 AND user_id = $2 RETURNING id", alert_id, user
                )
        return deleted is not None

    async def history(self, user: str, *, limit: int) -> list[AlertFired]:
        """`user`'s firings, newest first."""
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                rows = await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM alert_events e WHERE e.user_id = $1 ORDER BY e.id DESC LIMIT $2",
                    user,
                    limit,
                )
        return [_fired(row) for row in rows]

    async def decide(self, price: Price, *, band_pct: Decimal) -> list[Pending]:
        """Decide every alert of `price.asset` on this event (once, whatever the replicas and redeliveries);
        return the firings of this event still to be delivered."""
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                async with conn.transaction():
                    if await conn.fetchval(_ADVANCE, price.asset, price.seq, price.ts) is not None:
                        await self._decide_locked(conn, price, band_pct)
                return await self._undelivered(conn, price)

    async def _decide_locked(self, conn: asyncpg.Connection, price: Price, band_pct: Decimal) -> None:
        rows = await conn.fetch(_CANDIDATES, price.asset, price.price, band_pct)
        references: dict[int, Decimal | None] = {}
        fired: list[tuple[object, ...]] = []
        rearmed: list[int] = []
        for alert in map(_alert, rows):
            reference: Decimal | None = None
            window_s = alert.rule.window_s
            if window_s is not None:
                if window_s not in references:
                    references[window_s] = await _reference(conn, price, window_s)
                reference = references[window_s]
            decision = decide(alert.rule, armed=alert.armed, price=price.price, reference=reference, band_pct=band_pct)
            if decision.fire:
                change = None if decision.change_pct is None else round(decision.change_pct, 4)
                rule = alert.rule
                fired.append(
                    (
                        alert.id,
                        alert.user,
                        alert.asset,
                        rule.kind,
                        rule.target_price,
                        rule.pct,
                        rule.window_s,
                        alert.note,
                        price.price,
                        reference,
                        change,
                        price.seq,
                        datetime_from_ns(price.ts),
                    )
                )
            elif decision.armed and not alert.armed:
                rearmed.append(alert.id)
        # A few statements per event whatever the number of alerts it changes.
        if fired:
            await conn.execute(
                "UPDATE alerts SET armed = false, fired_count = fired_count + 1, last_fired_at = now()"
                " WHERE id = ANY($1::bigint[])",
                [row[0] for row in fired],
            )
            await conn.executemany(
                "INSERT INTO alert_events (alert_id, user_id, asset, kind, target_price, pct, window_s, note,"
                " price, reference_price, change_pct, price_seq, price_ts)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                " ON CONFLICT (alert_id, price_seq) DO NOTHING",
                fired,
            )
        if rearmed:
            await conn.execute("UPDATE alerts SET armed = true WHERE id = ANY($1::bigint[])", rearmed)

    async def _undelivered(self, conn: asyncpg.Connection, price: Price) -> list[Pending]:
        rows = await conn.fetch(
            f"SELECT {_EVENT_COLUMNS}, a.webhook_url FROM alert_events e LEFT JOIN alerts a ON a.id = e.alert_id"
            " WHERE e.asset = $1 AND e.price_seq = $2 AND e.delivered_at IS NULL ORDER BY e.id",
            price.asset,
            price.seq,
        )
        return [Pending(fired=_fired(row), webhook_url=row["webhook_url"]) for row in rows]

    async def mark_delivered(self, event_ids: list[int]) -> None:
        if not event_ids:
            return
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                await conn.execute(
                    "UPDATE alert_events SET delivered_at = now() WHERE id = ANY($1::bigint[])", event_ids
                )


async def _reference(conn: asyncpg.Connection, price: Price, window_s: int) -> Decimal | None:
    """The consensus at the start of the `window_s` before `price` (see _REFERENCE), or None when the window
    holds no price before this one (or there is no table)."""
    start_ns = price.ts - window_s * NS_PER_S
    bounds = (datetime_from_ns(start_ns), datetime_from_ns(start_ns - REFERENCE_GRACE_S * NS_PER_S))
    try:
        async with conn.transaction():  # a savepoint: a missing table must not abort the decision
            value = await conn.fetchval(_REFERENCE, price.asset, *bounds, datetime_from_ns(price.ts))
    except asyncpg.UndefinedTableError:
        return None  # the cache_writer has not migrated yet: no history to compare with
    return value if isinstance(value, Decimal) else None
