"""What one ingest batch reads and writes, and the Protocol each database implements.

The ingest pipeline (gateway/batch.py) decides; a store applies the decision in one
transaction, and the batch's presses are acknowledged to their senders only after its
commit returns. SQLite is :mod:`store.sqlite`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.dedup import ActiveIncident
from gateway.verify import DeviceState, KnownPress

_SIGN_BIT = 1 << 63


def window_to_sql(window: int) -> int:
    """The 64-bit replay window as SQLite's signed 64-bit INTEGER."""
    return window - (1 << 64) if window & _SIGN_BIT else window


def window_from_sql(value: int | None) -> int:
    """The replay window from its stored signed form."""
    return 0 if value is None else value & ((1 << 64) - 1)


@dataclass(frozen=True, slots=True)
class PressRow:
    """A new press row."""

    id: int
    device_id: str
    counter: int | None
    kind: str
    format: str
    trust: str
    received_at: float
    device_time: int | None
    battery: int | None
    lat: float | None
    lon: float | None
    accuracy_m: float | None
    incident_id: int | None
    outcome: str


@dataclass(frozen=True, slots=True)
class PathRow:
    """One path a press was heard on (inserted, or its count bumped)."""

    press_id: int
    path: str
    heard_at: float
    rssi: float | None
    snr: float | None


@dataclass(frozen=True, slots=True)
class IncidentRow:
    """A new incident row."""

    id: int
    device_id: str
    test: bool
    opened_at: float
    lat: float | None
    lon: float | None
    location_source: str
    kelurahan_kode: str | None
    kelurahan: str | None
    kecamatan: str | None
    kelurahan_match: str
    address: str
    landmark: str


@dataclass(frozen=True, slots=True)
class IncidentChange:
    """A change to an existing incident; None fields are left as they are."""

    id: int
    at: float
    add_presses: int = 0
    status: str | None = None
    urgent: bool | None = None
    lat: float | None = None
    lon: float | None = None
    location_source: str | None = None


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One entry on an incident's timeline: what happened and why."""

    incident_id: int
    at: float
    event: str
    reason: str
    actor: str | None = None
    press_id: int | None = None
    detail: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    """The device's state after the batch (only the newest frame per device is kept)."""

    state: DeviceState
    kind: str
    path: str


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A frame that was not accepted, kept with its reason."""

    received_at: float
    source: str
    path: str
    format: str
    device_ref: str | None
    reason: str
    detail: str
    payload: bytes


@dataclass(slots=True)
class BatchWrites:
    """Everything one ingest batch writes, applied in one transaction."""

    presses: list[PressRow] = field(default_factory=list)
    paths: list[PathRow] = field(default_factory=list)
    incidents: list[IncidentRow] = field(default_factory=list)
    incident_changes: list[IncidentChange] = field(default_factory=list)
    timeline: list[TimelineRow] = field(default_factory=list)
    devices: dict[str, DeviceSeen] = field(default_factory=dict)
    dead_letters: list[DeadLetterRow] = field(default_factory=list)
    # (press id, when): a copy of a stored press answered "received" (presses.answered_at).
    answered: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BatchState:
    """What the pipeline must know about a batch's devices before deciding anything."""

    devices: Mapping[str, DeviceState]
    active: Mapping[str, ActiveIncident]
    active_test: Mapping[str, ActiveIncident]
    known: Mapping[tuple[str, int], KnownPress]


class IngestStore(Protocol):
    """The ingest side's view of the store (one implementation per database)."""

    def allocate_press_id(self) -> int:
        """A fresh press id, valid within the current transaction."""
        ...

    def allocate_incident_id(self) -> int:
        """A fresh incident id, valid within the current transaction."""
        ...

    async def begin(self) -> None:
        """Start the batch's write transaction."""
        ...

    async def batch_state(
        self, device_ids: Iterable[str], keys: Iterable[tuple[str, int]]
    ) -> BatchState:
        """Device state, active incidents and already stored presses for a batch."""
        ...

    async def write(self, writes: BatchWrites) -> None:
        """Apply a batch's writes inside the open transaction."""
        ...

    async def commit(self) -> None:
        """Make the batch durable."""
        ...

    async def rollback(self) -> None:
        """Abandon the batch (ids handed out since begin are forgotten)."""
        ...


