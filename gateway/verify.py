"""Decide whether a decoded frame is trusted, a duplicate, or to be rejected (pure).

DESIGN §2 Devices and trust: a native frame needs a known device and a valid HMAC tag,
and its counter must be new: a frame whose device+counter is already stored is the same
press heard again (a retransmission or another path), acknowledged, not new.

Two rules close the ways an outsider could fake or silence a button (docs/SECURITY.md):

* A device with a key is trusted only through its signature, whatever source the frame
  arrives on. An unsigned frame naming it (a ChirpStack codec object, a Zigbee2MQTT
  message) is refused: anyone with a network-server account could otherwise raise fake
  panics in its name.
* Signed counters and network frame counters (LoRaWAN fCnt) are different sequences and
  never share one "last counter": a network frame with fCnt 2**32-1 would otherwise make
  every later signed press "stale".

"Counter is new" is an anti-replay window (RFC 4303 §3.4.3, the IPsec/DTLS sliding
window): the highest signed counter accepted and a bitmap of which of the 64 counters up
to it were accepted. A press lost at the broker whose retransmission arrives after a
later counter got through is still accepted; a counter already accepted, or older than
the window, is refused.
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
# Signed counters the anti-replay window remembers, the newest included (bit 0).
REPLAY_WINDOW = 64
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1


def window_has(last: int, window: int, counter: int) -> bool:
    """Whether ``counter`` was accepted, as far as the window (ending at ``last``) knows.

    A counter older than the window counts as accepted: it can no longer be told apart.
    """
    if counter > last:
        return False
    age = last - counter
    return age >= REPLAY_WINDOW or bool(window >> age & 1)


def window_add(last: int | None, window: int, counter: int) -> tuple[int, int]:
    """The (last, window) after accepting ``counter``."""
    if last is None:
        return counter, 1
    if counter > last:
        shift = counter - last
        shifted = (window << shift) & _WINDOW_MASK if shift < REPLAY_WINDOW else 0
        return counter, shifted | 1
    return last, window | (1 << (last - counter) if last - counter < REPLAY_WINDOW else 0)


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the store knows about a device's last accepted frame."""

    device_id: str
    # The highest signed counter accepted, and which of the 64 up to it were (bit 0 is
    # last_counter itself).
    last_counter: int | None
    last_seen_at: float | None
    battery: int | None
    window: int = 0
    # The network's own frame counter (LoRaWAN fCnt), a sequence of its own.
    last_network_counter: int | None = None


@dataclass(frozen=True, slots=True)
class KnownPress:
    """An already stored press with the same device and counter."""

    press_id: int
    kind: PressKind
    received_at: float
    trust: Trust = Trust.SIGNED
    # When a copy of it was last answered "received" (its first copy's reception until a
    # later one is answered): which copy of a transmission several instances received
    # answers it (gateway/batch.py ``SAME_TRANSMISSION_S``).
    answered_at: float | None = None


@dataclass(frozen=True, slots=True)
class Accept:
    """A new, trusted press; ``counter_reset`` marks a network counter that went back.

    ``trust`` is what the press was trusted by: SIGNED for any frame whose tag was
    checked, whatever source carried it.
    """

    device: Device
    counter_reset: bool = False
    trust: Trust = Trust.SIGNED


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


def bad_tag_detail(frame: Frame, device: Device) -> str:
    """What was checked when a tag did not match: whose key, over which bytes, what tag.

    Enough to tell a wrong key from a frame mangled on the way (the sizes), never the key
    or the tag expected: either would let the reader forge this device's presses.
    """
    size = len(frame.tag or b"")
    signed = len(frame.signed_bytes or b"")
    checked = (f"HMAC-SHA256 with device {device.id}'s key over {signed} signed bytes"
               f" of the {frame.format} frame")
    if size < MIN_TAG_BYTES:
        return f"{checked}: a {size}-byte tag is shorter than the {MIN_TAG_BYTES} required"
    return f"{checked}: the {size}-byte tag does not match"


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
    signed = trust is Trust.SIGNED or frame.tag is not None or device.key is not None
    if signed:
        if frame.tag is None or frame.signed_bytes is None:
            if trust is Trust.NETWORK:
                return Reject(
                    "unsigned", "device has a key: only its signed frames are trusted"
                )
            return Reject("unsigned", "source requires signed frames")
        if device.key is None:
            return Reject("no_key", "device has no key in the device-keys credential")
        if not tag_valid(frame, device.key):
            return Reject("bad_tag", bad_tag_detail(frame, device))
        if frame.counter is None:
            return Reject("no_counter")
    if known is not None and known.trust is not (Trust.SIGNED if signed else Trust.NETWORK):
        known = None  # the other sequence's press with the same number: not this press
    if known is not None and (signed or now - known.received_at <= NETWORK_DUPLICATE_WINDOW_S):
        if known.kind is not frame.kind:
            # Same counter, different meaning: firmware reused a counter. Never merge them.
            return Reject("counter_reused", f"counter {frame.counter} was {known.kind.value}")
        return Duplicate(device, known.press_id)
    if signed:
        assert frame.counter is not None
        last = state.last_counter if state is not None else None
        if last is not None and window_has(last, state.window if state else 0, frame.counter):
            if last - frame.counter >= REPLAY_WINDOW:
                return Reject(
                    "stale_counter",
                    f"counter {frame.counter} is older than the window"
                    f" (last {last}, window {REPLAY_WINDOW})",
                )
            return Reject("replayed_counter", f"counter {frame.counter} was accepted before")
        return Accept(device)
    last_network = state.last_network_counter if state is not None else None
    if frame.counter is not None and last_network is not None and frame.counter <= last_network:
        # LoRaWAN fCnt restarts after a rejoin; the network server guards its own replays.
        return Accept(device, counter_reset=True, trust=Trust.NETWORK)
    return Accept(device, trust=Trust.NETWORK)


def seen_state(
    previous: DeviceState | None, device_id: str, frame: Frame, trust: Trust, at: float
) -> DeviceState:
    """The device's state after accepting ``frame``, trusted by ``trust``."""
    last = previous.last_counter if previous is not None else None
    window = previous.window if previous is not None else 0
    last_network = previous.last_network_counter if previous is not None else None
    if frame.counter is not None:
        if trust is Trust.SIGNED:
            last, window = window_add(last, window, frame.counter)
        else:
            last_network = frame.counter
    battery = frame.battery
    if battery is None and previous is not None:
        battery = previous.battery
    return DeviceState(device_id, last, at, battery, window, last_network)
