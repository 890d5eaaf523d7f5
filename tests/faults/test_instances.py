"""Three live panicd instances on one PostgreSQL; one of them SIGKILLed ten times.

Issue 13 item 6 (proof). Three instances share one PostgreSQL database and one broker,
each with its own persistent MQTT session, so every instance receives every press. A
storm of 5,000 signed presses from 500 buttons (450 heartbeating, 50 pressing panic
twice: 50 incidents, opened through the storm, that escalate through two levels with
nobody answering, six pages each through Prism behind the recording peer) runs while,
every couple of seconds, one random instance is SIGKILLed and started again, ten times.
The buttons retransmit until they hear "received" (docs/FRAMES.md). Afterwards, counted
in the database and at the provider: no acknowledged press lost, none stored twice, one
incident per panic button, every step fired once (by whichever instance), every page
accepted by the provider once.

``failover`` is measured per kill as the longest any step due from the kill on waited
past its due time before some instance fired it (docs/HA.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
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
    rows,
    shared_store,
    twilio_env,
    twilio_peer,
)
from tests.faults.test_crash import UNSETTLED

__all__ = ["client_id", "shared_store", "twilio_env", "twilio_peer"]  # fixtures used by name

pytestmark = pytest.mark.slow

INSTANCES = 3
BUTTONS = 500
# Each panic button presses twice (PanicAndHeartbeats), spread over the storm so that
# incidents open and steps fall due through all ten kills; the second press joins the
# first one's burst.
PANIC_BUTTONS = 50
PRESSES = 5_000
RATE = 250.0
KILLS = 10
KILL_EVERY_S = 2.0
DOWN_S = 0.5
LEVEL_WAIT_S = 6
# How long after a kill a step's due time may fall and still count for that kill.
FAILOVER_WINDOW_S = 5.0


def _step_failover(kills: list[float], steps: list[tuple[object, ...]]) -> list[float | None]:
    """Per kill: the longest a step due in the window after it waited past its due time
    (None when no step fell due then)."""
    figures: list[float | None] = []
    for at in kills:
        waits = [float(str(fired)) - float(str(due)) for due, fired in steps
                 if at <= float(str(due)) < at + FAILOVER_WINDOW_S]
        figures.append(max(waits) if waits else None)
    return figures


@pytest.mark.usefixtures("twilio_env")
def test_three_instances_lose_nothing_and_double_nothing_across_ten_kills(  # noqa: PLR0917 -- fixtures
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    shared_store: str, fault_report: Callable[[str], None],
) -> None:
    pg_database = shared_store
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(LEVEL_WAIT_S),
                  buttons=BUTTONS, store_url=pg_database)
    configs = instance_configs(site, INSTANCES, client_id)
    chance = random.Random(1304)
    panic, heartbeat = site.devices[:PANIC_BUTTONS], site.devices[PANIC_BUTTONS:]
    buttons = PanicAndHeartbeats(mosquitto.host, mosquitto.port, panic, heartbeat,
                                 presses=PRESSES, rate=RATE, feedback_grace_s=90.0,
                                 client_id=client_id)

    running = [DaemonProcess(config, site.keys, tmp_path / f"i{k}-run0")
               for k, config in enumerate(configs)]
    everyone = list(running)
    for daemon in running:
        daemon.start()
    kills: list[float] = []
    started = time.monotonic()
    buttons.start()
    try:
        for n in range(1, KILLS + 1):
            time.sleep(max(0.0, started + n * KILL_EVERY_S - time.monotonic()))
            k = chance.randrange(INSTANCES)
            running[k].kill9()
            kills.append(time.time())
            time.sleep(DOWN_S)
            running[k] = DaemonProcess(configs[k], site.keys, tmp_path / f"i{k}-run{n}")
            everyone.append(running[k])
            running[k].start()
        assert buttons.join(180), "the storm did not end"
        settle_s = _settle(site.database, PRESSES, 120)
        for daemon in running:
            assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        for daemon in everyone:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.kill9()
        forget_sessions(mosquitto, [f"{client_id}-{k}" for k in range(INSTANCES)])

    database = site.database
    outcome = count_outcome(database, buttons.results.values(), twilio_peer,
                            site.public_url, everyone)
    steps = rows(database, "SELECT due_at, fired_at FROM escalation_steps"
                           " WHERE state = 'fired'")
    failover = [f for f in _step_failover(kills, steps) if f is not None]
    fault_report(
        f"{INSTANCES} instances on PostgreSQL, SIGKILL x{len(kills)}: {outcome.report()};"
        f" steps {len(steps)}; step failover max {max(failover, default=0.0):.2f} s over"
        f" {len(failover)} kills; settled {settle_s:.1f} s after the storm"
    )
    assert outcome.sent == PRESSES
    assert (outcome.lost, outcome.stored_twice, outcome.unconfirmed) == (0, 0, 0)
    assert outcome.incidents == sorted((device.id, 1) for device in panic)
    assert len(steps) == 2 * PANIC_BUTTONS
    assert (outcome.steps_fired_twice, outcome.pages_twice, outcome.pages_never) == (0, 0, 0)
    assert outcome.alerts == 6 * PANIC_BUTTONS
    assert duplicated_outbox_keys(database) == []
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0


def _settle(database: str | Path, presses: int, timeout_s: float) -> float:
    """Wait until every press is stored and no step or page is left; seconds taken."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        try:
            if (count_rows(database, "SELECT COUNT(*) FROM presses") >= presses
                    and count_rows(database, UNSETTLED) == 0):
                return time.monotonic() - started
        except LookupError:
            pass
        time.sleep(0.2)
    raise AssertionError("presses, steps or pages left undone")
