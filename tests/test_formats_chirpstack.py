"""ChirpStack v4 MQTT integration events (JSON marshaler)."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import chirpstack, lora_frame
from gateway.formats._common import OptionError
from gateway.model import GeoFix, Ignored, PressKind
from gateway.verify import tag_valid
from tests.formats_fuzz import assert_total, json_bytes, json_values

TOPIC = "application/17c82e96-be03-4f38-aef3-f83d48582d97/device/0101010101010101/event/up"
KEY = b"k" * 32

# Verbatim from chirpstack/chirpstack-docs src/chirpstack/integrations/events.md,
# "`up` - Uplink event". Note: no "fCnt" (it is 0, and proto3 JSON omits zero values)
# and no "object" (no codec in the device profile).
UP_EVENT: dict[str, object] = {
    "deduplicationId": "3ac7e3c4-4401-4b8d-9386-a5c902f9202d",
    "time": "2022-07-18T09:34:15.775023242+00:00",
    "deviceInfo": {
        "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
        "tenantName": "ChirpStack",
        "applicationId": "17c82e96-be03-4f38-aef3-f83d48582d97",
        "applicationName": "Test application",
        "deviceProfileId": "14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
        "deviceProfileName": "Test device-profile",
        "deviceName": "Test device",
        "devEui": "0101010101010101",
        "tags": {"key": "value"},
    },
    "devAddr": "00189440",
    "dr": 1,
    "fPort": 1,
    "data": "qg==",
    "rxInfo": [
        {
            "gatewayId": "0016c001f153a14c",
            "uplinkId": 4217106255,
            "rssi": -36,
            "snr": 10.5,
            "context": "E3OWOQ==",
            "metadata": {"region_name": "eu868", "region_common_name": "EU868"},
        }
    ],
    "txInfo": {
        "frequency": 867100000,
        "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 11, "codeRate": "CR_4_5"}},
    },
}

# Verbatim from chirpstack/chirpstack-docs src/chirpstack/integrations/events.md,
# "`status` - Margin and battery status".
STATUS_EVENT: dict[str, object] = {
    "deduplicationId": "bf2a9746-1c8b-49be-a92e-f0b89c8534e4",
    "time": "2022-07-18T09:35:06.927172638+00:00",
    "deviceInfo": {
        "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
        "tenantName": "ChirpStack",
        "applicationId": "17c82e96-be03-4f38-aef3-f83d48582d97",
        "applicationName": "Test application",
        "deviceProfileId": "14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
        "deviceProfileName": "Test device-profile",
        "deviceName": "Test device",
        "devEui": "0101010101010101",
    },
    "margin": 10,
    "batteryLevel": 88.3,
}

# rxInfo[].location is common.Location {latitude, longitude, altitude, source, accuracy}
# (chirpstack/chirpstack api/proto/gw/gw.proto UplinkRxInfo field 12, common.proto).
GATEWAY_NEAR = {
    "gatewayId": "0016c001f153a14d",
    "rssi": -90,
    "snr": 2.0,
    "location": {"latitude": -7.6298, "longitude": 111.5239, "altitude": 60, "source": "CONFIG"},
}


def _up(**changes: object) -> bytes:
    doc = copy.deepcopy(UP_EVENT)
    doc.update(changes)
    return json.dumps(doc).encode()


def test_docs_example_without_codec_or_our_frame_is_a_dead_letter() -> None:
    # "qg==" is the single byte 0xaa: not our frame, and nothing decoded it.
    with pytest.raises(DecodeError) as info:
        chirpstack.decode(TOPIC, _up())
    assert info.value.reason == "unsupported_version"


def test_codec_object_gives_kind_battery_gps_and_zero_fcnt() -> None:
    payload = _up(object={"event": "sos", "battery": 77.0, "lat": -7.63, "lon": 111.52})
    frame = chirpstack.decode(TOPIC, payload)
    assert not isinstance(frame, Ignored)
    assert frame.format == "chirpstack"
    assert frame.device_ref == "0101010101010101"
    assert frame.kind is PressKind.PANIC
    assert frame.counter == 0  # fCnt absent means 0, not unknown
    assert frame.battery == 77
    assert frame.fix == GeoFix(lat=-7.63, lon=111.52)
    assert frame.tag is None
    assert frame.gateway_ref == "0016c001f153a14c"
    assert frame.gateway_fix is None


def test_fcnt_is_the_counter_when_present() -> None:
    frame = chirpstack.decode(TOPIC, _up(fCnt=4711, object={"event": "cancel"}))
    assert not isinstance(frame, Ignored)
    assert (frame.kind, frame.counter) == (PressKind.CANCEL, 4711)


def test_our_signed_frame_in_data_carries_tag_and_inner_identity() -> None:
    inner = lora_frame.encode(device="L0001A2B3", counter=9, kind=PressKind.PANIC, key=KEY)
    payload = _up(
        fCnt=3,
        data=base64.b64encode(inner).decode(),
        object={"event": "test"},  # a codec output never outranks our own signature
        rxInfo=[UP_EVENT["rxInfo"][0], GATEWAY_NEAR],  # type: ignore[index]
    )
    frame = chirpstack.decode(TOPIC, payload)
    assert not isinstance(frame, Ignored)
    assert (frame.format, frame.device_ref, frame.counter) == ("chirpstack", "L0001A2B3", 9)
    assert frame.kind is PressKind.PANIC
    assert frame.signed_bytes == inner[:-8]
    assert tag_valid(frame, KEY)
    # The stronger gateway has no position; the weaker one with a position is the fallback.
    assert frame.gateway_ref == "0016c001f153a14d"
    assert frame.gateway_fix == GeoFix(lat=-7.6298, lon=111.5239)


def test_gateway_location_at_zero_zero_is_no_location() -> None:
    # proto3 JSON drops zero coordinates, so an unset location can arrive as {}.
    rx = {"gatewayId": "aa", "rssi": -50, "location": {}}
    frame = chirpstack.decode(TOPIC, _up(rxInfo=[rx], object={"event": "panic"}))
    assert not isinstance(frame, Ignored)
    assert (frame.gateway_ref, frame.gateway_fix) == ("aa", None)


def test_status_event_is_a_heartbeat_with_battery() -> None:
    topic = TOPIC.replace("/event/up", "/event/status")
    frame = chirpstack.decode(topic, json.dumps(STATUS_EVENT).encode())
    assert not isinstance(frame, Ignored)
    assert (frame.kind, frame.battery, frame.counter) == (PressKind.HEARTBEAT, 88, None)


def test_status_on_external_power_has_no_battery() -> None:
    doc = dict(STATUS_EVENT, externalPowerSource=True)
    doc.pop("batteryLevel")
    frame = chirpstack.decode(TOPIC.replace("/up", "/status"), json.dumps(doc).encode())
    assert not isinstance(frame, Ignored)
    assert frame.battery is None


@pytest.mark.parametrize("event", ["join", "ack", "txack", "log", "location", "integration"])
def test_other_event_types_are_ignored(event: str) -> None:
    result = chirpstack.decode(TOPIC.replace("/event/up", f"/event/{event}"), b"{}")
    assert result == Ignored(f"event_{event}")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (TOPIC.replace("0101010101010101", "0202020202020202"), _up(), "device_mismatch"),
        ("application/x/device/y/command/down", _up(), "unexpected_topic"),
        (TOPIC, _up(object={"event": "party"}), "unknown_event"),
        (TOPIC, _up(object={"battery": 50}), "no_event"),
        (TOPIC, _up(data="not base64!", object=None), "bad_data"),
        (TOPIC, _up(deviceInfo={}), "no_device"),
        (TOPIC, _up(fCnt=-1, object={"event": "panic"}), "bad_counter"),
    ],
)
def test_rejections_name_their_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        chirpstack.decode(topic, payload)
    assert info.value.reason == reason


def test_missing_data_and_object_is_no_payload() -> None:
    doc = copy.deepcopy(UP_EVENT)
    del doc["data"]
    with pytest.raises(DecodeError) as info:
        chirpstack.decode(TOPIC, json.dumps(doc).encode())
    assert info.value.reason == "no_payload"


def test_options_extend_event_names_and_reject_typos() -> None:
    decoder = chirpstack.ChirpstackDecoder.from_options({"events": {"alarm": "panic"}})
    frame = decoder(TOPIC, _up(object={"event": "ALARM"}))
    assert not isinstance(frame, Ignored)
    assert frame.kind is PressKind.PANIC
    with pytest.raises(OptionError):
        chirpstack.ChirpstackDecoder.from_options({"event": {}})
    with pytest.raises(OptionError):
        chirpstack.ChirpstackDecoder.from_options({"events": {"alarm": "fire"}})


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes) -> None:
    assert_total(chirpstack.decode, TOPIC, payload)


@given(json_bytes())
def test_arbitrary_json_only_raises_decode_error(payload: bytes) -> None:
    assert_total(chirpstack.decode, TOPIC, payload)


@given(st.dictionaries(st.sampled_from([*UP_EVENT, "object", "fCnt"]), json_values))
def test_mutated_uplinks_only_raise_decode_error(changes: dict[str, object]) -> None:
    assert_total(chirpstack.decode, TOPIC, _up(**changes))


@given(st.text(max_size=80))
def test_arbitrary_topics_only_raise_decode_error(topic: str) -> None:
    assert_total(chirpstack.decode, topic, _up(object={"event": "panic"}))
