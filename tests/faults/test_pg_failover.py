"""The PostgreSQL primary lost mid-storm and its synchronous standby promoted.

Issue 13 item 8 ("what happens when the primary dies", docs/HA.md). A private primary
with a synchronous standby (``pg_basebackup -R``, ``synchronous_standby_names``), two
live panicd instances whose ``[store] url`` lists both servers with
``target_session_attrs=read-write``, one Mosquitto. 200 buttons (20 pressing panic
twice: 20 incidents escalating through two levels with nobody answering) send 2,000
signed presses and retransmit until they hear "received". Four seconds in, the primary
crashes (``pg_ctl stop -m immediate``: no checkpoint, every connection cut); a second
later the standby is promoted. Afterwards, counted on the new primary and at the
provider: no press a button sent is missing or stored twice, every one was confirmed,
one incident per panic button, every step fired once, every page accepted by the
provider once, and both instances rode it out without a restart.

Before it ran, docs/HA.md could only say "not yet tested here" of this failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.pgserver import PostgresNotInstalledError, PostgresServer
from firmware_sim.storm import PanicAndHeartbeats
from tests.daemon_proc import DaemonProcess, count_rows
from tests.dispatch_e2e import (
    RecordingPeer,
    client_id,
    count_outcome,
    deploy,
    duplicated_outbox_keys,
    forget_sessions,
    instance_configs,
    policies_toml,
    twilio_env,
    twilio_peer,
)
from tests.faults.test_crash import settle

__all__ = ["client_id", "twilio_env", "twilio_peer"]  # fixtures used by name

pytestmark = pytest.mark.slow

INSTANCES = 2
BUTTONS = 200
PANIC_BUTTONS = 20
PRESSES = 2_000
RATE = 200.0
CRASH_AT_S = 4.0
DOWN_S = 1.0
LEVEL_WAIT_S = 3


@pytest.fixture
def replicated() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A private primary and its synchronous standby (stopped and removed afterwards)."""
    primary = PostgresServer()
    standby = PostgresServer(standby_of=primary, name="standby1")
    try:
        primary.start()
        standby.start()
    except PostgresNotInstalledError as exc:
        pytest.fail(f"{exc} -- the PostgreSQL tests need it, they are not skipped")
    try:
        primary.make_synchronous(standby)
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()


@pytest.mark.usefixtures("twilio_env")
def test_a_lost_primary_and_a_promoted_standby_lose_no_press_and_double_no_page(  # noqa: PLR0917 -- fixtures
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    replicated: tuple[PostgresServer, PostgresServer], fault_report: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    primary, standby = replicated
    monkeypatch.setenv("PANICD_ACK_SECRET", "failover-ack-link-key-" + "7" * 32)
    both = (f"postgresql://{primary.user}@{primary.host}:{primary.port},"
            f"{standby.host}:{standby.port}/{primary.database}"
            "?target_session_attrs=read-write")
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(LEVEL_WAIT_S),
                  buttons=BUTTONS, store_url=both)
    configs = instance_configs(site, INSTANCES, client_id)
    panic, heartbeat = site.devices[:PANIC_BUTTONS], site.devices[PANIC_BUTTONS:]
    buttons = PanicAndHeartbeats(mosquitto.host, mosquitto.port, panic, heartbeat,
                                 presses=PRESSES, rate=RATE, feedback_grace_s=90.0,
                                 client_id=client_id)

    instances = [DaemonProcess(config, site.keys, tmp_path / f"i{k}")
                 for k, config in enumerate(configs)]
    for daemon in instances:
        daemon.start()
    started = time.monotonic()
    buttons.start()
    try:
        time.sleep(CRASH_AT_S)
        stored_before = count_rows(standby.dsn, "SELECT COUNT(*) FROM presses")
        primary.crash()
        crashed = time.monotonic()
        time.sleep(DOWN_S)
        standby.promote()
        promoted_s = time.monotonic() - crashed
        assert buttons.join(180), "the storm did not end"
        ended = time.monotonic()
        settle(standby.dsn, PRESSES, 120)
        settle_s = time.monotonic() - ended
        alive = [daemon.process is not None and daemon.process.poll() is None
                 for daemon in instances]
        codes = [daemon.terminate() for daemon in instances]
    finally:
        for daemon in instances:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.kill9()
        forget_sessions(mosquitto, [f"{client_id}-{k}" for k in range(INSTANCES)])

    database = standby.dsn
    outcome = count_outcome(database, buttons.results.values(), twilio_peer, site.public_url,
                            instances)
    unavailable = sum(len(daemon.events("store.unavailable")) for daemon in instances)
    steps = count_rows(database, "SELECT COUNT(*) FROM escalation_steps WHERE state = 'fired'")
    fault_report(
        f"PostgreSQL primary crashed {CRASH_AT_S:.0f} s into the storm ({stored_before} presses"
        f" stored), standby promoted {promoted_s:.1f} s later, {INSTANCES} instances:"
        f" {outcome.report()}; steps {steps}; store.unavailable {unavailable}; settled"
        f" {settle_s:.1f} s after the storm, {time.monotonic() - started:.0f} s in all"
    )
    assert alive == [True] * INSTANCES, "an instance died with the primary"
    assert codes == [0] * INSTANCES
    assert 0 < stored_before < PRESSES, "the crash did not fall inside the storm"
    assert outcome.sent == PRESSES
    assert (outcome.lost, outcome.stored_twice, outcome.unconfirmed) == (0, 0, 0)
    assert outcome.incidents == sorted((device.id, 1) for device in panic)
    assert steps == 2 * PANIC_BUTTONS
    assert (outcome.steps_fired_twice, outcome.pages_twice, outcome.pages_never) == (0, 0, 0)
    assert outcome.alerts == 6 * PANIC_BUTTONS
    assert duplicated_outbox_keys(database) == []
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0

