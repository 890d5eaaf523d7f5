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
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import structlog

from dispatch.channel import Channel
from dispatch.escalation import EscalationStep, IncidentRef, plan_steps, resolve_targets_via
from dispatch.loops import SharedClock, SteadyClock, resilient, wait_until
from dispatch.metrics import Histogram
from dispatch.outbox import Outbox
from dispatch.policy import Level, Medium, Policy, Routing
from dispatch.responders import Responders
from dispatch.responses import AckResult, DispatchSettings, Feedback, Responses, alert_body
from gateway.ingest import IncidentEvent
from store.dispatch import DispatchStore, Fired, Firing, IncidentInfo, NewMessage, Plan, StepRow

__all__ = ["AckResult", "DispatchSettings", "Dispatcher", "Feedback"]

log = structlog.get_logger("panicd.dispatch")

DRAIN_DEADLINE_S = 10.0
# How often the wall clock is compared with the monotonic one. Python 3.11 exposes no
# event for "the clock was set" (timerfd's TFD_TIMER_CANCEL_ON_SET arrives in 3.13), and
# the comparison is two clock reads; nothing waits on it (SteadyClock keeps every
# comparison in one frame until the step is applied).
CLOCK_CHECK_S = 1.0
# How often an instance on a shared store measures the database's clock again: the two
# drift apart by NTP's slew at most (0.5 ms/s), 5 ms between measurements.
SHARED_CLOCK_SYNC_S = 10.0

@dataclass(frozen=True, slots=True)
class _Fired:
    """A step that fired inside a pass's transaction, logged once it commits."""

    step: StepRow
    incident_id: int
    people: int
    queued: int
    remaining: int
    test: bool = False


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
        clock: Callable[[], float] | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        """``clock`` defaults to a :class:`SteadyClock` on the system clocks, whose steps
        are followed, or on a store several instances share to a :class:`SharedClock`,
        the database's; a plain callable (a test's) is taken as it is."""
        self._store = store
        self._routing = routing
        self._responders = responders
        self._channel = channel
        self._settings = settings
        if clock is None:
            clock = SharedClock() if store.shared_clock else SteadyClock()
        self._clock: Callable[[], float] = clock
        self._steady = clock if isinstance(clock, SteadyClock) else None
        self._shared = clock if isinstance(clock, SharedClock) else None
        clock = self._clock
        self._feedback = feedback
        self._events: asyncio.Queue[IncidentEvent] = asyncio.Queue()
        self._step_wake = asyncio.Event()
        # Another instance stored an incident (or may have: its wake-ups were lost): it
        # may die before planning it, so this one looks too (plan_missing's ``peers``).
        self._peer_incidents = asyncio.Event()
        store.on_wake("step", self._step_wake.set)
        store.on_wake("incident", self._peer_incidents.set)
        # Every incident up to this id is planned or closed (closing is final), so an
        # 'opened' event at or below it needs no scan.
        self._planned_through = 0
        self._outbox = Outbox(store, channel, base_url=self.base_url_of(settings),
                              concurrency=settings.send_concurrency, clock=clock,
                              on_undeliverable=self._level_undeliverable)
        self._responses = Responses(store, routing, responders, settings, clock=clock,
                                    feedback=feedback, outbox=self._outbox,
                                    wake_scheduler=self._step_wake.set)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.steps_fired = 0
        self.step_latency = Histogram()  # step due → fired, seconds (GET /metrics)

    @staticmethod
    def base_url_of(settings: DispatchSettings) -> str:
        """The public base URL without a trailing slash."""
        return settings.public_base_url.rstrip("/")

    @property
    def base_url(self) -> str:
        """The public base URL (no trailing slash)."""
        return self.base_url_of(self._settings)

    @property
    def shared_clock(self) -> SharedClock | None:
        """The database's clock this dispatcher keeps in sync on a shared store (None on
        one box): the daemon stamps receptions with it too (docs/HA.md, Clocks)."""
        return self._shared

    async def __aenter__(self) -> Self:
        if self._shared is not None:
            # Before anything is planned or claimed: due times and leases in its clock.
            await self._shared.sync(self._store.database_time)
        await self.plan_missing()
        requeued = await self._store.requeue_interrupted(self._clock())
        if requeued:
            log.warning("outbox.requeued_after_restart", messages=requeued)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._tasks = [
            self._group.create_task(self._event_loop(), name="dispatch.events"),
            self._group.create_task(self._scheduler_loop(), name="dispatch.scheduler"),
            self._group.create_task(self._outbox.run(), name="dispatch.outbox"),
            self._group.create_task(self._peer_loop(), name="dispatch.peers"),
        ]
        if self._steady is not None:
            self._tasks.append(
                self._group.create_task(self._clock_loop(), name="dispatch.clock")
            )
        if self._shared is not None:
            self._tasks.append(
                self._group.create_task(self._shared_clock_loop(), name="dispatch.clock")
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Let sends the provider may already have accepted be recorded, so a restart does
        # not send them again; then stop everything.
        await self._outbox.drain(DRAIN_DEADLINE_S)
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

    async def plan_missing(
        self, *, fire_now: bool = False, committed_through: int | None = None,
        peers: bool = False,
    ) -> int:
        """Plan escalation for every open incident without a plan; returns how many.

        Looks only above the incidents known to be planned or closed: at start, at all of
        them. With ``fire_now`` the steps already due (level 1) fire in the same commit as
        the plan — one transaction per new incident instead of two on the dispatch
        connection, which is what a storm queues on (bench/dispatch.py).
        ``committed_through`` is an incident id known to be committed (an 'opened'
        event's); without it the newest committed id is read before the scan.

        With ``peers`` it looks at every open incident, and learns nothing from what it
        finds: instances on one PostgreSQL reserve incident ids ahead and commit them out
        of order, so a peer's incident may sit below one this instance planned. A peer
        planning the same incident at once is no harm: the database keeps one plan
        (incident_dispatch's key), and only its commit inserts the steps and fires them.
        """
        # An incident stamped after a step is planned in the stepped frame: apply it first.
        await self.follow_clock_step()
        if peers:
            return await self._plan_found(await self._store.unplanned_incidents(0),
                                          fire_now=fire_now)
        if committed_through is None:
            committed_through = await self._store.newest_incident_id()
        # Ingest commits ids in order, so every incident up to committed_through is
        # committed before the scan below starts and the scan sees it: those it does not
        # return are planned or closed already. Advancing past them even when nothing is
        # found keeps the first panic after a restart from scanning from id 0 again.
        found = await self._store.unplanned_incidents(self._planned_through)
        await self._plan_found(found, fire_now=fire_now)
        self._planned_through = max(
            self._planned_through, committed_through, *(incident.id for incident in found)
        )
        return len(found)

    async def _plan_found(self, found: Sequence[IncidentInfo], *, fire_now: bool) -> int:
        """Plan (and with ``fire_now`` fire the due steps of) these unplanned incidents in
        one commit; returns how many."""
        if not found:
            return 0
        plans = []
        now = self._clock()
        for incident in found:
            policy, route = self._routing.policy_for(
                incident.kelurahan_kode, incident.kecamatan, test=incident.test
            )
            # Stamped by the receiving instance's clock, compared here in the database's:
            # a receiver ahead of it must not hold the first level back (one behind brings
            # the levels forward by its lag, never later).
            opened = min(incident.opened_at, now) if self._shared else incident.opened_at
            steps = plan_steps(IncidentRef(str(incident.id), opened, incident.test), policy)
            plans.append((incident, policy, route, steps))
        stored = [self._plan(incident, policy, route.value, steps, now, fire_now=fire_now)
                  for incident, policy, route, steps in plans]
        incidents = {incident.id: incident for incident in found}
        firings = [(firing, incidents[plan.incident_id]) for plan in stored
                   for firing in plan.fire]
        fired = self._outcomes(await self._store.plan_incidents(stored, now), firings)
        for outcome in fired:
            self._log_fired(outcome, now)
        if fired:
            self._outbox.wake()
        for incident, policy, route, _steps in plans:
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

    def _plan(self, incident: IncidentInfo, policy: Policy, route: str,
              steps: Sequence[EscalationStep], now: float, *, fire_now: bool) -> Plan:
        rows = tuple(StepRow(s.key, incident.id, s.round, s.level, s.due_at, policy.id)
                     for s in steps)
        # plan_steps orders them by due time: those due already fire in the planning commit.
        due = itertools.takewhile(lambda row: row.due_at <= now, rows) if fire_now else ()
        return Plan(incident.id, policy.id, route, rows,
                    {"policy": policy.id, "levels": len(policy.levels), "repeat": policy.repeat},
                    tuple(self._firing(row, incident, now) for row in due))

    async def _event_loop(self) -> None:
        await resilient("events", self._event_once)

    async def _event_once(self) -> None:
        event = await self._events.get()
        try:
            match event.event:
                case "opened":
                    # Ids grow with commits, so one pass that planned a later incident
                    # covered this one: skip the scan for the events queued behind it.
                    if event.incident_id > self._planned_through:
                        await self.plan_missing(fire_now=True,
                                                committed_through=event.incident_id)
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

    async def _peer_loop(self) -> None:
        await resilient("peers", self._peer_once)

    async def _peer_once(self) -> None:
        await self._peer_incidents.wait()
        # Cleared before the scan: an incident stored while it runs gets a scan of its own.
        self._peer_incidents.clear()
        try:
            await self.plan_missing(fire_now=True, peers=True)
        except Exception:
            self._peer_incidents.set()  # not lost: _resilient pauses before the retry
            raise

    async def _hasten(self, incident_id: int, reason: str = "repeated_presses") -> None:
        """Bring the next pending level forward to now (repeated presses, or a level at
        which nobody could be reached)."""
        if await self._store.hasten(incident_id, self._clock(), reason):
            log.info("escalation.hastened", incident=incident_id, reason=reason)
            self._step_wake.set()

    async def _level_undeliverable(self, incident_id: int) -> None:
        incident = await self._store.incident(incident_id)
        if incident is not None and incident.status == "open":
            await self._hasten(incident_id, reason="level_undeliverable")

    # -- the clock ----------------------------------------------------------------------

    async def _clock_loop(self) -> None:
        await resilient("clock", self._clock_once)

    async def _clock_once(self) -> None:
        await asyncio.sleep(CLOCK_CHECK_S)
        await self.follow_clock_step()

    async def _shared_clock_loop(self) -> None:
        await resilient("clock", self._shared_clock_once)

    async def _shared_clock_once(self) -> None:
        await asyncio.sleep(SHARED_CLOCK_SYNC_S)
        if self._shared is not None:
            await self._shared.sync(self._store.database_time)

    async def follow_clock_step(self) -> float:
        """Apply a step of the wall clock to every pending due time; returns the step.

        A step planned as "wait 60 s" then still fires 60 s of real time after it was
        planned, and the stored due times stay wall-clock times, so a restart resumes
        them in the new frame. Shifting the rows and following the step happen together:
        until then every comparison uses the old frame (:class:`SteadyClock`).
        """
        steady = self._steady
        if steady is None or not steady.step():
            return 0.0
        shift = await self._store.follow_clock_step(steady)
        if shift is None:
            return 0.0
        log.warning("clock.stepped", step_s=round(shift.delta, 3), steps_shifted=shift.steps,
                    messages_shifted=shift.messages)
        self._step_wake.set()
        self._outbox.wake()
        return shift.delta

    # -- the scheduler ------------------------------------------------------------------

    async def _scheduler_loop(self) -> None:
        await resilient("scheduler", self._scheduler_once)

    async def _scheduler_once(self) -> None:
        # Clear before reading: a wake-up that arrives while we work is not lost.
        self._step_wake.clear()
        await self.fire_due()
        await wait_until(self._step_wake, await self._store.next_step_due(), self._clock)

    async def fire_due(self) -> int:
        """Fire every step due by the clock's now (one scheduler pass); returns how many."""
        steps = await self._store.due_steps(self._clock())
        fired = await self._fire_all(steps) if steps else 0
        if fired:
            self._outbox.wake()
        return fired

    def _level(self, step: StepRow) -> Level:
        policy = self._policy(step.policy_id)
        if step.level < len(policy.levels):
            return policy.levels[step.level]
        # A shorter policy after a reload: page the command centre rather than nobody.
        return Level(self._routing.command_centre.targets, (Medium.SMS, Medium.VOICE), 0)

    def _alert_body(self, incident: IncidentInfo, person_id: str, now: float) -> str:
        return alert_body(self._settings, incident, person_id, now)

    async def fire(self, step: StepRow) -> bool:
        """Fire one due step exactly once: claim it, queue its pages, all in one commit."""
        return await self._fire_all([step]) == 1

    async def _fire_all(self, steps: Sequence[StepRow]) -> int:
        """Fire steps in one commit; returns how many fired (the others were stale)."""
        now = self._clock()
        firings = []
        for step in steps:
            incident = await self._store.incident(step.incident_id)
            firings.append((self._firing(step, incident, now), incident))
        fired = self._outcomes(await self._store.fire_steps([f for f, _ in firings], now),
                               firings)
        for outcome in fired:
            self._log_fired(outcome, now)
        return len(fired)

    def _firing(self, step: StepRow, incident: IncidentInfo | None, now: float) -> Firing:
        """What firing ``step`` queues: its level's people now, each on each channel."""
        level = self._level(step)
        people = resolve_targets_via(level, self._responders, now)
        if incident is None or incident.status != "open":
            return Firing(step, live=False, messages=(), people=(), via=())
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
        return Firing(step, live=True, messages=tuple(messages),
                      people=tuple(p for p, _ in people), via=tuple(v for _, v in people))

    def _outcomes(self, fired: Sequence[Fired],
                  firings: Sequence[tuple[Firing, IncidentInfo | None]]) -> list[_Fired]:
        """The steps the store fired, joined with what was asked of it, for the log."""
        asked = {firing.step.key: (firing, incident) for firing, incident in firings}
        outcomes = []
        for done in fired:
            firing, incident = asked[done.key]
            if not firing.people:
                self._step_wake.set()  # the store brought the next level forward
            outcomes.append(_Fired(firing.step, firing.step.incident_id, len(firing.people),
                                   done.queued, done.remaining,
                                   incident is not None and incident.test))
        return outcomes

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
            # A test press pages only operations (one level): running out is its normal end.
            exhausted = log.info if fired.test else log.warning
            exhausted("escalation.exhausted", incident=fired.incident_id, test=fired.test)

    # -- the outbox ----------------------------------------------------------------------

    async def send_due(self) -> int:
        """Claim, send and record one batch of due outbox rows; returns how many."""
        return await self._outbox.send_due()

    @property
    def page_accepted(self) -> asyncio.Event:
        """Set once the provider has accepted a page since start."""
        return self._outbox.accepted

    @property
    def messages_sent(self) -> int:
        """Messages the channel accepted since start."""
        return self._outbox.messages_sent

    # -- responses (acks, closures, reassign, operations messages) ----------------------

    def person_name(self, person_id: str | None) -> str | None:
        """A responder's display name, if the id is known."""
        return self._responses.person_name(person_id)

    async def ack(
        self, incident_id: int, *, person_id: str | None, actor: str, via: str
    ) -> AckResult:
        """Record an ack; the first one stops escalation and tells the others who handles it."""
        return await self._responses.ack(incident_id, person_id=person_id, actor=actor, via=via)

    async def close(self, incident_id: int, *, reason: str, actor: str, note: str = "") -> bool:
        """Stop escalation for a cancelled or resolved incident and tell those paged."""
        return await self._responses.close(incident_id, reason=reason, actor=actor, note=note)

    async def reassign(self, incident_id: int, person_id: str, *, actor: str) -> int | None:
        """Page one named person for an active incident; None if it is not active."""
        return await self._responses.reassign(incident_id, person_id, actor=actor)

    async def send_ops(self, key: str, body: str) -> int:
        """Queue an operations SMS to the operations policy's first level (never responders)."""
        return await self._responses.send_ops(key, body)
