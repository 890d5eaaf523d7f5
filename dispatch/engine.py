"""The dispatcher: plans escalation for new incidents, fires due steps, sends the outbox,
and applies acks and closures (DESIGN §2 Routing and escalation, Acknowledgement).

Every pending step and message is a database row with a due time. Three named tasks own
the work: ``dispatch.events`` (incident transitions from ingest), ``dispatch.scheduler``
(sleeps until the earliest step, fires what is due — after a restart, overdue steps fire
at once) and ``dispatch.outbox`` (sends due messages). Nothing lives only in memory: a
restart re-reads the rows, and a crash between committing an incident and planning it is
healed by :meth:`Dispatcher.plan_missing` at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import aiosqlite
import structlog

from dispatch.channel import Channel, DeliveryResult, DeliveryStatus
from dispatch.escalation import IncidentRef, plan_steps, resolve_targets_via
from dispatch.messages import build_alert_sms, build_cancelled_sms, build_handled_sms
from dispatch.metrics import Histogram
from dispatch.policy import Level, Medium, Policy, Routing
from dispatch.responders import Responders
from dispatch.store import DispatchStore, IncidentInfo, NewMessage, OutboxRow, StepRow
from dispatch.webhook_auth import make_ack_token
from gateway.ingest import IncidentEvent

log = structlog.get_logger("panicd.dispatch")

# People who were (or are being) reached by an alert: they get the follow-up notices.
_NOTIFIED_SQL = (
    "SELECT person_id, MIN(phone) FROM outbox WHERE incident_id = ? AND purpose = 'alert'"
    " AND state IN ('sending', 'sent', 'delivered', 'no_answer') AND person_id IS NOT ?"
    " GROUP BY person_id ORDER BY MIN(id)"
)


class Feedback(Protocol):
    """Tells a button something about its incident (MQTT command topic, LoRa downlink)."""

    def __call__(self, device_id: str, incident_id: int, state: str) -> None:
        """Send ``state`` ("help_coming", "cancelled", …) to the device, best effort."""
        ...


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Where panicd is reachable and how ack links are signed."""

    public_base_url: str
    ack_secret: bytes
    ack_ttl_s: float = 6 * 3600.0
    send_concurrency: int = 16


@dataclass(frozen=True, slots=True)
class _Fired:
    """A step that fired inside a pass's transaction, logged once it commits."""

    step: StepRow
    incident_id: int
    people: int
    queued: int
    remaining: int


@dataclass(frozen=True, slots=True)
class AckResult:
    """What an ack did: ``first`` stopped escalation; ``status`` is the incident's now."""

    incident_id: int
    status: str
    first: bool
    accepted: bool


def _place(incident: IncidentInfo) -> str:
    parts = [p for p in (incident.landmark, incident.address) if p]
    return ", ".join(parts) or "lokasi tidak diketahui"


def _kind_label(incident: IncidentInfo) -> str:
    return "DARURAT MENDESAK" if incident.urgent else "DARURAT"


class Dispatcher:
    """Owns the dispatch tasks; an async context manager."""

    def __init__(
        self,
        store: DispatchStore,
        routing: Routing,
        responders: Responders,
        channel: Channel,
        settings: DispatchSettings,
        *,
        clock: Callable[[], float] = time.time,
        feedback: Feedback | None = None,
    ) -> None:
        self._store = store
        self._routing = routing
        self._responders = responders
        self._channel = channel
        self._settings = settings
        self._clock = clock
        self._feedback = feedback
        self._events: asyncio.Queue[IncidentEvent] = asyncio.Queue()
        self._step_wake = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._planned_through = 0  # highest incident id planned so far
        self._in_flight = 0  # outbox rows being sent by the outbox loop
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.steps_fired = 0
        self.messages_sent = 0
        self.step_latency = Histogram()  # step due → fired, seconds (GET /metrics)

    @property
    def base_url(self) -> str:
        """The public base URL (no trailing slash)."""
        return self._settings.public_base_url.rstrip("/")

    async def __aenter__(self) -> Self:
        await self.plan_missing()
        requeued = await self._store.requeue_interrupted(self._clock())
        if requeued:
            log.warning("outbox.requeued_after_restart", messages=requeued)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._tasks = [
            self._group.create_task(self._event_loop(), name="dispatch.events"),
            self._group.create_task(self._scheduler_loop(), name="dispatch.scheduler"),
            self._group.create_task(self._outbox_loop(), name="dispatch.outbox"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        assert self._group is not None
        with contextlib.suppress(asyncio.CancelledError):
            await self._group.__aexit__(exc_type, exc, tb)

    def on_incident(self, event: IncidentEvent) -> None:
        """Ingest listener: queue a committed incident transition (never blocks)."""
        self._events.put_nowait(event)

    # -- planning -----------------------------------------------------------------------

    def _policy(self, policy_id: str) -> Policy:
        if policy_id == self._routing.operations.id:
            return self._routing.operations
        policy = self._routing.policies.get(policy_id)
        if policy is None:
            # The configuration changed under a running incident: fall back to the city
            # policy rather than stall (it ends at the command centre).
            log.error("escalation.policy_missing", policy=policy_id)
            return self._routing.policies[self._routing.city]
        return policy

    async def plan_missing(self, after_id: int = 0) -> int:
        """Plan escalation for every open incident without a plan; returns how many.

        A full scan (``after_id=0``) runs at start; incident events scan only above the
        last incident planned.
        """
        plans = []
        for incident in await self._store.unplanned_incidents(after_id):
            policy, route = self._routing.policy_for(
                incident.kelurahan_kode, incident.kecamatan, test=incident.test
            )
            steps = plan_steps(
                IncidentRef(str(incident.id), incident.opened_at, incident.test), policy
            )
            plans.append((incident, policy, route, steps))
        if not plans:
            return 0
        now = self._clock()
        # One commit for every incident found: in a storm, a transaction per incident
        # queued behind the scheduler's and the senders' (measured with bench/dispatch.py).
        async with self._store.transaction() as db:
            for incident, policy, route, steps in plans:
                await db.execute(
                    "INSERT OR IGNORE INTO incident_dispatch (incident_id, policy_id, route,"
                    " planned_at) VALUES (?, ?, ?, ?)",
                    (incident.id, policy.id, route.value, now),
                )
                await db.executemany(
                    "INSERT OR IGNORE INTO escalation_steps (key, incident_id, round, level,"
                    " due_at, state) VALUES (?, ?, ?, ?, ?, 'pending')",
                    [(s.key, incident.id, s.round, s.level, s.due_at) for s in steps],
                )
                await DispatchStore.timeline(
                    db,
                    incident.id,
                    now,
                    "escalation.planned",
                    route.value,
                    detail={
                        "policy": policy.id,
                        "levels": len(policy.levels),
                        "repeat": policy.repeat,
                    },
                )
        for incident, policy, route, _steps in plans:
            self._planned_through = max(self._planned_through, incident.id)
            log.info(
                "escalation.planned",
                incident=incident.id,
                policy=policy.id,
                route=route.value,
                kelurahan=incident.kelurahan,
                test=incident.test,
            )
        self._step_wake.set()
        return len(plans)

    async def _resilient(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run one iteration; a failure is logged and retried after a pause, never fatal.

        Dispatch must outlive a transient database error: ingest keeps committing presses
        and the rows this loop needs are still there when it comes back.
        """
        failures = 0
        while True:
            try:
                await body()
                failures = 0
            except Exception as exc:  # noqa: BLE001 -- logged, retried; the rows persist
                failures += 1
                delay = min(30.0, 0.5 * 2.0 ** min(failures, 6))
                log.error(  # noqa: TRY400 -- one journal line, not a traceback
                    "dispatch.loop_failed",
                    loop=name,
                    error=repr(exc),
                    failures=failures,
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)

    async def _event_loop(self) -> None:
        await self._resilient("events", self._event_once)

    async def _event_once(self) -> None:
        event = await self._events.get()
        try:
            match event.event:
                case "opened":
                    # Ids grow with commits, so one pass that planned a later incident
                    # covered this one: skip the scan for the events queued behind it.
                    if event.incident_id > self._planned_through:
                        await self.plan_missing(after_id=self._planned_through)
                case "cancelled":
                    await self.close(
                        event.incident_id,
                        reason="cancelled",
                        actor=f"device:{event.device_id}",
                        note="cancel press",
                    )
                case "urgent":
                    await self._hasten(event.incident_id)
                case _:
                    pass
        except Exception:
            # Put it back so the transition is not lost; _resilient pauses before retrying.
            self._events.put_nowait(event)
            raise

    async def _hasten(self, incident_id: int) -> None:
        """Repeated presses: bring the next pending level forward to now."""
        now = self._clock()
        async with self._store.transaction() as db:
            cursor = await db.execute(
                "UPDATE escalation_steps SET due_at = ? WHERE key = (SELECT key FROM"
                " escalation_steps WHERE incident_id = ? AND state = 'pending'"
                " ORDER BY due_at, round, level LIMIT 1) AND due_at > ?",
                (now, incident_id, now),
            )
            if cursor.rowcount:
                await DispatchStore.timeline(
                    db, incident_id, now, "escalation.hastened", "repeated_presses"
                )
        if cursor.rowcount:
            log.info("escalation.hastened", incident=incident_id)
            self._step_wake.set()

    # -- the scheduler ------------------------------------------------------------------

    async def _wait(self, event: asyncio.Event, until: float | None) -> None:
        timeout = None if until is None else max(0.0, until - self._clock())
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass

    async def _scheduler_loop(self) -> None:
        await self._resilient("scheduler", self._scheduler_once)

    async def _scheduler_once(self) -> None:
        # Clear before reading: a wake-up that arrives while we work is not lost.
        self._step_wake.clear()
        await self.fire_due()
        await self._wait(self._step_wake, await self._store.next_step_due())

    async def fire_due(self) -> int:
        """Fire every step due by the clock's now (one scheduler pass); returns how many."""
        steps = await self._store.due_steps(self._clock())
        fired = await self._fire_all(steps) if steps else 0
        if fired:
            self._outbox_wake.set()
        return fired

    def _level(self, step: StepRow) -> Level:
        policy = self._policy(step.policy_id)
        if step.level < len(policy.levels):
            return policy.levels[step.level]
        # A shorter policy after a reload: page the command centre rather than nobody.
        return Level(self._routing.command_centre.targets, (Medium.SMS, Medium.VOICE), 0)

    def _alert_body(self, incident: IncidentInfo, person_id: str, now: float) -> str:
        token = make_ack_token(
            self._settings.ack_secret,
            str(incident.id),
            person_id,
            int(now + self._settings.ack_ttl_s),
        )
        return build_alert_sms(
            incident_code=str(incident.id),
            kind_label=_kind_label(incident),
            kelurahan=incident.kelurahan or "(di luar Kota Madiun)",
            place=_place(incident),
            occurred_at=incident.opened_at,
            ack_url=f"{self.base_url}/a/{token}",
            test=incident.test,
        )

    async def fire(self, step: StepRow) -> bool:
        """Fire one due step exactly once: claim it, queue its pages, all in one commit."""
        return await self._fire_all([step]) == 1

    async def _fire_all(self, steps: Sequence[StepRow]) -> int:
        """Fire steps in one commit; returns how many fired (the others were stale)."""
        now = self._clock()
        prepared = []
        for step in steps:
            incident = await self._store.incident(step.incident_id)
            level = self._level(step)
            people = resolve_targets_via(level, self._responders, now)
            prepared.append((step, incident, level, people))
        # One commit per scheduler pass, not per step: in a storm each step's transaction
        # queued behind the senders' (bench/dispatch.py measured fire lag of seconds).
        fired = []
        async with self._store.transaction() as db:
            for step, incident, level, people in prepared:
                outcome = await self._fire_in(
                    db, step, incident, level=level, people=people, now=now
                )
                if outcome is not None:
                    fired.append(outcome)
        for outcome in fired:
            self._log_fired(outcome, now)
        return len(fired)

    async def _fire_in(
        self,
        db: aiosqlite.Connection,
        step: StepRow,
        incident: IncidentInfo | None,
        *,
        level: Level,
        people: Sequence[tuple[str, str]],
        now: float,
    ) -> _Fired | None:
        cursor = await db.execute(
            "UPDATE escalation_steps SET state = 'fired', fired_at = ?"
            " WHERE key = ? AND state = 'pending'",
            (now, step.key),
        )
        if cursor.rowcount != 1:
            return None  # an ack, a closure or another wake-up got there first
        if incident is None or incident.status != "open":
            await db.execute(
                "UPDATE escalation_steps SET state = 'cancelled' WHERE key = ?", (step.key,)
            )
            return None
        messages = []
        for channel in level.channels:
            for person_id, _via in people:
                person = self._responders.people[person_id]
                body = self._alert_body(incident, person_id, now) if channel is Medium.SMS else ""
                messages.append(
                    NewMessage(
                        key=f"{step.key}:{person_id}:{channel.value}",
                        incident_id=incident.id,
                        person_id=person_id,
                        phone=person.phone,
                        channel=channel.value,
                        purpose="alert",
                        body=body,
                        due_at=now,
                        round=step.round,
                        level=step.level,
                    )
                )
        queued = await DispatchStore.insert_messages(db, messages, now)
        await DispatchStore.timeline(
            db,
            incident.id,
            now,
            "escalation.step_fired",
            f"level {step.level + 1}",
            detail={
                "round": step.round + 1,
                "level": step.level + 1,
                "people": [p for p, _ in people],
                "via": [v for _, v in people],
                "messages": queued,
            },
        )
        if not people:
            await self._pull_next_forward(db, step, now)
        remaining = next(
            iter(
                await db.execute_fetchall(
                    "SELECT COUNT(*) FROM escalation_steps"
                    " WHERE incident_id = ? AND state = 'pending'",
                    (incident.id,),
                )
            )
        )[0]
        if remaining == 0:
            await DispatchStore.timeline(
                db, incident.id, now, "escalation.exhausted", "no_ack_after_last_level"
            )
        return _Fired(step, incident.id, len(people), queued, remaining)

    def _log_fired(self, fired: _Fired, now: float) -> None:
        step = fired.step
        self.steps_fired += 1
        self.step_latency.observe(max(0.0, now - step.due_at))
        log.info(
            "escalation.step_due",
            incident=fired.incident_id,
            level=step.level + 1,
            round=step.round + 1,
            people=fired.people,
            messages=fired.queued,
            late_s=round(now - step.due_at, 3),
        )
        if not fired.people:
            log.warning("escalation.level_empty", incident=fired.incident_id, level=step.level + 1)
        if fired.remaining == 0:
            log.warning("escalation.exhausted", incident=fired.incident_id)

    async def _pull_next_forward(self, db: aiosqlite.Connection, step: StepRow, now: float) -> None:
        """A level that paged nobody (roster gap) must not keep the next level waiting."""
        await db.execute(
            "UPDATE escalation_steps SET due_at = ? WHERE key = (SELECT key FROM"
            " escalation_steps WHERE incident_id = ? AND state = 'pending'"
            " ORDER BY due_at, round, level LIMIT 1) AND due_at > ?",
            (now, step.incident_id, now),
        )
        await DispatchStore.timeline(
            db,
            step.incident_id,
            now,
            "escalation.level_empty",
            "nobody_on_call",
            detail={"level": step.level + 1},
        )
        self._step_wake.set()

    # -- the outbox ----------------------------------------------------------------------

    async def _outbox_loop(self) -> None:
        # Senders run side by side in this group and each frees its slot when done: a
        # claimed batch that waited for its slowest request held back every row queued
        # behind it (p99 of seconds with the Twilio peer, bench/dispatch.py).
        async with asyncio.TaskGroup() as senders:
            await self._resilient("outbox", lambda: self._outbox_once(senders))

    async def _outbox_once(self, senders: asyncio.TaskGroup) -> None:
        self._outbox_wake.clear()
        free = self._settings.send_concurrency - self._in_flight
        if free <= 0:
            await self._outbox_wake.wait()  # a sender finishing sets it
            return
        rows = await self._store.claim_outbox(self._clock(), free)
        for row in rows:
            self._in_flight += 1
            senders.create_task(self._send_in_slot(row), name=f"outbox.send.{row.id}")
        if len(rows) == free:
            return  # more may be due: claim again as soon as a slot frees
        await self._wait(self._outbox_wake, await self._store.next_outbox_due())

    async def _send_in_slot(self, row: OutboxRow) -> None:
        try:
            await self._send(row)
        except Exception as exc:  # noqa: BLE001 -- one sender must not cancel the others
            # As before this change: the row stays 'sending' and is requeued at the next
            # start (requeue_interrupted); the line says which one.
            log.error(  # noqa: TRY400 -- one journal line, not a traceback
                "outbox.send_failed", outbox=row.id, incident=row.incident_id, error=repr(exc)
            )
        finally:
            self._in_flight -= 1
            self._outbox_wake.set()

    async def send_due(self) -> int:
        """Claim and send one batch of due outbox rows (one outbox pass); returns how many."""
        rows = await self._store.claim_outbox(self._clock(), self._settings.send_concurrency)
        if rows:
            async with asyncio.TaskGroup() as group:
                for row in rows:
                    group.create_task(self._send(row), name=f"outbox.send.{row.id}")
        return len(rows)

    async def _deliver(self, row: OutboxRow) -> DeliveryResult:
        if row.channel == Medium.SMS.value:
            return await self._channel.send_sms(
                row.phone, row.body, status_callback=f"{self.base_url}/twilio/status/sms/{row.id}"
            )
        return await self._channel.place_call(
            row.phone,
            twiml_url=f"{self.base_url}/twilio/voice/{row.id}",
            status_callback=f"{self.base_url}/twilio/status/call/{row.id}",
        )

    async def _send(self, row: OutboxRow) -> None:
        try:
            result = await self._deliver(row)
        except Exception as exc:  # noqa: BLE001 -- a channel bug must not stall the outbox
            result = DeliveryResult(DeliveryStatus.FAILED_TRANSIENT, error_message=repr(exc))
        kind = "sms" if row.channel == Medium.SMS.value else "call"
        if result.ok:
            event, state = (f"{kind}.sent" if kind == "sms" else "call.placed"), "sent"
            self.messages_sent += 1
        else:
            event, state = f"{kind}.failed", "failed"
        now = self._clock()
        await self._store.record_delivery(
            row.id,
            state=state,
            now=now,
            sid=result.provider_sid,
            error_code=result.error_code,
            error=result.error_message,
            event=event,
            reason=row.purpose,
            detail={
                "to": row.person_id,
                "sid": result.provider_sid,
                "error_code": result.error_code,
                "attempts": result.attempts,
            },
        )
        fields = {
            "incident": row.incident_id,
            "to": row.phone,
            "person": row.person_id,
            "purpose": row.purpose,
            "sid": result.provider_sid,
            "attempts": result.attempts,
        }
        if result.ok:
            log.info(event, **fields)
        else:
            log.error(
                event,
                error_code=result.error_code,
                error=result.error_message,
                permanent=result.status is DeliveryStatus.FAILED_PERMANENT,
                **fields,
            )

    # -- operations messages ---------------------------------------------------------------

    async def send_ops(self, key: str, body: str) -> int:
        """Queue an operations SMS (device health, daily summary) to the operations policy's
        first level, resolved now; never a responder page. ``key`` makes it idempotent."""
        now = self._clock()
        level = self._routing.operations.levels[0]
        people = resolve_targets_via(level, self._responders, now)
        messages = [
            NewMessage(key=f"ops:{key}:{person_id}", incident_id=None, person_id=person_id,
                       phone=self._responders.people[person_id].phone, channel="sms",
                       purpose="ops", body=body, due_at=now)
            for person_id, _via in people
        ]
        async with self._store.transaction() as db:
            queued = await DispatchStore.insert_messages(db, messages, now)
        if queued:
            self._outbox_wake.set()
        log.info("ops.alert_queued", key=key, people=len(people), messages=queued)
        return queued

    async def reassign(self, incident_id: int, person_id: str, *, actor: str) -> int | None:
        """Page one named person for an open or acknowledged incident (an operator's
        choice); returns the messages queued, or None if the incident is not active."""
        person = self._responders.people.get(person_id)
        if person is None:
            raise KeyError(person_id)
        incident = await self._store.incident(incident_id)
        if incident is None or incident.status not in ("open", "acknowledged"):
            return None
        now = self._clock()
        # The call script of an acknowledged incident says "already handled": SMS only.
        channels = [Medium.SMS, Medium.VOICE] if incident.status == "open" else [Medium.SMS]
        messages = [
            NewMessage(key=f"{incident_id}:reassign:{int(now * 1000)}:{person_id}:{c.value}",
                       incident_id=incident_id, person_id=person_id, phone=person.phone,
                       channel=c.value, purpose="alert", due_at=now,
                       body=self._alert_body(incident, person_id, now) if c is Medium.SMS else "")
            for c in channels
        ]
        async with self._store.transaction() as db:
            queued = await DispatchStore.insert_messages(db, messages, now)
            await DispatchStore.timeline(db, incident_id, now, "incident.reassigned", "operator",
                                         actor=actor, detail={"person": person_id,
                                                              "messages": queued})
        self._outbox_wake.set()
        log.info("incident.reassigned", incident=incident_id, to=person_id, by=actor,
                 messages=queued)
        return queued

    # -- acks and closures ----------------------------------------------------------------

    async def _notified(
        self, db: aiosqlite.Connection, incident_id: int, exclude: str | None
    ) -> list[tuple[str, str]]:
        rows = await db.execute_fetchall(_NOTIFIED_SQL, (incident_id, exclude))
        return [(r[0], r[1]) for r in rows]

    @staticmethod
    async def _stop_escalation(db: aiosqlite.Connection, incident_id: int) -> None:
        await db.execute(
            "UPDATE escalation_steps SET state = 'cancelled'"
            " WHERE incident_id = ? AND state = 'pending'",
            (incident_id,),
        )
        await db.execute(
            "UPDATE outbox SET state = 'cancelled' WHERE incident_id = ?"
            " AND purpose = 'alert' AND state = 'pending'",
            (incident_id,),
        )

    def person_name(self, person_id: str | None) -> str | None:
        """A responder's display name, if the id is known."""
        person = self._responders.people.get(person_id) if person_id else None
        return person.name if person else None

    async def ack(
        self, incident_id: int, *, person_id: str | None, actor: str, via: str
    ) -> AckResult:
        """Record an ack; the first one stops escalation and tells the others who handles it."""
        now = self._clock()
        name = self.person_name(person_id) or actor
        incident = await self._store.incident(incident_id)
        if incident is None:
            return AckResult(incident_id, "unknown", first=False, accepted=False)
        async with self._store.transaction() as db:
            status = next(
                iter(
                    await db.execute_fetchall(
                        "SELECT status FROM incidents WHERE id = ?", (incident_id,)
                    )
                )
            )[0]
            if status in ("resolved", "cancelled"):
                await DispatchStore.timeline(
                    db,
                    incident_id,
                    now,
                    "ack.ignored",
                    f"incident_{status}",
                    actor=name,
                    detail={"via": via},
                )
                return AckResult(incident_id, status, first=False, accepted=False)
            first = status == "open"
            await db.execute(
                "INSERT INTO acks (incident_id, person_id, actor, via, at, first)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (incident_id, person_id, name, via, now, int(first)),
            )
            if first:
                await db.execute(
                    "UPDATE incidents SET status = 'acknowledged', updated_at = ? WHERE id = ?",
                    (now, incident_id),
                )
                await db.execute(
                    "UPDATE incident_dispatch SET handled_by = ? WHERE incident_id = ?",
                    (name, incident_id),
                )
                await self._stop_escalation(db, incident_id)
                body = build_handled_sms(
                    incident_code=str(incident_id), responder_name=name, at=now, test=incident.test
                )
                await DispatchStore.insert_messages(
                    db,
                    [
                        NewMessage(
                            key=f"{incident_id}:handled:{pid}",
                            incident_id=incident_id,
                            person_id=pid,
                            phone=phone,
                            channel="sms",
                            purpose="handled",
                            body=body,
                            due_at=now,
                        )
                        for pid, phone in await self._notified(db, incident_id, person_id)
                    ],
                    now,
                )
                await DispatchStore.timeline(
                    db,
                    incident_id,
                    now,
                    "incident.acknowledged",
                    via,
                    actor=name,
                    detail={"person": person_id},
                )
            else:
                await DispatchStore.timeline(
                    db,
                    incident_id,
                    now,
                    "responder.added",
                    via,
                    actor=name,
                    detail={"person": person_id},
                )
        self._outbox_wake.set()
        if first:
            log.info("incident.acknowledged", incident=incident_id, by=name, via=via)
            if self._feedback is not None:
                self._feedback(incident.device_id, incident_id, "help_coming")
        else:
            log.info("incident.responder_added", incident=incident_id, by=name, via=via)
        return AckResult(incident_id, "acknowledged", first=first, accepted=True)

    async def close(self, incident_id: int, *, reason: str, actor: str, note: str = "") -> bool:
        """Stop escalation for a cancelled or resolved incident and tell those paged.

        ``reason`` is "cancelled" (the ingest side already set the status) or "resolved"
        (an operator; this sets the status). Returns False if it was already closed.
        """
        now = self._clock()
        incident = await self._store.incident(incident_id)
        if incident is None:
            return False
        async with self._store.transaction() as db:
            status, closed_at = next(
                iter(
                    await db.execute_fetchall(
                        "SELECT i.status, d.closed_at FROM incidents i"
                        " LEFT JOIN incident_dispatch d ON d.incident_id = i.id WHERE i.id = ?",
                        (incident_id,),
                    )
                )
            )
            if closed_at is not None or (reason == "resolved" and status == "resolved"):
                return False
            if reason == "resolved":
                if status == "cancelled":
                    return False
                await db.execute(
                    "UPDATE incidents SET status = 'resolved', closed_at = ?,"
                    " updated_at = ? WHERE id = ?",
                    (now, now, incident_id),
                )
            await db.execute(
                "UPDATE incident_dispatch SET closed_at = ?, close_reason = ?"
                " WHERE incident_id = ?",
                (now, reason, incident_id),
            )
            await self._stop_escalation(db, incident_id)
            if reason == "cancelled":
                body = build_cancelled_sms(
                    incident_code=str(incident_id),
                    kelurahan=incident.kelurahan or "-",
                    at=now,
                    test=incident.test,
                )
            else:
                body = build_handled_sms(
                    incident_code=str(incident_id),
                    responder_name=actor,
                    at=now,
                    test=incident.test,
                )
            notify = await self._notified(db, incident_id, None)
            if status == "acknowledged":
                # Those already told "ditangani oleh …" need no second notice.
                notify = []
            await DispatchStore.insert_messages(
                db,
                [
                    NewMessage(
                        key=f"{incident_id}:{reason}:{pid}",
                        incident_id=incident_id,
                        person_id=pid,
                        phone=phone,
                        channel="sms",
                        purpose=reason,
                        body=body,
                        due_at=now,
                    )
                    for pid, phone in notify
                ],
                now,
            )
            event = "incident.resolved" if reason == "resolved" else "escalation.stopped"
            await DispatchStore.timeline(
                db,
                incident_id,
                now,
                event,
                reason,
                actor=actor,
                detail={"note": note, "notified": len(notify)},
            )
        self._outbox_wake.set()
        self._step_wake.set()
        log.info(
            "incident.closed", incident=incident_id, reason=reason, by=actor, notified=len(notify)
        )
        if self._feedback is not None:
            self._feedback(incident.device_id, incident_id, reason)
        return True
