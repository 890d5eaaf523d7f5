"""The ingest pipeline's single writer: verify → dedup → locate → commit → acknowledge.

Sources hand over :class:`Inbound` items and get their outcome through a callback that
runs only after the batch holding the item is committed. That callback is where a source
sends its MQTT PUBACK or LoRa ACK: nothing is acknowledged before it is durable.

The decisions themselves are pure (:mod:`gateway.verify`, :mod:`gateway.dedup`,
:mod:`gateway.locate`); this module only orders them, keeps the batch's working state,
and owns the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

import structlog

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
from gateway.store import (
    BatchState,
    BatchWrites,
    DeadLetterRow,
    DeviceSeen,
    IncidentChange,
    IncidentRow,
    IngestStore,
    PathRow,
    PressRow,
    TimelineRow,
)
from gateway.verify import Accept, DeviceState, Duplicate, KnownPress, Reject, verify

log = structlog.get_logger("panicd.ingest")

# In a burst every press attaches to the open incident, and its press.accepted line
# (outcome=attached, incident=…) already is the one canonical line for it. A second info
# line per press doubled the journal volume of a storm and cost about a tenth of the drain
# throughput (docs/PERFORMANCE.md); the attach stays in the incident's timeline.
_DEBUG_EVENTS = frozenset({"incident.press_attached"})


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
    """The press was already stored; this copy added a path."""

    press_id: int
    device_id: str
    counter: int | None


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


class Registry(Protocol):
    """Lookup of registered devices and gateways."""

    def device_for(self, frame: Frame) -> Device | None:
        """The registered device a frame's identity refers to."""
        ...

    @property
    def gateways(self) -> Mapping[str, Gateway]:
        """Registered receiving gateways by id."""
        ...


IncidentListener = Callable[[IncidentEvent], None]


@dataclass(slots=True)
class _Work:
    """The batch's working view: state as stored, updated press by press."""

    state: BatchState
    devices: dict[str, DeviceState]
    active: dict[str, ActiveIncident]
    active_test: dict[str, ActiveIncident]
    known: dict[tuple[str, int], KnownPress]
    writes: BatchWrites = field(default_factory=BatchWrites)
    logs: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    events: list[IncidentEvent] = field(default_factory=list)


class Ingestor:
    """Owns the ingest queue and the one task that writes presses to the store."""

    def __init__(
        self,
        store: IngestStore,
        registry: Registry,
        locator: Locator,
        *,
        policy: DedupPolicy,
        batch_max: int = 256,
        batch_window_s: float = 0.002,
        queue_max: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._registry = registry
        self._locator = locator
        self._policy = policy
        self._batch_max = batch_max
        self._batch_window_s = batch_window_s
        self._clock = clock
        self._queue: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=queue_max)
        self._listeners: list[IncidentListener] = []
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._task_group: asyncio.TaskGroup | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.committed_batches = 0
        self.committed_items = 0
        # Committed items by (source, outcome), for the metrics endpoint.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def add_listener(self, listener: IncidentListener) -> None:
        """Call ``listener`` for every committed incident transition."""
        self._listeners.append(listener)

    @property
    def depth(self) -> int:
        """Items submitted but not yet committed."""
        return self._pending

    async def __aenter__(self) -> Self:
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        self._writer = self._task_group.create_task(self._run(), name="ingest.writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        self._closing = True
        # Callers drain() first; whatever is still queued now was never acknowledged, so
        # its sender delivers it again after the restart.
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task_group.__aexit__(exc_type, exc, tb)

    async def submit(self, item: Inbound) -> None:
        """Queue an item; waits when the queue is full (back-pressure to the source)."""
        if self._closing:
            # Not acknowledged, so the sender (broker, button) will deliver it again.
            raise RuntimeError("ingest is shutting down")
        self._pending += 1
        self._idle.clear()
        await self._queue.put(item)

    async def drain(self, deadline_s: float) -> bool:
        """Wait until every submitted item is committed; False if the deadline passed."""
        try:
            async with asyncio.timeout(deadline_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._batch_window_s > 0:
                # Group commits: a few ms of waiting turns one fsync into one per batch.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self._batch_window_s
                while len(batch) < self._batch_max:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            batch.append(await self._queue.get())
                    except TimeoutError:
                        break
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            outcomes, work = await self._commit_with_retry(batch)
            self.committed_batches += 1
            self.committed_items += len(batch)
            self._pending -= len(batch)
            if self._pending == 0:
                self._idle.set()
            for item, outcome in zip(batch, outcomes, strict=True):
                self.outcomes[item.reception.source, outcome_label(outcome)] += 1
                item.on_done(outcome)
            for event, fields in work.logs:
                # Rejections are what an operator must see with `journalctl -p warning`.
                if event == "press.rejected":
                    log.warning(event, **fields)
                elif event in _DEBUG_EVENTS:
                    log.debug(event, **fields)
                else:
                    log.info(event, **fields)
            for incident_event in work.events:
                for listener in self._listeners:
                    listener(incident_event)

    async def _commit_with_retry(self, batch: list[Inbound]) -> tuple[list[Outcome], _Work]:
        """Commit the batch, retrying forever: an un-committed press must not be acked."""
        attempt = 0
        while True:
            try:
                return await self._commit(batch)
            except Exception as exc:  # noqa: BLE001 -- any database failure is retried
                attempt += 1
                with contextlib.suppress(Exception):
                    await self._store.rollback()
                delay = min(5.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311
                # One journal line per failure, not a traceback: the error says enough.
                log.error(  # noqa: TRY400
                    "store.commit_failed",
                    error=repr(exc),
                    attempt=attempt,
                    batch=len(batch),
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)

    async def _commit(self, batch: list[Inbound]) -> tuple[list[Outcome], _Work]:
        store = self._store
        await store.begin()
        device_ids: set[str] = set()
        keys: set[tuple[str, int]] = set()
        for item in batch:
            if isinstance(item.decoded, Frame):
                device = self._registry.device_for(item.decoded)
                if device is not None:
                    device_ids.add(device.id)
                    if item.decoded.counter is not None:
                        keys.add((device.id, item.decoded.counter))
        state = await store.batch_state(device_ids, keys)
        work = _Work(
            state=state,
            devices=dict(state.devices),
            active=dict(state.active),
            active_test=dict(state.active_test),
            known=dict(state.known),
        )
        outcomes = [self._process(item, work) for item in batch]
        await store.write(work.writes)
        await store.commit()
        return outcomes, work

    def _dead_letter(self, item: Inbound, work: _Work, reason: str, detail: str) -> Outcome:
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

    def _process(self, item: Inbound, work: _Work) -> Outcome:
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
                return Repeated(press_id, device.id, frame.counter)
            case Accept(device, counter_reset):
                return self._accept(item, frame, device, work, counter_reset=counter_reset)

    def _path_row(self, press_id: int, item: Inbound) -> PathRow:
        r = item.reception
        return PathRow(press_id, r.path, r.received_at, r.rssi, r.snr)

    def _accept(
        self, item: Inbound, frame: Frame, device: Device, work: _Work, *, counter_reset: bool
    ) -> Outcome:
        at = item.reception.received_at
        press_id = self._store.allocate_press_id()
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
                trust=item.trust.value,
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
        previous = work.devices.get(device.id)
        battery = (
            frame.battery if frame.battery is not None else (previous.battery if previous else None)
        )
        counter = (
            frame.counter
            if frame.counter is not None
            else (previous.last_counter if previous else None)
        )
        work.devices[device.id] = DeviceState(device.id, counter, at, battery)
        writes.devices[device.id] = DeviceSeen(
            device.id, counter, at, frame.kind.value, item.reception.path, battery
        )
        if frame.counter is not None:
            work.known[device.id, frame.counter] = KnownPress(press_id, frame.kind, at)
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
        work: _Work,
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
        self, item: Inbound, frame: Frame, device: Device, *, press_id: int, test: bool, work: _Work
    ) -> int:
        at = item.reception.received_at
        gateway_fix = frame.gateway_fix
        if gateway_fix is None and frame.gateway_ref is not None:
            gateway = self._registry.gateways.get(frame.gateway_ref)
            gateway_fix = gateway.location if gateway else None
        location = locate(
            gps=frame.fix, device=device, gateway_fix=gateway_fix, locator=self._locator
        )
        incident_id = self._store.allocate_incident_id()
        stale = work.active_test.get(device.id) if test else None
        if stale is not None:
            # A test press after the test window starts a new test incident; the old one
            # is closed here so no test incident stays open forever.
            work.writes.incident_changes.append(
                IncidentChange(id=stale.id, at=at, status="resolved")
            )
            work.writes.timeline.append(
                TimelineRow(stale.id, at, "incident.resolved", "test_window_over",
                            actor="panicd", detail={"replaced_by": incident_id})
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
