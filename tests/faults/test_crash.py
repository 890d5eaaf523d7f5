"""panicd SIGKILLed at random moments, 3 times, during a storm of mixed presses with
dispatch running.

Issue 12 item 5 (crash). Twenty buttons press panic, test and heartbeat frames for 8 s at
150/s; each retransmits until panicd's "received" (docs/FRAMES.md). panicd, paging
through Prism behind the recording peer, is killed at three random moments of the storm
and started again 0.3 s later. Afterwards: every press a button made is stored once and
was confirmed; each button has one panic incident and its test incident; every incident
has its notifications — both levels of every panic incident and the operations level
of every test incident fired once, each page accepted by the provider exactly once — and
no escalation step fired twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.storm import StormResult, storm
from gateway.model import PressKind
from tests.daemon_proc import DaemonProcess, count_rows
from tests.dispatch_e2e import (
    RecordingPeer,
    client_id,
    deploy,
    duplicated_outbox_keys,
    policies_toml,
    rows,
    steps_fired,
    twilio_env,
    twilio_peer,
)

__all__ = ["client_id", "twilio_env", "twilio_peer"]  # fixtures used by name

pytestmark = pytest.mark.slow

BUTTONS = 20
PRESSES = 1200
RATE = 150.0
KILLS = 3
DOWN_S = 0.3
LEVEL_WAIT_S = 3
MIX = (PressKind.PANIC, PressKind.HEARTBEAT, PressKind.TEST, PressKind.PANIC,
       PressKind.HEARTBEAT)
UNSETTLED = (
    "SELECT (SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending')"
    " + (SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending'))"
)


def settle(database: Path | str, presses: int, timeout_s: float) -> None:
    """Until every press is stored and no step or page is left to do."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stored = count_rows(database, "SELECT COUNT(*) FROM presses")
            if stored >= presses and count_rows(database, UNSETTLED) == 0:
                return
        except Exception:  # noqa: BLE001 -- the file is being written: look again
            pass
        time.sleep(0.2)
    raise AssertionError("presses, steps or pages left undone")


@pytest.mark.usefixtures("twilio_env")
def test_every_press_stored_once_and_every_incident_paged_once_across_random_kills(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    fault_report: Callable[[str], None],
) -> None:
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(LEVEL_WAIT_S),
                  buttons=BUTTONS)
    chance = random.Random(1203)
    storm_s = PRESSES / RATE
    # One random moment in each third of the storm.
    kill_at = [chance.uniform(storm_s * k / KILLS, storm_s * (k + 1) / KILLS)
               for k in range(KILLS)]
    results: list[StormResult] = []

    def publish() -> None:
        results.append(asyncio.run(storm(
            mosquitto.host, mosquitto.port, site.devices, count=PRESSES, rate=RATE,
            counter_base=1, kinds=MIX, retransmit=True, feedback_grace_s=60.0,
        )))

    daemons = [DaemonProcess(site.config, site.keys, tmp_path / "run0")]
    daemons[0].start()
    publisher = threading.Thread(target=publish, name="storm")
    started = time.monotonic()
    publisher.start()
    try:
        for n, at in enumerate(kill_at, 1):
            time.sleep(max(0.0, started + at - time.monotonic()))
            daemons[-1].kill9()
            time.sleep(DOWN_S)
            daemons.append(DaemonProcess(site.config, site.keys, tmp_path / f"run{n}"))
            daemons[-1].start()
        publisher.join(timeout=120)
        assert not publisher.is_alive(), "the storm did not end"
        settle(site.database, PRESSES, 90)
        assert daemons[-1].terminate() == 0
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.kill9()

    (result,) = results
    database = site.database
    stored = rows(database, "SELECT device_id, counter, COUNT(*) FROM presses"
                            " GROUP BY device_id, counter")
    twice = sum(1 for *_, n in stored if int(str(n)) > 1)
    lost = set(result.sent) - {(str(d), int(str(c))) for d, c, _ in stored}
    unconfirmed = set(result.sent) - set(result.feedback)
    incidents = rows(database, "SELECT device_id, test, COUNT(*) FROM incidents"
                               " GROUP BY device_id, test")
    alerts = rows(database, "SELECT id, channel, state FROM outbox WHERE purpose = 'alert'")
    accepted = {**twilio_peer.creates("Messages.json"), **twilio_peer.creates("Calls.json")}
    callbacks = [f"{site.public_url}/twilio/status/{'sms' if ch == 'sms' else 'call'}/{i}"
                 for i, ch, _ in alerts]
    pages_twice = sum(1 for key in callbacks if accepted.get(key, 0) > 1)
    pages_never = sum(1 for key in callbacks if key not in accepted)
    due_lines = steps_fired(daemons)
    steps_twice = sum(1 for n in due_lines.values() if n > 1)
    fault_report(
        f"panicd SIGKILL x{KILLS} at {', '.join(f'{t:.1f}' for t in kill_at)} s of a mixed"
        f" storm: presses {len(result.sent)}, stored {len(stored)}, lost {len(lost)}, twice"
        f" {twice}, unconfirmed {len(unconfirmed)}, retransmissions"
        f" {result.retransmissions}; incidents {sum(int(str(n)) for *_, n in incidents)},"
        f" pages {len(alerts)}, pages twice {pages_twice}, never sent {pages_never},"
        f" steps fired twice {steps_twice}"
    )
    assert len(result.sent) == PRESSES
    assert (lost, twice, unconfirmed) == (set(), 0, set())
    # One panic incident and one test incident per button, however often it was killed.
    assert sorted((str(d), int(str(t)), int(str(n))) for d, t, n in incidents) == sorted(
        (device.id, test, 1) for device in site.devices for test in (0, 1))
    # Every panic incident's two levels fired once, with all six pages sent once; every
    # test incident's one level (operations) once, with its page.
    steps = rows(database, "SELECT incident_id, level, state FROM escalation_steps")
    assert len(steps) == 3 * BUTTONS and {s for *_, s in steps} == {"fired"}
    assert {s for *_, s in alerts} == {"sent"}
    assert (pages_twice, pages_never, steps_twice) == (0, 0, 0)
    assert duplicated_outbox_keys(database) == []
    per_incident = rows(database, "SELECT i.test, COUNT(o.id) FROM incidents i LEFT JOIN"
                                  " outbox o ON o.incident_id = i.id AND o.purpose = 'alert'"
                                  " GROUP BY i.id")
    assert {(int(str(t)), int(str(n))) for t, n in per_incident} <= {(0, 6), (1, 1)}
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0
