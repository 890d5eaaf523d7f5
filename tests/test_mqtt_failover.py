"""Broker failover: a source with several brokers moves to the next when one is gone.

Issue 13 item 4. The pure parts (which broker next, when to back off, what "session
present" means per broker) are proved directly; then against two private Mosquittos:
the in-process source and a simulated button each reach the second broker when the first
is dead, and the real panicd, with a storm of retransmitting buttons, survives the first
broker's SIGKILL mid-storm: every press stored once and confirmed, panicd reconnected to
the second broker by itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
import structlog

from firmware_sim.broker import free_port
from firmware_sim.button import broker_link
from firmware_sim.fleet import write_fleet
from firmware_sim.storm import StormResult, storm
from gateway.config import BrokerAddress, load_config
from gateway.dedup import DedupPolicy
from gateway.ingest import Ingestor
from gateway.sources.mqtt import (
    SESSION_LOST,
    TAKEN_OVER,
    BrokerRotation,
    MqttSource,
    SessionAlarm,
    SessionGuard,
)
from store.sqlite import SqliteStore
from tests.daemon_proc import DaemonProcess, count_rows, stored_presses, wait_until
from tests.faults.conftest import KillableMosquitto
from tests.pipeline import CountingStore, make_fleet

# Generous deadlines: they bound a hang, they do not time anything.
DEADLINE_S = 20.0

A = BrokerAddress("a.local", 1883)
B = BrokerAddress("b.local", 1883)
C = BrokerAddress("c.local", 1883)


# --- which broker next ------------------------------------------------------------------


def test_rotation_moves_to_the_next_broker_and_backs_off_once_per_full_round() -> None:
    rotation = BrokerRotation((A, B, C))
    assert rotation.current == A
    assert [rotation.failed(), rotation.current] == [False, B]
    assert [rotation.failed(), rotation.current] == [False, C]
    # Every broker failed once: now, and only now, the caller waits its backoff.
    assert [rotation.failed(), rotation.current] == [True, A]
    assert [rotation.failed(), rotation.current] == [False, B]


def test_rotation_after_a_loss_starts_with_the_next_broker_and_counts_a_new_round() -> None:
    rotation = BrokerRotation((A, B))
    rotation.failed()
    rotation.succeeded()  # connected to B
    assert rotation.current == B
    # B lost: A at once; A failing too completes the round (B, A) that began at the loss.
    assert [rotation.failed(), rotation.current] == [False, A]
    assert [rotation.failed(), rotation.current] == [True, B]


def test_rotation_with_one_broker_backs_off_after_every_failure_as_before() -> None:
    rotation = BrokerRotation((A,))
    assert [rotation.failed(), rotation.failed(), rotation.current] == [True, True, A]


def test_rotation_needs_a_broker() -> None:
    with pytest.raises(ValueError, match="at least one broker"):
        BrokerRotation(())


# --- what "session present" means with several brokers -----------------------------------


def test_session_guard_expects_no_session_on_a_broker_it_never_had_one_on() -> None:
    guard = SessionGuard()
    assert guard.connected(session_present=False, now=0.0, broker=str(A)) == []
    guard.dropped()
    # Failover to B, where panicd never had a session: none is expected, no alarm.
    assert guard.connected(session_present=False, now=1.0, broker=str(B)) == []
    guard.dropped()
    # Back on A, which had our session and now has none: A forgot it.
    assert guard.connected(session_present=False, now=2.0, broker=str(A)) == [
        SessionAlarm(SESSION_LOST, 2.0)
    ]
    guard.dropped()
    assert guard.connected(session_present=True, now=3.0, broker=str(B)) == []


def test_session_guard_counts_no_failover_as_a_take_over_bounce() -> None:
    guard = SessionGuard(bounces=3, window_s=60.0)
    guard.connected(session_present=False, now=0.0, broker=str(A))
    for at, broker in ((1.0, B), (2.0, A), (3.0, B), (4.0, A)):
        guard.dropped()
        assert guard.connected(session_present=True, now=at, broker=str(broker)) == []
    # Kicked off A and straight back onto A, three times: that is a fight for the id.
    alarms = []
    for at in (5.0, 6.0, 7.0):
        guard.dropped()
        alarms += guard.connected(session_present=True, now=at, broker=str(A))
    assert alarms == [SessionAlarm(TAKEN_OVER, 7.0)]


# --- real brokers -------------------------------------------------------------------------


@pytest.fixture
def second_broker(tmp_path: Path) -> Iterator[KillableMosquitto]:
    broker = KillableMosquitto(tmp_path / "second")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _two_broker_toml(config: Path, first: int, second: int) -> None:
    """Replace write_fleet's host/port with a two-broker list, the first preferred."""
    text = config.read_text(encoding="utf-8")
    single = f'host = "127.0.0.1"\nport = {first}\n'
    assert single in text
    brokers = f'brokers = ["127.0.0.1:{first}", "127.0.0.1:{second}"]\n'
    config.write_text(text.replace(single, brokers), encoding="utf-8")


async def test_the_source_reaches_the_second_broker_at_once_when_the_first_is_dead(
    second_broker: KillableMosquitto, tmp_path: Path
) -> None:
    dead = free_port()  # nothing listens: the first broker is gone
    client_id = f"panicd-failover-{uuid.uuid4().hex[:8]}"
    fleet = make_fleet(tmp_path / "cfg", mqtt_port=dead, client_id=client_id)
    _two_broker_toml(fleet.config_path, dead, second_broker.port)
    loaded = load_config(fleet.config_path, {"PANICD_DEVICE_KEYS_FILE": str(fleet.keys_path)})
    (config,) = loaded.mqtt
    assert [broker.port for broker in config.brokers] == [dead, second_broker.port]
    with structlog.testing.capture_logs() as logs:
        async with SqliteStore(fleet.database) as inner, Ingestor(
            CountingStore(inner), loaded, fleet.locator, policy=DedupPolicy()
        ) as ingestor:
            source = MqttSource(config, ingestor, drain_timeout_s=5.0)
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(source.run(stop), name="test.failover.source")
                async with asyncio.timeout(DEADLINE_S):
                    await source.wait_connected()
                assert source.broker == BrokerAddress("127.0.0.1", second_broker.port)
                stop.set()
    (failed,) = [e for e in logs if e["event"] == "mqtt.connect_failed"]
    # No backoff between the dead first broker and the second: the round was not over.
    assert (failed["broker"], failed["next_broker"], failed["retry_in_s"]) == (
        f"127.0.0.1:{dead}", f"127.0.0.1:{second_broker.port}", 0.0
    )
    (connected,) = [e for e in logs if e["event"] == "mqtt.connected"]
    assert connected["broker"] == f"127.0.0.1:{second_broker.port}"
    assert connected["session_present"] is False
    # The first connect to a broker has no session on it to lose.
    assert source.alarm is None
    assert not [e for e in logs if e["log_level"] == "error"]


async def test_a_button_link_moves_to_the_next_broker_when_its_broker_dies(
    tmp_path: Path, second_broker: KillableMosquitto
) -> None:
    first = KillableMosquitto(tmp_path / "first")
    first.start()
    try:
        async with broker_link(
            first.host, first.port, f"sim-failover-{uuid.uuid4().hex[:8]}",
            fallback_brokers=[(second_broker.host, second_broker.port)],
        ) as link:
            assert link.broker == (first.host, first.port)
            on_first = await link.connection()
            await asyncio.to_thread(first.kill9)
            assert not await on_first.wait(None, DEADLINE_S)  # ends early: it is lost
            assert on_first.lost
            async with asyncio.timeout(DEADLINE_S):
                on_second = await link.connection()
            assert (link.broker, link.reconnects) == ((second_broker.host, second_broker.port), 1)
            assert await on_second.publish("panicd/v1/test", b"x", DEADLINE_S)
    finally:
        first.stop()


async def test_a_button_link_fails_its_first_connect_only_when_no_broker_answers(
    second_broker: KillableMosquitto,
) -> None:
    dead = ("127.0.0.1", free_port())
    async with broker_link(*dead, "sim-first-dead",
                           fallback_brokers=[(second_broker.host, second_broker.port)]) as link:
        assert (link.broker, link.reconnects) == ((second_broker.host, second_broker.port), 0)
    with pytest.raises(ExceptionGroup) as caught:  # the link's TaskGroup wraps the error
        async with broker_link(*dead, "sim-nobody",
                               fallback_brokers=[("127.0.0.1", free_port())]):
            pass
    assert caught.value.subgroup(aiomqtt.MqttError) is not None


# --- the real panicd, a storm, and the first broker SIGKILLed ---------------------------

BUTTONS = 100
RATE = 200.0
PRESSES = 1200
COUNTER_BASE = 1000






@pytest.mark.slow
def test_first_broker_killed_mid_storm_panicd_and_buttons_fail_over_and_nothing_is_lost(
    tmp_path: Path, second_broker: KillableMosquitto,
    record_property: Callable[[str, object], None],
) -> None:
    first = KillableMosquitto(tmp_path / "first")
    first.start()
    try:
        config, keys, devices = write_fleet(
            tmp_path / "cfg", devices=BUTTONS, mqtt_port=first.port, client_id="panicd-failover"
        )
        _two_broker_toml(config, first.port, second_broker.port)
        database = tmp_path / "cfg" / "panicd.sqlite3"
        results: list[StormResult] = []
        errors: list[BaseException] = []

        def press() -> None:
            try:
                results.append(asyncio.run(storm(
                    first.host, first.port, devices, count=PRESSES, rate=RATE,
                    counter_base=COUNTER_BASE, retransmit=True, feedback_grace_s=20.0,
                    client_id="failover-storm",
                    fallback_brokers=[(second_broker.host, second_broker.port)],
                )))
            except BaseException as exc:  # handed to the test thread, which fails with it
                errors.append(exc)
                raise

        with DaemonProcess(config, keys, tmp_path / "run") as daemon:
            assert daemon.process is not None
            pid = daemon.process.pid
            buttons = threading.Thread(target=press, name="storm")
            started = time.monotonic()
            buttons.start()
            sending_s = PRESSES / RATE
            time.sleep(max(0.0, started + sending_s / 2 - time.monotonic()))
            first.kill9()  # and it stays dead: no restart saves anything here
            buttons.join(timeout=sending_s + 60)
            assert not buttons.is_alive(), "the storm did not end by itself"
            assert not errors, f"the storm failed: {errors!r}"
            (result,) = results
            wait_until("SELECT COUNT(*) FROM presses", database, len(result.sent), 5.0)
            survived = daemon.process.poll() is None and daemon.process.pid == pid
            connected = daemon.events("mqtt.connected")
            dropped = daemon.events("mqtt.disconnected")
            lost_alarms = daemon.events("mqtt.session_lost")
            assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        first.stop()
    stored = stored_presses(database)
    lost = sorted(key for key in result.sent if key not in stored)
    twice = sorted(key for key, rows in stored.items() if rows > 1)
    figures = (f"{result.summary()} stored={len(stored)} lost={len(lost)} twice={len(twice)}"
               f" panicd_connects={[e['broker'] for e in connected]}")
    record_property("mqtt_failover", figures)

    assert len(result.sent) == PRESSES, figures
    assert lost == [], f"presses lost: {lost[:10]} ({figures})"
    assert twice == [], f"presses stored twice: {twice[:10]} ({figures})"
    assert result.unconfirmed() == [], f"no feedback: {result.unconfirmed()[:10]} ({figures})"
    assert result.forged_feedback == 0, figures
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0, figures
    # The buttons moved too: their links were re-made on the second broker.
    assert result.reconnects >= 1, figures
    # panicd was never restarted: the same process connected to the first broker, then,
    # by itself, to the second; its first connect there finds no session and that is
    # expected, not an alarm.
    assert survived, figures
    assert [e["broker"] for e in connected] == [
        f"127.0.0.1:{first.port}", f"127.0.0.1:{second_broker.port}"
    ], figures
    assert lost_alarms == [], figures
    # Straight to the second broker on the loss, without waiting the reconnect backoff.
    assert [(e["broker"], e["next_broker"], e["retry_in_s"]) for e in dropped] == [
        (f"127.0.0.1:{first.port}", f"127.0.0.1:{second_broker.port}", 0.0)
    ], figures
