"""Trust verdicts: device, signature, counter, duplicates and network counter resets."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import pytest

from gateway.model import Device, Frame, PressKind, Trust
from gateway.verify import (
    MIN_TAG_BYTES,
    NETWORK_DUPLICATE_WINDOW_S,
    Accept,
    DeviceState,
    Duplicate,
    KnownPress,
    Reject,
    tag_valid,
    verify,
)

KEY = bytes(range(32))
NOW = 1_700_000_000.0
SIGNED_BYTES = b"panicd/1|btn-1|10|panic|||||"


def _device(key: bytes | None = KEY) -> Device:
    return Device(
        id="btn-1",
        hardware="esp32-wifi",
        key=key,
        location=None,
        mobile=True,
        address="Jl. Pahlawan",
        landmark="",
        kelurahan_kode=None,
        heartbeat_interval_s=3600,
    )


def _signed(counter: int | None = 10, kind: PressKind = PressKind.PANIC, key: bytes = KEY) -> Frame:
    signed = SIGNED_BYTES.replace(b"|10|", f"|{counter}|".encode())
    return Frame(
        format="native",
        device_ref="btn-1",
        kind=kind,
        counter=counter,
        tag=hmac.digest(key, signed, hashlib.sha256),
        signed_bytes=signed,
    )


def _network(counter: int | None = 10, kind: PressKind = PressKind.PANIC) -> Frame:
    return Frame(format="zigbee2mqtt", device_ref="0x00158d0001", kind=kind, counter=counter)


def _state(last_counter: int | None) -> DeviceState:
    return DeviceState("btn-1", last_counter, NOW - 60, 80)


def _verify(
    frame: Frame,
    *,
    device: Device | None = None,
    trust: Trust = Trust.SIGNED,
    state: DeviceState | None = None,
    known: KnownPress | None = None,
    now: float = NOW,
) -> Accept | Duplicate | Reject:
    return verify(
        frame,
        device=_device() if device is None else device,
        trust=trust,
        state=state,
        known=known,
        now=now,
    )


# --- rejections -----------------------------------------------------------------------


def test_unknown_device_is_rejected_with_its_reference() -> None:
    verdict = verify(_signed(), device=None, trust=Trust.SIGNED, state=None, known=None, now=NOW)
    assert verdict == Reject("unknown_device", "btn-1")


def test_unsigned_frame_on_a_signed_source_is_rejected() -> None:
    frame = dataclasses.replace(_signed(), tag=None, signed_bytes=None)
    verdict = _verify(frame, trust=Trust.SIGNED)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "unsigned"


def test_tag_without_signed_bytes_is_unsigned() -> None:
    frame = dataclasses.replace(_signed(), signed_bytes=None)
    verdict = _verify(frame)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "unsigned"


def test_signed_frame_for_a_device_without_key_is_rejected() -> None:
    verdict = _verify(_signed(), device=_device(key=None))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "no_key"


def test_tag_from_another_key_is_bad_tag() -> None:
    verdict = _verify(_signed(key=b"\x01" * 32))
    assert verdict == Reject("bad_tag")


def test_tag_over_other_bytes_is_bad_tag() -> None:
    frame = dataclasses.replace(_signed(), signed_bytes=SIGNED_BYTES + b"x")
    assert _verify(frame) == Reject("bad_tag")


def test_signed_frame_without_counter_is_rejected() -> None:
    assert _verify(_signed(counter=None)) == Reject("no_counter")


def test_network_source_frame_carrying_a_tag_is_verified_as_signed() -> None:
    """Our LoRa frame inside a ChirpStack uplink: the network source does not skip the tag."""
    forged = _signed(key=b"\x02" * 32)
    assert _verify(forged, trust=Trust.NETWORK) == Reject("bad_tag")
    verdict = _verify(_signed(counter=5), trust=Trust.NETWORK, state=_state(9))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "stale_counter"


# --- duplicates -----------------------------------------------------------------------


def test_signed_known_press_of_same_kind_is_a_duplicate() -> None:
    known = KnownPress(press_id=77, kind=PressKind.PANIC, received_at=NOW - 5)
    verdict = _verify(_signed(), state=_state(10), known=known)
    assert verdict == Duplicate(_device(), 77)


def test_signed_known_press_is_a_duplicate_at_any_age() -> None:
    known = KnownPress(press_id=77, kind=PressKind.PANIC, received_at=NOW - 30 * 86400)
    verdict = _verify(_signed(), state=_state(500), known=known)
    assert verdict == Duplicate(_device(), 77)


def test_network_known_press_within_window_is_a_duplicate() -> None:
    known = KnownPress(
        press_id=5, kind=PressKind.PANIC, received_at=NOW - NETWORK_DUPLICATE_WINDOW_S
    )
    verdict = _verify(_network(), trust=Trust.NETWORK, state=_state(10), known=known)
    assert verdict == Duplicate(_device(), 5)


def test_network_known_press_past_window_is_a_new_press_after_counter_reset() -> None:
    known = KnownPress(
        press_id=5, kind=PressKind.PANIC, received_at=NOW - NETWORK_DUPLICATE_WINDOW_S - 1
    )
    verdict = _verify(_network(), trust=Trust.NETWORK, state=_state(10), known=known)
    assert verdict == Accept(_device(), counter_reset=True)


def test_known_counter_with_another_kind_is_counter_reused() -> None:
    known = KnownPress(press_id=77, kind=PressKind.TEST, received_at=NOW - 5)
    verdict = _verify(_signed(kind=PressKind.PANIC), state=_state(10), known=known)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "counter_reused"
    assert "test" in verdict.detail


def test_network_known_counter_with_another_kind_within_window_is_counter_reused() -> None:
    known = KnownPress(press_id=3, kind=PressKind.CANCEL, received_at=NOW - 1)
    verdict = _verify(_network(kind=PressKind.PANIC), trust=Trust.NETWORK, known=known)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "counter_reused"


def test_duplicate_check_comes_after_the_signature() -> None:
    """A forged copy of a stored press must not be acknowledged as that press."""
    known = KnownPress(press_id=77, kind=PressKind.PANIC, received_at=NOW - 5)
    assert _verify(_signed(key=b"\x03" * 32), state=_state(10), known=known) == Reject("bad_tag")


# --- counters -------------------------------------------------------------------------


def test_signed_counter_above_last_is_accepted() -> None:
    assert _verify(_signed(counter=11), state=_state(10)) == Accept(_device())


def test_signed_counter_without_stored_state_is_accepted() -> None:
    assert _verify(_signed(counter=0), state=None) == Accept(_device())
    assert _verify(_signed(counter=0), state=_state(None)) == Accept(_device())


def test_signed_counter_below_last_is_stale() -> None:
    verdict = _verify(_signed(counter=9), state=_state(10))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "stale_counter"
    assert "9" in verdict.detail
    assert "10" in verdict.detail


def test_signed_counter_equal_to_last_without_known_press_is_stale() -> None:
    verdict = _verify(_signed(counter=10), state=_state(10), known=None)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "stale_counter"


def test_network_counter_going_back_is_accepted_as_a_reset() -> None:
    verdict = _verify(_network(counter=0), trust=Trust.NETWORK, state=_state(4000))
    assert verdict == Accept(_device(), counter_reset=True)


def test_network_counter_equal_without_known_press_is_a_reset() -> None:
    verdict = _verify(_network(counter=10), trust=Trust.NETWORK, state=_state(10))
    assert verdict == Accept(_device(), counter_reset=True)


def test_network_counter_above_last_is_accepted_without_reset() -> None:
    verdict = _verify(_network(counter=11), trust=Trust.NETWORK, state=_state(10))
    assert verdict == Accept(_device(), counter_reset=False)


def test_network_frame_without_counter_is_accepted() -> None:
    verdict = _verify(_network(counter=None), trust=Trust.NETWORK, state=_state(10))
    assert verdict == Accept(_device())


# --- tag_valid ------------------------------------------------------------------------


def _truncated(size: int) -> Frame:
    full = _signed()
    assert full.tag is not None
    return dataclasses.replace(full, tag=full.tag[:size])


def test_full_tag_is_valid_only_for_its_key() -> None:
    assert tag_valid(_signed(), KEY)
    assert not tag_valid(_signed(), KEY[::-1])


def test_truncated_tag_is_valid_at_its_own_length() -> None:
    assert tag_valid(_truncated(8), KEY)
    assert tag_valid(_truncated(16), KEY)


def test_truncated_tag_matches_an_explicit_digest_size() -> None:
    assert tag_valid(_truncated(8), KEY, digest_size=8)
    assert not tag_valid(_truncated(8), KEY, digest_size=32)
    assert not tag_valid(_signed(), KEY, digest_size=8)


def test_truncated_tag_with_a_flipped_bit_is_invalid() -> None:
    frame = _truncated(8)
    assert frame.tag is not None
    flipped = bytes([frame.tag[0] ^ 1]) + frame.tag[1:]
    assert not tag_valid(dataclasses.replace(frame, tag=flipped), KEY)


@pytest.mark.parametrize("size", range(MIN_TAG_BYTES))
def test_tag_shorter_than_minimum_is_never_valid(size: int) -> None:
    frame = _truncated(size)
    assert not tag_valid(frame, KEY)
    assert _verify(frame) == Reject("bad_tag")


def test_missing_tag_or_signed_bytes_is_not_valid() -> None:
    assert not tag_valid(dataclasses.replace(_signed(), tag=None), KEY)
    assert not tag_valid(dataclasses.replace(_signed(), signed_bytes=None), KEY)
