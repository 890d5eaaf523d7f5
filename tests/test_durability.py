"""Kill -9 in the middle of a storm: nothing acknowledged is lost, nothing is stored twice.

DESIGN §2 Durability. The broker holds every press panicd has not acknowledged (QoS 1,
persistent session), and panicd acknowledges only after COMMIT; so after a SIGKILL and a
restart, every press must be in the database exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import write_fleet
from firmware_sim.storm import StormResult, storm
from tests.daemon_proc import DaemonProcess, count_rows, wait_until

PRESSES = 3000


@pytest.mark.slow
def test_kill_9_mid_storm_then_restart_stores_every_press_exactly_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config, keys, devices = write_fleet(
        tmp_path / "cfg", devices=60, mqtt_port=mosquitto.port, client_id="panicd-durability"
    )
    database = tmp_path / "cfg" / "panicd.sqlite3"
    daemon = DaemonProcess(config, keys, tmp_path / "run")
    results: list[StormResult] = []

    def publish() -> None:
        results.append(
            asyncio.run(
                storm(mosquitto.host, mosquitto.port, devices, count=PRESSES, rate=1000,
                      counter_base=1000, duplicate_ratio=0.1, via_gateway="gw-sim")
            )
        )

    with daemon:
        publisher = threading.Thread(target=publish, name="storm")
        publisher.start()
        seen = wait_until("SELECT COUNT(*) FROM presses", database, PRESSES // 3, 60)
        assert seen >= PRESSES // 3, daemon.log()
        daemon.kill9()
        at_kill = count_rows(database, "SELECT COUNT(*) FROM presses")
        publisher.join(timeout=120)
        assert not publisher.is_alive()
        # The storm went on while panicd was dead: the broker kept those for its session.
        assert at_kill < PRESSES

        daemon.start()
        stored = wait_until("SELECT COUNT(*) FROM presses", database, PRESSES, 90)
        time.sleep(1.0)  # let any (wrong) redelivered copy arrive before we count again
        assert daemon.terminate() == 0

    (result,) = results
    assert len(result.sent) == PRESSES
    assert stored == PRESSES
    assert count_rows(database, "SELECT COUNT(*) FROM presses") == PRESSES
    assert count_rows(
        database,
        "SELECT COUNT(*) FROM (SELECT device_id, counter FROM presses"
        " GROUP BY device_id, counter HAVING COUNT(*) > 1)",
    ) == 0
    # Every sent (device, counter) is there: compare the sets, not just the counts.


    conn = sqlite3.connect(database)
    try:
        stored_keys = set(conn.execute("SELECT device_id, counter FROM presses"))
        relayed = conn.execute(
            "SELECT COUNT(*) FROM press_paths WHERE path LIKE '%/gw/gw-sim/up'"
        ).fetchone()[0]
    finally:
        conn.close()
    assert stored_keys == set(result.sent)
    # Heard-twice copies through the relay were recorded as paths of the same press.
    assert relayed == result.duplicates
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0
