"""The pure core of ingest: what one batch of received items does to the store.

Given the stored state of the batch's devices, :class:`BatchProcessor` runs every item
through verify → dedup → locate and returns the rows to write, the outcome of each item,
the log lines and the incident transitions — no I/O, no clock. The :class:`~gateway.
ingest.Ingestor` around it owns the queue, the transaction and the acknowledgements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from gateway.dedup import (
    ActiveIncident,
    Attach,
    Cancel,
    CancelRefused,
    DedupPolicy,
    NoIncident,
    OpenIncident,
    decide,
)
from gateway.errors import DecodeError
from gateway.locate import Locator, locate
from gateway.model import Device, Frame, Gateway, PressKind, Reception, Trust
from gateway.verify import (
    Accept,
    DeviceState,
    Duplicate,
    KnownPress,
    Reject,
    seen_state,
    verify,
)
from store.ingest import (
    BatchState,
    BatchWrites,
    DeadLetterRow,
    DeviceSeen,
    IncidentChange,
    IncidentRow,
    PathRow,
    PressRow,
    TimelineRow,
)

# Copies of one transmission reach every instance within milliseconds; a button's next
# transmission of the press comes 0.8 s later at the soonest (1 s less 20 %, docs/FRAMES.md).
# A copy this far or further from the last answered one is a new transmission, answered
# once more: its button did not hear the first "received".
SAME_TRANSMISSION_S = 0.5


@dataclass(frozen=True, slots=True)
class Stored:
    """A new press was committed (and maybe opened or changed an incident)."""

    press_id: int
    device_id: str
    counter: int | None
    incident_id: int | None
    outcome: str


@dataclass(frozen=True, slots=True)
class Repeated:
    """The press was already stored; this copy added a path.

    ``answer`` is False for a copy of a transmission another copy was answered for
    (another instance's, on one shared store): its source sends the button no second
    "received".
    """

    press_id: int
    device_id: str
    counter: int | None
    answer: bool = True


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """The frame was rejected and kept as a dead letter."""

    reason: str


Outcome = Stored | Repeated | DeadLettered


def outcome_label(outcome: Outcome) -> str:
    """A short label for an outcome: the press outcome, "duplicate" or "rejected"."""
    match outcome:
        case Stored():
            return outcome.outcome
        case Repeated():
            return "duplicate"
        case DeadLettered():
            return "rejected"


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    """A committed incident transition, for dispatch and presser feedback."""

    incident_id: int
    device_id: str
    event: str
    at: float
    test: bool


@dataclass(slots=True)
class Inbound:
    """One received message on its way to the store.

    ``decoded`` is the source's decode result; a DecodeError becomes a dead letter.
    ``on_done`` runs after commit (it must not block: it sends an ack or sets a future).
    """

    decoded: Frame | DecodeError
    payload: bytes
    reception: Reception
    format: str
    trust: Trust
    on_done: Callable[[Outcome], None]
    # The source answers "received" on a broker every instance subscribes to (a native
    # button over MQTT): a copy of a press already stored is answered only if no copy of
    # its transmission was (``Repeated.answer``).
    answers_shared: bool = False


class Registry(Protocol):
    """Lookup of registered devices and gateways."""

    def device_for(self, frame: Frame) -> Device | None:
        """The registered device a frame's identity refers to."""
        ...

    @property
    def gateways(self) -> Mapping[str, Gateway]:
        """Registered receiving gateways by id."""
        ...

    @property
    def devices(self) -> Mapping[str, Device]:
        """Registered devices by id (with their keys, for signing feedback)."""
        ...


class IdAllocator(Protocol):
    """Hands out press and incident ids inside the batch's transaction."""

    def allocate_press_id(self) -> int:
        """A fresh press id."""
        ...

    def allocate_incident_id(self) -> int:
        """A fresh incident id."""
        ...


@dataclass(slots=True)
class BatchResult:
    """The batch's working view (state as stored, updated press by press) and its results."""

    state: BatchState
    devices: dict[str, DeviceState]
    active: dict[str, ActiveIncident]
    active_test: dict[str, ActiveIncident]
    known: dict[tuple[str, int], KnownPress]
    writes: BatchWrites = field(default_factory=BatchWrites)
    logs: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    events: list[IncidentEvent] = field(default_factory=list)


def batch_keys(batch: list[Inbound], registry: Registry) -> tuple[set[str], set[tuple[str, int]]]:
    """The device ids and (device, counter) keys whose stored state the batch needs."""
    device_ids: set[str] = set()
    keys: set[tuple[str, int]] = set()
    for item in batch:
        if isinstance(item.decoded, Frame):
            device = registry.device_for(item.decoded)
            if device is not None:
                device_ids.add(device.id)
                if item.decoded.counter is not None:
                    keys.add((device.id, item.decoded.counter))
    return device_ids, keys


class BatchProcessor:
    """Decides every item of a batch against the batch's stored state (pure)."""

    def __init__(
        self, registry: Registry, locator: Locator, policy: DedupPolicy, ids: IdAllocator
    ) -> None:
        self._registry = registry
        self._locator = locator
        self._policy = policy
        self._ids = ids

    def process(self, batch: list[Inbound], state: BatchState) -> tuple[list[Outcome], BatchResult]:
        """Outcomes in batch order, and everything to write, log and announce."""
        work = BatchResult(
            state=state,
            devices=dict(state.devices),
            active=dict(state.active),
            active_test=dict(state.active_test),
            known=dict(state.known),
        )
        return [self._process(item, work) for item in batch], work

    def _dead_letter(self, item: Inbound, work: BatchResult, reason: str, detail: str) -> Outcome:
        ref = item.decoded.device_ref if isinstance(item.decoded, Frame) else None
        work.writes.dead_letters.append(
            DeadLetterRow(
                received_at=item.reception.received_at,
                source=item.reception.source,
                path=item.reception.path,
                format=item.format,
                device_ref=ref,
                reason=reason,
                detail=detail[:500],
                payload=item.payload[:4096],
            )
        )
        level = "press.rejected"
        work.logs.append(
            (
                level,
                {
                    "reason": reason,
                    "detail": detail[:200],
                    "device": ref,
                    "source": item.reception.source,
                    "path": item.reception.path,
                },
            )
        )
        return DeadLettered(reason)

    def _process(self, item: Inbound, work: BatchResult) -> Outcome:
        frame = item.decoded
        if isinstance(frame, DecodeError):
            return self._dead_letter(item, work, frame.reason, frame.detail)
        device = self._registry.device_for(frame)
        at = item.reception.received_at
        known = None
        if device is not None and frame.counter is not None:
            known = work.known.get((device.id, frame.counter))
        verdict = verify(
            frame,
            device=device,
            trust=item.trust,
            state=work.devices.get(device.id) if device else None,
            known=known,
            now=at,
        )
        match verdict:
            case Reject(reason, detail):
                return self._dead_letter(item, work, reason, detail)
            case Duplicate(device, press_id):
                work.writes.paths.append(self._path_row(press_id, item))
                answer = True
                if item.answers_shared and known is not None:
                    answer = self._claim_answer(known, device.id, frame.counter, at, work)
                work.logs.append(
                    (
                        "press.duplicate",
                        {
                            "device": device.id,
                            "counter": frame.counter,
                            "press": press_id,
                            "path": item.reception.path,
                        },
                    )
                )
                return Repeated(press_id, device.id, frame.counter, answer)
            case Accept(device, counter_reset, trust):
                return self._accept(
                    item, frame, device, work, counter_reset=counter_reset, trust=trust
                )

    @staticmethod
    def _claim_answer(known: KnownPress, device_id: str, counter: int | None, at: float,
                      work: BatchResult) -> bool:
        """Whether this copy of a stored press is the one of its transmission to answer
        "received"; if so it is recorded as answered (decided under the device's lock,
        so of the instances that received the transmission, one answers)."""
        answered = known.received_at if known.answered_at is None else known.answered_at
        if abs(at - answered) < SAME_TRANSMISSION_S:
            return False
        work.writes.answered.append((known.press_id, at))
        if counter is not None:
            work.known[device_id, counter] = replace(known, answered_at=at)
        return True

    def _path_row(self, press_id: int, item: Inbound) -> PathRow:
        r = item.reception
        return PathRow(press_id, r.path, r.received_at, r.rssi, r.snr)

    def _accept(
        self,
        item: Inbound,
        frame: Frame,
        device: Device,
        work: BatchResult,
        *,
        counter_reset: bool,
        trust: Trust,
    ) -> Outcome:
        at = item.reception.received_at
        press_id = self._ids.allocate_press_id()
        decision = decide(
            frame.kind,
            active=work.active.get(device.id),
            active_test=work.active_test.get(device.id),
            at=at,
            policy=self._policy,
        )
        incident_id: int | None = None
        outcome: str
        writes = work.writes
        match decision:
            case OpenIncident(test):
                incident_id = self._open(
                    item, frame, device, press_id=press_id, test=test, work=work
                )
                outcome = "opened"
            case Attach(incident_id, now_urgent):
                outcome = "attached"
                self._attach(item, frame, device, press_id, incident_id, now_urgent, work)
            case Cancel(incident_id):
                outcome = "cancelled"
                was_test = device.id in work.active_test and (
                    work.active_test[device.id].id == incident_id
                )
                (work.active_test if was_test else work.active).pop(device.id)
                writes.incident_changes.append(
                    IncidentChange(id=incident_id, at=at, add_presses=1, status="cancelled")
                )
                writes.timeline.append(
                    TimelineRow(
                        incident_id,
                        at,
                        "incident.cancelled",
                        "cancel_press_in_grace",
                        actor=f"device:{device.id}",
                        press_id=press_id,
                    )
                )
                work.logs.append(
                    ("incident.cancelled", {"incident": incident_id, "device": device.id})
                )
                work.events.append(IncidentEvent(incident_id, device.id, "cancelled", at, was_test))
            case CancelRefused(incident_id, reason):
                outcome = "cancel_refused"
                writes.incident_changes.append(IncidentChange(id=incident_id, at=at, add_presses=1))
                writes.timeline.append(
                    TimelineRow(
                        incident_id,
                        at,
                        "incident.cancel_refused",
                        reason,
                        actor=f"device:{device.id}",
                        press_id=press_id,
                    )
                )
                work.logs.append(
                    (
                        "incident.cancel_refused",
                        {"incident": incident_id, "device": device.id, "reason": reason},
                    )
                )
            case NoIncident(reason):
                outcome = reason
        fix = frame.fix
        writes.presses.append(
            PressRow(
                id=press_id,
                device_id=device.id,
                counter=frame.counter,
                kind=frame.kind.value,
                format=frame.format,
                trust=trust.value,
                received_at=at,
                device_time=frame.device_time,
                battery=frame.battery,
                lat=fix.lat if fix else None,
                lon=fix.lon if fix else None,
                accuracy_m=fix.accuracy_m if fix else None,
                incident_id=incident_id,
                outcome=outcome,
            )
        )
        writes.paths.append(self._path_row(press_id, item))
        state = seen_state(work.devices.get(device.id), device.id, frame, trust, at)
        work.devices[device.id] = state
        writes.devices[device.id] = DeviceSeen(
            state, frame.kind.value, item.reception.path
        )
        if frame.counter is not None:
            work.known[device.id, frame.counter] = KnownPress(press_id, frame.kind, at, trust)
        fields: dict[str, object] = {
            "device": device.id,
            "counter": frame.counter,
            "kind": frame.kind.value,
            "press": press_id,
            "incident": incident_id,
            "outcome": outcome,
            "path": item.reception.path,
            "battery": frame.battery,
        }
        if counter_reset:
            fields["counter_reset"] = True
        work.logs.append(("press.accepted", fields))
        return Stored(press_id, device.id, frame.counter, incident_id, outcome)

    def _attach(  # noqa: PLR0917 -- private step of _accept, called once
        self,
        item: Inbound,
        frame: Frame,
        device: Device,
        press_id: int,
        incident_id: int,
        now_urgent: bool,
        work: BatchResult,
    ) -> None:
        at = item.reception.received_at
        writes = work.writes
        active_map = work.active_test if frame.kind is PressKind.TEST else work.active
        current = active_map[device.id]
        active_map[device.id] = ActiveIncident(
            id=current.id,
            device_id=current.device_id,
            test=current.test,
            opened_at=current.opened_at,
            press_count=current.press_count + 1,
            urgent=current.urgent or now_urgent,
        )
        fix = frame.fix
        writes.incident_changes.append(
            IncidentChange(
                id=incident_id,
                at=at,
                add_presses=1,
                urgent=True if now_urgent else None,
                lat=fix.lat if fix else None,
                lon=fix.lon if fix else None,
                location_source="gps" if fix else None,
            )
        )
        writes.timeline.append(
            TimelineRow(
                incident_id,
                at,
                "press.attached",
                "burst",
                press_id=press_id,
                detail={"press_count": current.press_count + 1},
            )
        )
        work.logs.append(
            (
                "incident.press_attached",
                {
                    "incident": incident_id,
                    "device": device.id,
                    "press_count": current.press_count + 1,
                },
            )
        )
        if now_urgent:
            writes.timeline.append(
                TimelineRow(
                    incident_id, at, "incident.urgent", "repeated_presses", press_id=press_id
                )
            )
            work.logs.append(("incident.urgent", {"incident": incident_id, "device": device.id}))
            work.events.append(IncidentEvent(incident_id, device.id, "urgent", at, current.test))

    def _open(
        self,
        item: Inbound,
        frame: Frame,
        device: Device,
        *,
        press_id: int,
        test: bool,
        work: BatchResult,
    ) -> int:
        at = item.reception.received_at
        gateway_fix = frame.gateway_fix
        if gateway_fix is None and frame.gateway_ref is not None:
            gateway = self._registry.gateways.get(frame.gateway_ref)
            gateway_fix = gateway.location if gateway else None
        location = locate(
            gps=frame.fix, device=device, gateway_fix=gateway_fix, locator=self._locator
        )
        incident_id = self._ids.allocate_incident_id()
        stale = work.active_test.get(device.id) if test else None
        if stale is not None:
            # A test press after the test window starts a new test incident; the old one
            # is closed here so no test incident stays open forever.
            work.writes.incident_changes.append(
                IncidentChange(id=stale.id, at=at, status="resolved")
            )
            work.writes.timeline.append(
                TimelineRow(
                    stale.id,
                    at,
                    "incident.resolved",
                    "test_window_over",
                    actor="panicd",
                    detail={"replaced_by": incident_id},
                )
            )
        kel = location.kelurahan
        work.writes.incidents.append(
            IncidentRow(
                id=incident_id,
                device_id=device.id,
                test=test,
                opened_at=at,
                lat=location.fix.lat if location.fix else None,
                lon=location.fix.lon if location.fix else None,
                location_source=location.source.value,
                kelurahan_kode=kel.kode if kel else None,
                kelurahan=kel.name if kel else None,
                kecamatan=kel.kecamatan if kel else None,
                kelurahan_match=location.match.value,
                address=device.address,
                landmark=device.landmark,
            )
        )
        work.writes.incident_changes.append(IncidentChange(id=incident_id, at=at, add_presses=1))
        reason = "test_press" if test else "panic_press"
        work.writes.timeline.append(
            TimelineRow(
                incident_id,
                at,
                "incident.opened",
                reason,
                actor=f"device:{device.id}",
                press_id=press_id,
                detail={
                    "location_source": location.source.value,
                    "kelurahan_match": location.match.value,
                    "distance_m": None
                    if location.distance_m is None
                    else round(location.distance_m, 1),
                    "path": item.reception.path,
                },
            )
        )
        active = ActiveIncident(incident_id, device.id, test, at, 1, False)
        (work.active_test if test else work.active)[device.id] = active
        work.logs.append(
            (
                "incident.opened",
                {
                    "incident": incident_id,
                    "device": device.id,
                    "test": test,
                    "kelurahan": kel.name if kel else None,
                    "kecamatan": kel.kecamatan if kel else None,
                    "location_source": location.source.value,
                },
            )
        )
        work.events.append(IncidentEvent(incident_id, device.id, "opened", at, test))
        return incident_id
