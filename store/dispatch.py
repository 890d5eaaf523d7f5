"""Dispatch's view of the database: escalation steps, the outbox, acks and closures.

It has its own SQLite connection (SQLite serialises writers with BEGIN IMMEDIATE and the
busy timeout), so the ingest writer and dispatch never share a transaction. Every state
change is a conditional UPDATE (``… WHERE state = 'pending'``), so a step fires once and
an outbox row is claimed once even when two wake-ups race or a restart repeats work.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from store.sqlite import SqliteDatabase, Writers


@dataclass(frozen=True, slots=True)
class IncidentInfo:
    """What dispatch needs to know about an incident to route and word its messages."""

    id: int
    device_id: str
    status: str
    test: bool
    urgent: bool
    opened_at: float
    kelurahan_kode: str | None
    kelurahan: str | None
    kecamatan: str | None
    address: str
    landmark: str
    lat: float | None
    lon: float | None


@dataclass(frozen=True, slots=True)
class StepRow:
    """A pending escalation step with its incident's policy."""

    key: str
    incident_id: int
    round: int
    level: int
    due_at: float
    policy_id: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One message in the outbox."""

    id: int
    key: str
    incident_id: int | None
    person_id: str
    phone: str
    channel: str
    purpose: str
    body: str
    state: str
    attempts: int
    provider_sid: str | None
    # Set when an earlier request may have been accepted unbeknown to panicd (a crash
    # mid-send, a dropped connection): when that request began. The provider is asked
    # before this row is sent again (dispatch/outbox.py).
    in_doubt_since: float | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """An outbox row to insert (ignored if its key exists: idempotent)."""

    key: str
    incident_id: int | None
    person_id: str
    phone: str
    channel: str
    purpose: str
    body: str
    due_at: float
    round: int | None = None
    level: int | None = None


# Twilio does not promise status callbacks in order, and one may even beat the API
# response: the outbox UPDATEs below never let a late "sent" (queued, sending, ringing…)
# undo a final state (delivered, failed, no_answer).

@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one send attempt, to record."""

    outbox_id: int
    incident_id: int | None
    state: str
    at: float
    sid: str | None
    error_code: int | None
    error: str | None
    event: str
    reason: str
    detail: Mapping[str, Any]
    # state 'pending' only: a transient failure, due again at this time (issue 12 item 2).
    retry_at: float | None = None
    # state 'pending' only: the row stays (or becomes) in doubt since then; None: it is not.
    in_doubt_since: float | None = None


# An alert that no longer matters: its incident is resolved or cancelled, or acknowledged
# and the alert is an escalation page (a reassign page, round NULL, still matters then).
_ALERT_CLOSED = (
    "o.purpose = 'alert' AND EXISTS (SELECT 1 FROM incidents i WHERE i.id = o.incident_id"
    " AND (i.status IN ('resolved', 'cancelled')"
    " OR (i.status = 'acknowledged' AND o.round IS NOT NULL)))"
)


# A row the outbox may claim now: an SMS, or a call to a number with no other call
# unsettled — sending, or pending in doubt. A call carries nothing of panicd's at the
# provider, so with two calls to one number in doubt a lookup could not tell whose a
# found call is (issue 12 item 3); one at a time, it can. Twilio places calls from one
# number at about one a second anyway, and one person takes one call at a time.
_CLAIMABLE = (
    "(o.channel = 'sms' OR NOT EXISTS (SELECT 1 FROM outbox AS u WHERE u.channel = 'voice'"
    " AND u.phone = o.phone AND u.id != o.id AND (u.state = 'sending'"
    " OR (u.state = 'pending' AND u.in_doubt_since IS NOT NULL))))"
)


_INCIDENT_COLUMNS = (
    "id, device_id, status, test, urgent, opened_at, kelurahan_kode, kelurahan, kecamatan,"
    " address, landmark, lat, lon"
)
_OUTBOX_COLUMNS = (
    "id, key, incident_id, person_id, phone, channel, purpose, body, state, attempts,"
    " provider_sid, in_doubt_since"
)


def _incident(row: Sequence[Any]) -> IncidentInfo:
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


def _outbox(row: Sequence[Any]) -> OutboxRow:
    return OutboxRow(*row)


class DispatchStore(SqliteDatabase):
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

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        rows = list(await self.db.execute_fetchall(sql, params))
        return rows[0] if rows else None

    # -- reads ------------------------------------------------------------------------

    async def incident(self, incident_id: int) -> IncidentInfo | None:
        """One incident, or None."""
        row = await self._one(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?",  # noqa: S608
            (incident_id,),
        )
        return None if row is None else _incident(row)

    async def unplanned_incidents(self, after_id: int = 0) -> list[IncidentInfo]:
        """Open incidents with no escalation plan yet (e.g. after a crash between commits).

        ``after_id`` skips incidents already known to be planned or closed: ids are
        allocated and committed in order by the single ingest writer, so a new incident is
        always above them.
        """
        # The unary + keeps SQLite 3.40 (no ANALYZE) from walking the rowid range above
        # after_id, which at start (after_id 0) is every incident ever stored: through
        # incidents_active it reads only the open ones, 4.0 -> 0.02 ms on 50,000
        # incidents (query-plan audit).
        rows = await self.db.execute_fetchall(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents i"  # noqa: S608
            " WHERE +i.id > ? AND status IN ('open', 'acknowledged')"
            " AND NOT EXISTS (SELECT 1 FROM incident_dispatch d WHERE d.incident_id = i.id)"
            " ORDER BY +i.id",
            (after_id,),
        )
        return [_incident(r) for r in rows]

    async def newest_incident_id(self) -> int:
        """The highest incident id committed so far; 0 when there is none."""
        row = await self._one("SELECT COALESCE(MAX(id), 0) FROM incidents")
        return int(row[0]) if row else 0

    async def due_steps(self, now: float) -> list[StepRow]:
        """Pending steps due at or before ``now``, earliest first."""
        rows = await self.db.execute_fetchall(
            "SELECT s.key, s.incident_id, s.round, s.level, s.due_at, d.policy_id"
            " FROM escalation_steps s JOIN incident_dispatch d USING (incident_id)"
            " WHERE s.state = 'pending' AND s.due_at <= ?"
            " ORDER BY s.due_at, s.round, s.level, s.incident_id",
            (now,),
        )
        return [StepRow(*r) for r in rows]

    async def next_step_due(self) -> float | None:
        """When the earliest pending step falls due."""
        row = await self._one("SELECT MIN(due_at) FROM escalation_steps WHERE state = 'pending'")
        return None if row is None or row[0] is None else float(row[0])

    async def next_outbox_due(self) -> float | None:
        """When the earliest pending outbox row may be sent."""
        row = await self._one(
            "SELECT o.due_at FROM outbox AS o"  # noqa: S608 -- a constant only
            f" WHERE o.state = 'pending' AND {_CLAIMABLE} ORDER BY o.due_at LIMIT 1"
        )
        return None if row is None or row[0] is None else float(row[0])

    async def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        """One outbox row."""
        row = await self._one(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?",  # noqa: S608
            (outbox_id,),
        )
        return None if row is None else _outbox(row)

    async def pending_step_count(self) -> int:
        """How many escalation steps are waiting."""
        row = await self._one("SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending'")
        return int(row[0]) if row else 0

    # -- writes (call inside transaction()) -------------------------------------------

    @staticmethod
    async def timeline(
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
    async def insert_messages(
        db: aiosqlite.Connection, messages: Sequence[NewMessage], now: float
    ) -> int:
        """Insert outbox rows, skipping keys that exist; returns how many were new."""
        before = db.total_changes
        await db.executemany(
            "INSERT OR IGNORE INTO outbox (key, incident_id, person_id, phone, channel, purpose,"
            " round, level, body, state, created_at, due_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
            [
                (
                    m.key,
                    m.incident_id,
                    m.person_id,
                    m.phone,
                    m.channel,
                    m.purpose,
                    m.round,
                    m.level,
                    m.body,
                    now,
                    m.due_at,
                    now,
                )
                for m in messages
            ],
        )
        return db.total_changes - before

    async def claim_outbox(self, now: float, limit: int) -> list[OutboxRow]:
        """Move up to ``limit`` due pending rows to 'sending' and return them."""
        async with self.transaction() as db:
            rows = await db.execute_fetchall(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox AS o"  # noqa: S608
                f" WHERE state = 'pending' AND due_at <= ? AND {_CLAIMABLE}"
                " ORDER BY due_at, id LIMIT ?",
                (now, limit),
            )
            claimed, calls = [], set()
            for row in map(_outbox, rows):
                if row.channel != "sms":
                    if row.phone in calls:
                        continue  # the number's next call waits for this one to settle
                    calls.add(row.phone)
                claimed.append(row)
            await db.executemany(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, updated_at = ?"
                " WHERE id = ? AND state = 'pending'",
                [(now, row.id) for row in claimed],
            )
        return claimed

    async def requeue_interrupted(self, now: float, older_than: float | None = None) -> int:
        """Rows left in 'sending' go back to 'pending' (at-least-once delivery): all of them
        at start (a crash), or those untouched since ``older_than`` while running.

        Their request may have reached the provider, so each is in doubt from its claim
        (``updated_at``): the outbox asks the provider before sending it again.
        """
        cutoff = now if older_than is None else older_than
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE outbox SET state = 'pending', due_at = ?, updated_at = ?,"
                " in_doubt_since = COALESCE(in_doubt_since, updated_at)"
                " WHERE state = 'sending' AND updated_at <= ?",
                (now, now, cutoff),
            )
            return cursor.rowcount

    async def recorded_sids(self, sids: Sequence[str]) -> set[str]:
        """Which of these provider SIDs a message of the outbox holds already."""
        if not sids:
            return set()
        marks = ",".join("?" * len(sids))
        rows = await self.db.execute_fetchall(
            f"SELECT provider_sid FROM outbox WHERE provider_sid IN ({marks})",  # noqa: S608
            list(sids),
        )
        return {str(r[0]) for r in rows}

    async def undeliverable_levels(self, outbox_ids: Sequence[int]) -> list[int]:
        """Incidents where one of these failed alerts completed a level whose every alert
        (each person, each channel) has failed: nobody at that level can be reached."""
        if not outbox_ids:
            return []
        marks = ",".join("?" * len(outbox_ids))
        rows = await self.db.execute_fetchall(
            "SELECT DISTINCT o.incident_id FROM outbox o"  # noqa: S608 -- placeholders only
            f" WHERE o.id IN ({marks}) AND o.purpose = 'alert' AND o.state = 'failed'"
            " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.incident_id = o.incident_id"
            " AND p.round = o.round AND p.level = o.level AND p.purpose = 'alert'"
            " AND p.state != 'failed')",
            list(outbox_ids),
        )
        return [int(r[0]) for r in rows]

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> list[int]:
        """Write the outcomes of many send attempts, and their timeline lines, in one commit.

        A transient failure (state 'pending' with ``retry_at``) goes back to 'pending',
        due at ``retry_at``, unless it is an alert whose incident was closed meanwhile:
        that one is cancelled. Returns the ids cancelled so.
        """
        final = [d for d in deliveries if d.state != "pending"]
        retries = [d for d in deliveries if d.state == "pending"]
        async with self.transaction() as db:
            await db.executemany(
                # A late 'sent' must not undo a final state a status callback already set.
                # A SID another row holds already stays with that row (SIDs are UNIQUE):
                # one conflicting outcome must not fail the whole batch, again and again.
                "UPDATE outbox SET state = CASE WHEN ? = 'sent' AND state IN"
                " ('delivered', 'failed', 'no_answer') THEN state ELSE ? END,"
                " provider_sid = CASE WHEN EXISTS (SELECT 1 FROM outbox AS other"
                " WHERE other.provider_sid = ? AND other.id != outbox.id) THEN provider_sid"
                " ELSE COALESCE(?, provider_sid) END, in_doubt_since = NULL,"
                " error_code = ?, error = ?, updated_at = ? WHERE id = ?",
                [(d.state, d.state, d.sid, d.sid, d.error_code, d.error, d.at, d.outbox_id)
                 for d in final],
            )
            cancelled = await self._closed_alerts(db, [d.outbox_id for d in retries])
            await db.executemany(
                # Only from 'sending': nothing was accepted, so no callback can have moved it.
                "UPDATE outbox SET state = ?, due_at = ?, error_code = ?, error = ?,"
                " updated_at = ?, in_doubt_since = ? WHERE id = ? AND state = 'sending'",
                [("cancelled" if d.outbox_id in cancelled else "pending",
                  d.at if d.retry_at is None else d.retry_at, d.error_code, d.error, d.at,
                  d.in_doubt_since, d.outbox_id) for d in retries],
            )
            await db.executemany(
                "INSERT INTO incident_events (incident_id, at, event, reason, actor, detail)"
                " VALUES (?, ?, ?, ?, NULL, ?)",
                [(d.incident_id, d.at,
                  "outbox.cancelled" if d.outbox_id in cancelled else d.event,
                  "incident_closed" if d.outbox_id in cancelled else d.reason,
                  json.dumps(d.detail, sort_keys=True))
                 for d in deliveries if d.incident_id is not None],
            )
        return sorted(cancelled)

    @staticmethod
    async def _closed_alerts(db: aiosqlite.Connection, outbox_ids: Sequence[int]) -> set[int]:
        if not outbox_ids:
            return set()
        marks = ",".join("?" * len(outbox_ids))
        rows = await db.execute_fetchall(
            "SELECT o.id FROM outbox o"  # noqa: S608 -- placeholders and a constant only
            f" WHERE o.id IN ({marks}) AND {_ALERT_CLOSED}",
            list(outbox_ids),
        )
        return {int(r[0]) for r in rows}

    # -- the provider's outage, a device_health condition (dispatch/health_monitor.py) --

    async def raised_condition(self, subject: str, condition: str) -> tuple[int, float] | None:
        """The raised (not cleared) health row of ``subject``/``condition``: (id, raised_at)."""
        row = await self._one(
            "SELECT id, raised_at FROM device_health"
            " WHERE subject = ? AND condition = ? AND cleared_at IS NULL",
            (subject, condition),
        )
        return None if row is None else (int(row[0]), float(row[1]))

    async def raise_condition(
        self, subject: str, condition: str, now: float, detail: Mapping[str, Any]
    ) -> int | None:
        """Raise a health condition once; None if it is raised already."""
        async with self.transaction() as db:
            cursor = await db.execute(
                # device_health_active is UNIQUE (subject, condition) WHERE not cleared.
                "INSERT OR IGNORE INTO device_health (subject, condition, raised_at, detail)"
                " VALUES (?, ?, ?, ?)",
                (subject, condition, now, json.dumps(dict(detail), sort_keys=True)),
            )
            return cursor.lastrowid if cursor.rowcount == 1 else None

    async def clear_condition(self, subject: str, condition: str, now: float) -> int | None:
        """Clear a raised health condition; returns its row id, None if none was raised."""
        async with self.transaction() as db:
            rows = list(await db.execute_fetchall(
                "UPDATE device_health SET cleared_at = ? WHERE subject = ? AND condition = ?"
                " AND cleared_at IS NULL RETURNING id",
                (now, subject, condition),
            ))
        return int(rows[0][0]) if rows else None

    async def record_status_callback(
        self,
        outbox_id: int,
        *,
        sid: str,
        state: str,
        rank: int,
        now: float,
        error_code: int | None,
        event: str,
        detail: Mapping[str, Any],
    ) -> Literal["applied", "replayed", "sid_mismatch", "unknown"]:
        """Apply a provider status callback about the send whose SID is ``sid``, at most once.

        Twilio's signature carries no nonce, so a captured callback can be replayed at will,
        and genuine ones arrive out of order. ``rank`` orders the provider's statuses (queued
        < sent < delivered, initiated < ringing < in-progress < completed): a callback whose
        rank is not above the highest already on this row's timeline, or whose state would
        move the row back, changes nothing — no second timeline line, and a final state
        (delivered, failed, no_answer) is never undone. Returns "unknown" (no such row),
        "sid_mismatch" (the row's message has another SID: refused), "replayed" (nothing
        changed) or "applied".
        """
        async with self.transaction() as db:
            row = await self._one(
                "SELECT incident_id, provider_sid FROM outbox WHERE id = ?", (outbox_id,)
            )
            if row is None:
                return "unknown"
            incident_id, recorded = row
            if recorded is None:
                # No SID recorded yet: the callback beat the recording of the provider's
                # answer (Twilio may post "queued" before create_async returns), or a crash
                # lost that answer. The signature proves Twilio posted it to this row's own
                # callback URL, so the SID is one of this row's sends: record it, which
                # binds every later callback (and call webhook) to it. One exception: a SID
                # another row already holds is that row's message, and its callback aimed
                # here is not about this row (outbox ids reused after a database was
                # recreated): refuse it rather than give one message to two rows (the SID
                # is UNIQUE). The provider's own answer, recorded later, still wins.
                if not sid or await self._one(
                    "SELECT 1 FROM outbox WHERE provider_sid = ?", (sid,)
                ):
                    return "sid_mismatch"
                await db.execute(
                    "UPDATE outbox SET provider_sid = ? WHERE id = ?", (sid, outbox_id)
                )
            elif sid != recorded:
                return "sid_mismatch"
            # Forward only: 'sent' from a row not yet sent, a final state from any row not
            # yet final; never out of a final state, never out of 'cancelled'.
            moved = await db.execute(
                "UPDATE outbox SET state = ?, error_code = COALESCE(?, error_code),"
                " updated_at = ? WHERE id = ? AND (state IN ('pending', 'sending')"
                " OR (state = 'sent' AND ? IN ('delivered', 'failed', 'no_answer')))",
                (state, error_code, now, outbox_id, state),
            )
            applied = moved.rowcount > 0
            if incident_id is not None:
                # The highest status this row's timeline already shows (its lines carry the
                # outbox id and rank): a replay, or a status overtaken by a later one, adds
                # no line.
                shown = await self._one(
                    "SELECT MAX(json_extract(detail, '$.rank')) FROM incident_events"
                    " WHERE incident_id = ? AND event = ?"
                    " AND json_extract(detail, '$.outbox') = ?",
                    (incident_id, event, outbox_id),
                )
                if shown is None or shown[0] is None or rank > int(shown[0]):
                    await self.timeline(
                        db, incident_id, now, event, state,
                        detail={**detail, "outbox": outbox_id, "sid": sid, "rank": rank},
                    )
                    applied = True
        return "applied" if applied else "replayed"
