"""Third-party traffic for storms: what Zigbee2MQTT and a ChirpStack v4 network server
publish for a button press, shaped as those projects document it (see the fixtures in
tests/test_formats_zigbee2mqtt.py and tests/test_formats_chirpstack.py for the sources).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

from firmware_sim.fleet import SimDevice
from gateway.formats import lora_frame
from gateway.model import PressKind

CHIRPSTACK_APPLICATION = "17c82e96-be03-4f38-aef3-f83d48582d97"
CHIRPSTACK_GATEWAY = "0016c001f153a14c"


def zigbee_press(friendly_name: str, *, battery: int = 90) -> tuple[str, bytes]:
    """An SOS button's action message (Zigbee2MQTT publishes on zigbee2mqtt/{name})."""
    body = {"action": "emergency", "battery": battery, "linkquality": 120}
    return f"zigbee2mqtt/{friendly_name}", json.dumps(body).encode()


def chirpstack_uplink(
    device: SimDevice, dev_eui: str, counter: int, f_cnt: int, *, kind: PressKind,
    battery: int = 90,
) -> tuple[str, bytes]:
    """A ChirpStack v4 "up" event carrying our signed binary frame in ``data``.

    ``fCnt`` is left out when it is 0, as ChirpStack's JSON marshaler does.
    """
    frame = lora_frame.encode(device=device.id, counter=counter, kind=kind, key=device.key,
                              battery=battery)
    event: dict[str, object] = {
        "deduplicationId": str(uuid.uuid4()),
        "time": datetime.now(tz=UTC).isoformat(),
        "deviceInfo": {
            "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
            "applicationId": CHIRPSTACK_APPLICATION,
            "applicationName": "panic buttons",
            "deviceName": device.id,
            "devEui": dev_eui,
        },
        "fPort": 1,
        "data": base64.b64encode(frame).decode("ascii"),
        "rxInfo": [{"gatewayId": CHIRPSTACK_GATEWAY, "rssi": -97, "snr": 6.5}],
    }
    if f_cnt:
        event["fCnt"] = f_cnt
    topic = f"application/{CHIRPSTACK_APPLICATION}/device/{dev_eui}/event/up"
    return topic, json.dumps(event).encode()
