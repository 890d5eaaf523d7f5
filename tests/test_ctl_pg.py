"""panicctl on a shared PostgreSQL store: the same views as on SQLite, the instances with
their heartbeats, and an ack recorded in the database when no instance answers here.

Issue 13 items 3 and 8: webhooks, ack links and panicctl work against any instance, and
``panicctl status`` lists the instances with their last heartbeat. A real daemon on a
private PostgreSQL stores the incident; panicctl reads it as an operator would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import write_fleet
from panicd.cli import main
from tests.daemon_proc import DaemonProcess, count_rows, wait_until
from tests.dispatch_e2e import (
    RecordingPeer,
    client_id,
    deploy,
    policies_toml,
    press_panic,
    rows,
    shared_store,
    twilio_env,
    twilio_peer,
)

__all__ = ["client_id", "shared_store", "twilio_env", "twilio_peer"]  # fixtures used by name


def _run(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.usefixtures("twilio_env")
def test_panicctl_reads_lists_instances_and_acks_on_a_shared_store(  # noqa: PLR0917 -- fixtures
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    shared_store: str, capsys: pytest.CaptureFixture[str],
) -> None:
    pg_database = shared_store
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(60),
                  store_url=pg_database)
    with DaemonProcess(site.config, site.keys, tmp_path / "run"):
        press_panic(mosquitto, site.devices[0])
        assert wait_until("SELECT COUNT(*) FROM incidents", pg_database, 1, 30) == 1
        assert wait_until("SELECT COUNT(*) FROM instances", pg_database, 1, 30) == 1
        # One listening connection for the instance, its dispatcher's: device health
        # (and panicctl, below) never wait on a peer's commit. There were two.
        assert _wake_connections(pg_database) == 1

        code, out, _ = _run(capsys, site.config, "incidents", "--open", "--json")
        assert code == 0
        (listed,) = json.loads(out)
        assert (listed["id"], listed["status"], listed["device_id"]) == (
            1, "open", site.devices[0].id)

        code, out, _ = _run(capsys, site.config, "show", "1", "--json")
        assert code == 0
        assert json.loads(out)["id"] == 1

        code, out, err = _run(capsys, site.config, "status", "--json")
        assert (code, err) == (0, "")
        status = json.loads(out)
        assert [i["instance_id"] for i in status["instances"]] == [
            next(r[0] for r in rows(pg_database, "SELECT instance_id FROM instances"))]
        assert status["instances"][0]["is_leader"] is True
        code, out, _ = _run(capsys, site.config, "status")
        assert "Instances: 1" in out
        assert "device health" in out
        assert _wake_connections(pg_database) == 1

    # No instance answers here now: the ack goes into the database, as any instance
    # would record it, and the first ack wins.
    code, out, err = _run(capsys, site.config, "ack", "1", "--by", "ani", "--json")
    assert code == 0, err
    reply = json.loads(out)
    assert (reply["first"], reply["via"], reply["handled_by"]) == (True, "database", "Ani Rahayu")
    assert rows(pg_database, "SELECT person_id, first FROM acks") == [("ani", 1)]
    assert count_rows(pg_database, "SELECT COUNT(*) FROM incidents WHERE status ="
                                   " 'acknowledged'") == 1
    code, out, _ = _run(capsys, site.config, "ack", "1", "--by", "budi", "--json")
    assert code == 0
    reply = json.loads(out)
    assert (reply["first"], reply["handled_by"]) == (False, "Ani Rahayu")

    code, out, _ = _run(capsys, site.config, "purge", "--older-than", "1", "--dry-run",
                        "--json")
    assert code == 0
    assert json.loads(out)["dry_run"] is True


def test_check_config_of_a_postgresql_store_names_the_store_and_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # It once raised "needs a SQLite store" while printing the summary.
    url = "postgresql://panicd@db.example:5432/panicd"
    config, _keys, _devices = write_fleet(tmp_path, devices=1, mqtt_port=1883,
                                          client_id="ctl-check", store_url=url)
    code, out, err = _run(capsys, config, "check-config", "--json")
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert (summary["store"], summary["database"]) == (url, None)


def _wake_connections(database: str) -> int:
    """LISTEN connections open on ``database`` (they name themselves panicd-wake …)."""
    return count_rows(database, "SELECT COUNT(*) FROM pg_stat_activity WHERE datname ="
                                " current_database() AND application_name LIKE 'panicd-wake %'")
