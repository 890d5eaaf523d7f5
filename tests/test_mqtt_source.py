"""MqttSource + Ingestor in-process against a real Mosquitto (DESIGN §2 Durability, §4).

PUBACK only after COMMIT, a persistent session across restarts of panicd and of the
broker, presser feedback on the command topic, dead letters acknowledged, retained
third-party state ignored.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import structlog

from firmware_sim.broker import Mosquitto, free_port
from firmware_sim.button import press
from firmware_sim.storm import storm
from gateway.dedup import DedupPolicy
from gateway.formats import native
from gateway.ingest import Ingestor
from gateway.model import PressKind
from gateway.sources.mqtt import (
    SESSION_LOST,
    TAKEN_OVER,
    MqttSource,
    SessionAlarm,
    SessionGuard,
)
from store.sqlite import SqliteStore
from tests.pipeline import BlockingStore, CountingStore, Fleet, make_fleet, rows, scalar

# Generous deadlines: they bound a hang, they do not time anything.
DEADLINE_S = 20.0


@dataclass(slots=True)
class Running:
    """One live pipeline: store wrapper, ingestor and the source under test."""

    store: CountingStore
    ingestor: Ingestor
    source: MqttSource
    stop: asyncio.Event


@asynccontextmanager
async def pipeline(
    fleet: Fleet,
    *,
    source: int = 0,
    blocking: bool = False,
    on_availability: Callable[[str, str, bool, float], None] | None = None,
) -> AsyncIterator[Running]:
    """Store → Ingestor → MqttSource, connected; a graceful stop on exit."""
    async with SqliteStore(fleet.database) as inner:
        store = BlockingStore(inner) if blocking else CountingStore(inner)
        async with Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor:
            mqtt = MqttSource(fleet.config.mqtt[source], ingestor, drain_timeout_s=5.0,
                              on_availability=on_availability)
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(mqtt.run(stop), name="test.mqtt.source")
                async with asyncio.timeout(DEADLINE_S):
                    await mqtt.wait_connected()
                try:
                    yield Running(store, ingestor, mqtt, stop)
                finally:
                    stop.set()


async def publish(broker: Mosquitto, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """One QoS 1 publication (complete once the broker has it)."""
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"test-pub-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.publish(topic, payload, qos=1, retain=retain)


async def forget_session(broker: Mosquitto, client_id: str) -> None:
    """Drop a persistent session so it stops collecting other tests' messages."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=True):
        pass


@pytest.fixture
def client_id() -> str:
    return f"panicd-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def fleet(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> AsyncIterator[Fleet]:
    yield make_fleet(tmp_path / "cfg", mqtt_port=mosquitto.port, client_id=client_id)
    await forget_session(mosquitto, client_id)


async def test_a_signed_press_is_stored_and_the_button_gets_received_feedback(
    mosquitto: Mosquitto, fleet: Fleet
) -> None:
    device = fleet.devices[0]
    async with pipeline(fleet) as running:
        _, feedback = await press(
            mosquitto.host, mosquitto.port, device, PressKind.PANIC, 41,
            feedback_timeout_s=DEADLINE_S,
        )
        assert running.source.acked == 1
    assert feedback is not None
    assert {k: v for k, v in feedback.items() if k != "tag"} == {
        "dev": device.id, "ctr": 41, "state": "received", "press": 1, "incident": 1
    }
    # Signed with the button's key: no broker account can forge "received" (issue 11).
    assert native.ack_tag_valid(device.key, feedback)
    assert not native.ack_tag_valid(device.key, {**feedback, "ctr": 42})
    assert rows(fleet.database, "SELECT device_id, counter, kind, incident_id FROM presses") == [
        (device.id, 41, "panic", 1)
    ]
    assert rows(fleet.database, "SELECT path FROM press_paths") == [
        (f"mqtt:local:{native.uplink_topic(device.id)}",)
    ]


async def test_a_press_never_committed_is_not_acked_and_is_redelivered_and_stored_once(
    mosquitto: Mosquitto, fleet: Fleet
) -> None:
    device = fleet.devices[0]
    payload = native.encode(key=device.key, device_id=device.id, counter=7, kind=PressKind.PANIC)
    # Pipeline 1 receives the press but its COMMIT never completes: tear it all down as a
    # crash would (the open transaction dies with the connection).
    async with SqliteStore(fleet.database) as inner:
        store = BlockingStore(inner)
        async with Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor:
            source = MqttSource(fleet.config.mqtt[0], ingestor, drain_timeout_s=0.1)
            async with asyncio.TaskGroup() as group:
                task = group.create_task(source.run(asyncio.Event()), name="test.mqtt.doomed")
                async with asyncio.timeout(DEADLINE_S):
                    await source.wait_connected()
                    await publish(mosquitto, native.uplink_topic(device.id), payload)
                    await store.entered.wait()
                assert ingestor.depth == 1
                task.cancel()
            assert source.received == 1
            assert source.acked == 0
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 0

    # Pipeline 2, same client id: the broker still owns the message and delivers it again.
    async with pipeline(fleet) as running:
        async with asyncio.timeout(DEADLINE_S):
            await running.store.wait_for(presses=1)
        assert running.source.acked == 1
    assert rows(fleet.database, "SELECT device_id, counter FROM presses") == [(device.id, 7)]
    assert scalar(fleet.database, "SELECT heard FROM press_paths") == 1
    assert scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters") == 0


async def test_presses_published_while_panicd_is_down_arrive_when_it_returns(
    mosquitto: Mosquitto, fleet: Fleet
) -> None:
    async with pipeline(fleet):
        pass  # subscribes with clean_session=False: the broker now keeps the session
    sent = await storm(
        mosquitto.host, mosquitto.port, fleet.devices, count=20, rate=10_000, counter_base=100
    )
    assert len(sent.sent) == 20
    async with pipeline(fleet) as running:
        async with asyncio.timeout(DEADLINE_S):
            await running.store.wait_for(presses=20)
    stored = {
        (str(device), int(str(counter)))
        for device, counter in rows(fleet.database, "SELECT device_id, counter FROM presses")
    }
    assert stored == set(sent.sent)
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 20


async def test_a_malformed_frame_becomes_a_dead_letter_and_is_acked_not_redelivered(
    mosquitto: Mosquitto, fleet: Fleet
) -> None:
    device = fleet.devices[1]
    topic = native.uplink_topic(device.id)
    async with pipeline(fleet) as running:
        await publish(mosquitto, topic, b"{\"v\": 1, oops")
        async with asyncio.timeout(DEADLINE_S):
            await running.store.wait_for(dead_letters=1)
    assert rows(fleet.database, "SELECT reason, payload, path FROM dead_letters") == [
        ("bad_json", b"{\"v\": 1, oops", f"mqtt:local:{topic}")
    ]
    # After a restart on the same session a sentinel press arrives; an unacked dead letter
    # would have been redelivered ahead of it.
    async with pipeline(fleet) as running:
        await publish(
            mosquitto, topic,
            native.encode(key=device.key, device_id=device.id, counter=1, kind=PressKind.PANIC),
        )
        async with asyncio.timeout(DEADLINE_S):
            await running.store.wait_for(presses=1)
        assert running.store.dead_letters == 0
    assert scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters") == 1


async def test_the_source_reconnects_after_a_broker_restart_and_keeps_its_session(
    tmp_path: Path, client_id: str
) -> None:
    broker = Mosquitto(tmp_path / "broker", port=free_port())
    await asyncio.to_thread(broker.start)
    try:
        fleet = make_fleet(tmp_path / "cfg", mqtt_port=broker.port, client_id=client_id)
        device = fleet.devices[2]
        with structlog.testing.capture_logs() as logs:
            async with pipeline(fleet) as running:
                await asyncio.to_thread(broker.stop)
                await asyncio.to_thread(broker.start)  # same port, same persistence file
                await press(broker.host, broker.port, device, PressKind.PANIC, 5)
                async with asyncio.timeout(DEADLINE_S):
                    await running.store.wait_for(presses=1)
    finally:
        await asyncio.to_thread(broker.stop)
    events = [entry["event"] for entry in logs]
    assert "mqtt.disconnected" in events
    (disconnected,) = [e for e in logs if e["event"] == "mqtt.disconnected"][:1]
    assert (disconnected["log_level"], disconnected["port"]) == ("warning", broker.port)
    assert events.count("mqtt.connected") >= 2
    assert events.index("mqtt.disconnected") < len(events) - 1 - events[::-1].index(
        "mqtt.connected"
    )
    assert rows(fleet.database, "SELECT device_id, counter FROM presses") == [(device.id, 5)]


ZIGBEE_DEVICE = (
    '[[device]]\nid = "ZB-SOS-1"\nhardware = "zigbee-sos"\n'
    "location = { lat = -7.61364, lon = 111.53369 }\n"
    'external_ids = { zigbee2mqtt = "sos_button_1" }\n'
)
ZIGBEE_TOPIC = "zigbee2mqtt/sos_button_1"


async def test_a_retained_zigbee2mqtt_action_is_ignored_and_a_live_one_is_stored(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    zigbee_source = (
        f'\n[[mqtt]]\nname = "zigbee"\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
        f'client_id = "{client_id}-z"\nformat = "zigbee2mqtt"\ntopics = ["zigbee2mqtt/#"]\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 1\n"
    )
    fleet = make_fleet(
        tmp_path / "cfg", mqtt_port=mosquitto.port, client_id=client_id,
        extra_toml=zigbee_source, extra_registry=ZIGBEE_DEVICE,
    )
    assert fleet.config.mqtt[1].format == "zigbee2mqtt"
    # The state Zigbee2MQTT left retained from a press long ago.
    await publish(mosquitto, ZIGBEE_TOPIC, b'{"action":"emergency","battery":11}', retain=True)
    try:
        async with pipeline(fleet, source=1) as running:
            await publish(mosquitto, ZIGBEE_TOPIC, b'{"action":"emergency","battery":80}')
            async with asyncio.timeout(DEADLINE_S):
                await running.store.wait_for(presses=1)
            # The retained copy was delivered first (on subscribe) and acked as ignored.
            assert running.source.received == 2
            assert running.source.acked == 2
    finally:
        await publish(mosquitto, ZIGBEE_TOPIC, b"", retain=True)
        await forget_session(mosquitto, f"{client_id}-z")
    assert rows(
        fleet.database, "SELECT device_id, kind, format, trust, battery, counter FROM presses"
    ) == [("ZB-SOS-1", "panic", "zigbee2mqtt", "network", 80, None)]
    assert rows(fleet.database, "SELECT device_id, press_count, kelurahan FROM incidents") == [
        ("ZB-SOS-1", 1, "Sukosari")
    ]
    assert scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters") == 0


async def test_zigbee2mqtt_availability_reports_a_device_offline_and_back_online(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    zigbee_source = (
        f'\n[[mqtt]]\nname = "zigbee"\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
        f'client_id = "{client_id}-z"\nformat = "zigbee2mqtt"\ntopics = ["zigbee2mqtt/#"]\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 1\n"
    )
    fleet = make_fleet(
        tmp_path / "cfg", mqtt_port=mosquitto.port, client_id=client_id,
        extra_toml=zigbee_source, extra_registry=ZIGBEE_DEVICE,
    )
    reports: list[tuple[str, str, bool]] = []
    changed = asyncio.Event()

    def on_availability(fmt: str, ref: str, online: bool, _at: float) -> None:
        reports.append((fmt, ref, online))
        changed.set()

    topic = f"{ZIGBEE_TOPIC}/availability"
    try:
        async with pipeline(fleet, source=1, on_availability=on_availability) as running:
            # Zigbee2MQTT retains availability: the state is known on (re)subscribe.
            await publish(mosquitto, topic, b'{"state":"offline"}', retain=True)
            async with asyncio.timeout(DEADLINE_S):
                while len(reports) < 1:
                    changed.clear()
                    await changed.wait()
            await publish(mosquitto, topic, b'{"state":"online"}', retain=True)
            async with asyncio.timeout(DEADLINE_S):
                while len(reports) < 2:
                    changed.clear()
                    await changed.wait()
            assert running.source.acked == 2
    finally:
        await publish(mosquitto, topic, b"", retain=True)
        await forget_session(mosquitto, f"{client_id}-z")
    assert reports == [("zigbee2mqtt", "sos_button_1", False),
                       ("zigbee2mqtt", "sos_button_1", True)]
    # Availability is health, never a press.
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 0
    assert scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters") == 0


async def take_over(broker: Mosquitto, client_id: str) -> None:
    """Connect with panicd's client id and a clean session, as the case 5 attacker did."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id,
                              clean_session=True):
        pass


async def test_a_clean_session_connect_with_our_client_id_is_reported_as_session_lost(
    mosquitto: Mosquitto, fleet: Fleet, client_id: str
) -> None:
    # The open test broker binds no client ids, as a broker without the shipped config.
    with structlog.testing.capture_logs() as logs:
        async with pipeline(fleet) as running:
            before = running.source.alarm
            await take_over(mosquitto, client_id)
            async with asyncio.timeout(DEADLINE_S):
                await running.source.wait_connections(2)
            alarm = running.source.alarm
    assert before is None
    assert alarm is not None
    assert alarm.reason == SESSION_LOST
    (lost,) = [e for e in logs if e["event"] == "mqtt.session_lost"]
    assert (lost["log_level"], lost["client_id"], lost["source"]) == ("error", client_id, "local")
    first, second = [e for e in logs if e["event"] == "mqtt.connected"][:2]
    assert (first["session_present"], second["session_present"]) == (False, False)


async def test_a_reconnect_that_finds_its_session_raises_no_alarm(
    mosquitto: Mosquitto, fleet: Fleet
) -> None:
    async with pipeline(fleet):
        pass
    with structlog.testing.capture_logs() as logs:
        async with pipeline(fleet) as running:
            assert running.source.alarm is None
    (connected,) = [e for e in logs if e["event"] == "mqtt.connected"]
    assert connected["session_present"] is True
    assert not [e for e in logs if e["log_level"] == "error"]


async def test_being_kicked_off_again_and_again_is_reported_as_taken_over(
    mosquitto: Mosquitto, fleet: Fleet, client_id: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with pipeline(fleet) as running:
            for connections in range(2, 5):
                await take_over(mosquitto, client_id)
                async with asyncio.timeout(DEADLINE_S):
                    await running.source.wait_connections(connections)
            alarm = running.source.alarm
    assert alarm is not None
    assert alarm.reason == TAKEN_OVER
    (taken,) = [e for e in logs if e["event"] == "mqtt.taken_over"]
    assert taken["log_level"] == "error"


def test_session_guard_expects_a_session_only_after_it_had_one() -> None:
    guard = SessionGuard()
    assert guard.connected(session_present=False, now=0.0) == []  # first start: none yet
    guard.dropped()
    assert guard.connected(session_present=True, now=1.0) == []
    guard.dropped()
    assert guard.connected(session_present=False, now=2.0) == [SessionAlarm(SESSION_LOST, 2.0)]


def test_session_guard_counts_bounces_not_outages() -> None:
    guard = SessionGuard(bounces=3, window_s=60.0)
    guard.connected(session_present=False, now=0.0)
    for at in (1.0, 2.0):
        guard.dropped()
        assert guard.connected(session_present=True, now=at) == []
    # A broker restart: the drop is followed by a failed connect, so it is no bounce.
    guard.dropped()
    guard.connect_failed()
    assert guard.connected(session_present=True, now=3.0) == []
    guard.dropped()
    assert guard.connected(session_present=True, now=4.0) == [SessionAlarm(TAKEN_OVER, 4.0)]
    # Bounces spread wider than the window are an unsteady network, not a takeover.
    for at in (100.0, 200.0, 300.0):
        guard.dropped()
        assert guard.connected(session_present=True, now=at) == []
