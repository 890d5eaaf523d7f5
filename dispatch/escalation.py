"""Pure escalation logic: which level fires when, who it pages, and what an ack cancels.

No clock, no database: times are Unix seconds (UTC floats) passed in by the caller.

Two kinds of rows, both keyed for idempotency:

* ``EscalationStep`` — one per (round, level), planned in full when the incident opens
  and inserted in the same transaction as the incident. Key
  ``f"{incident}:{round}:{level}"``. Rosters are *not* resolved here, because the person
  on call at level 3 is whoever is on shift when level 3 falls due, not at opening.
* ``Page`` — one per (person, channel) of a fired step, produced by ``expand_step`` at
  fire time and inserted as outbox rows. Key
  ``f"{incident}:{round}:{level}:{person}:{channel}"``; the outbox enforces it UNIQUE.

What the scheduler must do to never double-fire:

1. Sleep until ``next_due_at(pending steps)``; after a restart overdue steps fire at once.
2. For each step from ``due_steps(steps, now)``, in ONE transaction (the store's
   ``fire_steps``): claim it only while it is still pending (if it is not, an ack or
   another worker got there first: do nothing), and insert the outbox rows from
   ``expand_step``, skipping keys that exist. A crash before the commit leaves the step
   pending and nothing queued; a crash after it leaves the pages in the outbox, which
   the channel workers resume — the step is never expanded twice.
3. If ``expand_step`` returns nothing (a roster gap), apply
   ``reschedule_after_empty_level`` in the same transaction so the next level is not
   kept waiting for a level that paged no one.

State machines::

    incident:  OPEN --ack--> ACKED --resolve--> RESOLVED
               OPEN --cancel press (grace window)--> CANCELLED
               OPEN --resolve (operator)--> RESOLVED
               (every step fired and no ack: stays OPEN, timeline "escalation.exhausted")

    step:      PENDING --due, claimed--> FIRED          (terminal; pages are in the outbox)
               PENDING --ack/cancel/resolve--> CANCELLED (terminal)

    page:      outbox-owned: pending -> sent -> delivered | failed; pending pages of a
               closed incident are cancelled with its steps (``close().cancel_pages``).

The first ack closes escalation: ``close(CloseReason.ACK, …)`` lists the pending steps and
pages to cancel and the people already paged to tell "ditangani oleh NAME". A cancel
press or an operator resolve tells everyone already paged to stand down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

from dispatch.policy import Level, Medium, Policy
from dispatch.responders import Responders


class StepState(StrEnum):
    """Where an escalation step is in its life."""

    PENDING = "pending"
    FIRED = "fired"
    CANCELLED = "cancelled"


class CloseReason(StrEnum):
    """Why escalation stops."""

    ACK = "ack"
    CANCEL = "cancel"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class IncidentRef:
    """The parts of an incident that escalation needs."""

    id: str
    opened_at: float
    test: bool = False


@dataclass(frozen=True, slots=True)
class EscalationStep:
    """One level of one round of an incident's policy, due at ``due_at`` (Unix seconds)."""

    incident_id: str
    round: int
    level: int
    due_at: float
    state: StepState = StepState.PENDING

    @property
    def key(self) -> str:
        """The idempotency key the store enforces as UNIQUE."""
        return f"{self.incident_id}:{self.round}:{self.level}"


@dataclass(frozen=True, slots=True)
class Page:
    """One message to one person on one channel, produced when a step fires."""

    incident_id: str
    round: int
    level: int
    person_id: str
    channel: Medium
    due_at: float

    @property
    def key(self) -> str:
        """The idempotency key the outbox enforces as UNIQUE."""
        return f"{self.incident_id}:{self.round}:{self.level}:{self.person_id}:{self.channel}"


@dataclass(frozen=True, slots=True)
class Closure:
    """What closing an incident's escalation means: rows to cancel, people to tell."""

    reason: CloseReason
    cancel_steps: tuple[EscalationStep, ...]
    cancel_pages: tuple[Page, ...]
    notify: tuple[str, ...]
    handled_by: str | None


def plan_steps(incident: IncidentRef, policy: Policy) -> tuple[EscalationStep, ...]:
    """Every (round, level) step of ``policy`` for ``incident``, due times non-decreasing."""
    return tuple(
        EscalationStep(incident.id, rnd, level, incident.opened_at + offset)
        for rnd, level, offset in policy.offsets()
    )


def _as_datetime(at: float | datetime) -> datetime:
    return at if isinstance(at, datetime) else datetime.fromtimestamp(at, tz=UTC)


def resolve_targets_via(
    level: Level, responders: Responders, at: float | datetime
) -> tuple[tuple[str, str], ...]:
    """``(person_id, via)`` for a level at instant ``at``; each person once, first source wins."""
    when = _as_datetime(at)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []

    def add(person: str, via: str) -> None:
        if person not in seen:
            seen.add(person)
            out.append((person, via))

    for person in level.targets.people:
        add(person, "person")
    for group in level.targets.groups:
        for person in responders.groups[group].members:
            add(person, f"group:{group}")
    for roster in level.targets.rosters:
        for person in responders.rosters[roster].on_call(when):
            add(person, f"roster:{roster}")
    return tuple(out)


def resolve_targets(level: Level, responders: Responders, at: float | datetime) -> tuple[str, ...]:
    """The person ids a level pages at instant ``at`` (rosters resolved at that instant)."""
    return tuple(person for person, _ in resolve_targets_via(level, responders, at))


def expand_step(
    step: EscalationStep, policy: Policy, responders: Responders, at: float
) -> tuple[Page, ...]:
    """The pages a step sends when it fires at ``at``: every channel's pass over every person.

    Channel-major order (all SMS, then all calls) because an SMS reaches everyone within
    seconds while each call takes a line for up to a minute.
    """
    level = policy.levels[step.level]
    people = resolve_targets(level, responders, at)
    return tuple(
        Page(step.incident_id, step.round, step.level, person, channel, at)
        for channel in level.channels
        for person in people
    )


def _order(step: EscalationStep) -> tuple[float, int, int]:
    return (step.due_at, step.round, step.level)


def due_steps(steps: Iterable[EscalationStep], now: float) -> tuple[EscalationStep, ...]:
    """Pending steps due at or before ``now``, earliest first (overdue ones fire at once)."""
    return tuple(
        sorted((s for s in steps if s.state is StepState.PENDING and s.due_at <= now), key=_order)
    )


def next_due_at(steps: Iterable[EscalationStep]) -> float | None:
    """When the scheduler must wake next, or None if nothing is pending."""
    return min((s.due_at for s in steps if s.state is StepState.PENDING), default=None)


def steps_to_cancel(steps: Iterable[EscalationStep]) -> tuple[EscalationStep, ...]:
    """The steps an ack, cancel or resolve must cancel: every one still pending."""
    return tuple(sorted((s for s in steps if s.state is StepState.PENDING), key=_order))


def is_exhausted(steps: Iterable[EscalationStep]) -> bool:
    """Whether every step has fired (the command centre was paged and no one acked)."""
    rows = list(steps)
    return bool(rows) and all(s.state is StepState.FIRED for s in rows)


def notified_people(pages: Iterable[Page]) -> tuple[str, ...]:
    """The people paged so far, each once, in the order they were first paged."""
    seen: dict[str, None] = {}
    for page in sorted(pages, key=lambda p: (p.due_at, p.round, p.level)):
        seen.setdefault(page.person_id)
    return tuple(seen)


def close(
    reason: CloseReason,
    steps: Iterable[EscalationStep],
    sent: Iterable[Page],
    *,
    unsent: Iterable[Page] = (),
    acked_by: str | None = None,
) -> Closure:
    """What to cancel and whom to tell when an incident is acked, cancelled or resolved.

    ``sent`` are pages that left the outbox (the people who know about the incident);
    ``unsent`` are pages still queued, which are cancelled so no one is called after an
    ack. Call this on the first transition out of OPEN only; later acks find nothing
    pending and must not repeat the notices.
    """
    if reason is CloseReason.ACK and acked_by is None:
        raise ValueError("an ack needs acked_by")
    notified = notified_people(sent)
    notify = tuple(p for p in notified if p != acked_by)
    return Closure(
        reason=reason,
        cancel_steps=steps_to_cancel(steps),
        cancel_pages=tuple(unsent),
        notify=notify,
        handled_by=acked_by if reason is CloseReason.ACK else None,
    )


def apply_cancel(
    steps: Iterable[EscalationStep], cancel: Iterable[EscalationStep]
) -> tuple[EscalationStep, ...]:
    """``steps`` with every step in ``cancel`` marked CANCELLED (an in-memory store's update)."""
    keys = {s.key for s in cancel}
    return tuple(
        replace(s, state=StepState.CANCELLED)
        if s.key in keys and s.state is StepState.PENDING
        else s
        for s in steps
    )


def reschedule_after_empty_level(
    steps: Iterable[EscalationStep], fired: EscalationStep, at: float
) -> tuple[EscalationStep, ...]:
    """Pending steps after ``fired`` moved earlier so the next one is due at ``at``.

    Used when a level resolved to nobody (a roster gap): waiting out its ``wait_s`` would
    delay help for a page no one received. Keys do not change, so this stays idempotent;
    the later waits keep their lengths. Returns only the changed rows.
    """
    later = sorted(
        (s for s in steps if s.state is StepState.PENDING and _order(s) > _order(fired)),
        key=_order,
    )
    if not later or later[0].due_at <= at:
        return ()
    shift = later[0].due_at - at
    return tuple(replace(s, due_at=s.due_at - shift) for s in later)
