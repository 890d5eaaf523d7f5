"""what people do to a paged incident — acks, closures, reassignment — and the
operations messages that page no responder."""

from __future__ import annotations

from collections.abc import Sequence

from store.dispatch import AckOutcome, NewMessage, Notice
from store.dispatch_base import DispatchBase
from store.sql import Tx

# People who were (or are being) reached by an alert: they get the follow-up notices;
# {other} is the dialect's "person_id differs from ?, NULL included".
_NOTIFIED_SQL = (
    "SELECT person_id, MIN(phone) FROM outbox WHERE incident_id = ? AND purpose = 'alert'"
    " AND state IN ('sending', 'sent', 'delivered', 'no_answer') AND {other}"
    " GROUP BY person_id ORDER BY MIN(id)"
)


class Responses(DispatchBase):
    """Acks, closures, reassignment and operations messages."""

    async def queue_messages(self, messages: Sequence[NewMessage], now: float) -> int:
        """Insert outbox rows, skipping keys that exist; returns how many were new."""
        async with self.transaction() as tx:
            return await self._insert_messages(tx, messages, now)

    async def record_reassign(
        self, incident_id: int, person_id: str, actor: str,
        messages: Sequence[NewMessage], now: float,
    ) -> int:
        """Queue an operator's reassign pages with their timeline line; returns how many."""
        async with self.transaction() as tx:
            queued = await self._insert_messages(tx, messages, now)
            await self._timeline(tx, incident_id, now, "incident.reassigned", "operator",
                                 actor=actor, detail={"person": person_id, "messages": queued})
        return queued

    async def _notified(
        self, tx: Tx, incident_id: int, exclude: str | None
    ) -> list[tuple[str, str]]:
        sql = _NOTIFIED_SQL.format(other=self.dialect.is_distinct("person_id", "?"))
        rows = await tx.rows(sql, (incident_id, exclude))
        return [(r[0], r[1]) for r in rows]

    @classmethod
    async def _notify(
        cls, tx: Tx, incident_id: int, notice: Notice,
        people: Sequence[tuple[str, str]], now: float,
    ) -> None:
        await cls._insert_messages(tx, [
            NewMessage(key=f"{notice.key_prefix}:{pid}", incident_id=incident_id,
                       person_id=pid, phone=phone, channel="sms", purpose=notice.purpose,
                       body=notice.body, due_at=now)
            for pid, phone in people
        ], now)

    @staticmethod
    async def _stop_escalation(tx: Tx, incident_id: int) -> None:
        await tx.execute(
            "UPDATE escalation_steps SET state = 'cancelled'"
            " WHERE incident_id = ? AND state = 'pending'",
            (incident_id,),
        )
        await tx.execute(
            "UPDATE outbox SET state = 'cancelled' WHERE incident_id = ?"
            " AND purpose = 'alert' AND state = 'pending'",
            (incident_id,),
        )

    @staticmethod
    async def _acked_before(
        tx: Tx, incident_id: int, person_id: str | None, name: str
    ) -> bool:
        """Whether this person (a known responder by id, anyone else by name) acked it."""
        rows = await tx.rows(
            # The CAST: PostgreSQL cannot tell a bare parameter's type from IS NULL.
            "SELECT 1 FROM acks WHERE incident_id = ? AND (person_id = ?"
            " OR (CAST(? AS TEXT) IS NULL AND person_id IS NULL AND actor = ?)) LIMIT 1",
            (incident_id, person_id, person_id, name),
        )
        return bool(rows)

    async def record_ack(
        self, incident_id: int, *, person_id: str | None, name: str, via: str,
        now: float, handled: Notice,
    ) -> AckOutcome:
        """Record an ack; the first stops escalation (pending steps and unsent alerts
        cancelled in the same commit) and queues ``handled`` to those already paged."""
        async with self.transaction() as tx:
            # Held to the commit (PostgreSQL): a second ack at once, on this instance or a
            # peer, waits and then reads 'acknowledged', so one ack only is the first.
            rows = await tx.rows(
                "SELECT status FROM incidents i WHERE id = ?"  # noqa: S608 -- the dialect's
                f"{self.dialect.lock_rows('i')}",
                (incident_id,),
            )
            status = str(rows[0][0])
            if status in ("resolved", "cancelled"):
                await self._timeline(tx, incident_id, now, "ack.ignored", f"incident_{status}",
                                     actor=name, detail={"via": via})
                return AckOutcome(status, "ignored")
            if await self._acked_before(tx, incident_id, person_id, name):
                # A replayed link POST, a second key press, the CLI run twice: the same
                # person is already recorded (first or not), so no second ack row, no
                # "responder added", and never "handled by another officer" to them.
                return AckOutcome(status, "repeated")
            first = status == "open"
            await tx.execute(
                "INSERT INTO acks (incident_id, person_id, actor, via, at, first)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (incident_id, person_id, name, via, now, int(first)),
            )
            if first:
                await tx.execute(
                    "UPDATE incidents SET status = 'acknowledged', updated_at = ? WHERE id = ?",
                    (now, incident_id),
                )
                await tx.execute(
                    "UPDATE incident_dispatch SET handled_by = ? WHERE incident_id = ?",
                    (name, incident_id),
                )
                await self._stop_escalation(tx, incident_id)
                await self._notify(tx, incident_id, handled,
                                   await self._notified(tx, incident_id, person_id), now)
            await self._timeline(tx, incident_id, now,
                                 "incident.acknowledged" if first else "responder.added",
                                 via, actor=name, detail={"person": person_id})
        return AckOutcome(status, "first" if first else "added")

    async def close_incident(
        self, incident_id: int, *, reason: str, actor: str, note: str, now: float,
        notice: Notice,
    ) -> int | None:
        """Stop escalation for a cancelled or resolved incident and queue ``notice`` to
        those paged; returns how many were told, None if it was closed already.

        ``reason`` is "cancelled" (the ingest side already set the status) or "resolved"
        (an operator; this sets the status).
        """
        async with self.transaction() as tx:
            # Held to the commit, as in record_ack: one closure (or ack) at a time.
            rows = await tx.rows(
                "SELECT i.status, d.closed_at FROM incidents i"  # noqa: S608 -- the dialect's
                " LEFT JOIN incident_dispatch d ON d.incident_id = i.id WHERE i.id = ?"
                f"{self.dialect.lock_rows('i')}",
                (incident_id,),
            )
            status, closed_at = rows[0]
            if closed_at is not None or (reason == "resolved" and status == "resolved"):
                return None
            if reason == "resolved":
                if status == "cancelled":
                    return None
                await tx.execute(
                    "UPDATE incidents SET status = 'resolved', closed_at = ?,"
                    " updated_at = ? WHERE id = ?",
                    (now, now, incident_id),
                )
            await tx.execute(
                "UPDATE incident_dispatch SET closed_at = ?, close_reason = ?"
                " WHERE incident_id = ?",
                (now, reason, incident_id),
            )
            await self._stop_escalation(tx, incident_id)
            notify = await self._notified(tx, incident_id, None)
            if status == "acknowledged":
                # Those already told "ditangani oleh …" need no second notice.
                notify = []
            await self._notify(tx, incident_id, notice, notify, now)
            event = "incident.resolved" if reason == "resolved" else "escalation.stopped"
            await self._timeline(tx, incident_id, now, event, reason, actor=actor,
                                 detail={"note": note, "notified": len(notify)})
        return len(notify)
