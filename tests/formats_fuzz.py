"""Hypothesis strategies, every decoder with valid frames to mutate, and the outcome checks."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from firmware_sim.third_party import CHIRPSTACK_APPLICATION
from gateway.errors import DecodeError
from gateway.formats import lora_ack, lora_frame, native, serial_lines, shelly
from gateway.formats._common import DeviceHealth
from gateway.model import Frame, GeoFix, Ignored, PressKind
from gateway.sources.decoding import decoder_for
from gateway.sources.serial import LineInterpreter

SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")

json_values: st.SearchStrategy[object] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def json_bytes(values: st.SearchStrategy[object] = json_values) -> st.SearchStrategy[bytes]:
    """Arbitrary JSON documents, serialised (NaN/Infinity included, as Python emits them)."""
    return values.map(lambda v: json.dumps(v).encode())


def assert_total(
    decode: Callable[[str, bytes], Frame | Ignored], topic: str, payload: bytes
) -> None:
    """The decoder returns a Frame/Ignored or raises DecodeError with a snake_case reason."""
    try:
        result = decode(topic, payload)
    except DecodeError as exc:
        assert SNAKE_CASE.fullmatch(exc.reason), exc.reason
    else:
        assert isinstance(result, Frame | Ignored)
        if isinstance(result, Ignored):
            assert result.reason


# -- every decoder, with valid example frames to mutate ------------------------------------
#
# One table of targets serves the hypothesis tests (tests/test_fuzz_decoders.py) and the
# atheris harness (tests/fuzz_decoders.py). A target's outcome contract: a result of one
# of its types, or (where it may reject) a DecodeError with a snake_case reason and a
# non-empty detail; never any other exception. Every string a Frame or a DecodeError
# carries must be storable (SQLite refuses lone surrogates) and every integer must fit a
# SQLite INTEGER: a value the store cannot write fails the whole batch, which the ingest
# loop then retries forever, and every press queued behind it waits.

FUZZ_KEY = b"fuzz-key-0123456789abcdef-fuzz!!"
SQLITE_MAX_INT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Target:
    """One decoding entry point, its valid example (topic, payload) pairs and its contract."""

    name: str
    decode: Callable[[str, bytes], object]
    seeds: tuple[tuple[str, bytes], ...]
    results: tuple[type, ...]
    may_reject: bool = True


def _native_seeds() -> tuple[tuple[str, bytes], ...]:
    plain = native.encode(key=FUZZ_KEY, device_id="MDN-0001", counter=7, kind=PressKind.PANIC)
    full = native.encode(
        key=FUZZ_KEY, device_id="MDN-0001", counter=2**31, kind=PressKind.HEARTBEAT,
        device_time=1_750_000_000, battery=64, fix=GeoFix(-7.6298, 111.5239, accuracy_m=12.0),
    )
    return (
        (native.uplink_topic("MDN-0001"), plain),
        (f"{native.TOPIC_PREFIX}gw/gw-1/up", full),
        ("", full),
    )


def _lora_seeds() -> tuple[tuple[str, bytes], ...]:
    plain = lora_frame.encode(device="L0000BEEF", counter=9, kind=PressKind.PANIC, key=FUZZ_KEY)
    located = lora_frame.encode(device="L0000BEEF", counter=10, kind=PressKind.TEST,
                                key=FUZZ_KEY, battery=40, fix=GeoFix(-7.63, 111.52))
    return (("", plain), ("", located))


def _chirpstack_seeds() -> tuple[tuple[str, bytes], ...]:
    dev_eui = "0004a30b001c0530"
    topic = f"application/{CHIRPSTACK_APPLICATION}/device/{dev_eui}/event/up"
    framed = json.dumps({
        "deduplicationId": "3d0d6b38-1d4c-4a86-9c8d-3d2b0e0a7c11",
        "time": "2025-06-15T10:00:00+00:00",
        "deviceInfo": {"applicationId": CHIRPSTACK_APPLICATION, "deviceName": "b1",
                       "devEui": dev_eui},
        "fPort": 1, "fCnt": 12,
        "data": base64.b64encode(_lora_seeds()[0][1]).decode("ascii"),
        "rxInfo": [{"gatewayId": "0016c001f153a14c", "rssi": -97, "snr": 6.5,
                    "location": {"latitude": -7.63, "longitude": 111.52}}],
    }).encode()
    coded = json.dumps({
        "deviceInfo": {"devEui": dev_eui}, "fCnt": 3,
        "object": {"event": "panic", "battery": 77, "lat": -7.62, "lon": 111.51},
        "rxInfo": [{"gatewayId": "0016c001f153a14c", "rssi": -110, "snr": -2}],
    }).encode()
    status = json.dumps({"deviceInfo": {"devEui": dev_eui}, "batteryLevel": 55.5}).encode()
    return ((topic, framed), (topic, coded), ("", coded),
            (f"application/{CHIRPSTACK_APPLICATION}/device/{dev_eui}/event/status", status))


def _ttn_seeds() -> tuple[tuple[str, bytes], ...]:
    topic = "v3/app1@ttn/devices/dev1/up"
    ids = {"device_id": "dev1", "application_ids": {"application_id": "app1"},
           "dev_eui": "0004A30B001C0530"}
    meta = [{"gateway_ids": {"gateway_id": "gtw1", "eui": "9C5C8E00001A05C4"}, "rssi": -35,
             "snr": 5, "location": {"latitude": -7.6298, "longitude": 111.5239}},
            {"gateway_ids": {"gateway_id": "packetbroker"},
             "packet_broker": {"forwarder_gateway_id": "eui-00800000a00009ef"}, "rssi": -20}]
    coded = json.dumps({
        "end_device_ids": ids, "received_at": "2020-02-12T15:15:46.014773143Z",
        "uplink_message": {"f_cnt": 12, "frm_payload": "gkHe",
                           "decoded_payload": {"event": "panic", "battery": 64},
                           "rx_metadata": meta, "last_battery_percentage": {"value": 80}},
    }).encode()
    framed = json.dumps({
        "end_device_ids": ids,
        "uplink_message": {"f_cnt": 2, "rx_metadata": meta[:1],
                           "frm_payload": base64.b64encode(_lora_seeds()[1][1]).decode()},
        "simulated": True,
    }).encode()
    return ((topic, coded), ("", framed), ("v3/app1/devices/dev1/join", b"{}"))


def _zigbee_seeds() -> tuple[tuple[str, bytes], ...]:
    return (
        ("zigbee2mqtt/sos_rt03", b'{"action":"emergency","battery":84,"linkquality":120}'),
        ("zigbee2mqtt/rw03/pos_ronda/button", b'{"action": "single", "battery": "90"}'),
        ("zigbee2mqtt/sos_rt03/availability", b'{"state":"online"}'),
        ("zigbee2mqtt/sos_rt03", b'{"state":"ON","battery":12}'),
    )


def _shelly_seeds() -> tuple[tuple[str, bytes], ...]:
    gen1 = "shellies/shellybutton1-A4CF12F45301"
    gen2 = json.dumps({
        "src": "shellyplusi4-a8032ab12345", "dst": "shellyplusi4-a8032ab12345/events",
        "method": "NotifyEvent",
        "params": {"ts": 1631266595.43, "events": [
            {"component": "input:0", "id": 0, "event": "btn_down", "ts": 1631266595.43},
            {"component": "input:0", "id": 0, "event": "single_push", "ts": 1631266595.43}]},
    }).encode()
    return (
        (f"{gen1}/input_event/0", b'{"event":"S","event_cnt":7}'),
        (f"{gen1}/sensor/battery", b"95"),
        (f"{gen1}/online", b"false"),
        ("kelurahan/taman/events/rpc", gen2),
    )


def _tasmota_seeds() -> tuple[tuple[str, bytes], ...]:
    return (
        ("stat/tombol_rw05/RESULT", b'{"Button1":{"Action":"SINGLE"}}'),
        ("stat/tombol_rw05/BUTTON2", b'{"ACTION":"DOUBLE"}'),
        ("cmnd/tasmota02/POWER", b"TOGGLE"),
        ("tele/tombol_rw05/LWT", b"Online"),
        ("tele/tombol_rw05/SENSOR", b'{"Time":"2021-01-01T00:00:00","Switch1":"ON"}'),
    )


def _reyax_seeds() -> tuple[tuple[str, bytes], ...]:
    frame = _lora_seeds()[0][1].hex().upper().encode()
    body = native.encode(key=FUZZ_KEY, device_id="MDN-0001", counter=7, kind=PressKind.PANIC)
    return (
        ("", b"+RCV=50,%d,%s,-99,40\r\n" % (len(frame), frame)),
        ("", b"+RCV=7,%d,%s,-41,11.5" % (len(body[:240]), body[:240])),
        ("", b"+READY"), ("", b"+OK"), ("", b"+ERR=4"),
    )


def _rak_seeds() -> tuple[tuple[str, bytes], ...]:
    frame = _lora_seeds()[1][1].hex().encode()
    return (
        ("", b"+EVT:RXP2P:-60:11:" + frame),
        ("", b"+EVT:RXP2P, RSSI -60, SNR 11"),
        ("", b"+EVT:" + frame.upper()),
        ("", b"+EVT:TXP2P DONE"), ("", b"OK"), ("", b"AT_PARAM_ERROR"), ("", b"RAKwireless"),
    )


def _lines_then(mode: str) -> Callable[[str, bytes], object]:
    """A fresh receiver interpreter fed every line of the payload (two-line RAK state too)."""
    def interpret(_topic: str, payload: bytes) -> object:
        interpreter = LineInterpreter(mode)
        return [interpreter.interpret(line) for line in payload.split(b"\n")]
    return interpret


def _with_availability(decoder: object) -> Callable[[str, bytes], object]:
    # The Decoder Protocol has no availability(); the concrete decoders that report it do.
    availability: Callable[[str, bytes], object] = getattr(decoder, "availability")  # noqa: B009
    return availability


_DECODED = (Frame, Ignored)
_RADIO = (serial_lines.Received, serial_lines.Ready, serial_lines.Ok, serial_lines.Err,
          serial_lines.RxMeta, serial_lines.RxData, serial_lines.Event, serial_lines.Other)


def fuzz_targets() -> tuple[Target, ...]:
    """Every decoder, built through gateway.sources.decoding as a source builds it."""
    z2m_options = {"actions": {"single": "panic", "double": "cancel", "hold": "test"},
                   "state_as_heartbeat": True}
    ttn_options = {"identity": "dev_eui", "simulated": "test"}
    shelly_options = {"inputs": [0, 1], "ignore_actions": ["btn_up", "btn_down"]}
    radio = (*_reyax_seeds(), *_rak_seeds())
    return (
        Target("native", decoder_for("native", {}), _native_seeds(), _DECODED),
        Target("lora-frame", decoder_for("lora-frame", {}), _lora_seeds(), _DECODED),
        Target("chirpstack", decoder_for("chirpstack", {}), _chirpstack_seeds(), _DECODED),
        Target("ttn", decoder_for("ttn", {}), _ttn_seeds(), _DECODED),
        Target("ttn-dev-eui", decoder_for("ttn", ttn_options), _ttn_seeds(), _DECODED),
        Target("zigbee2mqtt", decoder_for("zigbee2mqtt", z2m_options), _zigbee_seeds(),
               _DECODED),
        Target("zigbee2mqtt-availability",
               _with_availability(decoder_for("zigbee2mqtt", {})), _zigbee_seeds(),
               (DeviceHealth, type(None))),
        Target("shelly", decoder_for("shelly", shelly_options), _shelly_seeds(), _DECODED),
        Target("shelly-availability", _with_availability(decoder_for("shelly", {})),
               _shelly_seeds(), (DeviceHealth, type(None))),
        Target("shelly-event-count", lambda _t, p: shelly.gen1_event_count(p),
               _shelly_seeds(), (int, type(None))),
        Target("tasmota", decoder_for("tasmota", {}), _tasmota_seeds(), _DECODED),
        Target("tasmota-availability", _with_availability(decoder_for("tasmota", {})),
               _tasmota_seeds(), (DeviceHealth, type(None))),
        Target("reyax-line", lambda _t, p: serial_lines.parse_reyax_line(p), radio, _RADIO),
        Target("rak-line", lambda _t, p: serial_lines.parse_rak_line(p), radio, _RADIO),
        Target("json-line", lambda _t, p: serial_lines.parse_json_line(p), _native_seeds(),
               (bytes, type(None))),
        Target("lora-ack", lambda _t, p: lora_ack.decode(p, key=FUZZ_KEY), _ack_seeds(),
               (lora_ack.Ack, type(None)), may_reject=False),
        Target("serial-rylr", _lines_then("rylr"), radio, (list,), may_reject=False),
        Target("serial-rak3172", _lines_then("rak3172"), radio, (list,), may_reject=False),
        Target("serial-jsonl", _lines_then("jsonl"), _native_seeds(), (list,),
               may_reject=False),
    )


def _ack_seeds() -> tuple[tuple[str, bytes], ...]:
    return tuple(
        ("", lora_ack.encode(device="L0000BEEF", counter=c, state=s, key=FUZZ_KEY))
        for c, s in ((9, lora_ack.AckState.RECEIVED), (2**32 - 1, lora_ack.AckState.HELP_COMING))
    )


def _storable_text(value: str | None, what: str) -> None:
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AssertionError(f"{what} {value!r} cannot be stored (lone surrogate)") from None


def _storable_int(value: int | None, what: str) -> None:
    if value is not None:
        assert -SQLITE_MAX_INT - 1 <= value <= SQLITE_MAX_INT, f"{what} {value} > int64"


def assert_storable(result: object) -> None:
    """Everything a decoded item hands the store can be written by SQLite."""
    match result:
        case Frame():
            for name in ("format", "device_ref", "gateway_ref"):
                _storable_text(getattr(result, name), f"frame.{name}")
            for name in ("counter", "device_time", "battery"):
                _storable_int(getattr(result, name), f"frame.{name}")
            for fix in (result.fix, result.gateway_fix):
                if fix is not None:
                    assert math.isfinite(fix.lat) and math.isfinite(fix.lon), fix
        case Ignored():
            _storable_text(result.reason, "ignored.reason")
        case DecodeError():
            _storable_text(result.reason, "reason")
            _storable_text(result.detail, "detail")
        case DeviceHealth():
            _storable_text(result.device_ref, "health.device_ref")
        case list():
            for event in result:
                decoded = getattr(event, "decoded", None)
                if decoded is not None:
                    assert isinstance(decoded, Frame | DecodeError), decoded
                    assert_storable(decoded)
        case _:
            pass


def check_outcome(target: Target, topic: str, payload: bytes) -> object:
    """Run one input through a target and assert its outcome contract; returns the outcome."""
    try:
        result = target.decode(topic, payload)
    except DecodeError as exc:
        assert target.may_reject, f"{target.name} raised {exc!r}"
        assert SNAKE_CASE.fullmatch(exc.reason), exc.reason
        assert isinstance(exc.detail, str)
        assert_storable(exc)
        return exc
    assert isinstance(result, target.results), (target.name, result)
    if isinstance(result, Ignored):
        assert result.reason
    assert_storable(result)
    return result


# -- mutations of valid frames -------------------------------------------------------------

# Byte strings that have broken JSON and line parsers elsewhere: lone and encoded
# surrogates, integers past int64 and past Python's 4300-digit limit, non-finite numbers,
# deep nesting, NUL, invalid UTF-8, terminal escapes, bidi overrides.
TOKENS: tuple[bytes, ...] = (
    b"\\ud800", b"\\udfff", b"\\ud83d\\ude00", b"\xed\xa0\x80", b"\xff", b"\x00", b"\r\n", b"\n",
    b"9223372036854775808", b"-9223372036854775809", b"18446744073709551616", b"1e400",
    b"-0", b"0.5", b"NaN", b"Infinity", b"-Infinity", b"9" * 4400, b"[" * 3000, b"{" * 64,
    b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"null", b"true", b"false", b'""',
    b"\x1b[2J\x1b[H", "\u202e".encode(), b"+RCV=", b"+EVT:", b"RXP2P", b",-99,40",
)

# JSON values a field may be swapped for: every type, edge numbers (int32/uint32/int64
# boundaries, past float range), hostile strings; each kind about equally likely, and
# each draw a fresh copy (mutated_json edits documents in place).
EDGE_NUMBERS: tuple[object, ...] = (
    0, -1, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, -(2**63) - 1, 2**64,
    10**30, -(10**30), 1e308, -1e-308, 0.5, -0.0, 100.5, float("inf"), float("-inf"),
    float("nan"),
)
HOSTILE_STRINGS: tuple[object, ...] = (
    "", " ", "0", "1", "-1", "1e400", "panic", "PANIC", "single", "S", "\x00", "\ud800",
    "\udfff", "\udfff\ud800", "x\ud83dy", "\x1b[2J\x1b[H", "\u202e", "x" * 300,
)
OTHER_TYPES: tuple[object, ...] = (None, True, False, [], {}, [None], {"": None}, [[[]]])
tricky_values: st.SearchStrategy[object] = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.sampled_from(HOSTILE_STRINGS)
    | st.text(st.characters(categories=("Cs", "Cc", "Cf", "Zl")), max_size=4),
    st.sampled_from(OTHER_TYPES),
    json_values,
).map(copy.deepcopy)


def _paths(doc: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    match doc:
        case dict():
            items: list[tuple[str | int, object]] = list(doc.items())
        case list():
            items = list(enumerate(doc))
        case _:
            return []
    out: list[tuple[str | int, ...]] = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _replaced(doc: object, path: tuple[str | int, ...], value: object) -> object:
    copied = copy.deepcopy(doc)
    parent = copied
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]  # the path was taken from this document
    if value is _DELETE:
        del parent[path[-1]]  # type: ignore[attr-defined]
    else:
        parent[path[-1]] = value  # type: ignore[index]
    return copied


_DELETE = object()


def field_swaps(seed: bytes) -> list[bytes]:
    """Every field of a JSON seed, in turn, removed or swapped for every edge value and type.

    Systematic where the random mutations are not: a counter past 2**63 in one field of
    one format is one input in thousands of random ones.
    """
    try:
        doc = json.loads(seed)
    except ValueError:
        return []
    values = (_DELETE, *EDGE_NUMBERS, *HOSTILE_STRINGS, *OTHER_TYPES)
    return [json.dumps(_replaced(doc, path, value)).encode()
            for path in _paths(doc) for value in values]


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with a few byte-level edits: flips, inserts, deletes, splices, truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(("flip", "insert", "delete", "token", "truncate", "copy"))):
            case "flip" if data:
                at = min(pos, len(data) - 1)
                data[at] ^= 1 << draw(st.integers(0, 7))
            case "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            case "delete":
                del data[pos : pos + draw(st.integers(1, 16))]
            case "token":
                end = pos + draw(st.integers(0, 4))
                data[pos:end] = draw(st.sampled_from(TOKENS))
            case "truncate":
                del data[pos:]
            case "copy":
                start = draw(st.integers(0, len(data)))
                data[pos:pos] = data[start : start + draw(st.integers(1, 32))]
            case _:
                pass
    return bytes(data)


def _containers(doc: object, out: list[tuple[dict[str, object] | list[object], object]]) -> None:
    match doc:
        case dict():
            for key, value in doc.items():
                out.append((doc, key))
                _containers(value, out)
        case list():
            for index, value in enumerate(doc):
                out.append((doc, index))
                _containers(value, out)
        case _:
            pass


@st.composite
def mutated_json(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed JSON with fields swapped for other types, removed, added or wrapped."""
    doc: object = json.loads(seed)
    for _ in range(draw(st.integers(1, 4))):
        slots: list[tuple[dict[str, object] | list[object], object]] = []
        _containers(doc, slots)
        if not slots or draw(st.integers(0, 19)) == 0:
            doc = draw(tricky_values)
            continue
        parent, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(("replace", "delete", "add", "wrap", "stringify")))
        if isinstance(parent, dict):
            assert isinstance(key, str)
            if op == "delete":
                del parent[key]
                continue
            if op == "add":
                parent[draw(st.text(max_size=8) | st.sampled_from(list(parent)))] = draw(
                    tricky_values)
                continue
            old = parent[key]
        else:
            assert isinstance(key, int)
            if op == "delete":
                del parent[key]
                continue
            if op == "add":
                parent.insert(key, draw(tricky_values))
                continue
            old = parent[key]
        new: object = (draw(tricky_values) if op == "replace"
                       else [old] if op == "wrap" else json.dumps(old))
        parent[key] = new  # type: ignore[index]  # key is str for a dict, int for a list
    return json.dumps(doc).encode()


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Byte-level edits of the seed, and JSON-level ones when the seed is JSON."""
    try:
        json.loads(seed)
    except ValueError:
        return mutated_bytes(seed)
    return mutated_bytes(seed) | mutated_json(seed) | mutated_json(seed).flatmap(mutated_bytes)


@st.composite
def mutated_topic(draw: st.DrawFn, topic: str) -> str:
    """The seed topic with a level replaced, dropped or added (or no topic at all)."""
    levels = topic.split("/")
    match draw(st.sampled_from(("replace", "drop", "add", "empty", "text"))):
        case "replace":
            levels[draw(st.integers(0, len(levels) - 1))] = draw(
                st.text(max_size=12) | st.sampled_from(("", "+", "#", "up", "..", "\u202e")))
        case "drop" if len(levels) > 1:
            del levels[draw(st.integers(0, len(levels) - 1))]
        case "add":
            levels.insert(draw(st.integers(0, len(levels))), draw(st.text(max_size=8)))
        case "empty":
            return ""
        case "text":
            return draw(st.text(max_size=40))
        case _:
            pass
    return "/".join(levels)
