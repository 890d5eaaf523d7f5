"""Tasmota detached button and switch actions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import tasmota
from gateway.formats._common import DeviceHealth
from gateway.model import Ignored, PressKind
from tests.formats_fuzz import assert_total, json_bytes


# arendst/Tasmota support_button.ino MqttButtonTopic: {"Button<n>":{"Action":"SINGLE"}} on
# stat/<topic>/RESULT (tasmota/docs Buttons-and-Switches.md, SetOption73).
@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b'{"Button1":{"Action":"SINGLE"}}', PressKind.PANIC),
        (b'{"Button1":{"Action":"DOUBLE"}}', PressKind.CANCEL),
        (b'{"Button1":{"Action":"TRIPLE"}}', PressKind.TEST),
        (b'{"Button1":{"Action":"HOLD"}}', PressKind.PANIC),
        (b'{"Switch1":{"Action":"ON"}}', PressKind.PANIC),  # SetOption114
    ],
)
def test_current_result_form(payload: bytes, kind: PressKind) -> None:
    frame = tasmota.decode("stat/tombol_rw05/RESULT", payload)
    assert not isinstance(frame, Ignored)
    assert (frame.device_ref, frame.kind, frame.counter) == ("tombol_rw05", kind, None)


# Tasmota 9.1.0 changelog: "When SetOption73 1 JSON result from {"ACTION":"SINGLE"} to
# {"Button1":{"Action":"SINGLE"}}"; docs: stat/tasmota/BUTTON<x> = {"ACTION":"SINGLE"}.
def test_pre_9_1_action_form_takes_the_input_from_the_topic() -> None:
    decoder = tasmota.TasmotaDecoder.from_options({"actions": {"button2:single": "test"}})
    frame = decoder("stat/tombol/BUTTON2", b'{"ACTION":"SINGLE"}')
    assert not isinstance(frame, Ignored)
    assert frame.kind is PressKind.TEST


# Buttons-and-Switches.md ButtonTopic: "MQT: cmnd/tasmota02/POWER = TOGGLE".
def test_button_topic_power_command() -> None:
    frame = tasmota.decode("cmnd/tasmota02/POWER", b"TOGGLE")
    assert not isinstance(frame, Ignored)
    assert (frame.device_ref, frame.kind) == ("tasmota02", PressKind.PANIC)


def test_clear_after_release_and_periodic_switch_state_are_ignored() -> None:
    assert tasmota.decode("stat/t/RESULT", b'{"Button1":{"Action":"CLEAR"}}') == Ignored(
        "ignored_action"
    )
    # SwitchMode 15 / TelePeriod: tele/<topic>/SENSOR repeats the switch state.
    assert isinstance(
        tasmota.decode("tele/t/SENSOR", b'{"Time":"2021-01-01T00:00:00","Switch1":"ON"}'), Ignored
    )
    assert tasmota.decode("stat/t/RESULT", b'{"POWER":"ON"}') == Ignored("not_an_action")


def test_lwt_is_health_not_a_press() -> None:
    decoder = tasmota.TasmotaDecoder()
    assert isinstance(decoder("tele/t/LWT", b"Offline"), Ignored)
    assert decoder.availability("tele/t/LWT", b"Offline") == DeviceHealth("t", False)
    assert decoder.availability("tele/t/LWT", b"Online") == DeviceHealth("t", True)


def test_unmapped_action_is_a_dead_letter() -> None:
    with pytest.raises(DecodeError) as info:
        tasmota.decode("stat/t/RESULT", b'{"Button1":{"Action":"PENTA"}}')
    assert info.value.reason == "unmapped_action"


@given(
    st.binary(max_size=200), st.sampled_from(["stat/t/RESULT", "stat/t/BUTTON1", "cmnd/t/POWER2"])
)
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes, topic: str) -> None:
    assert_total(tasmota.decode, topic, payload)


@given(json_bytes(), st.text(max_size=30))
def test_arbitrary_json_and_topics_only_raise_decode_error(payload: bytes, topic: str) -> None:
    assert_total(tasmota.decode, topic, payload)
    assert_total(tasmota.decode, "stat/t/RESULT", payload)
