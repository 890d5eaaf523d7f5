"""kill -9 panicd while escalation steps are pending; after a restart past their due time
the overdue step fires once and nothing fires twice (DESIGN §2: no escalation lives only
in memory)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from tests.daemon_proc import DaemonProcess, wait_until
from tests.dispatch_e2e import (
    RecordingPeer,
    client_id,
    deploy,
    duplicated_outbox_keys,
    policies_toml,
    press_panic,
    rows,
    twilio_env,
    twilio_peer,
)

__all__ = ["client_id", "twilio_env", "twilio_peer"]  # fixtures used by name

pytestmark = pytest.mark.slow

SENT_ALERTS = "SELECT COUNT(*) FROM outbox WHERE purpose = 'alert' AND state = 'sent'"


def test_an_overdue_step_fires_once_after_kill_9_and_restart(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    twilio_env: None,
) -> None:
    # Level 1 (ani, budi: SMS) then level 2 (dewi: SMS + call) due 3 s after opening.
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(3, '"sms"'))
    database = site.database
    daemon = DaemonProcess(site.config, site.keys, tmp_path / "run")
    with daemon:
        press_panic(mosquitto, site.devices[0])
        assert wait_until(SENT_ALERTS, database, 2, 30) == 2, daemon.log()
        assert rows(database, "SELECT level, state FROM escalation_steps ORDER BY level") == [
            (0, "fired"), (1, "pending")
        ]
        daemon.kill9()
    ((due_at, level_1_fired_at),) = rows(
        database, "SELECT MAX(due_at), MIN(fired_at) FROM escalation_steps"
    )
    assert isinstance(due_at, float)
    assert rows(database, "SELECT state FROM escalation_steps WHERE level = 1") == [
        ("pending",)
    ], "level 2 fired before the kill; the test proves nothing"

    # Stay down past the due time (a wait for the wall clock, not an assertion on it).
    time.sleep(max(0.0, due_at - time.time()) + 1.0)
    restarted = DaemonProcess(site.config, site.keys, tmp_path / "run2")
    with restarted:  # same config, same database
        assert wait_until(SENT_ALERTS, database, 4, 30) == 4, restarted.log()
        assert restarted.terminate() == 0

    steps = rows(database, "SELECT level, state, due_at, fired_at FROM escalation_steps"
                           " ORDER BY level")
    assert [(s[0], s[1]) for s in steps] == [(0, "fired"), (1, "fired")]
    assert steps[0][3] == level_1_fired_at  # level 1 was not fired again
    fired_at = steps[1][3]
    assert isinstance(fired_at, float) and fired_at > due_at
    assert duplicated_outbox_keys(database) == []
    ((total, distinct),) = rows(database, "SELECT COUNT(*), COUNT(DISTINCT key) FROM outbox")
    assert total == distinct
    per_key = rows(
        database,
        "SELECT level, person_id, channel, COUNT(*) FROM outbox WHERE purpose = 'alert'"
        " GROUP BY incident_id, level, person_id, channel ORDER BY level, person_id, channel",
    )
    assert per_key == [
        (0, "ani", "sms", 1), (0, "budi", "sms", 1), (1, "dewi", "sms", 1),
        (1, "dewi", "voice", 1),
    ]
    # One escalation.step_due log line per level across both runs.
    due_lines = [
        entry["level"]
        for line in (daemon.log() + restarted.log()).splitlines()
        if line.startswith("{") and (entry := json.loads(line)).get("event")
        == "escalation.step_due" and entry.get("incident") is not None
    ]
    assert sorted(due_lines) == [1, 2]
    # What reached the peer: the level 1 SMS once each, dewi's SMS and call once.
    alerts = [r for r in twilio_peer.requests if "/a/" in r.form.get("Body", "/a/")]
    assert sorted(r.form["To"] for r in alerts) == [
        "+628120001001", "+628120001002", "+628120009901", "+628120009901"
    ]
    assert all(r.status == 201 for r in alerts)
