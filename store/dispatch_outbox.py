"""the outbox — claimed once, sent, its outcomes and the provider's status
callbacks recorded, never moving a row back from a final state."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from store import locks
from store.dispatch import Delivery, OutboxRow, StatusOutcome
from store.dispatch_base import DispatchBase
from store.sql import Tx

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


# The advisory lock under which PostgreSQL instances take turns claiming (store/locks.py).
_CLAIM_LOCK = locks.OUTBOX_CLAIM

_OUTBOX_COLUMNS = (
    "id, key, incident_id, person_id, phone, channel, purpose, body, state, attempts,"
    " provider_sid, in_doubt_since"
)


def _outbox_of(row: Sequence[Any]) -> OutboxRow:
    return OutboxRow(*row)


class Outbox(DispatchBase):
    """The outbox's statements."""

    async def next_outbox_due(self) -> float | None:
        """When the earliest pending outbox row may be sent, or the earliest claim's lease
        runs out (the claim then takes the row back, in doubt)."""
        row = await self._one(
            "SELECT o.due_at FROM outbox AS o"  # noqa: S608 -- a constant only
            f" WHERE o.state = 'pending' AND {_CLAIMABLE} ORDER BY o.due_at LIMIT 1"
        )
        lease = await self._one(
            "SELECT MIN(lease_until) FROM outbox WHERE state = 'sending'"
        )
        due = [float(r[0]) for r in (row, lease) if r is not None and r[0] is not None]
        return min(due, default=None)

    async def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        """One outbox row."""
        row = await self._one(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?",  # noqa: S608
            (outbox_id,),
        )
        return None if row is None else _outbox_of(row)

    async def claim_outbox(self, now: float, limit: int) -> list[OutboxRow]:
        """Move up to ``limit`` due pending rows to 'sending', claimed by this instance
        for its lease, and return them; rows whose lease ran out are taken back first."""
        async with self.transaction() as tx:
            # Claims take turns across instances: the check that a number has no other
            # call unsettled (_CLAIMABLE) reads committed rows only, so two claims at once
            # could each send one of two calls to a number. A claim is a few ms.
            turn = self.dialect.serialise(_CLAIM_LOCK)
            if turn is not None:
                await tx.execute(turn)
            await self._take_back_expired(tx, now)
            # On PostgreSQL the rows stay locked to this transaction, and a peer's claim
            # passes over them (SKIP LOCKED) instead of waiting or taking them too.
            rows = await tx.rows(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox AS o"  # noqa: S608
                f" WHERE state = 'pending' AND due_at <= ? AND {_CLAIMABLE}"
                f" ORDER BY due_at, id LIMIT ?{self.dialect.skip_locked()}",
                (now, limit),
            )
            claimed, calls = [], set()
            for row in map(_outbox_of, rows):
                if row.channel != "sms":
                    if row.phone in calls:
                        continue  # the number's next call waits for this one to settle
                    calls.add(row.phone)
                claimed.append(row)
            await tx.executemany(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, updated_at = ?,"
                " claimed_by = ?, lease_until = ? WHERE id = ? AND state = 'pending'",
                [(now, self.instance, now + self.lease_s, row.id) for row in claimed],
            )
        return claimed

    async def _take_back_expired(self, tx: Tx, now: float) -> int:
        """Rows whose claim's lease ran out (their instance died or hung mid-send) go back
        to 'pending', in doubt since that claim: the outbox asks the provider before it
        sends one again."""
        # SKIP LOCKED (PostgreSQL): a row a peer is taking back or recording is left to it.
        return await tx.execute(
            "UPDATE outbox SET state = 'pending', due_at = ?, updated_at = ?,"  # noqa: S608
            " in_doubt_since = COALESCE(in_doubt_since, updated_at), claimed_by = NULL,"
            " lease_until = NULL WHERE id IN (SELECT id FROM outbox WHERE state = 'sending'"
            f" AND lease_until <= ?{self.dialect.skip_locked()})",
            (now, now, now),
        )

    async def requeue_interrupted(self, now: float, older_than: float | None = None) -> int:
        """Rows this instance left in 'sending' go back to 'pending' (at-least-once
        delivery): all of them at start (a crash), or those untouched since
        ``older_than`` while running; and anyone's whose lease ran out.

        Their request may have reached the provider, so each is in doubt from its claim
        (``updated_at``): the outbox asks the provider before sending it again. A peer's
        row within its lease is the peer's: it may be sending it right now.
        """
        cutoff = now if older_than is None else older_than
        async with self.transaction() as tx:
            return await tx.execute(
                "UPDATE outbox SET state = 'pending', due_at = ?, updated_at = ?,"
                " in_doubt_since = COALESCE(in_doubt_since, updated_at), claimed_by = NULL,"
                " lease_until = NULL WHERE state = 'sending' AND ((COALESCE(claimed_by, ?) = ?"
                " AND updated_at <= ?) OR lease_until <= ?)",
                (now, now, self.instance, self.instance, cutoff, now),
            )

    async def recorded_sids(self, sids: Sequence[str]) -> set[str]:
        """Which of these provider SIDs a message of the outbox holds already."""
        if not sids:
            return set()
        marks = ",".join("?" * len(sids))
        rows = await self._rows(
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
        rows = await self._rows(
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
        async with self.transaction() as tx:
            await tx.executemany(
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
            cancelled = await self._closed_alerts(tx, [d.outbox_id for d in retries])
            await tx.executemany(
                # Only from 'sending': nothing was accepted, so no callback can have moved it.
                # Only this instance's claim: a row taken back after its lease ran out and
                # claimed again is the new claimant's, whose send this must not undo.
                "UPDATE outbox SET state = ?, due_at = ?, error_code = ?, error = ?,"
                " updated_at = ?, in_doubt_since = ?, claimed_by = NULL, lease_until = NULL"
                " WHERE id = ? AND state = 'sending' AND COALESCE(claimed_by, ?) = ?",
                [("cancelled" if d.outbox_id in cancelled else "pending",
                  d.at if d.retry_at is None else d.retry_at, d.error_code, d.error, d.at,
                  d.in_doubt_since, d.outbox_id, self.instance, self.instance)
                 for d in retries],
            )
            await tx.executemany(
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
    async def _closed_alerts(tx: Tx, outbox_ids: Sequence[int]) -> set[int]:
        if not outbox_ids:
            return set()
        marks = ",".join("?" * len(outbox_ids))
        rows = await tx.rows(
            "SELECT o.id FROM outbox o"  # noqa: S608 -- placeholders and a constant only
            f" WHERE o.id IN ({marks}) AND {_ALERT_CLOSED}",
            list(outbox_ids),
        )
        return {int(r[0]) for r in rows}

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
    ) -> StatusOutcome:
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
        async with self.transaction() as tx:
            row = await tx.one(
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
                if not sid or await tx.one(
                    "SELECT 1 FROM outbox WHERE provider_sid = ?", (sid,)
                ):
                    return "sid_mismatch"
                await tx.execute(
                    "UPDATE outbox SET provider_sid = ? WHERE id = ?", (sid, outbox_id)
                )
            elif sid != recorded:
                return "sid_mismatch"
            # Forward only: 'sent' from a row not yet sent, a final state from any row not
            # yet final; never out of a final state, never out of 'cancelled'.
            moved = await tx.rows(
                "UPDATE outbox SET state = ?, error_code = COALESCE(?, error_code),"
                " updated_at = ? WHERE id = ? AND (state IN ('pending', 'sending')"
                " OR (state = 'sent' AND ? IN ('delivered', 'failed', 'no_answer')))"
                " RETURNING id",
                (state, error_code, now, outbox_id, state),
            )
            applied = bool(moved)
            if incident_id is not None:
                # The highest status this row's timeline already shows (its lines carry the
                # outbox id and rank): a replay, or a status overtaken by a later one, adds
                # no line.
                shown = await self._shown_rank(tx, incident_id, event, outbox_id)
                if shown is None or rank > shown:
                    await self._timeline(
                        tx, incident_id, now, event, state,
                        detail={**detail, "outbox": outbox_id, "sid": sid, "rank": rank},
                    )
                    applied = True
        return "applied" if applied else "replayed"

    async def _shown_rank(
        self, tx: Tx, incident_id: int, event: str, outbox_id: int
    ) -> int | None:
        """The highest provider status rank the incident's ``event`` lines show for this
        outbox row; None if there is none."""
        rank, outbox = (self.dialect.json_int("detail", key) for key in ("rank", "outbox"))
        row = await tx.one(
            f"SELECT MAX({rank}) FROM incident_events"  # noqa: S608 -- the dialect's only
            f" WHERE incident_id = ? AND event = ? AND {outbox} = ?",
            (incident_id, event, outbox_id),
        )
        return None if row is None or row[0] is None else int(row[0])
