"""Decide whether a decoded frame is trusted, a duplicate, or to be rejected (pure).

DESIGN §2 Devices and trust: a native frame needs a known device, a valid HMAC tag and
a counter above the last accepted one. A frame whose device+counter is already stored
is the same press heard again (a retransmission or another path): acknowledged, not new.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from gateway.model import Device, Frame, PressKind, Trust

# A third-party counter (LoRaWAN fCnt) restarts at 0 when a device rejoins, so an old
# device+counter only means "the same press" while it is fresh.
NETWORK_DUPLICATE_WINDOW_S = 600.0
# The shortest tag any format sends (the LoRa frame's 8 bytes, docs/FRAMES.md). A shorter
# one would be forgeable by guessing; an empty one would compare equal to anything.
MIN_TAG_BYTES = 8


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the store knows about a device's last accepted frame."""

    device_id: str
    last_counter: int | None
    last_seen_at: float | None
    battery: int | None


@dataclass(frozen=True, slots=True)
class KnownPress:
    """An already stored press with the same device and counter."""

    press_id: int
    kind: PressKind
    received_at: float


@dataclass(frozen=True, slots=True)
class Accept:
    """A new, trusted press; ``counter_reset`` marks a network counter that went back."""

    device: Device
    counter_reset: bool = False


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same press again (retransmission or another path)."""

    device: Device
    press_id: int


@dataclass(frozen=True, slots=True)
class Reject:
    """Not trusted; becomes a dead letter with this reason."""

    reason: str
    detail: str = ""


Verdict = Accept | Duplicate | Reject


def tag_valid(frame: Frame, key: bytes, digest_size: int | None = None) -> bool:
    """Constant-time check of the frame's (possibly truncated) HMAC-SHA256 tag."""
    if frame.tag is None or frame.signed_bytes is None or len(frame.tag) < MIN_TAG_BYTES:
        return False
    expected = hmac.digest(key, frame.signed_bytes, "sha256")
    size = digest_size if digest_size is not None else len(frame.tag)
    return hmac.compare_digest(expected[:size], frame.tag)


def verify(
    frame: Frame,
    *,
    device: Device | None,
    trust: Trust,
    state: DeviceState | None,
    known: KnownPress | None,
    now: float,
) -> Verdict:
    """The trust verdict for one frame, given the device's stored state."""
    if device is None:
        return Reject("unknown_device", frame.device_ref)
    signed = trust is Trust.SIGNED or frame.tag is not None
    if signed:
        if frame.tag is None or frame.signed_bytes is None:
            return Reject("unsigned", "source requires signed frames")
        if device.key is None:
            return Reject("no_key", "device has no key in the device-keys credential")
        if not tag_valid(frame, device.key):
            return Reject("bad_tag")
        if frame.counter is None:
            return Reject("no_counter")
    if known is not None and (signed or now - known.received_at <= NETWORK_DUPLICATE_WINDOW_S):
        if known.kind is not frame.kind:
            # Same counter, different meaning: firmware reused a counter. Never merge them.
            return Reject("counter_reused", f"counter {frame.counter} was {known.kind.value}")
        return Duplicate(device, known.press_id)
    last = state.last_counter if state is not None else None
    if frame.counter is not None and last is not None and frame.counter <= last:
        if signed:
            return Reject("stale_counter", f"counter {frame.counter} <= last {last}")
        # LoRaWAN fCnt restarts after a rejoin; the network server guards its own replays.
        return Accept(device, counter_reset=True)
    return Accept(device)
