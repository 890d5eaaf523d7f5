"""Zigbee2MQTT device messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import zigbee2mqtt
from gateway.formats._common import DeviceHealth, OptionError
from gateway.model import Ignored, PressKind
from tests.formats_fuzz import assert_total, json_bytes

ORDINARY = zigbee2mqtt.Zigbee2MqttDecoder.from_options(
    {"actions": {"single": "panic", "double": "cancel", "hold": "test"}}
)


# Koenkk/zigbee2mqtt.io docs/devices/TS0215A_sos.md: exposes battery, action (enum
# "emergency"), linkquality — published together in one JSON state message.
def test_sos_button_emergency_is_a_panic_with_battery() -> None:
    frame = zigbee2mqtt.decode(
        "zigbee2mqtt/sos_rt03", b'{"action":"emergency","battery":84,"linkquality":120}'
    )
    assert not isinstance(frame, Ignored)
    assert (frame.format, frame.device_ref, frame.kind) == (
        "zigbee2mqtt",
        "sos_rt03",
        PressKind.PANIC,
    )
    assert (frame.battery, frame.counter) == (84, None)


# docs/guide/usage/mqtt_topics_and_messages.md: '{"action": "single"}' from a WXKG01LM, and
# friendly names may contain "/" ("kitchen/floor_light").
def test_ordinary_button_maps_through_options_and_keeps_slashes_in_names() -> None:
    frame = ORDINARY("zigbee2mqtt/rw03/pos_ronda/button", b'{"action": "double"}')
    assert not isinstance(frame, Ignored)
    assert (frame.device_ref, frame.kind) == ("rw03/pos_ronda/button", PressKind.CANCEL)


# docs/devices/HS1EB_HS1EB-E.md: deprecated "click" exposed unless legacy: false.
def test_legacy_click_property_is_used_without_action() -> None:
    frame = ORDINARY("zigbee2mqtt/heiman", b'{"click":"single","battery":100}')
    assert not isinstance(frame, Ignored)
    assert frame.kind is PressKind.PANIC


# settings.schema.json homeassistant.legacy_action_sensor: an empty action follows each one.
def test_empty_action_and_state_reports_are_ignored() -> None:
    assert ORDINARY("zigbee2mqtt/b", b'{"action":"","battery":90}') == Ignored("no_action")
    assert ORDINARY("zigbee2mqtt/b", b'{"battery":90,"linkquality":70}') == Ignored("no_action")
    assert ORDINARY("zigbee2mqtt/b", b'{"action":"off"}') == Ignored("ignored_action")


def test_state_reports_can_count_as_heartbeats() -> None:
    decoder = zigbee2mqtt.Zigbee2MqttDecoder.from_options({"state_as_heartbeat": True})
    frame = decoder("zigbee2mqtt/b", b'{"battery":12,"voltage":2600}')
    assert not isinstance(frame, Ignored)
    assert (frame.kind, frame.battery) == (PressKind.HEARTBEAT, 12)


def test_unmapped_action_is_a_dead_letter_not_silence() -> None:
    with pytest.raises(DecodeError) as info:
        zigbee2mqtt.decode("zigbee2mqtt/b", b'{"action":"single"}')
    assert info.value.reason == "unmapped_action"


# docs/guide/configuration/device-availability.md: retained zigbee2mqtt/NAME/availability,
# legacy "online"/"offline" or JSON {"state":"online"}.
@pytest.mark.parametrize(
    ("payload", "online"),
    [
        (b"online", True),
        (b"offline", False),
        (b'{"state":"online"}', True),
        (b'{"state":"offline"}', False),
    ],
)
def test_availability_is_ignored_but_maps_to_health(payload: bytes, online: bool) -> None:
    topic = "zigbee2mqtt/rw03/button/availability"
    assert zigbee2mqtt.decode(topic, payload) == Ignored("availability")
    assert ORDINARY.availability(topic, payload) == DeviceHealth("rw03/button", online)


@pytest.mark.parametrize(
    "topic",
    [
        "zigbee2mqtt/bridge/state",
        "zigbee2mqtt/bridge/logging",
        "zigbee2mqtt/b/set",
        "zigbee2mqtt/b/set/state",
    ],
)
def test_bridge_and_command_topics_are_not_presses(topic: str) -> None:
    assert isinstance(zigbee2mqtt.decode(topic, b"online"), Ignored)


def test_custom_base_topic_and_foreign_topics() -> None:
    decoder = zigbee2mqtt.Zigbee2MqttDecoder.from_options({"base_topic": "z2m"})
    assert not isinstance(decoder("z2m/sos", b'{"action":"sos"}'), Ignored)
    with pytest.raises(DecodeError) as info:
        decoder("zigbee2mqtt/sos", b'{"action":"sos"}')
    assert info.value.reason == "unexpected_topic"
    with pytest.raises(OptionError):
        zigbee2mqtt.Zigbee2MqttDecoder.from_options({"actions": {"single": "alarm"}})


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes) -> None:
    assert_total(ORDINARY, "zigbee2mqtt/b", payload)


@given(json_bytes(), st.text(max_size=40))
def test_arbitrary_json_and_topics_only_raise_decode_error(payload: bytes, name: str) -> None:
    assert_total(ORDINARY, f"zigbee2mqtt/{name}", payload)
