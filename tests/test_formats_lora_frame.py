"""The binary LoRa frame: layout, round trip, tamper detection, total decoding."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import lora_frame
from gateway.model import GeoFix, PressKind
from gateway.verify import tag_valid
from tests.formats_fuzz import assert_total

KEY = b"k" * 32

# A hand-assembled frame following docs/FRAMES.md "Binary LoRa frame" byte for byte, so
# a change to the encoder that breaks deployed firmware fails here.
BODY = bytes.fromhex("01010001a2b30000002a0057") + struct.pack(">ii", -7_629_000, 111_523_000)
HAND_FRAME = BODY + hmac.digest(KEY, BODY, hashlib.sha256)[:8]


def test_decodes_documented_layout() -> None:
    frame = lora_frame.decode("", HAND_FRAME)
    assert frame.format == "lora-frame"
    assert frame.device_ref == "L0001A2B3"
    assert frame.counter == 42
    assert frame.kind is PressKind.PANIC
    assert frame.battery == 87
    assert frame.fix == GeoFix(lat=-7.629, lon=111.523)
    assert frame.signed_bytes == BODY
    assert frame.tag == HAND_FRAME[-8:]
    assert tag_valid(frame, KEY)


def test_encoder_matches_documented_layout() -> None:
    encoded = lora_frame.encode(
        device="L0001A2B3",
        counter=42,
        kind=PressKind.PANIC,
        key=KEY,
        battery=87,
        fix=GeoFix(lat=-7.629, lon=111.523),
    )
    assert encoded == HAND_FRAME


def test_frame_without_gps_is_20_bytes_and_fits_sf12() -> None:
    frame = lora_frame.encode(device="L00000001", counter=1, kind=PressKind.TEST, key=KEY)
    assert len(frame) == 20
    assert len(HAND_FRAME) == 28 <= lora_frame.MAX_FRAME_BYTES
    decoded = lora_frame.decode("", frame)
    assert decoded.fix is None
    assert decoded.battery is None


def test_registry_id_mapping_round_trips() -> None:
    assert lora_frame.device_id(0x0001A2B3) == "L0001A2B3"
    assert lora_frame.device_number("L0001A2B3") == 0x0001A2B3
    with pytest.raises(ValueError, match="not a LoRa button id"):
        lora_frame.device_number("l0001a2b3")
    with pytest.raises(ValueError, match="reserved"):
        lora_frame.device_number("L00000000")


@given(
    number=st.integers(1, 0xFFFFFFFF),
    counter=st.integers(0, 0xFFFFFFFF),
    kind=st.sampled_from(list(PressKind)),
    battery=st.none() | st.integers(0, 100),
    fix=st.none()
    | st.builds(
        GeoFix,
        lat=st.integers(-90_000_000, 90_000_000).map(lambda v: v / 1_000_000),
        lon=st.integers(-180_000_000, 180_000_000).map(lambda v: v / 1_000_000),
    ),
)
def test_encode_decode_round_trip(
    number: int, counter: int, kind: PressKind, battery: int | None, fix: GeoFix | None
) -> None:
    device = lora_frame.device_id(number)
    payload = lora_frame.encode(
        device=device, counter=counter, kind=kind, key=KEY, battery=battery, fix=fix
    )
    frame = lora_frame.decode("", payload)
    assert (frame.device_ref, frame.counter, frame.kind, frame.battery, frame.fix) == (
        device,
        counter,
        kind,
        battery,
        fix,
    )
    assert tag_valid(frame, KEY)


@given(position=st.integers(0, 27), bit=st.integers(0, 7))
def test_any_flipped_bit_is_rejected_or_fails_the_tag(position: int, bit: int) -> None:
    tampered = bytearray(HAND_FRAME)
    tampered[position] ^= 1 << bit
    try:
        frame = lora_frame.decode("", bytes(tampered))
    except DecodeError:
        return
    assert not tag_valid(frame, KEY)


def test_wrong_key_fails_the_tag() -> None:
    assert not tag_valid(lora_frame.decode("", HAND_FRAME), b"x" * 32)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "bad_length"),
        (b"\x02" + HAND_FRAME[1:], "unsupported_version"),
        (HAND_FRAME[:-1], "bad_length"),
        (HAND_FRAME + b"\x00", "bad_length"),
        (HAND_FRAME[:1] + b"\x03" + HAND_FRAME[2:], "reserved_flags"),
        (HAND_FRAME[:2] + b"\x00\x00\x00\x00" + HAND_FRAME[6:], "reserved_device_number"),
        (HAND_FRAME[:10] + b"\x04" + HAND_FRAME[11:], "unknown_kind"),
        (HAND_FRAME[:11] + b"\x65" + HAND_FRAME[12:], "bad_battery"),
        (HAND_FRAME[:12] + struct.pack(">i", 90_000_001) + HAND_FRAME[16:], "bad_position"),
    ],
)
def test_malformed_frames_name_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        lora_frame.decode("", payload)
    assert info.value.reason == reason


def test_encode_rejects_values_the_layout_cannot_carry() -> None:
    with pytest.raises(ValueError, match="uint32"):
        lora_frame.encode(device="L00000001", counter=2**32, kind=PressKind.PANIC, key=KEY)
    with pytest.raises(ValueError, match="battery"):
        lora_frame.encode(device="L00000001", counter=1, kind=PressKind.PANIC, key=KEY, battery=101)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes) -> None:
    assert_total(lora_frame.decode, "", payload)


@given(st.binary(min_size=18, max_size=18))
def test_well_sized_random_frames_only_raise_decode_error(rest: bytes) -> None:
    # Valid version and flags so the fuzzer reaches the field checks behind them.
    assert_total(lora_frame.decode, "", b"\x01\x00" + rest)
