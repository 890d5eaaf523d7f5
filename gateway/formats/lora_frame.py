"""panicd's compact binary frame for its own LoRa buttons (docs/FRAMES.md, "Binary LoRa frame").

Layout (big-endian), 20 bytes without GPS, 28 with; the tag covers every byte before it:

    0      version          1
    1      flags            bit 0 = GPS present; bits 1..7 must be 0
    2..5   device number    uint32; registry id "L" + 8 upper-case hex digits
    6..9   counter          uint32, strictly increasing per device
    10     kind             0 panic, 1 cancel, 2 test, 3 heartbeat
    11     battery          0..100 %, 255 = unknown
    12..19 lat, lon         int32 each, 1e-6 degrees (only when flag bit 0)
    last 8 tag              HMAC-SHA256(device key, all preceding bytes)[:8]

The frame travels as-is in a LoRaWAN FRMPayload (ChirpStack ``data``, TTN
``frm_payload``) and hex-encoded in the text-based serial receivers (REYAX, RAK P2P).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct

from gateway.errors import DecodeError
from gateway.model import Frame, GeoFix, PressKind

FORMAT = "lora-frame"
VERSION = 1
TAG_BYTES = 8
FLAG_GPS = 0x01
BATTERY_UNKNOWN = 0xFF
# SF12/125 kHz in AS923 leaves ~51 bytes of FRMPayload; stay far below it.
MAX_FRAME_BYTES = 51

_HEADER = struct.Struct(">BBIIBB")
_GPS = struct.Struct(">ii")
BASE_BYTES = _HEADER.size + TAG_BYTES
GPS_BYTES = BASE_BYTES + _GPS.size

_KINDS: tuple[PressKind, ...] = (
    PressKind.PANIC,
    PressKind.CANCEL,
    PressKind.TEST,
    PressKind.HEARTBEAT,
)
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
_DEVICE_ID = re.compile(r"L[0-9A-F]{8}")
_MICRODEGREES = 1_000_000


def device_id(number: int) -> str:
    """The registry id for a frame's 4-byte device number, e.g. 0x0001A2B3 → "L0001A2B3"."""
    return f"L{number:08X}"


def device_number(registry_id: str) -> int:
    """The 4-byte device number for a registry id such as "L0001A2B3"."""
    if not _DEVICE_ID.fullmatch(registry_id):
        raise ValueError(f"{registry_id!r} is not a LoRa button id (L + 8 upper-case hex)")
    number = int(registry_id[1:], 16)
    if number == 0:
        raise ValueError("device number 0 is reserved (erased-flash default)")
    return number


def encode(
    *,
    device: str,
    counter: int,
    kind: PressKind,
    key: bytes,
    battery: int | None = None,
    fix: GeoFix | None = None,
) -> bytes:
    """Build a signed frame, as the button firmware (and the simulator) does."""
    if not 0 <= counter <= 0xFFFFFFFF:
        raise ValueError("counter must fit in uint32")
    if battery is not None and not 0 <= battery <= 100:
        raise ValueError("battery must be 0..100 or None")
    body = _HEADER.pack(
        VERSION,
        FLAG_GPS if fix is not None else 0,
        device_number(device),
        counter,
        _KIND_CODES[kind],
        BATTERY_UNKNOWN if battery is None else battery,
    )
    if fix is not None:
        body += _GPS.pack(_to_micro(fix.lat, 90), _to_micro(fix.lon, 180))
    return body + hmac.digest(key, body, hashlib.sha256)[:TAG_BYTES]


def decode(topic: str, payload: bytes) -> Frame:
    """Decode a binary frame; the tag is returned for the verifier, not checked here."""
    del topic  # the frame names its own device; the topic carries nothing extra
    return decode_bytes(payload, format_name=FORMAT)


def decode_bytes(payload: bytes, *, format_name: str) -> Frame:
    """Decode a binary frame carried inside another format (ChirpStack, TTN, serial)."""
    if len(payload) < 1:
        raise DecodeError("bad_length", "empty frame")
    if payload[0] != VERSION:
        raise DecodeError("unsupported_version", f"version byte {payload[0]}")
    if len(payload) < _HEADER.size:
        raise DecodeError("bad_length", f"{len(payload)} bytes")
    _, flags, number, counter, kind_code, battery = _HEADER.unpack_from(payload)
    if flags & ~FLAG_GPS:
        raise DecodeError("reserved_flags", f"flags {flags:#04x}")
    expected = GPS_BYTES if flags & FLAG_GPS else BASE_BYTES
    if len(payload) != expected:
        raise DecodeError("bad_length", f"{len(payload)} bytes, expected {expected}")
    if number == 0:
        raise DecodeError("reserved_device_number", "device number 0")
    if kind_code >= len(_KINDS):
        raise DecodeError("unknown_kind", f"kind code {kind_code}")
    if battery > 100 and battery != BATTERY_UNKNOWN:
        raise DecodeError("bad_battery", f"battery byte {battery}")
    fix = None
    if flags & FLAG_GPS:
        lat_e6, lon_e6 = _GPS.unpack_from(payload, _HEADER.size)
        if abs(lat_e6) > 90 * _MICRODEGREES or abs(lon_e6) > 180 * _MICRODEGREES:
            raise DecodeError("bad_position", f"{lat_e6}, {lon_e6}")
        fix = GeoFix(lat=lat_e6 / _MICRODEGREES, lon=lon_e6 / _MICRODEGREES)
    signed_end = expected - TAG_BYTES
    return Frame(
        format=format_name,
        device_ref=device_id(number),
        kind=_KINDS[kind_code],
        counter=counter,
        battery=None if battery == BATTERY_UNKNOWN else battery,
        fix=fix,
        tag=bytes(payload[signed_end:]),
        signed_bytes=bytes(payload[:signed_end]),
    )


def looks_like_frame(payload: bytes) -> bool:
    """Cheap test whether bytes are shaped like a binary frame (version and length)."""
    return len(payload) in (BASE_BYTES, GPS_BYTES) and payload[0] == VERSION


def _to_micro(degrees: float, limit: int) -> int:
    value = round(degrees * _MICRODEGREES)
    if abs(value) > limit * _MICRODEGREES:
        raise ValueError(f"{degrees} is outside ±{limit}°")
    return value
