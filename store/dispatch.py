"""Dispatch's view of the database: the rows it reads and writes, and the interface a
backend implements (:class:`DispatchStore`; the statements: store/dispatch_*.py, over
store/sqlite_dispatch.py or store/pg_dispatch.py).

Every state change is conditional (``… WHERE state = 'pending'``), so a step fires once
and an outbox row is claimed once even when two wake-ups race or a restart repeats work.
Each method that writes is one transaction, inside the store: dispatch/ holds no SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self


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


@dataclass(frozen=True, slots=True)
class Firing:
    """A due step to fire, with the pages it queues if its incident is still open."""

    step: StepRow
    # The incident exists and is open (read before the commit): otherwise the claimed
    # step is cancelled and queues nothing.
    live: bool
    messages: tuple[NewMessage, ...]
    people: tuple[str, ...]
    via: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fired:
    """A step this store claimed and fired: how many pages were new, how many steps wait."""

    key: str
    queued: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Plan:
    """An incident's escalation plan, and the steps already due to fire in its commit."""

    incident_id: int
    policy_id: str
    route: str
    steps: tuple[StepRow, ...]
    detail: Mapping[str, Any]
    fire: tuple[Firing, ...] = ()


@dataclass(frozen=True, slots=True)
class ClockShift:
    """A wall-clock step applied to the pending due times."""

    delta: float
    steps: int
    messages: int


class ClockFrame(Protocol):
    """The frame the stored due times are in (dispatch.loops.SteadyClock)."""

    def step(self) -> float:
        """How far the wall clock was stepped against the frame; 0.0: not at all."""
        ...

    def follow(self, delta: float) -> None:
        """Take ``delta`` into the frame: the due times were shifted by it."""
        ...


@dataclass(frozen=True, slots=True)
class Notice:
    """The SMS told to everyone an incident's alerts reached: key ``{key_prefix}:{person}``."""

    key_prefix: str
    purpose: str
    body: str


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """What recording an ack did, and the incident's status it found."""

    status: str
    # ignored: the incident is closed; repeated: this person acked it already;
    # first: it stopped escalation; added: a further responder.
    outcome: Literal["ignored", "repeated", "first", "added"]


@dataclass(frozen=True, slots=True)
class HealthRow:
    """One device_health row."""

    id: int
    subject: str
    condition: str
    raised_at: float
    cleared_at: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HealthRaise:
    """A health condition to raise."""

    subject: str
    condition: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Unhealthy:
    """A raised condition as ``panicctl status`` lists it."""

    subject: str
    condition: str
    raised_at: float


@dataclass(frozen=True, slots=True)
class OpenIncident:
    """An open or acknowledged incident as ``panicctl status`` lists it."""

    id: int
    status: str
    test: bool
    urgent: bool
    device_id: str
    opened_at: float
    kelurahan: str | None
    kecamatan: str | None


@dataclass(frozen=True, slots=True)
class QueueDepths:
    """Work waiting in the database: outbox messages pending or sending, pending steps."""

    outbox: int
    escalation: int


StatusOutcome = Literal["applied", "replayed", "sid_mismatch", "unknown"]

# What a wake-up says changed, committed by any instance on the database: a step pending
# (inserted, or its due time moved), an outbox row pending or out of 'sending' (its lease
# freed), an incident stored, an ack recorded.
WakeKind = Literal["step", "outbox", "incident", "ack"]
WAKE_KINDS: tuple[WakeKind, ...] = ("step", "outbox", "incident", "ack")


class DispatchStore(Protocol):
    """What dispatch needs of a database; an async context manager (open, migrated).

    Methods that write are one transaction each; ``now`` is the caller's clock.
    """

    async def __aenter__(self) -> Self:
        """Open the connection."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close it."""
        ...

    def on_wake(self, kind: WakeKind, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop, never blocking) when another instance may
        have changed work of ``kind``; on one process (SQLite) it is never called, its
        owner waking itself."""
        ...

    # Whether due times and leases are compared in the database's clock (several
    # instances on one store) rather than this process's (dispatch.loops.SharedClock).
    shared_clock: bool

    async def database_time(self) -> float | None:
        """The database's clock now (Unix seconds) when several instances share the store
        and compare due times and leases in that one clock; None for one process's own
        file, whose owner's clock is the only one."""
        ...

    # -- incidents and steps (store/dispatch_steps.py) ----------------------------------

    async def incident(self, incident_id: int) -> IncidentInfo | None:
        """One incident, or None."""
        ...

    async def unplanned_incidents(self, after_id: int = 0) -> list[IncidentInfo]:
        """Open incidents above ``after_id`` with no escalation plan yet, by id."""
        ...

    async def newest_incident_id(self) -> int:
        """The highest incident id committed so far; 0 when there is none."""
        ...

    async def due_steps(self, now: float) -> list[StepRow]:
        """Pending steps due at or before ``now``, earliest first."""
        ...

    async def next_step_due(self) -> float | None:
        """When the earliest pending step falls due."""
        ...

    async def pending_step_count(self) -> int:
        """How many escalation steps are waiting."""
        ...

    async def plan_incidents(self, plans: Sequence[Plan], now: float) -> list[Fired]:
        """Store each plan (once per incident) and fire its due steps, in one commit."""
        ...

    async def fire_steps(self, firings: Sequence[Firing], now: float) -> list[Fired]:
        """Claim and fire each pending step once, queueing its pages, in one commit."""
        ...

    async def hasten(self, incident_id: int, now: float, reason: str) -> bool:
        """Make the incident's next pending level due now; False if none was later."""
        ...

    async def follow_clock_step(self, frame: ClockFrame) -> ClockShift | None:
        """Shift every pending due time by the frame's step and follow it, in one commit."""
        ...

    # -- acks, closures, reassignment (store/dispatch_responses.py) ---------------------

    async def queue_messages(self, messages: Sequence[NewMessage], now: float) -> int:
        """Insert outbox rows, skipping keys that exist; returns how many were new."""
        ...

    async def record_reassign(
        self, incident_id: int, person_id: str, actor: str,
        messages: Sequence[NewMessage], now: float,
    ) -> int:
        """Queue an operator's reassign pages with their timeline line; returns how many."""
        ...

    async def record_ack(
        self, incident_id: int, *, person_id: str | None, name: str, via: str,
        now: float, handled: Notice,
    ) -> AckOutcome:
        """Record an ack; the first stops escalation and queues ``handled`` to those paged."""
        ...

    async def close_incident(
        self, incident_id: int, *, reason: str, actor: str, note: str, now: float,
        notice: Notice,
    ) -> int | None:
        """Stop escalation ("cancelled" or "resolved") and queue ``notice`` to those paged
        (unless already told who handles it); the number told, None if already closed."""
        ...

    # -- the outbox (store/dispatch_outbox.py) ------------------------------------------

    async def next_outbox_due(self) -> float | None:
        """When the earliest pending outbox row may be sent."""
        ...

    async def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        """One outbox row."""
        ...

    async def claim_outbox(self, now: float, limit: int) -> list[OutboxRow]:
        """Move up to ``limit`` due pending rows to 'sending', claimed by this instance
        for its lease (rows whose lease ran out taken back first), and return them."""
        ...

    async def requeue_interrupted(self, now: float, older_than: float | None = None) -> int:
        """Rows this instance left in 'sending' (all, or those older than ``older_than``)
        and anyone's whose lease ran out go back to 'pending', in doubt; how many."""
        ...

    async def recorded_sids(self, sids: Sequence[str]) -> set[str]:
        """Which of these provider SIDs a message of the outbox holds already."""
        ...

    async def undeliverable_levels(self, outbox_ids: Sequence[int]) -> list[int]:
        """Incidents where one of these failed alerts completed an all-failed level."""
        ...

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> list[int]:
        """Write the outcomes of send attempts in one commit; returns the ids cancelled."""
        ...

    async def record_status_callback(
        self, outbox_id: int, *, sid: str, state: str, rank: int, now: float,
        error_code: int | None, event: str, detail: Mapping[str, Any],
    ) -> StatusOutcome:
        """Apply a provider status callback at most once, never moving a row back."""
        ...

    # -- health (store/dispatch_health.py) ----------------------------------------------

    async def raised_condition(self, subject: str, condition: str) -> tuple[int, float] | None:
        """The raised (not cleared) row of ``subject``/``condition``: (id, raised_at)."""
        ...

    async def raise_condition(
        self, subject: str, condition: str, now: float, detail: Mapping[str, Any]
    ) -> int | None:
        """Raise a health condition once; None if it is raised already."""
        ...

    async def clear_condition(self, subject: str, condition: str, now: float) -> int | None:
        """Clear a raised health condition; its row id, None if none was raised."""
        ...

    async def raised_health(self) -> list[HealthRow]:
        """Every raised (not cleared) condition."""
        ...

    async def device_sightings(self) -> dict[str, tuple[float | None, int | None]]:
        """Device id -> (last seen at, battery %) of every device heard from."""
        ...

    async def record_health(
        self, raised: Sequence[HealthRaise], cleared: Sequence[int], now: float
    ) -> list[int]:
        """Raise and clear (by row id) conditions in one commit; the new ids in order."""
        ...

    async def health_since(self, conditions: Sequence[str], since: float) -> list[HealthRow]:
        """Rows of these conditions raised after ``since``, cleared or not."""
        ...

    async def unannounced_health(self, since: float) -> list[HealthRow]:
        """Rows raised after ``since`` with no operations SMS queued about them."""
        ...

    async def summary_counts(self, since: float) -> tuple[int, int]:
        """Incidents open now, and real (not test) incidents opened since ``since``."""
        ...

    async def open_counts(self) -> tuple[int, int]:
        """Open (or acknowledged) incidents and pending escalation steps."""
        ...

    # -- what operators see (store/dispatch_observe.py) ---------------------------------

    async def incident_counts(self) -> dict[str, int]:
        """Incidents by status."""
        ...

    async def notification_counts(self) -> dict[tuple[str, str], int]:
        """Outbox messages by (channel, state)."""
        ...

    async def raised_counts(self) -> dict[str, int]:
        """Raised health conditions by condition."""
        ...

    async def queue_depths(self) -> QueueDepths:
        """Messages and steps waiting."""
        ...

    async def open_incidents(self) -> list[OpenIncident]:
        """Open and acknowledged incidents by id."""
        ...

    async def unhealthy(self) -> list[Unhealthy]:
        """Raised conditions by subject and condition."""
        ...
