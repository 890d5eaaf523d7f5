"""Attacks on a running panicd, from outside, as issue 11's attacker tried them.

The real daemon (subprocess), a real Mosquitto and the console channel: each attack is
published or posted the way an outsider could, and the test asserts it was refused with
its reason, opened no incident and paged nobody, while the genuine button still works.
Broker-side attacks with the shipped ACLs are in tests/test_security_broker.py; the
webhook parsers are fuzzed in tests/test_webhook_fuzz.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import aiomqtt
import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.button import build_frame
from firmware_sim.fleet import SimDevice
from firmware_sim.third_party import CHIRPSTACK_APPLICATION, chirpstack_uplink
from gateway.formats import native
from gateway.model import PressKind
from gateway.verify import REPLAY_WINDOW
from tests.daemon_proc import DaemonProcess, count_rows, wait_until
from tests.dispatch_e2e import Deployment, deploy, policies_toml, rows

pytestmark = pytest.mark.slow

LORA = SimDevice("L00C0FFEE", hashlib.sha256(b"security:L00C0FFEE").digest(), None)
LORA_EUI = "0004a30b00c0ffee"
UPLINK = f"application/{CHIRPSTACK_APPLICATION}/device/{LORA_EUI}/event/up"


@dataclass(frozen=True, slots=True)
class Site:
    """A running daemon, its deployment and the genuine button's first counter."""

    deployment: Deployment
    daemon: DaemonProcess
    broker: Mosquitto
    button: SimDevice
    counter: int


def _publish(broker: Mosquitto, *messages: tuple[str, bytes]) -> None:
    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port,
                                  identifier=f"attacker-{time.monotonic_ns()}") as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1)

    asyncio.run(run())


def _dead_letters(site: Site, reason: str, expected: int) -> int:
    return wait_until(
        f"SELECT COUNT(*) FROM dead_letters WHERE reason = '{reason}'",
        site.deployment.database, expected, 15,
    )


@pytest.fixture(scope="module")
def site(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("security")
    client_id = f"panicd-security-{time.monotonic_ns()}"
    deployment = deploy(directory, mosquitto=mosquitto, client_id=client_id,
                        twilio_base_url="http://127.0.0.1:9", policies=policies_toml(600))
    with deployment.config.open("a", encoding="utf-8") as config:
        config.write(
            f'\n[[mqtt]]\nname = "lorawan"\nport = {mosquitto.port}\n'
            f'client_id = "{client_id}-lns"\nformat = "chirpstack"\ntrust = "network"\n'
            'topics = ["application/+/device/+/event/+"]\n'
        )
    registry = deployment.config.parent / "devices.toml"
    with registry.open("a", encoding="utf-8") as handle:
        handle.write(
            f'\n[[device]]\nid = "{LORA.id}"\nhardware = "lora-button"\n'
            "location = { lat = -7.62182, lon = 111.53096 }\n"
            f'external_ids = {{ chirpstack = "{LORA_EUI}" }}\n'
        )
    with deployment.keys.open("a", encoding="utf-8") as keys:
        keys.write(f'{LORA.id} = "{LORA.key.hex()}"\n')
    daemon = DaemonProcess(deployment.config, deployment.keys, directory / "run")
    daemon.start()
    try:
        yield Site(deployment, daemon, mosquitto, deployment.devices[0], 1_000)
    finally:
        daemon.terminate()


def test_forged_replayed_and_unknown_frames_are_refused_and_page_nobody(site: Site) -> None:
    button, counter = site.button, site.counter
    genuine = build_frame(button, PressKind.PANIC, counter)
    topic = native.uplink_topic(button.id)
    _publish(site.broker, (topic, genuine))
    assert wait_until("SELECT COUNT(*) FROM incidents", site.deployment.database, 1, 15) == 1

    stranger = SimDevice("MDN-XXX-0666", hashlib.sha256(b"stranger").digest(), None)
    other_key = SimDevice(button.id, hashlib.sha256(b"not the key").digest(), None)
    unsigned = json.dumps({"v": 1, "dev": button.id, "ctr": counter + 5, "kind": "panic"})
    _publish(
        site.broker,
        (topic, build_frame(button, PressKind.PANIC, counter + 1, tamper=True)),
        (topic, build_frame(other_key, PressKind.PANIC, counter + 2)),
        (topic, genuine),  # a captured frame, replayed byte for byte
        (topic, build_frame(button, PressKind.CANCEL, counter - REPLAY_WINDOW - 1)),
        (native.uplink_topic(stranger.id), build_frame(stranger, PressKind.PANIC, 1)),
        (topic, b'{"v":1,"pad":"' + b"x" * 4000 + b'"}'),
        (topic, unsigned.encode()),
    )
    assert _dead_letters(site, "bad_tag", 2) == 2
    for reason in ("stale_counter", "unknown_device", "too_large", "bad_tag_format"):
        assert _dead_letters(site, reason, 1) == 1, reason
    database = site.deployment.database
    # The replay is the same press heard again: acknowledged, one press, no new incident.
    assert count_rows(database, "SELECT COUNT(*) FROM presses") == 1
    assert count_rows(database, "SELECT heard FROM press_paths") == 2
    assert count_rows(database, "SELECT COUNT(*) FROM incidents") == 1
    pages = rows(database, "SELECT DISTINCT incident_id FROM outbox WHERE purpose = 'alert'")
    assert pages == [(1,)]


def test_an_unsigned_network_uplink_cannot_fake_or_lock_out_a_keyed_button(site: Site) -> None:
    """Issue 11 case 1, end to end: ChirpStack codec object, no tag, fCnt 2**32-1."""
    forged = {
        "deviceInfo": {"devEui": LORA_EUI, "deviceName": LORA.id},
        "fCnt": 4294967295,
        "object": {"event": "panic"},
        "rxInfo": [{"gatewayId": "0016c001f153a14c", "rssi": -90, "snr": 7.0}],
    }
    _publish(site.broker, (UPLINK, json.dumps(forged).encode()))
    assert _dead_letters(site, "unsigned", 1) == 1
    database = site.deployment.database
    assert count_rows(database, f"SELECT COUNT(*) FROM presses WHERE device_id = '{LORA.id}'") == 0
    # The real button's next signed press is stored and opens its incident.
    _, uplink = chirpstack_uplink(LORA, LORA_EUI, counter=2, f_cnt=3, kind=PressKind.PANIC)
    _publish(site.broker, (UPLINK, uplink))
    assert wait_until(
        f"SELECT COUNT(*) FROM incidents WHERE device_id = '{LORA.id}'", database, 1, 15
    ) == 1
    assert rows(database, f"SELECT counter, trust FROM presses WHERE device_id = '{LORA.id}'") == [
        (2, "signed")
    ]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/twilio/gather/1"), ("POST", "/twilio/status/sms/1"), ("POST", "/twilio/voice/1"),
     ("GET", "/a/AAAAAAAAAAAAAAAAAAAAAAAA"), ("POST", "/a/AAAAAAAAAAAAAAAAAAAAAAAA")],
)
def test_unsigned_webhooks_and_forged_ack_links_are_refused(
    site: Site, method: str, path: str
) -> None:
    request = urllib.request.Request(
        site.deployment.public_url + path, data=b"Digits=1" if method == "POST" else None,
        method=method, headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    database = site.deployment.database
    assert count_rows(database, "SELECT COUNT(*) FROM acks") == 0
