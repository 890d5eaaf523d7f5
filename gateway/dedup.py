"""What an accepted press does to incidents (pure; DESIGN §2 Dedup and Press kinds).

* panic: opens an incident, or attaches to the device's active one (a burst); reaching
  ``burst_urgent_presses`` presses marks it urgent.
* cancel: within ``cancel_grace_s`` of opening, cancels the device's active incident.
  Later it is refused and recorded: the incident stays open, because a late "cancel" may
  be coerced and responders must still check.
* test: opens a test incident (operations only), or attaches to a recent one.
* heartbeat: device health only.

After an incident is resolved or cancelled, the next press opens a new incident.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.model import PressKind


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    """The tunable windows of incident dedup."""

    cancel_grace_s: float = 120.0
    burst_urgent_presses: int = 3
    test_window_s: float = 600.0


@dataclass(frozen=True, slots=True)
class ActiveIncident:
    """A device's incident that is still open or acknowledged."""

    id: int
    device_id: str
    test: bool
    opened_at: float
    press_count: int
    urgent: bool


@dataclass(frozen=True, slots=True)
class OpenIncident:
    """Open a new incident for this press."""

    test: bool


@dataclass(frozen=True, slots=True)
class Attach:
    """Attach the press to an active incident; ``now_urgent`` once the burst threshold is hit."""

    incident_id: int
    now_urgent: bool


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the incident (within the grace window)."""

    incident_id: int


@dataclass(frozen=True, slots=True)
class CancelRefused:
    """Record the cancel on the incident but keep it open."""

    incident_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class NoIncident:
    """The press touches no incident (heartbeat, or a cancel with nothing to cancel)."""

    reason: str


Decision = OpenIncident | Attach | Cancel | CancelRefused | NoIncident


def decide(
    kind: PressKind,
    *,
    active: ActiveIncident | None,
    active_test: ActiveIncident | None,
    at: float,
    policy: DedupPolicy,
) -> Decision:
    """The incident decision for one accepted, non-duplicate press."""
    match kind:
        case PressKind.HEARTBEAT:
            return NoIncident("heartbeat")
        case PressKind.PANIC:
            if active is None:
                return OpenIncident(test=False)
            crossed = not active.urgent and active.press_count + 1 >= policy.burst_urgent_presses
            return Attach(active.id, now_urgent=crossed)
        case PressKind.TEST:
            if active_test is not None and at - active_test.opened_at <= policy.test_window_s:
                return Attach(active_test.id, now_urgent=False)
            return OpenIncident(test=True)
        case PressKind.CANCEL:
            if active is not None:
                if at - active.opened_at <= policy.cancel_grace_s:
                    return Cancel(active.id)
                return CancelRefused(active.id, "grace_expired")
            if active_test is not None:
                return Cancel(active_test.id)
            return NoIncident("nothing_to_cancel")
