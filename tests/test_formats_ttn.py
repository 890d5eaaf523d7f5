"""The Things Stack v3 uplinks over MQTT."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import lora_frame, ttn
from gateway.formats._common import OptionError
from gateway.model import GeoFix, Ignored, PressKind
from gateway.verify import tag_valid
from tests.formats_fuzz import assert_total, json_bytes, json_values

TOPIC = "v3/app1@ttn/devices/dev1/up"
KEY = b"k" * 32

# "Uplink message example" from TheThingsIndustries/lorawan-stack-docs
# doc/content/integrations/data-formats/_index.md (JSON), verbatim.
UPLINK: dict[str, object] = {
    "end_device_ids": {
        "device_id": "dev1",
        "application_ids": {"application_id": "app1"},
        "dev_eui": "0004A30B001C0530",
        "join_eui": "800000000000000C",
        "dev_addr": "00BCB929",
    },
    "correlation_ids": [
        "as:up:01E0WZGT6Y7657CPFPE5WEYDSQ",
        "gs:conn:01E0WDEC6T5T4XXBAX7S1VMFKE",
        "gs:uplink:01E0WZGSZWT07NE5TS2APTV1Z9",
        "ns:uplink:01E0WZGSZXZXZS8RFAWZX0F2FY",
        "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01E0WZGSZXGE1KS577PFBWRJEE",
    ],
    "received_at": "2020-02-12T15:15:46.014773143Z",
    "uplink_message": {
        "session_key_id": "AXA50tHUGUucuzS/bCGMNw==",
        "f_cnt": 1,
        "frm_payload": "gkHe",
        "decoded_payload": {"temperature": 1.0, "luminosity": 0.64},
        "rx_metadata": [
            {
                "gateway_ids": {"gateway_id": "gtw1", "eui": "9C5C8E00001A05C4"},
                "time": "2020-02-12T15:15:45.787Z",
                "timestamp": 2463457000,
                "rssi": -35,
                "channel_rssi": -35,
                "snr": 5,
                "uplink_token": "ChIKEAoEZ3R3MRIInFyOAAAaBcQQ6L3Vlgk=",
                "channel_index": 2,
            }
        ],
        "settings": {
            "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
            "data_rate_index": 5,
            "coding_rate": "4/6",
            "frequency": "868300000",
            "timestamp": 2463457000,
            "time": "2020-02-12T15:15:45.787Z",
        },
        "consumed_airtime": "0.056576s",
        "locations": {
            "user": {
                "latitude": 37.97155556731436,
                "longitude": 23.72678801175413,
                "altitude": 10,
                "source": "SOURCE_REGISTRY",
            }
        },
        "received_at": "2020-02-12T15:15:45.789585559Z",
    },
}

# RxMetadata.location / Location {latitude, longitude, altitude, accuracy, source}:
# TheThingsNetwork/lorawan-stack api/ttn/lorawan/v3/metadata.proto.
LOCATED_GATEWAY = {
    "gateway_ids": {"gateway_id": "madiun-balaikota", "eui": "58A0CBFFFE8052EC"},
    "rssi": -101,
    "snr": -3.5,
    "location": {"latitude": -7.6298, "longitude": 111.5239, "source": "SOURCE_REGISTRY"},
}
# Packet Broker relayed uplinks name the gateway "packetbroker" and describe the real one
# in packet_broker (metadata.proto PacketBrokerMetadata.forwarder_gateway_id).
BROKER_GATEWAY = {
    "gateway_ids": {"gateway_id": "packetbroker"},
    "packet_broker": {"forwarder_net_id": "000013", "forwarder_gateway_id": "eui-00800000a00009ef"},
    "rssi": -20,
}


def _up(*, top: object = None, **uplink: object) -> bytes:
    doc = copy.deepcopy(UPLINK)
    message = doc["uplink_message"]
    assert isinstance(message, dict)
    message.update(uplink)
    for key, value in uplink.items():
        if value is None:
            del message[key]
    if isinstance(top, dict):
        doc.update(top)
    return json.dumps(doc).encode()


def test_docs_example_has_no_press_event() -> None:
    # The documented payload formatter yields temperature/luminosity: not a button.
    with pytest.raises(DecodeError) as info:
        ttn.decode(TOPIC, _up())
    assert info.value.reason == "no_event"


def test_decoded_payload_gives_press_with_device_id_and_counter() -> None:
    frame = ttn.decode(TOPIC, _up(f_cnt=12, decoded_payload={"event": "panic", "battery": 64}))
    assert not isinstance(frame, Ignored)
    assert (frame.format, frame.device_ref, frame.kind) == ("ttn", "dev1", PressKind.PANIC)
    assert (frame.counter, frame.battery) == (12, 64)
    assert frame.gateway_ref == "gtw1"
    assert frame.fix is None  # locations.user is TTS's registry, not a GPS fix


def test_absent_f_cnt_means_zero() -> None:
    frame = ttn.decode(TOPIC, _up(f_cnt=None, decoded_payload={"event": "test"}))
    assert not isinstance(frame, Ignored)
    assert frame.counter == 0


def test_last_battery_percentage_is_the_battery_fallback() -> None:
    # last_battery_percentage as shown in lorawan-stack-docs' webhook tutorial uplink
    # (TTS 3.33.1 "Add the latest battery percentage ... in the ApplicationUplink").
    payload = _up(
        decoded_payload={"event": "heartbeat"},
        last_battery_percentage={
            "f_cnt": 14,
            "value": 90.118576,
            "received_at": "2025-04-16T11:54:13Z",
        },
    )
    frame = ttn.decode(TOPIC, payload)
    assert not isinstance(frame, Ignored)
    assert (frame.kind, frame.battery) == (PressKind.HEARTBEAT, 90)


def test_signed_frame_in_frm_payload_wins_and_keeps_its_tag() -> None:
    inner = lora_frame.encode(
        device="L00C0FFEE", counter=77, kind=PressKind.CANCEL, key=KEY, battery=50
    )
    payload = _up(
        frm_payload=base64.b64encode(inner).decode(),
        rx_metadata=[UPLINK["uplink_message"]["rx_metadata"][0], LOCATED_GATEWAY],  # type: ignore[index]
    )
    frame = ttn.decode(TOPIC, payload)
    assert not isinstance(frame, Ignored)
    assert (frame.device_ref, frame.counter, frame.kind) == ("L00C0FFEE", 77, PressKind.CANCEL)
    assert tag_valid(frame, KEY)
    assert frame.gateway_ref == "madiun-balaikota"
    assert frame.gateway_fix == GeoFix(lat=-7.6298, lon=111.5239)


def test_packet_broker_gateway_is_named_by_its_forwarder() -> None:
    frame = ttn.decode(TOPIC, _up(decoded_payload={"event": "panic"}, rx_metadata=[BROKER_GATEWAY]))
    assert not isinstance(frame, Ignored)
    assert frame.gateway_ref == "eui-00800000a00009ef"


def test_simulated_uplinks_are_ignored_by_default() -> None:
    payload = _up(decoded_payload={"event": "panic"}, top={"simulated": True})
    assert ttn.decode(TOPIC, payload) == Ignored("simulated")


def test_simulated_uplinks_can_become_test_presses() -> None:
    decoder = ttn.TtnDecoder.from_options({"simulated": "test"})
    frame = decoder(TOPIC, _up(decoded_payload={"event": "panic"}, top={"simulated": True}))
    assert not isinstance(frame, Ignored)
    assert frame.kind is PressKind.TEST


def test_dev_eui_identity_option() -> None:
    decoder = ttn.TtnDecoder.from_options({"identity": "dev_eui"})
    frame = decoder(TOPIC, _up(decoded_payload={"event": "panic"}))
    assert not isinstance(frame, Ignored)
    assert frame.device_ref == "0004A30B001C0530"


def test_open_source_topic_without_tenant_and_other_messages() -> None:
    frame = ttn.decode("v3/app1/devices/dev1/up", _up(decoded_payload={"event": "panic"}))
    assert not isinstance(frame, Ignored)
    assert ttn.decode("v3/app1@ttn/devices/dev1/join", b"{}") == Ignored("message_join")
    assert ttn.decode("v3/app1@ttn/devices/dev1/down/sent", b"{}") == Ignored("message_down_sent")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (
            "v3/app1@ttn/devices/other/up",
            _up(decoded_payload={"event": "panic"}),
            "device_mismatch",
        ),
        ("v3/app1@ttn/gateways/g/up", _up(), "unexpected_topic"),
        (TOPIC, _up(decoded_payload={"event": "fire"}), "unknown_event"),
        (TOPIC, _up(decoded_payload=None, frm_payload="%%%"), "bad_data"),
        (TOPIC, _up(decoded_payload=None, frm_payload=None), "no_payload"),
        (TOPIC, _up(top={"uplink_message": None}), "no_uplink"),
    ],
)
def test_rejections_name_their_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        ttn.decode(topic, payload)
    assert info.value.reason == reason


def test_bad_options_fail_at_build_time() -> None:
    with pytest.raises(OptionError):
        ttn.TtnDecoder.from_options({"simulated": "yes"})


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes) -> None:
    assert_total(ttn.decode, TOPIC, payload)


@given(json_bytes())
def test_arbitrary_json_only_raises_decode_error(payload: bytes) -> None:
    assert_total(ttn.decode, TOPIC, payload)


@given(
    st.dictionaries(
        st.sampled_from(
            ["f_cnt", "frm_payload", "decoded_payload", "rx_metadata", "last_battery_percentage"]
        ),
        json_values,
    )
)
def test_mutated_uplinks_only_raise_decode_error(changes: dict[str, object]) -> None:
    assert_total(
        ttn.decode, TOPIC, _up(**{k: (v if v is not None else 0) for k, v in changes.items()})
    )
