"""What the SQLite dispatch statements share: the connection's transactions, the timeline,
outbox inserts and the incident columns (store/sqlite_dispatch.py composes the parts).

It has its own SQLite connection (SQLite serialises writers with BEGIN IMMEDIATE and the
busy timeout), so the ingest writer and dispatch never share a transaction. The SQL is
written to run on PostgreSQL too once ``?`` becomes ``$n``: ``ON CONFLICT DO NOTHING``
rather than ``INSERT OR IGNORE``, ``RETURNING`` rather than ``lastrowid`` or
``total_changes``, booleans as 0/1; the one SQLite-only function (``json_extract``) is in
:meth:`store.sqlite_outbox.SqliteOutbox._shown_rank`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from store.dispatch import IncidentInfo, NewMessage
from store.sqlite import SqliteDatabase, Writers

INCIDENT_COLUMNS = (
    "id, device_id, status, test, urgent, opened_at, kelurahan_kode, kelurahan, kecamatan,"
    " address, landmark, lat, lon"
)

# 12 parameters a row: 80 rows stay under SQLite's oldest cap of 999 host parameters.
_MESSAGES_PER_INSERT = 80


def incident_of(row: Sequence[Any]) -> IncidentInfo:
    """An incidents row read with :data:`INCIDENT_COLUMNS`."""
    return IncidentInfo(
        id=row[0],
        device_id=row[1],
        status=row[2],
        test=bool(row[3]),
        urgent=bool(row[4]),
        opened_at=row[5],
        kelurahan_kode=row[6],
        kelurahan=row[7],
        kecamatan=row[8],
        address=row[9],
        landmark=row[10],
        lat=row[11],
        lon=row[12],
    )


class SqliteDispatchBase(SqliteDatabase):
    """Dispatch's SQLite connection; an async context manager."""

    def __init__(self, path: Path, *, writers: Writers | None = None) -> None:
        # One connection, many tasks (scheduler, outbox senders, webhooks): transactions
        # on it must not interleave — the write lock (shared with the process's other
        # connections) also serialises them.
        super().__init__(path, writers=writers)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One BEGIN IMMEDIATE … COMMIT; rolled back on any exception."""
        db = self.db
        async with self.write_lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
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

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    async def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        row = await self._one(sql, params)
        return int(row[0]) if row else 0

    @staticmethod
    async def _timeline(
        db: aiosqlite.Connection,
        incident_id: int,
        at: float,
        event: str,
        reason: str,
        *,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append to an incident's timeline."""
        await db.execute(
            "INSERT INTO incident_events (incident_id, at, event, reason, actor, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                incident_id,
                at,
                event,
                reason,
                actor,
                None if detail is None else json.dumps(detail, sort_keys=True),
            ),
        )

    @staticmethod
    async def _insert_messages(
        db: aiosqlite.Connection, messages: Sequence[NewMessage], now: float
    ) -> int:
        """Insert outbox rows, skipping keys that exist; returns how many were new."""
        new = 0
        for start in range(0, len(messages), _MESSAGES_PER_INSERT):
            chunk = messages[start : start + _MESSAGES_PER_INSERT]
            values = ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)" for _ in chunk)
            # One statement per chunk, its RETURNING counting the rows that were new (a
            # key that exists is skipped: the key is UNIQUE).
            rows = await db.execute_fetchall(
                "INSERT INTO outbox (key, incident_id, person_id, phone, channel, purpose,"  # noqa: S608
                f" round, level, body, state, created_at, due_at, updated_at) VALUES {values}"
                " ON CONFLICT DO NOTHING RETURNING id",
                [part for m in chunk for part in _message_row(m, now)],
            )
            new += len(list(rows))
        return new


def _message_row(m: NewMessage, now: float) -> Iterable[Any]:
    return (m.key, m.incident_id, m.person_id, m.phone, m.channel, m.purpose, m.round,
            m.level, m.body, now, m.due_at, now)
