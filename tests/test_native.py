"""The native signed JSON frame: test vector, round trip, every rejection, total decoding."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import native
from gateway.model import GeoFix, PressKind
from gateway.verify import tag_valid
from tests.formats_fuzz import assert_total, json_values

# The published test vector (docs/FRAMES.md, "Native JSON frame"): firmware authors check
# their canonical string and HMAC against these exact values.
VECTOR_KEY = bytes(range(32))
VECTOR_CANONICAL = b"panicd/1|MDN-OOO-0001|42|panic|1700000000|87|-7.621820|111.530960|15"
VECTOR_TAG = "fd67f3615ec30ca16eba6705a3003cd188e7e5b26dea7d9874046e31d5692f9c"
VECTOR_FRAME = (
    '{"v":1,"dev":"MDN-OOO-0001","ctr":42,"kind":"panic","ts":1700000000,"bat":87,'
    '"gps":{"lat":-7.62182,"lon":111.53096,"acc":15},'
    '"tag":"' + VECTOR_TAG + '"}'
).encode()
HEARTBEAT_CANONICAL = b"panicd/1|MDN-OOO-0001|43|heartbeat|||||"
HEARTBEAT_TAG = "37046888d341e4852ca0792f0075674e14220ea71f17847aef02d7440589c8d8"

TOPIC = "panicd/v1/dev/MDN-OOO-0001/up"
GOOD_TAG = "ab" * 32


def _body(**changes: Any) -> dict[str, Any]:
    """A well-formed frame body (tag not valid for any key) with fields changed or removed."""
    body: dict[str, Any] = {
        "v": 1,
        "dev": "MDN-OOO-0001",
        "ctr": 7,
        "kind": "panic",
        "ts": 1_700_000_000,
        "bat": 50,
        "gps": {"lat": -7.6, "lon": 111.5, "acc": 10},
        "tag": GOOD_TAG,
    }
    for name, value in changes.items():
        if value is _DROP:
            body.pop(name)
        else:
            body[name] = value
    return body


_DROP = object()


def _payload(**changes: Any) -> bytes:
    return json.dumps(_body(**changes)).encode()


def _reason(topic: str, payload: bytes) -> str:
    with pytest.raises(DecodeError) as caught:
        native.decode(topic, payload)
    return caught.value.reason


# --- the test vector ------------------------------------------------------------------


def test_canonical_bytes_match_the_published_vector() -> None:
    canonical = native.canonical_bytes(
        device_id="MDN-OOO-0001",
        counter=42,
        kind=PressKind.PANIC,
        device_time=1_700_000_000,
        battery=87,
        fix=GeoFix(lat=-7.62182, lon=111.53096, accuracy_m=15.0),
    )
    assert canonical == VECTOR_CANONICAL
    assert native.sign(VECTOR_KEY, canonical).hex() == VECTOR_TAG


def test_canonical_bytes_leave_absent_fields_empty_between_pipes() -> None:
    canonical = native.canonical_bytes(
        device_id="MDN-OOO-0001",
        counter=43,
        kind=PressKind.HEARTBEAT,
        device_time=None,
        battery=None,
        fix=None,
    )
    assert canonical == HEARTBEAT_CANONICAL
    assert canonical.count(b"|") == 8
    assert native.sign(VECTOR_KEY, canonical).hex() == HEARTBEAT_TAG


def test_canonical_bytes_leave_accuracy_empty_when_the_fix_has_none() -> None:
    canonical = native.canonical_bytes(
        device_id="d1",
        counter=0,
        kind=PressKind.TEST,
        device_time=0,
        battery=0,
        fix=GeoFix(lat=0.0, lon=-0.5),
    )
    assert canonical == b"panicd/1|d1|0|test|0|0|0.000000|-0.500000|"


def test_encoder_produces_the_published_frame_byte_for_byte() -> None:
    encoded = native.encode(
        key=VECTOR_KEY,
        device_id="MDN-OOO-0001",
        counter=42,
        kind=PressKind.PANIC,
        device_time=1_700_000_000,
        battery=87,
        fix=GeoFix(lat=-7.62182, lon=111.53096, accuracy_m=15.0),
    )
    assert encoded == VECTOR_FRAME


def test_published_frame_decodes_to_its_fields_and_a_valid_tag() -> None:
    frame = native.decode(TOPIC, VECTOR_FRAME)
    assert frame.format == "native"
    assert frame.device_ref == "MDN-OOO-0001"
    assert frame.counter == 42
    assert frame.kind is PressKind.PANIC
    assert frame.device_time == 1_700_000_000
    assert frame.battery == 87
    assert frame.fix == GeoFix(lat=-7.62182, lon=111.53096, accuracy_m=15.0)
    assert frame.signed_bytes == VECTOR_CANONICAL
    assert frame.tag == bytes.fromhex(VECTOR_TAG)
    assert frame.gateway_ref is None
    assert tag_valid(frame, VECTOR_KEY)
    assert not tag_valid(frame, bytes(32))


def test_signature_does_not_depend_on_json_key_order_or_whitespace() -> None:
    body = json.loads(VECTOR_FRAME)
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()
    frame = native.decode(TOPIC, reordered)
    assert frame.signed_bytes == VECTOR_CANONICAL
    assert tag_valid(frame, VECTOR_KEY)


def test_published_vector_is_the_one_in_docs_frames_md() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "FRAMES.md").read_text("utf-8")
    assert VECTOR_KEY.hex() in doc
    assert VECTOR_CANONICAL.decode() in doc
    assert VECTOR_TAG in doc
    assert VECTOR_FRAME.decode() in doc
    assert HEARTBEAT_CANONICAL.decode() in doc
    assert HEARTBEAT_TAG in doc


def test_topics_follow_the_documented_layout() -> None:
    assert native.uplink_topic("MDN-OOO-0001") == "panicd/v1/dev/MDN-OOO-0001/up"
    assert native.command_topic("MDN-OOO-0001") == "panicd/v1/dev/MDN-OOO-0001/cmd"


def test_gateway_topic_sets_gateway_ref_and_accepts_any_device() -> None:
    frame = native.decode("panicd/v1/gw/gw-balaikota/up", VECTOR_FRAME)
    assert frame.gateway_ref == "gw-balaikota"
    assert frame.device_ref == "MDN-OOO-0001"


def test_empty_topic_is_a_serial_frame_without_gateway() -> None:
    frame = native.decode("", VECTOR_FRAME)
    assert frame.gateway_ref is None
    assert frame.device_ref == "MDN-OOO-0001"


def test_optional_fields_decode_as_none() -> None:
    frame = native.decode(TOPIC, _payload(ts=_DROP, bat=_DROP, gps=_DROP))
    assert (frame.device_time, frame.battery, frame.fix) == (None, None, None)
    assert frame.signed_bytes == b"panicd/1|MDN-OOO-0001|7|panic|||||"


def test_json_null_optional_fields_are_absent() -> None:
    frame = native.decode(TOPIC, _payload(ts=None, bat=None, gps=None))
    assert (frame.device_time, frame.battery, frame.fix) == (None, None, None)


def test_a_tampered_field_invalidates_the_tag() -> None:
    body = json.loads(VECTOR_FRAME)
    body["ctr"] = 43
    frame = native.decode(TOPIC, json.dumps(body).encode())
    assert frame.counter == 43
    assert not tag_valid(frame, VECTOR_KEY)


def test_frame_of_exactly_max_bytes_is_not_too_large() -> None:
    payload = VECTOR_FRAME[:-1] + b" " * (native.MAX_FRAME_BYTES - len(VECTOR_FRAME)) + b"}"
    assert len(payload) == native.MAX_FRAME_BYTES
    assert native.decode(TOPIC, payload).counter == 42


# --- round trip -----------------------------------------------------------------------

device_ids = st.from_regex(native.DEVICE_ID, fullmatch=True)


def _fixes() -> st.SearchStrategy[GeoFix | None]:
    return st.none() | st.builds(
        GeoFix,
        lat=st.integers(-90_000_000, 90_000_000).map(lambda v: v / 1_000_000),
        lon=st.integers(-180_000_000, 180_000_000).map(lambda v: v / 1_000_000),
        accuracy_m=st.none() | st.integers(0, 1_000_000).map(float),
    )


@given(
    device_id=device_ids,
    counter=st.integers(0, native.MAX_COUNTER),
    kind=st.sampled_from(list(PressKind)),
    device_time=st.none() | st.integers(0, 2**40),
    battery=st.none() | st.integers(0, 100),
    fix=_fixes(),
    key=st.binary(min_size=16, max_size=64),
    via_gateway=st.booleans(),
)
def test_encode_then_decode_round_trips_every_field(  # noqa: PLR0917 -- hypothesis arguments
    device_id: str,
    counter: int,
    kind: PressKind,
    device_time: int | None,
    battery: int | None,
    fix: GeoFix | None,
    key: bytes,
    via_gateway: bool,
) -> None:
    payload = native.encode(
        key=key,
        device_id=device_id,
        counter=counter,
        kind=kind,
        device_time=device_time,
        battery=battery,
        fix=fix,
    )
    topic = "panicd/v1/gw/gw-1/up" if via_gateway else native.uplink_topic(device_id)
    frame = native.decode(topic, payload)
    assert frame.device_ref == device_id
    assert frame.counter == counter
    assert frame.kind is kind
    assert frame.device_time == device_time
    assert frame.battery == battery
    assert frame.fix == fix
    assert frame.gateway_ref == ("gw-1" if via_gateway else None)
    assert frame.signed_bytes == native.canonical_bytes(
        device_id=device_id,
        counter=counter,
        kind=kind,
        device_time=device_time,
        battery=battery,
        fix=fix,
    )
    assert tag_valid(frame, key)
    assert not tag_valid(frame, key + b"x")


# --- every rejection ------------------------------------------------------------------


def test_payload_over_max_bytes_is_too_large() -> None:
    payload = VECTOR_FRAME[:-1] + b" " * (native.MAX_FRAME_BYTES + 1 - len(VECTOR_FRAME)) + b"}"
    assert len(payload) == native.MAX_FRAME_BYTES + 1
    assert _reason(TOPIC, payload) == "too_large"


@pytest.mark.parametrize(
    "topic",
    [
        "panicd/v1/dev/MDN-OOO-0001/cmd",
        "panicd/v2/dev/MDN-OOO-0001/up",
        "panicd/v1/btn/MDN-OOO-0001/up",
        "panicd/v1/dev//up",
        "panicd/v1/dev/+/up",
        "panicd/v1/dev/#",
        "panicd/v1/dev/MDN-OOO-0001/up/extra",
        "/panicd/v1/dev/MDN-OOO-0001/up",
        "other/v1/dev/MDN-OOO-0001/up",
        "panicd/v1/dev/-leading-dash/up",
        "panicd/v1/dev/" + "a" * 65 + "/up",
    ],
)
def test_topic_outside_the_layout_is_bad_topic(topic: str) -> None:
    assert _reason(topic, VECTOR_FRAME) == "bad_topic"


def test_invalid_utf8_is_bad_encoding() -> None:
    assert _reason(TOPIC, b'{"v":1,"dev":"\xff"}') == "bad_encoding"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "empty"),
        (b"not json", "not json"),
        (b'{"v":1', "truncated"),
        (b'{"v":1,"v":1}', "duplicate top-level key"),
        (
            b'{"v":1,"dev":"d","ctr":1,"kind":"panic","gps":{"lat":1,"lat":2,"lon":3}}',
            "duplicate gps key",
        ),
        (b'{"v":1,"bat":NaN}', "NaN"),
        (b'{"v":1,"bat":Infinity}', "Infinity"),
        (b'{"v":1,"bat":-Infinity}', "-Infinity"),
        (b"[1,2]", "array"),
        (b'"frame"', "string"),
        (b"42", "number"),
        (b"null", "null"),
        (b"[" * 500 + b"]" * 500, "deeply nested array"),
    ],
)
def test_malformed_json_is_bad_json(payload: bytes, why: str) -> None:
    assert _reason(TOPIC, payload) == "bad_json", why


def test_nesting_past_the_recursion_limit_is_bad_json_not_recursion_error() -> None:
    depth = len(inspect.stack(0))
    old = sys.getrecursionlimit()
    # json's C scanner counts its own recursion; a limit just above the current depth
    # makes a 400-deep document exceed it the way a tiny thread stack would.
    sys.setrecursionlimit(depth + 100)
    try:
        reason = _reason(TOPIC, b'{"gps":' + b"[" * 400 + b"]" * 400 + b"}")
    finally:
        sys.setrecursionlimit(old)
    assert reason == "bad_json"


@pytest.mark.parametrize(
    "payload",
    [_payload(extra=1), _payload(gps={"lat": 1, "lon": 2, "alt": 3}), _payload(Tag=GOOD_TAG)],
)
def test_unknown_field_is_refused(payload: bytes) -> None:
    assert _reason(TOPIC, payload) == "unknown_field"


@pytest.mark.parametrize("version", [_DROP, 0, 2, True, 1.0, "1", None, [1]])
def test_missing_or_other_version_is_bad_version(version: object) -> None:
    assert _reason(TOPIC, _payload(v=version)) == "bad_version"


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"dev": _DROP}, "dev missing"),
        ({"dev": ""}, "dev empty"),
        ({"dev": "has space"}, "dev with space"),
        ({"dev": "a|b"}, "dev with the canonical separator"),
        ({"dev": 17}, "dev not a string"),
        ({"dev": "a" * 65}, "dev too long"),
        ({"ctr": _DROP}, "ctr missing"),
        ({"ctr": None}, "ctr null"),
        ({"ctr": -1}, "ctr negative"),
        ({"ctr": native.MAX_COUNTER + 1}, "ctr beyond 2^53-1"),
        ({"ctr": 1.0}, "ctr float"),
        ({"ctr": "7"}, "ctr string"),
        ({"ctr": True}, "ctr boolean"),
        ({"ts": -1}, "ts negative"),
        ({"ts": 2**40 + 1}, "ts too large"),
        ({"bat": 101}, "bat over 100"),
        ({"bat": -1}, "bat negative"),
        ({"bat": False}, "bat boolean"),
        ({"bat": 50.5}, "bat float"),
        ({"gps": [1, 2]}, "gps array"),
        ({"gps": {"lat": 1}}, "gps without lon"),
        ({"gps": {"lon": 1}}, "gps without lat"),
        ({"gps": {"lat": 90.5, "lon": 1}}, "lat out of range"),
        ({"gps": {"lat": 1, "lon": -180.5}}, "lon out of range"),
        ({"gps": {"lat": "1", "lon": 1}}, "lat string"),
        ({"gps": {"lat": True, "lon": 1}}, "lat boolean"),
        ({"gps": {"lat": 10**400, "lon": 1}}, "lat integer too large for a float"),
        ({"gps": {"lat": 1, "lon": 1, "acc": -1}}, "acc negative"),
        ({"gps": {"lat": 1, "lon": 1, "acc": 1e7}}, "acc too large"),
    ],
)
def test_ill_typed_or_out_of_range_field_is_bad_field(changes: dict[str, Any], why: str) -> None:
    assert _reason(TOPIC, _payload(**changes)) == "bad_field", why


@pytest.mark.parametrize(
    ("field", "value"), [(b'"ts": 1700000000', b'"ts": 1e400'), (b'"lat": -7.6', b'"lat": -1e400')]
)
def test_number_literal_overflowing_to_infinity_is_bad_field(field: bytes, value: bytes) -> None:
    payload = _payload()
    assert field in payload
    assert _reason(TOPIC, payload.replace(field, value)) == "bad_field"


def test_range_limits_themselves_are_accepted() -> None:
    frame = native.decode(
        TOPIC,
        _payload(
            ctr=native.MAX_COUNTER,
            ts=2**40,
            bat=100,
            gps={"lat": -90, "lon": 180, "acc": 1_000_000},
        ),
    )
    assert frame.counter == native.MAX_COUNTER
    assert frame.device_time == 2**40
    assert frame.battery == 100
    assert frame.fix == GeoFix(lat=-90.0, lon=180.0, accuracy_m=1_000_000.0)


def test_device_topic_naming_another_device_is_topic_mismatch() -> None:
    assert _reason("panicd/v1/dev/MDN-KLG-0001/up", VECTOR_FRAME) == "topic_mismatch"


@pytest.mark.parametrize("kind", [_DROP, "PANIC", "alarm", "", 0, None, ["panic"]])
def test_unknown_or_missing_kind_is_bad_kind(kind: object) -> None:
    assert _reason(TOPIC, _payload(kind=kind)) == "bad_kind"


@pytest.mark.parametrize(
    "tag",
    [_DROP, None, "AB" * 32, "ab" * 31, "ab" * 33, "ab" * 31 + "zz", 12, ["ab" * 32]],
)
def test_tag_that_is_not_64_lowercase_hex_is_bad_tag_format(tag: object) -> None:
    assert _reason(TOPIC, _payload(tag=tag)) == "bad_tag_format"


# --- total decoding -------------------------------------------------------------------

topics = st.text(max_size=80) | st.sampled_from(
    ["", TOPIC, "panicd/v1/gw/gw-1/up", "panicd/v1/dev/x/up", "panicd/v1/dev/x/cmd"]
)


@given(topic=topics, payload=st.binary(max_size=1100))
def test_arbitrary_bytes_and_topics_raise_only_decode_error(topic: str, payload: bytes) -> None:
    assert_total(native.decode, topic, payload)


# Field values that reach every validator: the real field names with wild values,
# including integers far beyond float range.
wild_values = json_values | st.integers(-(10**400), 10**400) | st.floats()
frame_objects = st.dictionaries(
    st.sampled_from(sorted(native._FIELDS)) | st.text(max_size=6),
    wild_values
    | st.dictionaries(
        st.sampled_from(["lat", "lon", "acc"]) | st.text(max_size=4), wild_values, max_size=4
    ),
    max_size=9,
)


@given(body=frame_objects, topic=topics)
def test_arbitrary_json_objects_raise_only_decode_error(
    body: dict[str, object], topic: str
) -> None:
    assert_total(native.decode, topic, json.dumps(body).encode())


@given(
    body=st.fixed_dictionaries(
        {
            "v": st.just(1),
            "dev": device_ids,
            "ctr": wild_values,
            "kind": st.sampled_from([k.value for k in PressKind]) | wild_values,
            "gps": st.fixed_dictionaries({"lat": wild_values, "lon": wild_values}),
            "tag": st.just(GOOD_TAG),
        }
    )
)
def test_nearly_valid_frames_raise_only_decode_error(body: dict[str, object]) -> None:
    assert_total(native.decode, "", json.dumps(body).encode())


def test_signed_ack_matches_the_documented_vector() -> None:
    """docs/FRAMES.md, "ACK downlink": the JSON ACK's tag for the test key."""
    body = native.signed_ack(bytes(range(32)), {"dev": "L0000ABCD", "ctr": 5, "state": "received"})
    assert body["tag"] == "195b63109b83f0c16d7f872e68c60c7f3a3e719921e333c572a65df6da5d3ca4"
    assert native.ack_tag_valid(bytes(range(32)), body)
    assert not native.ack_tag_valid(bytes(range(32)), {**body, "state": "help_coming"})
    assert not native.ack_tag_valid(bytes(range(32)), {**body, "ctr": True})
    assert not native.ack_tag_valid(b"\x01" * 32, body)


def test_mqtt_feedback_matches_the_documented_vector() -> None:
    """docs/FRAMES.md, "Topics": the signed "received" feedback for the test key."""
    body = native.signed_ack(
        bytes(range(32)),
        {"dev": "MDN-OOO-0001", "ctr": 42, "state": "received", "press": 1234, "incident": 567},
    )
    assert body["tag"] == "1e3de496d7ae75ad423c428026da0bea7f76eb610b55f43203cb6649de251f1a"
