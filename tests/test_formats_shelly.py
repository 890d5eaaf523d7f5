"""Shelly Gen1 and Gen2+ button events."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import shelly
from gateway.formats._common import DeviceHealth
from gateway.model import Ignored, PressKind
from tests.formats_fuzz import assert_total, json_bytes

GEN1 = "shellies/shellybutton1-A4CF12F45301"


# Shelly Gen1 API, Button1 MQTT: shellies/<id>/input_event/0 = {"event":"S","event_cnt":N}
# (shelly-api-docs.shelly.cloud/gen1; event letters S, SS, SSS, L per the same page).
@pytest.mark.parametrize(
    ("event", "kind"),
    [
        ("S", PressKind.PANIC),
        ("SS", PressKind.CANCEL),
        ("SSS", PressKind.TEST),
        ("L", PressKind.PANIC),
    ],
)
def test_gen1_button_events_map_to_kinds(event: str, kind: PressKind) -> None:
    payload = json.dumps({"event": event, "event_cnt": 7}).encode()
    frame = shelly.decode(f"{GEN1}/input_event/0", payload)
    assert not isinstance(frame, Ignored)
    assert (frame.device_ref, frame.kind) == ("shellybutton1-A4CF12F45301", kind)
    # event_cnt restarts on reboot: never a replay counter, only available on the side.
    assert frame.counter is None
    assert shelly.gen1_event_count(payload) == 7


def test_gen1_empty_event_before_first_press_is_ignored() -> None:
    assert shelly.decode(f"{GEN1}/input_event/0", b'{"event":"","event_cnt":0}') == Ignored(
        "no_event"
    )


def test_gen1_battery_topic_is_a_heartbeat() -> None:
    frame = shelly.decode(f"{GEN1}/sensor/battery", b"95")
    assert not isinstance(frame, Ignored)
    assert (frame.kind, frame.battery) == (PressKind.HEARTBEAT, 95)


def test_gen1_lwt_is_health() -> None:
    decoder = shelly.ShellyDecoder()
    assert decoder.availability(f"{GEN1}/online", b"false") == DeviceHealth(
        "shellybutton1-A4CF12F45301", False
    )
    assert isinstance(shelly.decode(f"{GEN1}/online", b"true"), Ignored)


# Gen2 docs General/Notifications + RPCProtocol: NotifyEvent on <prefix>/events/rpc,
# params.events[] = {"component":"input:0","id":0,"event":"single_push","ts":...}.
GEN2_EVENT = {
    "src": "shellyplusi4-a8032ab12345",
    "dst": "shellyplusi4-a8032ab12345/events",
    "method": "NotifyEvent",
    "params": {
        "ts": 1631266595.43,
        "events": [
            {"component": "input:0", "id": 0, "event": "btn_down", "ts": 1631266595.43},
            {"component": "input:0", "id": 0, "event": "single_push", "ts": 1631266595.43},
        ],
    },
}


def test_gen2_notify_event_skips_edges_and_uses_src() -> None:
    topic = "kelurahan/taman/events/rpc"  # the MQTT prefix is user-configurable
    frame = shelly.decode(topic, json.dumps(GEN2_EVENT).encode())
    assert not isinstance(frame, Ignored)
    assert (frame.device_ref, frame.kind, frame.counter) == (
        "shellyplusi4-a8032ab12345",
        PressKind.PANIC,
        None,
    )


def test_gen2_custom_mapping_and_input_filter() -> None:
    decoder = shelly.ShellyDecoder.from_options({"actions": {"single_push": "test"}, "inputs": [1]})
    topic = "shellyplusi4-a8032ab12345/events/rpc"
    assert decoder(topic, json.dumps(GEN2_EVENT).encode()) == Ignored("no_press_event")
    doc = json.loads(json.dumps(GEN2_EVENT))
    doc["params"]["events"][1]["component"] = "input:1"
    frame = decoder(topic, json.dumps(doc).encode())
    assert not isinstance(frame, Ignored)
    assert frame.kind is PressKind.TEST


def test_gen2_status_with_devicepower_is_a_heartbeat() -> None:
    status = {
        "src": "shellyplusht-08b61fcb7f3c",
        "dst": "shellyplusht-08b61fcb7f3c/events",
        "method": "NotifyFullStatus",
        "params": {"ts": 1.0, "devicepower:0": {"id": 0, "battery": {"V": 5.5, "percent": 80}}},
    }
    frame = shelly.decode("shellyplusht-08b61fcb7f3c/events/rpc", json.dumps(status).encode())
    assert not isinstance(frame, Ignored)
    assert (frame.kind, frame.battery) == (PressKind.HEARTBEAT, 80)


def test_unmapped_action_is_a_dead_letter() -> None:
    with pytest.raises(DecodeError) as info:
        shelly.decode(f"{GEN1}/input_event/0", b'{"event":"LS","event_cnt":1}')
    assert info.value.reason == "unmapped_action"


@given(
    st.binary(max_size=200),
    st.sampled_from([f"{GEN1}/input_event/0", f"{GEN1}/sensor/battery", "x/events/rpc"]),
)
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes, topic: str) -> None:
    assert_total(shelly.decode, topic, payload)


@given(json_bytes(), st.sampled_from([f"{GEN1}/input_event/0", "x/events/rpc"]))
def test_arbitrary_json_only_raises_decode_error(payload: bytes, topic: str) -> None:
    assert_total(shelly.decode, topic, payload)
