"""incidents as dispatch reads them, and the escalation steps — planned, fired,
hastened, and shifted with a step of the wall clock."""

from __future__ import annotations

from collections.abc import Sequence

from store.dispatch import ClockFrame, ClockShift, Fired, Firing, IncidentInfo, Plan, StepRow
from store.dispatch_base import INCIDENT_COLUMNS, DispatchBase, incident_of
from store.sql import Tx


class Steps(DispatchBase):
    """Incidents and escalation steps."""

    async def incident(self, incident_id: int) -> IncidentInfo | None:
        """One incident, or None."""
        row = await self._one(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE id = ?",  # noqa: S608
            (incident_id,),
        )
        return None if row is None else incident_of(row)

    async def unplanned_incidents(self, after_id: int = 0) -> list[IncidentInfo]:
        """Open incidents with no escalation plan yet (e.g. after a crash between commits).

        ``after_id`` skips incidents already known to be planned or closed: ids are
        allocated and committed in order by the single ingest writer, so a new incident is
        always above them.
        """
        # The unary + keeps SQLite 3.40 (no ANALYZE) from walking the rowid range above
        # after_id, which at start (after_id 0) is every incident ever stored: through
        # incidents_active it reads only the open ones, 4.0 -> 0.02 ms on 50,000
        # incidents (query-plan audit). PostgreSQL accepts the unary + on a number too.
        rows = await self._rows(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents i"  # noqa: S608
            " WHERE +i.id > ? AND status IN ('open', 'acknowledged')"
            " AND NOT EXISTS (SELECT 1 FROM incident_dispatch d WHERE d.incident_id = i.id)"
            " ORDER BY +i.id",
            (after_id,),
        )
        return [incident_of(r) for r in rows]

    async def newest_incident_id(self) -> int:
        """The highest incident id committed so far; 0 when there is none."""
        return await self._count("SELECT COALESCE(MAX(id), 0) FROM incidents")

    async def due_steps(self, now: float) -> list[StepRow]:
        """Pending steps due at or before ``now``, earliest first."""
        rows = await self._rows(
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

    async def pending_step_count(self) -> int:
        """How many escalation steps are waiting."""
        return await self._count("SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending'")

    async def plan_incidents(self, plans: Sequence[Plan], now: float) -> list[Fired]:
        """Store each plan (once per incident) and fire its due steps, in one commit.

        One commit for every incident found: in a storm, a transaction per incident queued
        behind the scheduler's and the senders' (measured with bench/dispatch.py).
        """
        fired = []
        async with self.transaction() as tx:
            for plan in plans:
                new = await tx.rows(
                    "INSERT INTO incident_dispatch (incident_id, policy_id, route, planned_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING incident_id",
                    (plan.incident_id, plan.policy_id, plan.route, now),
                )
                if not new:
                    # Planned already (by a peer instance, or a scan racing the event): its
                    # steps went in, and its due ones fired, in that plan's own commit.
                    continue
                await tx.executemany(
                    "INSERT INTO escalation_steps (key, incident_id, round, level, due_at,"
                    " state) VALUES (?, ?, ?, ?, ?, 'pending') ON CONFLICT DO NOTHING",
                    [(s.key, plan.incident_id, s.round, s.level, s.due_at) for s in plan.steps],
                )
                await self._timeline(tx, plan.incident_id, now, "escalation.planned",
                                     plan.route, detail=plan.detail)
                for firing in plan.fire:
                    outcome = await self._fire_in(tx, firing, now)
                    if outcome is not None:
                        fired.append(outcome)
        return fired

    async def fire_steps(self, firings: Sequence[Firing], now: float) -> list[Fired]:
        """Claim and fire each pending step once, queueing its pages, in one commit.

        One commit per scheduler pass, not per step: in a storm each step's transaction
        queued behind the senders' (bench/dispatch.py measured fire lag of seconds).
        """
        fired = []
        async with self.transaction() as tx:
            for firing in firings:
                outcome = await self._fire_in(tx, firing, now)
                if outcome is not None:
                    fired.append(outcome)
        return fired

    async def _fire_in(self, tx: Tx, firing: Firing, now: float) -> Fired | None:
        step = firing.step
        claimed = await tx.rows(
            "UPDATE escalation_steps SET state = 'fired', fired_at = ?"
            " WHERE key = ? AND state = 'pending' RETURNING key",
            (now, step.key),
        )
        if not claimed:
            return None  # an ack, a closure or another wake-up got there first
        if not firing.live:
            await tx.execute(
                "UPDATE escalation_steps SET state = 'cancelled' WHERE key = ?", (step.key,)
            )
            return None
        queued = await self._insert_messages(tx, firing.messages, now)
        await self._timeline(
            tx,
            step.incident_id,
            now,
            "escalation.step_fired",
            f"level {step.level + 1}",
            detail={
                "round": step.round + 1,
                "level": step.level + 1,
                "people": list(firing.people),
                "via": list(firing.via),
                "messages": queued,
            },
        )
        if not firing.people:
            # A level that paged nobody (roster gap) must not keep the next level waiting.
            await self._bring_next_forward(tx, step.incident_id, now)
            await self._timeline(tx, step.incident_id, now, "escalation.level_empty",
                                 "nobody_on_call", detail={"level": step.level + 1})
        (remaining,) = await tx.rows(
            "SELECT COUNT(*) FROM escalation_steps WHERE incident_id = ? AND state = 'pending'",
            (step.incident_id,),
        )
        remaining_count = int(remaining[0])
        if remaining_count == 0:
            await self._timeline(tx, step.incident_id, now, "escalation.exhausted",
                                 "no_ack_after_last_level")
        return Fired(step.key, queued, remaining_count)

    @staticmethod
    async def _bring_next_forward(tx: Tx, incident_id: int, now: float) -> bool:
        """Make the incident's next pending level due now; False if none was later."""
        moved = await tx.rows(
            "UPDATE escalation_steps SET due_at = ? WHERE key = (SELECT key FROM"
            " escalation_steps WHERE incident_id = ? AND state = 'pending'"
            " ORDER BY due_at, round, level LIMIT 1) AND due_at > ? RETURNING key",
            (now, incident_id, now),
        )
        return bool(moved)

    async def hasten(self, incident_id: int, now: float, reason: str) -> bool:
        """Make the incident's next pending level due now, on its timeline; False if none
        was later."""
        async with self.transaction() as tx:
            moved = await self._bring_next_forward(tx, incident_id, now)
            if moved:
                await self._timeline(tx, incident_id, now, "escalation.hastened", reason)
        return moved

    async def follow_clock_step(self, frame: ClockFrame) -> ClockShift | None:
        """Shift every pending due time by the frame's step and follow it, in one commit.

        The step is read again under the write lock, so each step is applied once; the
        frame follows it before COMMIT, so what this connection reads from then on is in
        the new frame, and is put back if the commit fails.
        """
        followed = 0.0
        try:
            async with self.transaction() as tx:
                delta = frame.step()
                if not delta:
                    return None
                steps = await tx.execute(
                    "UPDATE escalation_steps SET due_at = due_at + ? WHERE state = 'pending'",
                    (delta,),
                )
                # Pending messages wait for their due time (retry backoff, Retry-After); one
                # in flight is judged stale by how long ago it was claimed (updated_at).
                messages = await tx.execute(
                    "UPDATE outbox SET due_at = due_at + ? WHERE state = 'pending'", (delta,)
                )
                # ... and its lease runs out in the same frame.
                await tx.execute(
                    "UPDATE outbox SET updated_at = updated_at + ?,"
                    " lease_until = lease_until + ? WHERE state = 'sending'",
                    (delta, delta),
                )
                frame.follow(delta)
                followed = delta
        except BaseException:
            frame.follow(-followed)  # rolled back: the rows are in the old frame again
            raise
        return ClockShift(delta, steps, messages)
