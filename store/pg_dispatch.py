"""The PostgreSQL implementation of :class:`store.dispatch.DispatchStore`: the same
dispatch statements as SQLite's (store/dispatch_*.py) over a pool of asyncpg connections
(:class:`store.pg.PgDatabase`, migrated on open).

A transaction is one connection acquired from the pool for the length of ``async with
conn.transaction()``; a read outside one borrows a connection for that statement. Unlike
the SQLite store's one connection, several transactions of one instance may run at once,
and several instances share the database: every state change is conditional (``… WHERE
state = 'pending'``), and the outbox's claim passes over rows a peer is claiming (``FOR
UPDATE SKIP LOCKED``), so each step fires once and each row is claimed once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from store.dispatch_base import DEFAULT_LEASE_S, DispatchBase
from store.dispatch_health import Health
from store.dispatch_observe import Observe
from store.dispatch_outbox import Outbox
from store.dispatch_responses import Responses
from store.dispatch_steps import Steps
from store.pg import PgDatabase
from store.sql import PG, PgTx, Tx

__all__ = ["PgDispatchBase", "PgDispatchStore"]


class PgDispatchBase(PgDatabase, DispatchBase):
    """Dispatch's PostgreSQL pool; an async context manager."""

    dialect = PG

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        instance: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        max_size: int = 4,
    ) -> None:
        super().__init__(url, password=password, max_size=max_size)
        # Unique per process by default: a restarted instance is a new claimant, and what
        # its previous run left 'sending' is taken back when the lease runs out, by it or
        # by a peer, in doubt.
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = lease_s

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One pooled connection inside BEGIN … COMMIT; rolled back on any exception."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield PgTx(conn)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self.pool.acquire() as conn:
            return await PgTx(conn).rows(sql, params)


class PgDispatchStore(Steps, Responses, Outbox, Health, Observe, PgDispatchBase):
    """Dispatch's PostgreSQL pool; an async context manager."""
