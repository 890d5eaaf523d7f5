"""What the dispatch statements share, on either database: transactions and reads through
a :class:`store.sql.Tx`, the timeline, outbox inserts and the incident columns.

The statements are written once, with ``?`` placeholders, ``ON CONFLICT DO NOTHING``,
``RETURNING`` and booleans as 0/1; what the databases spell differently comes from the
base's :class:`store.sql.Dialect`. A backend (store/sqlite_dispatch.py,
store/pg_dispatch.py) supplies the connection: :meth:`DispatchBase.transaction` and
:meth:`DispatchBase._rows`.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from store.dispatch import IncidentInfo, NewMessage
from store.sql import Dialect, Tx

INCIDENT_COLUMNS = (
    "id, device_id, status, test, urgent, opened_at, kelurahan_kode, kelurahan, kecamatan,"
    " address, landmark, lat, lon"
)

# How long an outbox claim holds before a peer (or this instance's own stale check) takes
# the row back in doubt: as long as dispatch/outbox.py's STALE_SENDING_S, so that on one
# box a send is judged stale when it was before leases (issue 13 item 3).
DEFAULT_LEASE_S = 300.0

# 12 parameters a row: 80 rows stay under SQLite's oldest cap of 999 host parameters
# (PostgreSQL's is 65,535).
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


class DispatchBase(abc.ABC):
    """The connection a backend gives the dispatch statements."""

    dialect: Dialect
    # Who claims outbox rows here (outbox.claimed_by), and for how long (lease_until).
    instance: str
    lease_s: float

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One transaction, committed on leaving the block, rolled back on any exception."""

    @abc.abstractmethod
    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """A read outside any transaction: its rows."""

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    async def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        row = await self._one(sql, params)
        return int(row[0]) if row else 0

    @staticmethod
    async def _timeline(
        tx: Tx,
        incident_id: int,
        at: float,
        event: str,
        reason: str,
        *,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append to an incident's timeline."""
        await tx.execute(
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
    async def _insert_messages(tx: Tx, messages: Sequence[NewMessage], now: float) -> int:
        """Insert outbox rows, skipping keys that exist; returns how many were new."""
        new = 0
        for start in range(0, len(messages), _MESSAGES_PER_INSERT):
            chunk = messages[start : start + _MESSAGES_PER_INSERT]
            values = ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)" for _ in chunk)
            # One statement per chunk, its RETURNING counting the rows that were new (a
            # key that exists is skipped: the key is UNIQUE).
            rows = await tx.rows(
                "INSERT INTO outbox (key, incident_id, person_id, phone, channel, purpose,"  # noqa: S608
                f" round, level, body, state, created_at, due_at, updated_at) VALUES {values}"
                " ON CONFLICT DO NOTHING RETURNING id",
                [part for m in chunk for part in _message_row(m, now)],
            )
            new += len(rows)
        return new


def _message_row(m: NewMessage, now: float) -> Iterable[Any]:
    return (m.key, m.incident_id, m.person_id, m.phone, m.channel, m.purpose, m.round,
            m.level, m.body, now, m.due_at, now)
