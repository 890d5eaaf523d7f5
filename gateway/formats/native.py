"""panicd's own signed JSON frame (docs/FRAMES.md, "Native JSON frame").

Topic layout (MQTT 3.1.1 / 5, QoS 1):

* ``panicd/v1/dev/{device_id}/up`` — a button publishing for itself; the topic's device
  id must equal the frame's ``dev``.
* ``panicd/v1/gw/{gateway_id}/up`` — a relay gateway forwarding frames it heard; the
  gateway's registered position is the last location fallback.
* ``panicd/v1/dev/{device_id}/cmd`` — feedback from panicd to the button (not decoded here).

The tag is HMAC-SHA256 over :func:`canonical_bytes`, a pipe-joined line chosen so that a
microcontroller can build it with one ``snprintf`` and never needs a JSON canonicaliser.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from typing import Any

from gateway.errors import DecodeError
from gateway.formats._common import without_lone_surrogates
from gateway.model import Frame, GeoFix, PressKind

FORMAT = "native"
VERSION = 1
MAX_FRAME_BYTES = 1024
MAX_COUNTER = 2**53 - 1  # largest integer every JSON implementation keeps exact
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TAG_HEX = re.compile(r"[0-9a-f]{64}")
TOPIC_PREFIX = "panicd/v1/"
_FIELDS = frozenset({"v", "dev", "ctr", "kind", "ts", "bat", "gps", "tag"})
_GPS_FIELDS = frozenset({"lat", "lon", "acc"})


def uplink_topic(device_id: str) -> str:
    """The topic a native button publishes its frames on."""
    return f"{TOPIC_PREFIX}dev/{device_id}/up"


def command_topic(device_id: str) -> str:
    """The topic panicd publishes presser feedback on."""
    return f"{TOPIC_PREFIX}dev/{device_id}/cmd"


def canonical_bytes(
    *,
    device_id: str,
    counter: int,
    kind: PressKind,
    device_time: int | None,
    battery: int | None,
    fix: GeoFix | None,
) -> bytes:
    """The exact bytes the HMAC tag covers (empty fields stay empty between the pipes)."""
    lat = f"{fix.lat:.6f}" if fix else ""
    lon = f"{fix.lon:.6f}" if fix else ""
    acc = str(round(fix.accuracy_m)) if fix and fix.accuracy_m is not None else ""
    ts = "" if device_time is None else str(device_time)
    bat = "" if battery is None else str(battery)
    line = f"panicd/{VERSION}|{device_id}|{counter}|{kind.value}|{ts}|{bat}|{lat}|{lon}|{acc}"
    return line.encode("ascii")


def sign(key: bytes, signed_bytes: bytes) -> bytes:
    """HMAC-SHA256 of the canonical bytes."""
    return hmac.new(key, signed_bytes, hashlib.sha256).digest()


def ack_canonical_bytes(device_id: str, counter: int | None, state: str) -> bytes:
    """The bytes a JSON acknowledgement's tag covers (docs/FRAMES.md, "Signed ACK")."""
    ctr = "" if counter is None else str(counter)
    return f"panicd-ack/{VERSION}|{device_id}|{ctr}|{state}".encode("ascii")


def signed_ack(key: bytes, body: dict[str, object]) -> dict[str, object]:
    """``body`` (with ``dev``, ``state`` and maybe ``ctr``) plus its ``tag``.

    Whoever can reach a button (radio range, a broker account) could otherwise tell it
    "received" and silence a real panic; the button accepts only a tag made with its key.
    """
    ctr = body.get("ctr")
    signed = ack_canonical_bytes(
        str(body["dev"]), ctr if isinstance(ctr, int) else None, str(body["state"])
    )
    return {**body, "tag": sign(key, signed).hex()}


def ack_tag_valid(key: bytes, body: dict[str, object]) -> bool:
    """Whether a JSON acknowledgement carries a valid tag for ``key`` (the button's check)."""
    tag, dev, state, ctr = body.get("tag"), body.get("dev"), body.get("state"), body.get("ctr")
    if not isinstance(tag, str) or not isinstance(dev, str) or not isinstance(state, str):
        return False
    if ctr is not None and (not isinstance(ctr, int) or isinstance(ctr, bool)):
        return False
    expected = sign(key, ack_canonical_bytes(dev, ctr, state)).hex()
    return hmac.compare_digest(expected, tag)


def encode(
    *,
    key: bytes,
    device_id: str,
    counter: int,
    kind: PressKind,
    device_time: int | None = None,
    battery: int | None = None,
    fix: GeoFix | None = None,
) -> bytes:
    """Build a signed frame, as firmware (and the simulator) does."""
    canonical = canonical_bytes(
        device_id=device_id,
        counter=counter,
        kind=kind,
        device_time=device_time,
        battery=battery,
        fix=fix,
    )
    body: dict[str, Any] = {"v": VERSION, "dev": device_id, "ctr": counter, "kind": kind.value}
    if device_time is not None:
        body["ts"] = device_time
    if battery is not None:
        body["bat"] = battery
    if fix is not None:
        gps: dict[str, Any] = {"lat": round(fix.lat, 6), "lon": round(fix.lon, 6)}
        if fix.accuracy_m is not None:
            gps["acc"] = round(fix.accuracy_m)
        body["gps"] = gps
    body["tag"] = sign(key, canonical).hex()
    return json.dumps(body, separators=(",", ":")).encode()


def _reject_constant(name: str) -> float:
    raise DecodeError("bad_json", f"non-finite number {name}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two values for one key would let the signed and the acted-on values differ.
            raise DecodeError("bad_json", f"duplicate key {key!r}")
        out[key] = value
    return out


# One decoder for every frame: json.loads with hooks builds a new one (and its scanner)
# on each call, which is measurable at thousands of presses a second.
_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)


def _int_field(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError("bad_field", f"{name} must be an integer")
    if not low <= value <= high:
        raise DecodeError("bad_field", f"{name} out of range {low}..{high}")
    return value


def _number(gps: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = gps.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError("bad_field", f"gps.{name} must be a number")
    try:
        as_float = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        raise DecodeError("bad_field", f"gps.{name} out of range") from None
    if not math.isfinite(as_float) or not low <= as_float <= high:
        raise DecodeError("bad_field", f"gps.{name} out of range")
    return as_float


def _gps(value: object) -> GeoFix | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DecodeError("bad_field", "gps must be an object")
    unknown = set(value) - _GPS_FIELDS
    if unknown:
        raise DecodeError("unknown_field", f"gps.{sorted(unknown)[0]}")
    lat = _number(value, "lat", -90.0, 90.0)
    lon = _number(value, "lon", -180.0, 180.0)
    if lat is None or lon is None:
        raise DecodeError("bad_field", "gps needs lat and lon")
    acc = value.get("acc")
    if acc is not None and type(acc) is not int:
        raise DecodeError("bad_field", "gps.acc must be whole metres")
    # Act on exactly what the tag covers: the canonical string has 6 decimals.
    return GeoFix(
        lat=round(lat, 6), lon=round(lon, 6), accuracy_m=_number(value, "acc", 0.0, 1e6)
    )


def _topic_identity(topic: str) -> tuple[str, str] | None:
    """('dev', id) or ('gw', id) from a native topic; None for an empty topic (serial)."""
    if not topic:
        return None
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}/" != TOPIC_PREFIX or parts[4] != "up":
        raise DecodeError("bad_topic", topic[:200])
    if parts[2] not in ("dev", "gw") or not DEVICE_ID.fullmatch(parts[3]):
        raise DecodeError("bad_topic", topic[:200])
    return parts[2], parts[3]


def decode(topic: str, payload: bytes) -> Frame:
    """Decode one native frame; raises DecodeError (never anything else) on bad input."""
    if len(payload) > MAX_FRAME_BYTES:
        raise DecodeError("too_large", f"{len(payload)} bytes")
    identity = _topic_identity(topic)
    try:
        text = payload.decode("utf-8")
        body = without_lone_surrogates(text, _JSON.decode(text))
    except UnicodeDecodeError as exc:
        raise DecodeError("bad_encoding", str(exc)) from None
    except RecursionError:
        raise DecodeError("bad_json", "nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and our DecodeError subclass
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError("bad_json", str(exc)) from None
    if not isinstance(body, dict):
        raise DecodeError("bad_json", "frame is not an object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise DecodeError("unknown_field", sorted(unknown)[0][:64])
    if type(body.get("v")) is not int or body.get("v") != VERSION:
        raise DecodeError("bad_version", repr(body.get("v"))[:32])
    device_id = body.get("dev")
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise DecodeError("bad_field", "dev must be a device id")
    if identity is not None and identity[0] == "dev" and identity[1] != device_id:
        raise DecodeError("topic_mismatch", f"topic device {identity[1]} != frame {device_id}")
    counter = _int_field(body, "ctr", 0, MAX_COUNTER)
    if counter is None:
        raise DecodeError("bad_field", "ctr is required")
    try:
        kind = PressKind(str(body.get("kind")))
    except ValueError:
        raise DecodeError("bad_kind", repr(body.get("kind"))[:32]) from None
    device_time = _int_field(body, "ts", 0, 2**40)
    battery = _int_field(body, "bat", 0, 100)
    fix = _gps(body.get("gps"))
    tag_hex = body.get("tag")
    if not isinstance(tag_hex, str) or not TAG_HEX.fullmatch(tag_hex):
        raise DecodeError("bad_tag_format", "tag must be 64 lowercase hex digits")
    signed = canonical_bytes(
        device_id=device_id,
        counter=counter,
        kind=kind,
        device_time=device_time,
        battery=battery,
        fix=fix,
    )
    return Frame(
        format=FORMAT,
        device_ref=device_id,
        kind=kind,
        counter=counter,
        device_time=device_time,
        battery=battery,
        fix=fix,
        tag=bytes.fromhex(tag_hex),
        signed_bytes=signed,
        gateway_ref=identity[1] if identity is not None and identity[0] == "gw" else None,
    )
