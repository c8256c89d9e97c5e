"""Holdings in PostgreSQL (`portfolio_holdings`, migrated by the gateway): read, and replaced whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from pricewire_gateway.alert_store import postgres
from pricewire_gateway.portfolio import Holding

ACQUIRE_TIMEOUT_S: Final = 2.0


class PortfolioStore:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = ACQUIRE_TIMEOUT_S) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    async def get(self, user: str) -> list[Holding]:
        """`user`'s holdings in the order they were put."""
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                rows = await conn.fetch(
                    "SELECT asset, amount FROM portfolio_holdings WHERE user_id = $1 ORDER BY position", user
                )
        return [Holding(asset=row["asset"], amount=row["amount"]) for row in rows]

    async def replace(self, user: str, holdings: Sequence[Holding]) -> None:
        """Make `holdings` the whole of `user`'s portfolio, atomically."""
        with postgres():
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn, conn.transaction():
                await conn.execute("DELETE FROM portfolio_holdings WHERE user_id = $1", user)
                await conn.executemany(
                    "INSERT INTO portfolio_holdings (user_id, asset, amount, position) VALUES ($1, $2, $3, $4)",
                    [(user, h.asset, h.amount, position) for position, h in enumerate(holdings)],
                )
