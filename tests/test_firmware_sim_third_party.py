"""panic-sim's third-party traffic: shaped so panicd's own decoders accept it, and a storm
of it through a real broker into the real daemon."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from firmware_sim import cli, third_party
from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import SimDevice, write_fleet
from gateway.formats import chirpstack, zigbee2mqtt
from gateway.model import Frame, PressKind
from gateway.verify import tag_valid
from tests.daemon_proc import DaemonProcess, count_rows, wait_until

LORA = SimDevice("L0000BEEF", hashlib.sha256(b"test:L0000BEEF").digest(), None)
DEV_EUI = "70b3d57ed0000001"


def test_a_chirpstack_uplink_carries_a_signed_frame_the_decoder_verifies() -> None:
    topic, payload = third_party.chirpstack_uplink(LORA, DEV_EUI, 77, 5, kind=PressKind.PANIC)
    frame = chirpstack.decode(topic, payload)
    assert isinstance(frame, Frame)
    assert (frame.device_ref, frame.counter, frame.kind) == ("L0000BEEF", 77, PressKind.PANIC)
    assert frame.gateway_ref == third_party.CHIRPSTACK_GATEWAY
    assert tag_valid(frame, LORA.key)


def test_a_first_uplink_leaves_fcnt_out_as_chirpstack_does() -> None:
    _, payload = third_party.chirpstack_uplink(LORA, DEV_EUI, 1, 0, kind=PressKind.PANIC)
    assert "fCnt" not in json.loads(payload)


def test_a_zigbee_sos_press_decodes_as_a_panic_with_its_battery() -> None:
    topic, payload = third_party.zigbee_press("sos_button_1", battery=42)
    frame = zigbee2mqtt.decode(topic, payload)
    assert isinstance(frame, Frame)
    assert (frame.device_ref, frame.kind, frame.battery) == ("sos_button_1", PressKind.PANIC, 42)


def test_storm_third_party_presses_are_stored_as_those_networks_deliver_them(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sources = (
        f'\n[[mqtt]]\nname = "zigbee"\nport = {mosquitto.port}\nclient_id = "panicd-3p-z"\n'
        'format = "zigbee2mqtt"\ntopics = ["zigbee2mqtt/#"]\n'
        f'\n[[mqtt]]\nname = "lorawan"\nport = {mosquitto.port}\nclient_id = "panicd-3p-c"\n'
        'format = "chirpstack"\ntopics = ["application/+/device/+/event/+"]\n'
    )
    config, keys, _ = write_fleet(tmp_path / "cfg", devices=1, mqtt_port=mosquitto.port,
                                  client_id="panicd-3p", extra_toml=sources)
    registry = config.parent / "devices.toml"
    registry.write_text(
        registry.read_text(encoding="utf-8")
        + '\n[[device]]\nid = "ZB-SOS-1"\nhardware = "zigbee-sos"\n'
        "location = { lat = -7.61364, lon = 111.53369 }\n"
        'external_ids = { zigbee2mqtt = "sos_button_1" }\n'
        f'\n[[device]]\nid = "{LORA.id}"\nhardware = "lora-button"\n'
        "location = { lat = -7.60059, lon = 111.55428 }\n"
        f'external_ids = {{ chirpstack = "{DEV_EUI}" }}\n',
        encoding="utf-8",
    )
    keys.write_text(keys.read_text(encoding="utf-8") + f'{LORA.id} = "{LORA.key.hex()}"\n',
                    encoding="utf-8")
    database = config.parent / "panicd.sqlite3"
    with DaemonProcess(config, keys, tmp_path / "run") as daemon:
        code = cli.main(["storm", "--config", str(config), "--keys", str(keys),
                         "--state", str(tmp_path / "counters.json"), "--count", "0",
                         "--third-party", "6", "--rate", "200"])
        assert code == 0
        stored = wait_until("SELECT COUNT(*) FROM presses", database, 6, 30)
        assert daemon.terminate() == 0
    assert stored == 6
    assert count_rows(database, "SELECT COUNT(*) FROM presses WHERE format = 'zigbee2mqtt'"
                      " AND device_id = 'ZB-SOS-1' AND trust = 'network'") == 3
    # The LoRaWAN copies carry our signed frame: trusted by its tag, not by the network.
    assert count_rows(database, "SELECT COUNT(*) FROM presses WHERE format = 'chirpstack'"
                      f" AND device_id = '{LORA.id}'") == 3
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0
