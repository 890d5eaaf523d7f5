"""The SQLite implementation of :class:`store.dispatch.DispatchStore`: the dispatch
statements (store/dispatch_steps.py, dispatch_responses.py, dispatch_outbox.py,
dispatch_health.py, dispatch_observe.py) over one aiosqlite connection of its own.

It has its own connection (SQLite serialises writers with BEGIN IMMEDIATE and the busy
timeout), so the ingest writer and dispatch never share a transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from store.dispatch import WakeKind
from store.dispatch_base import DEFAULT_LEASE_S, DispatchBase
from store.dispatch_health import Health
from store.dispatch_observe import Observe
from store.dispatch_outbox import Outbox
from store.dispatch_responses import Responses
from store.dispatch_steps import Steps
from store.sql import SQLITE, SqliteTx, Tx
from store.sqlite import SqliteDatabase, Writers

__all__ = ["SqliteDispatchBase", "SqliteDispatchStore"]


class SqliteDispatchBase(SqliteDatabase, DispatchBase):
    """Dispatch's SQLite connection; an async context manager."""

    dialect = SQLITE

    def __init__(
        self, path: Path, *, writers: Writers | None = None, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        # One connection, many tasks (scheduler, outbox senders, webhooks): transactions
        # on it must not interleave — the write lock (shared with the process's other
        # connections) also serialises them.
        super().__init__(path, writers=writers)
        # One box, one instance: whatever a previous run left 'sending' is this one's own,
        # taken back at start as before leases.
        self.instance = "local"
        self.lease_s = lease_s

    def on_wake(self, kind: WakeKind, callback: Callable[[], None]) -> None:
        """Nothing to register: one process on one file, whose every change comes from its
        own tasks, which wake each other."""

    shared_clock = False

    async def database_time(self) -> float | None:
        """None: one process, whose own clock (dispatch.loops.SteadyClock) is the frame."""
        return None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One BEGIN IMMEDIATE … COMMIT; rolled back on any exception."""
        db = self.db
        async with self.write_lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield SqliteTx(db)
                await db.execute("COMMIT")
            except BaseException:
                # Also when BEGIN or COMMIT itself was interrupted (a cancelled sender): the
                # statement still runs on aiosqlite's thread, and a connection left inside a
                # transaction would refuse every later BEGIN. Statements run in order there,
                # so this ROLLBACK follows it; "no transaction is active" is fine.
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.db.execute_fetchall(sql, params))


class SqliteDispatchStore(Steps, Responses, Outbox, Health, Observe, SqliteDispatchBase):
    """Dispatch's SQLite connection; an async context manager."""
