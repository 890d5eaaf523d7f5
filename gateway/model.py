"""Frozen values that cross the pipeline's stage boundaries.

Nothing here does I/O. Times are Unix seconds (UTC) as floats; the caller owns the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class PressKind(StrEnum):
    """What the button asked for (DESIGN §2 Press kinds)."""

    PANIC = "panic"
    CANCEL = "cancel"
    TEST = "test"
    HEARTBEAT = "heartbeat"


class Trust(StrEnum):
    """Where a frame's authenticity comes from.

    SIGNED frames carry our own HMAC tag and counter. NETWORK frames come from a
    third-party format (ChirpStack, TTN, Zigbee2MQTT, Shelly, Tasmota) whose identity is
    vouched for by the broker or network server that authenticated the device.
    """

    SIGNED = "signed"
    NETWORK = "network"


@dataclass(frozen=True, slots=True)
class GeoFix:
    """A WGS84 position; lat/lon order as buttons send it (GeoJSON is lon/lat)."""

    lat: float
    lon: float
    accuracy_m: float | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded uplink, before anything about trust has been decided.

    ``device_ref`` is the identity the frame itself carries: our device id for native
    frames, the devEui / TTN device id / friendly name / Shelly id / Tasmota topic for
    third-party formats. ``signed_bytes`` is the canonical encoding that ``tag`` covers;
    both are None for formats that cannot sign.
    """

    format: str
    device_ref: str
    kind: PressKind
    counter: int | None = None
    device_time: int | None = None
    battery: int | None = None
    fix: GeoFix | None = None
    tag: bytes | None = None
    signed_bytes: bytes | None = None
    gateway_fix: GeoFix | None = None
    gateway_ref: str | None = None


@dataclass(frozen=True, slots=True)
class Reception:
    """Where and when a frame was heard: one *path* of a press."""

    path: str
    received_at: float
    source: str
    rssi: float | None = None
    snr: float | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """A registered button (from the device registry; the secret comes from credentials)."""

    id: str
    hardware: str
    key: bytes | None
    location: GeoFix | None
    mobile: bool
    address: str
    landmark: str
    kelurahan_kode: str | None
    heartbeat_interval_s: int
    external_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Gateway:
    """A registered receiving gateway; its position is the last location fallback."""

    id: str
    location: GeoFix
    description: str = ""


@dataclass(frozen=True, slots=True)
class Kelurahan:
    """An administrative village (kelurahan) and its kecamatan."""

    kode: str
    name: str
    kecamatan: str


class LocationSource(StrEnum):
    """Which rung of the DESIGN §2 location ladder produced a position."""

    GPS = "gps"
    REGISTERED = "registered"
    GATEWAY = "gateway"
    UNKNOWN = "unknown"


class KelurahanMatch(StrEnum):
    """How a point was assigned to a kelurahan."""

    INSIDE = "inside"
    OVERLAP = "overlap"
    NEAREST = "nearest"
    OVERRIDE = "override"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Location:
    """The resolved location of a press."""

    source: LocationSource
    fix: GeoFix | None
    kelurahan: Kelurahan | None
    match: KelurahanMatch
    distance_m: float | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message that is well-formed but carries no press (e.g. a retained availability
    message or an empty Zigbee2MQTT action). Not a dead letter: nothing was lost."""

    reason: str
