"""``panicctl decode``: one frame through decode + verify, printed as one JSON object.

Fixtures are the documented payloads of tests/test_formats_*.py (each cites its source).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.formats import lora_frame, native
from gateway.model import GeoFix, PressKind
from panicd import cli
from tests import test_formats_chirpstack as cs
from tests import test_formats_ttn as ttn
from tests.test_formats_shelly import GEN1, GEN2_EVENT

REPO = Path(__file__).resolve().parent.parent
LORA_ID = "L0000ABCD"
LORA_KEY = bytes(range(32, 64))
# docs/FRAMES.md test vector key and frame.
NATIVE_ID = "MDN-OOO-0001"
NATIVE_KEY = bytes(range(32))
DOCS_FRAME = (
    b'{"v":1,"dev":"MDN-OOO-0001","ctr":42,"kind":"panic","ts":1700000000,"bat":87,'
    b'"gps":{"lat":-7.62182,"lon":111.53096,"acc":15},'
    b'"tag":"fd67f3615ec30ca16eba6705a3003cd188e7e5b26dea7d9874046e31d5692f9c"}'
)
EXTERNAL = {
    "chirpstack": "0101010101010101",
    "ttn": "dev1",
    "zigbee2mqtt": "sos_rt03",
    "shelly": "shellybutton1-A4CF12F45301",
    "tasmota": "tombol_rw05",
}


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry with a native button, a LoRa button and one device per third-party format."""
    devices = [
        f'[[device]]\nid = "{NATIVE_ID}"\nhardware = "esp32-wifi"\n'
        "location = { lat = -7.62182, lon = 111.53096 }\n",
        f'[[device]]\nid = "{LORA_ID}"\nhardware = "lora-button"\nmobile = true\n',
    ]
    for index, (fmt, ref) in enumerate(EXTERNAL.items()):
        devices.append(
            f'[[device]]\nid = "TP-{index}"\nhardware = "{fmt}"\nmobile = true\n'
            f'external_ids = {{ {fmt} = "{ref}" }}\n'
        )
    (tmp_path / "devices.toml").write_text("\n".join(devices), encoding="utf-8")
    keys = tmp_path / "device-keys.toml"
    keys.write_text(f'{NATIVE_ID} = "{NATIVE_KEY.hex()}"\n{LORA_ID} = "{LORA_KEY.hex()}"\n',
                    encoding="utf-8")
    monkeypatch.setenv("PANICD_DEVICE_KEYS_FILE", str(keys))
    path = tmp_path / "panicd.toml"
    path.write_text(
        f'[panicd]\ndatabase = "{tmp_path / "db.sqlite3"}"\n'
        f'[geo]\nkelurahan_file = "{REPO / "config" / "geo" / "kelurahan.geojson"}"\n'
        '[devices]\nregistry = "devices.toml"\n',
        encoding="utf-8",
    )
    return path


Decode = Callable[..., tuple[int, dict[str, object]]]


@pytest.fixture
def decode(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Decode:
    """Run ``panicctl decode`` on a payload; the exit code and the printed JSON object."""

    def run(fmt: str, payload: bytes, topic: str | None = None) -> tuple[int, dict[str, object]]:
        frame_file = tmp_path / "frame.bin"
        frame_file.write_bytes(payload)
        argv = ["--config", str(config), "decode", "--format", fmt, str(frame_file)]
        if topic is not None:
            argv[5:5] = ["--topic", topic]
        code = cli.main(argv)
        return code, json.loads(capsys.readouterr().out)

    return run


def _lora_hex(counter: int = 9, key: bytes = LORA_KEY) -> bytes:
    frame = lora_frame.encode(device=LORA_ID, counter=counter, kind=PressKind.PANIC, key=key,
                              battery=71, fix=GeoFix(-7.6298, 111.5239))
    return frame.hex().upper().encode()


def test_native_docs_vector_is_accepted_with_position(decode: Decode) -> None:
    code, out = decode("native", DOCS_FRAME + b"\n")
    assert code == 0
    assert out == {
        "via": "native", "device": NATIVE_ID, "registry_device": NATIVE_ID, "counter": 42,
        "kind": "panic", "battery": 87, "lat": -7.62182, "lon": 111.53096,
        "verdict": "accepted",
    }


def test_native_with_a_flipped_tag_says_bad_tag(decode: Decode) -> None:
    tampered = DOCS_FRAME.replace(b'"tag":"fd', b'"tag":"fe')
    code, out = decode("native", tampered)
    assert (code, out["verdict"], out["device"]) == (1, "bad_tag", NATIVE_ID)


def test_native_on_another_devices_topic_is_a_decode_rejection(decode: Decode) -> None:
    code, out = decode("native", DOCS_FRAME,
                        topic=native.uplink_topic("MDN-KLG-0001"))
    assert (code, out["verdict"]) == (1, "topic_mismatch")


def test_lora_frame_as_hex_text(decode: Decode) -> None:
    code, out = decode("lora-frame", _lora_hex() + b"\n")
    assert code == 0
    assert (out["device"], out["counter"], out["battery"], out["lat"], out["lon"]) == (
        LORA_ID, 9, 71, -7.6298, 111.5239)


def test_lora_frame_signed_with_the_wrong_key(decode: Decode) -> None:
    code, out = decode("lora-frame", _lora_hex(key=b"x" * 32))
    assert (code, out["verdict"]) == (1, "bad_tag")


def test_lora_frame_raw_bytes_from_an_unregistered_button(decode: Decode) -> None:
    raw = lora_frame.encode(device="L00000001", counter=1, kind=PressKind.TEST, key=LORA_KEY)
    code, out = decode("lora-frame", raw)
    assert (code, out["verdict"], out["device"], out["registry_device"]) == (
        1, "unknown_device", "L00000001", None)


def test_rylr_line_carries_rssi_and_snr(decode: Decode) -> None:
    data = _lora_hex()
    line = b"+RCV=43981,%d,%s,-97,-4\r\n" % (len(data), data)
    code, out = decode("rylr", line)
    assert code == 0
    assert (out["via"], out["device"], out["rssi"], out["snr"]) == ("rylr", LORA_ID, -97.0, -4.0)


def test_rak3172_legacy_two_line_event(decode: Decode) -> None:
    raw = lora_frame.encode(device=LORA_ID, counter=3, kind=PressKind.HEARTBEAT, key=LORA_KEY)
    lines = b"+EVT:RXP2P, RSSI -60, SNR 11\r\n+EVT:" + raw.hex().upper().encode() + b"\r\n"
    code, out = decode("rak3172", lines)
    assert code == 0
    assert (out["kind"], out["counter"], out["rssi"]) == ("heartbeat", 3, -60.0)


def test_chirpstack_uplink_with_codec_object(decode: Decode) -> None:
    payload = cs._up(fCnt=5, object={"event": "panic"})
    code, out = decode("chirpstack", payload, topic=cs.TOPIC)
    assert code == 0
    assert (out["device"], out["registry_device"], out["counter"]) == (
        "0101010101010101", "TP-0", 5)


def test_chirpstack_docs_example_has_no_press(decode: Decode) -> None:
    code, out = decode("chirpstack", cs._up(), topic=cs.TOPIC)
    assert code == 1
    assert out["verdict"] not in ("accepted", "")


def test_ttn_uplink_with_decoded_payload(decode: Decode) -> None:
    payload = ttn._up(f_cnt=12, decoded_payload={"event": "panic", "battery": 64})
    code, out = decode("ttn", payload, topic=ttn.TOPIC)
    assert code == 0
    assert (out["device"], out["counter"], out["battery"], out["gateway"]) == (
        "dev1", 12, 64, "gtw1")


def test_an_uplink_that_is_no_press_still_says_device_counter_and_fields(
    decode: Decode,
) -> None:
    # A door sensor's status (issue 16): the verdict used to be all an installer saw.
    code, out = decode("chirpstack", cs._up(fCnt=9, data=None, object={"door": "open"}),
                       topic=cs.TOPIC)
    assert code == 1
    assert (out["verdict"], out["device"], out["registry_device"], out["counter"]) == (
        "no_event", "0101010101010101", "TP-0", 9)
    assert out["fields_read"] == ["event", "sos"]
    assert "sos" in str(out["detail"])


def test_an_unregistered_device_says_which_registry_entry_is_missing(decode: Decode) -> None:
    payload = ttn._up(f_cnt=3, decoded_payload={"sos": True},
                      top={"end_device_ids": {"device_id": "stranger"}})
    code, out = decode("ttn", payload, topic="v3/app1@ttn/devices/stranger/up")
    assert code == 1
    assert (out["kind"], out["device"], out["registry_device"]) == ("panic", "stranger", None)
    assert out["registry_detail"] == "no [[device]] with external_ids.ttn = 'stranger'"


def test_ttn_sos_true_is_a_press_of_the_registered_device(decode: Decode) -> None:
    payload = ttn._up(f_cnt=4, decoded_payload={"sos": True, "battery": 94})
    code, out = decode("ttn", payload, topic=ttn.TOPIC)
    assert (code, out["kind"], out["registry_device"], out["battery"]) == (0, "panic", "TP-1", 94)


def test_zigbee2mqtt_sos_button(decode: Decode) -> None:
    code, out = decode("zigbee2mqtt",
                        b'{"action":"emergency","battery":84,"linkquality":120}',
                        topic="zigbee2mqtt/sos_rt03")
    assert code == 0
    assert (out["device"], out["kind"], out["battery"]) == ("sos_rt03", "panic", 84)


def test_zigbee2mqtt_empty_action_is_ignored_not_rejected(decode: Decode) -> None:
    code, out = decode("zigbee2mqtt", b'{"action":"","battery":90}',
                        topic="zigbee2mqtt/sos_rt03")
    assert (code, out) == (1, {"via": "zigbee2mqtt", "verdict": "ignored", "detail": "no_action"})


def test_shelly_gen1_and_gen2(decode: Decode) -> None:
    code, out = decode("shelly", b'{"event":"S","event_cnt":7}',
                        topic=f"{GEN1}/input_event/0")
    assert (code, out["device"], out["kind"], out["counter"]) == (
        0, "shellybutton1-A4CF12F45301", "panic", None)
    code, out = decode("shelly", json.dumps(GEN2_EVENT).encode(),
                        topic="kelurahan/taman/events/rpc")
    # Decoded, but this Plus i4 is not in the registry.
    assert (code, out["device"], out["verdict"]) == (1, "shellyplusi4-a8032ab12345",
                                                     "unknown_device")


def test_tasmota_result(decode: Decode) -> None:
    code, out = decode("tasmota", b'{"Button1":{"Action":"SINGLE"}}',
                        topic="stat/tombol_rw05/RESULT")
    assert (code, out["device"], out["registry_device"], out["verdict"]) == (
        0, "tombol_rw05", "TP-4", "accepted")


def test_frame_from_stdin(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(DOCS_FRAME)))
    assert cli.main(["--config", str(config), "decode", "--format", "native", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "accepted"


def test_app_format_runs_the_signed_frame_the_app_posts(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame_file = tmp_path / "app.json"
    frame_file.write_bytes(DOCS_FRAME)
    code = cli.main(["--config", str(config), "decode", "--format", "app", str(frame_file)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["verdict"] == "accepted"
    assert out["via"] == "app"


def test_app_format_with_an_empty_object_is_a_rejection(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame_file = tmp_path / "app.json"
    frame_file.write_text("{}", encoding="utf-8")
    code = cli.main(["--config", str(config), "decode", "--format", "app", str(frame_file)])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "bad_version"
