"""Trust verdicts: device, signature, counter, duplicates and network counter resets."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.model import Device, Frame, PressKind, Trust
from gateway.verify import (
    MIN_TAG_BYTES,
    NETWORK_DUPLICATE_WINDOW_S,
    REPLAY_WINDOW,
    Accept,
    DeviceState,
    Duplicate,
    KnownPress,
    Reject,
    seen_state,
    tag_valid,
    verify,
    window_add,
    window_has,
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


def _state(last_counter: int | None, window: int = 1) -> DeviceState:
    """A device whose highest signed counter is ``last_counter`` (window: only that one)."""
    return DeviceState("btn-1", last_counter, NOW - 60, 80, window=window)


def _net_state(last_network_counter: int | None) -> DeviceState:
    return DeviceState("btn-1", None, NOW - 60, 80, last_network_counter=last_network_counter)


def _reason(verdict: object) -> str:
    assert isinstance(verdict, Reject)
    return verdict.reason


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
    assert isinstance(verdict, Reject)
    assert verdict.reason == "bad_tag"


def test_tag_over_other_bytes_is_bad_tag() -> None:
    frame = dataclasses.replace(_signed(), signed_bytes=SIGNED_BYTES + b"x")
    verdict = _verify(frame)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "bad_tag"


def test_a_bad_tag_says_what_was_checked_without_the_key_or_the_expected_tag() -> None:
    frame = _signed(key=b"\x01" * 32)
    verdict = _verify(frame)
    assert verdict == Reject("bad_tag", "HMAC-SHA256 with device btn-1's key over"
                             f" {len(SIGNED_BYTES)} signed bytes of the native frame:"
                             " the 32-byte tag does not match")
    assert isinstance(verdict, Reject)
    expected = hmac.digest(KEY, SIGNED_BYTES, hashlib.sha256)
    for secret in (KEY, expected, expected[:MIN_TAG_BYTES]):
        for form in (secret.hex(), secret.hex().upper(), repr(secret)):
            assert form not in verdict.detail


def test_a_tag_too_short_to_check_says_so() -> None:
    frame = dataclasses.replace(_signed(), tag=b"\x00" * 4)
    verdict = _verify(frame)
    assert isinstance(verdict, Reject)
    assert verdict.detail.endswith(": a 4-byte tag is shorter than the 8 required")


def test_signed_frame_without_counter_is_rejected() -> None:
    assert _verify(_signed(counter=None)) == Reject("no_counter")


def test_network_source_frame_carrying_a_tag_is_verified_as_signed() -> None:
    """Our LoRa frame inside a ChirpStack uplink: the network source does not skip the tag."""
    forged = _signed(key=b"\x02" * 32)
    assert _reason(_verify(forged, trust=Trust.NETWORK)) == "bad_tag"
    verdict = _verify(_signed(counter=5), trust=Trust.NETWORK, state=_state(9, window=0b11111))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "replayed_counter"
    assert _verify(_signed(counter=10), trust=Trust.NETWORK, state=_state(9)) == Accept(_device())


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
        press_id=5, kind=PressKind.PANIC, received_at=NOW - NETWORK_DUPLICATE_WINDOW_S,
        trust=Trust.NETWORK,
    )
    verdict = _verify(_network(), device=_device(key=None), trust=Trust.NETWORK,
                      state=_net_state(10), known=known)
    assert verdict == Duplicate(_device(key=None), 5)


def test_network_known_press_past_window_is_a_new_press_after_counter_reset() -> None:
    known = KnownPress(
        press_id=5, kind=PressKind.PANIC, received_at=NOW - NETWORK_DUPLICATE_WINDOW_S - 1,
        trust=Trust.NETWORK,
    )
    verdict = _verify(_network(), device=_device(key=None), trust=Trust.NETWORK,
                      state=_net_state(10), known=known)
    assert verdict == Accept(_device(key=None), counter_reset=True, trust=Trust.NETWORK)


def test_known_counter_with_another_kind_is_counter_reused() -> None:
    known = KnownPress(press_id=77, kind=PressKind.TEST, received_at=NOW - 5)
    verdict = _verify(_signed(kind=PressKind.PANIC), state=_state(10), known=known)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "counter_reused"
    assert "test" in verdict.detail


def test_network_known_counter_with_another_kind_within_window_is_counter_reused() -> None:
    known = KnownPress(press_id=3, kind=PressKind.CANCEL, received_at=NOW - 1,
                       trust=Trust.NETWORK)
    verdict = _verify(_network(kind=PressKind.PANIC), device=_device(key=None),
                      trust=Trust.NETWORK, known=known)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "counter_reused"


def test_duplicate_check_comes_after_the_signature() -> None:
    """A forged copy of a stored press must not be acknowledged as that press."""
    known = KnownPress(press_id=77, kind=PressKind.PANIC, received_at=NOW - 5)
    assert _reason(_verify(_signed(key=b"\x03" * 32), state=_state(10), known=known)) == "bad_tag"


# --- counters -------------------------------------------------------------------------


def test_signed_counter_above_last_is_accepted() -> None:
    assert _verify(_signed(counter=11), state=_state(10)) == Accept(_device())


def test_signed_counter_without_stored_state_is_accepted() -> None:
    assert _verify(_signed(counter=0), state=None) == Accept(_device())
    assert _verify(_signed(counter=0), state=_state(None)) == Accept(_device())


def test_signed_counter_older_than_the_window_is_stale() -> None:
    verdict = _verify(_signed(counter=9), state=_state(9 + REPLAY_WINDOW))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "stale_counter"
    assert "9" in verdict.detail
    assert str(9 + REPLAY_WINDOW) in verdict.detail


def test_signed_counter_inside_the_window_never_accepted_is_a_late_press() -> None:
    """A press lost at the broker, retransmitted after the next one got through (issue 12)."""
    assert _verify(_signed(counter=9), state=_state(10)) == Accept(_device())
    oldest = 10 - REPLAY_WINDOW + 1
    assert _verify(_signed(counter=oldest), state=_state(10)) == Accept(_device())


def test_signed_counter_inside_the_window_already_accepted_is_replayed() -> None:
    verdict = _verify(_signed(counter=8), state=_state(10, window=0b101))
    assert verdict == Reject("replayed_counter", "counter 8 was accepted before")


def test_signed_counter_equal_to_last_without_known_press_is_replayed() -> None:
    verdict = _verify(_signed(counter=10), state=_state(10), known=None)
    assert isinstance(verdict, Reject)
    assert verdict.reason == "replayed_counter"


def test_network_counter_going_back_is_accepted_as_a_reset() -> None:
    verdict = _verify(_network(counter=0), device=_device(key=None), trust=Trust.NETWORK,
                      state=_net_state(4000))
    assert verdict == Accept(_device(key=None), counter_reset=True, trust=Trust.NETWORK)


def test_network_counter_equal_without_known_press_is_a_reset() -> None:
    verdict = _verify(_network(counter=10), device=_device(key=None), trust=Trust.NETWORK,
                      state=_net_state(10))
    assert verdict == Accept(_device(key=None), counter_reset=True, trust=Trust.NETWORK)


def test_network_counter_above_last_is_accepted_without_reset() -> None:
    verdict = _verify(_network(counter=11), device=_device(key=None), trust=Trust.NETWORK,
                      state=_net_state(10))
    assert verdict == Accept(_device(key=None), counter_reset=False, trust=Trust.NETWORK)


def test_network_counter_is_not_compared_with_the_signed_counter() -> None:
    verdict = _verify(_network(counter=3), device=_device(key=None), trust=Trust.NETWORK,
                      state=_state(4000))
    assert verdict == Accept(_device(key=None), trust=Trust.NETWORK)


def test_network_frame_without_counter_is_accepted() -> None:
    verdict = _verify(_network(counter=None), device=_device(key=None), trust=Trust.NETWORK,
                      state=_net_state(10))
    assert verdict == Accept(_device(key=None), trust=Trust.NETWORK)


# --- a keyed device is trusted only through its signature (issue 11, case 1) ----------


@pytest.mark.parametrize("kind", list(PressKind))
def test_unsigned_network_frame_naming_a_keyed_device_is_refused(kind: PressKind) -> None:
    """An unsigned ChirpStack codec object must not raise a panic in a keyed button's name."""
    verdict = _verify(_network(counter=2**32 - 1, kind=kind), trust=Trust.NETWORK)
    assert verdict == Reject("unsigned", "device has a key: only its signed frames are trusted")


def test_network_frame_never_moves_the_signed_counter() -> None:
    """fCnt 4294967295 on a network frame must not make the button's signed presses stale."""
    keyless = _device(key=None)
    network = _network(counter=2**32 - 1)
    state = seen_state(_state(1), keyless.id, network, Trust.NETWORK, NOW)
    assert (state.last_counter, state.window, state.last_network_counter) == (1, 1, 2**32 - 1)
    assert _verify(_signed(counter=2), state=state) == Accept(_device())


def test_known_press_of_the_other_sequence_is_not_this_press() -> None:
    """A network press numbered 5 is no retransmission of signed press 5 (a key was added)."""
    network_press = KnownPress(press_id=3, kind=PressKind.PANIC, received_at=NOW - 5,
                               trust=Trust.NETWORK)
    verdict = _verify(_signed(counter=5), state=_state(4), known=network_press)
    assert verdict == Accept(_device())


# --- the anti-replay window -----------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=60))
def test_window_agrees_with_the_set_of_accepted_counters(counters: list[int]) -> None:
    """window_has is exact inside the window and "accepted" below it, like RFC 4303."""
    last: int | None = None
    window = 0
    accepted: set[int] = set()
    for counter in counters:
        if last is not None and window_has(last, window, counter):
            assert counter in accepted or counter <= last - REPLAY_WINDOW
            continue
        assert counter not in accepted
        last, window = window_add(last, window, counter)
        accepted.add(counter)
        assert last == max(accepted)
        assert window < 1 << REPLAY_WINDOW
    if last is not None:
        for counter in range(max(0, last - REPLAY_WINDOW + 1), last + 2):
            assert window_has(last, window, counter) == (counter in accepted)


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
    assert _reason(_verify(frame)) == "bad_tag"


def test_missing_tag_or_signed_bytes_is_not_valid() -> None:
    assert not tag_valid(dataclasses.replace(_signed(), tag=None), KEY)
    assert not tag_valid(dataclasses.replace(_signed(), signed_bytes=None), KEY)
