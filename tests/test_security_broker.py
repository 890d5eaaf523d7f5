"""The broker as shipped, attacked (issue 11 case 5 and the gateway ACL).

A real Mosquitto with config/mosquitto.conf's client-id binding, config/mosquitto.acl and
a password file (the ``secure_mosquitto`` fixture), real clients holding real button and
gateway credentials, and panicd's own MQTT source and ingest pipeline on the other end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import aiomqtt
import pytest
import structlog
from aiomqtt.exceptions import MqttConnectError

from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import SimDevice
from gateway.dedup import DedupPolicy
from gateway.formats import native, payload_bytes
from gateway.ingest import Ingestor
from gateway.sources.mqtt import MqttSource
from store.sqlite import SqliteStore
from tests.conftest import SECURE_ACCOUNTS
from tests.pipeline import CountingStore, Fleet, frame_bytes, make_fleet, rows, scalar

# Generous: they bound a hang, they do not time anything.
DEADLINE_S = 20.0
# How long a client that must receive nothing listens before the positive control.
LISTEN_S = 0.5
GATEWAY = "gw-balaikota"  # the relay gateway config/mosquitto.acl names
GATEWAY_REGISTRY = (
    f'[[gateway]]\nid = "{GATEWAY}"\nlocation = {{ lat = -7.6298, lon = 111.5239 }}\n'
)


@dataclass(slots=True)
class Running:
    """panicd's pipeline on the secured broker."""

    store: CountingStore
    source: MqttSource


@asynccontextmanager
async def panicd(fleet: Fleet, broker: Mosquitto) -> AsyncIterator[Running]:
    """Store → Ingestor → MqttSource logged in as panicd's account, as shipped."""
    config = replace(fleet.config.mqtt[0], port=broker.port, username="panicd",
                     password=SECURE_ACCOUNTS["panicd"], client_id="panicd")
    async with SqliteStore(fleet.database) as inner:
        store = CountingStore(inner)
        async with Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor:
            source = MqttSource(config, ingestor, drain_timeout_s=5.0)
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(source.run(stop), name="test.security.panicd")
                async with asyncio.timeout(DEADLINE_S):
                    await source.wait_connected()
                try:
                    yield Running(store, source)
                finally:
                    stop.set()


def account(
    broker: Mosquitto, username: str, *, identifier: str | None = None,
    clean_session: bool = True, password: str | None = None,
) -> aiomqtt.Client:
    """A client logged in with one account's credentials."""
    return aiomqtt.Client(
        broker.host, broker.port, username=username,
        password=SECURE_ACCOUNTS[username] if password is None else password,
        identifier=identifier or f"{username}-{uuid.uuid4().hex[:8]}",
        clean_session=clean_session,
    )


async def received_within(client: aiomqtt.Client, seconds: float) -> list[str]:
    """Topics of whatever reaches ``client`` within ``seconds``."""
    topics: list[str] = []
    try:
        async with asyncio.timeout(seconds):
            topics.extend([message.topic.value async for message in client.messages])
    except TimeoutError:
        pass
    return topics


async def own_feedback(client: aiomqtt.Client, device: SimDevice) -> list[str]:
    """Topics reaching ``client`` until panicd's feedback to ``device`` arrives."""
    topics: list[str] = []
    async with asyncio.timeout(DEADLINE_S):
        async for message in client.messages:
            topics.append(message.topic.value)
            if message.topic.value == native.command_topic(device.id):
                assert b'"state":"received"' in payload_bytes(message.payload)
                return topics
    raise AssertionError("no feedback")  # pragma: no cover -- the iterator never ends


@pytest.fixture
async def fleet(secure_mosquitto: Mosquitto, tmp_path: Path) -> AsyncIterator[Fleet]:
    yield make_fleet(tmp_path / "cfg", mqtt_port=secure_mosquitto.port, client_id="panicd",
                     extra_registry=GATEWAY_REGISTRY)
    # The broker lives for the session: leave no persistent session to the next test.
    for username in SECURE_ACCOUNTS:
        async with account(secure_mosquitto, username, identifier=username):
            pass


async def test_a_button_using_panicds_client_id_neither_kicks_panicd_nor_loses_presses(
    secure_mosquitto: Mosquitto, fleet: Fleet
) -> None:
    victim, attacker = fleet.devices[0], fleet.devices[1]
    with structlog.testing.capture_logs() as logs:
        async with panicd(fleet, secure_mosquitto) as running:
            async with account(secure_mosquitto, victim.id) as button:
                # Case 5: the attacker's own credentials, panicd's client id, a clean
                # session, eleven times; a press goes out after each attempt.
                for counter in range(1, 12):
                    async with account(secure_mosquitto, attacker.id, identifier="panicd"):
                        pass
                    await button.publish(native.uplink_topic(victim.id),
                                         frame_bytes(victim, counter), qos=1)
            async with asyncio.timeout(DEADLINE_S):
                await running.store.wait_for(presses=11)
            assert running.source.alarm is None
    events = [entry["event"] for entry in logs]
    assert events.count("mqtt.connected") == 1
    assert "mqtt.disconnected" not in events
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses WHERE device_id = ?",
                  (victim.id,)) == 11


async def test_panicds_persistent_session_survives_takeover_attempts_while_it_is_down(
    secure_mosquitto: Mosquitto, fleet: Fleet
) -> None:
    victim, attacker = fleet.devices[0], fleet.devices[1]
    async with panicd(fleet, secure_mosquitto):
        pass  # subscribed with clean_session = false: the broker keeps the session
    async with account(secure_mosquitto, victim.id) as button:
        for counter in range(1, 6):
            await button.publish(native.uplink_topic(victim.id), frame_bytes(victim, counter),
                                 qos=1)
    # Resuming panicd's session would hand the thief the five queued presses; a clean
    # session with panicd's id would wipe them.
    async with account(secure_mosquitto, attacker.id, identifier="panicd",
                       clean_session=False) as thief:
        stolen = await received_within(thief, LISTEN_S)
    async with account(secure_mosquitto, attacker.id, identifier="panicd"):
        pass
    with structlog.testing.capture_logs() as logs:
        async with panicd(fleet, secure_mosquitto) as running:
            async with asyncio.timeout(DEADLINE_S):
                await running.store.wait_for(presses=5)
            assert running.source.alarm is None
    assert stolen == []
    (connected,) = [e for e in logs if e["event"] == "mqtt.connected"]
    assert connected["session_present"] is True
    assert rows(fleet.database, "SELECT counter FROM presses ORDER BY counter") == [
        (n,) for n in range(1, 6)
    ]


async def test_a_button_cannot_publish_as_another_button_or_as_a_gateway(
    secure_mosquitto: Mosquitto, fleet: Fleet
) -> None:
    victim, attacker = fleet.devices[0], fleet.devices[1]
    async with panicd(fleet, secure_mosquitto) as running:
        async with account(secure_mosquitto, attacker.id) as button:
            # Frames the attacker signed with its own key, on topics that are not its own:
            # the broker drops them (MQTT 3.1.1: PUBACKed, never delivered).
            await button.publish(native.uplink_topic(victim.id), frame_bytes(attacker, 1), qos=1)
            await button.publish(f"panicd/v1/gw/{GATEWAY}/up", frame_bytes(attacker, 2), qos=1)
            # A gateway named like the button itself: what the old gateway pattern allowed.
            await button.publish(f"panicd/v1/gw/{attacker.id}/up", frame_bytes(attacker, 3),
                                 qos=1)
        # The positive control, published after them: the real gateway relaying a press.
        async with account(secure_mosquitto, GATEWAY) as gateway:
            await gateway.publish(f"panicd/v1/gw/{GATEWAY}/up", frame_bytes(victim, 7), qos=1)
        async with asyncio.timeout(DEADLINE_S):
            await running.store.wait_for(presses=1)
        assert running.source.received == 1
    assert rows(fleet.database, "SELECT device_id, counter FROM presses") == [(victim.id, 7)]
    assert scalar(fleet.database, "SELECT path FROM press_paths") == (
        f"mqtt:local:panicd/v1/gw/{GATEWAY}/up"
    )
    assert scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters") == 0


async def test_a_button_cannot_read_another_buttons_commands_or_any_uplink(
    secure_mosquitto: Mosquitto, fleet: Fleet
) -> None:
    victim, snoop = fleet.devices[0], fleet.devices[1]
    async with panicd(fleet, secure_mosquitto), account(secure_mosquitto, snoop.id) as spy:
        # Mosquitto 2 grants these subscriptions and filters every delivery by the ACL.
        for topic in (native.command_topic(victim.id), "panicd/v1/dev/+/cmd",
                      "panicd/v1/dev/+/up", "panicd/v1/gw/+/up", "#"):
            await spy.subscribe(topic, qos=1)
        async with account(secure_mosquitto, victim.id) as button:
            await button.subscribe(native.command_topic(victim.id), qos=1)
            await button.publish(native.uplink_topic(victim.id), frame_bytes(victim, 1),
                                 qos=1)
            assert await own_feedback(button, victim) == [native.command_topic(victim.id)]
        # The control: the spy's own press, whose feedback it may read, comes last.
        await spy.publish(native.uplink_topic(snoop.id), frame_bytes(snoop, 1), qos=1)
        seen = await own_feedback(spy, snoop)
    assert set(seen) == {native.command_topic(snoop.id)}


async def test_anonymous_clients_and_wrong_passwords_are_refused(
    secure_mosquitto: Mosquitto,
) -> None:
    anonymous = aiomqtt.Client(secure_mosquitto.host, secure_mosquitto.port, identifier="panicd")
    with pytest.raises(MqttConnectError) as refused:
        async with anonymous:
            pass
    assert str(refused.value.rc) == "Not authorized"
    with pytest.raises(MqttConnectError) as refused:
        async with account(secure_mosquitto, "panicd", password="guessed"):
            pass
    assert str(refused.value.rc) == "Not authorized"
