"""panicctl status, devices, reassign, test-press, backup and purge against databases
produced by the real pipeline, and (status, test-press, reassign) against the real
``panicd`` subprocess on the real Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from firmware_sim.broker import Mosquitto
from gateway.dedup import DedupPolicy
from gateway.ingest import Ingestor
from gateway.model import PressKind
from panicd.cli import main
from store.sqlite import SqliteStore
from tests.daemon_proc import DaemonProcess
from tests.pipeline import T0, Collector, Fleet, frame_bytes, make_fleet, rows

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "config" / "demo"


def _dispatch_toml(directory: Path) -> str:
    return (
        f'\n[dispatch]\nresponders = "{DEMO / "responders.toml"}"\n'
        f'policies = "{DEMO / "policies.toml"}"\npublic_base_url = "http://127.0.0.1:9"\n'
        f'listen_host = "127.0.0.1"\nlisten_port = 0\n'
        f'control_socket = "{directory / "control.sock"}"\n'
    )


async def _populate(fleet: Fleet) -> None:
    one, two, three = fleet.devices
    async with (
        SqliteStore(fleet.database) as store,
        Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor,
    ):
        pipe = Collector(ingestor)
        await pipe.send(pipe.item(frame_bytes(one, 1, battery=12), at=T0))
        await pipe.send(pipe.item(frame_bytes(two, 1), at=T0 + 10))
        await pipe.send(pipe.item(frame_bytes(two, 2, PressKind.CANCEL), at=T0 + 20))
        await pipe.send(pipe.item(b"garbage", at=T0 + 40))
    del three  # never heard: "never_seen"


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """An open incident (low battery), a cancelled one, a silent device and a dead letter."""
    directory = tmp_path / "cfg"
    fleet = make_fleet(directory, extra_toml=_dispatch_toml(directory))
    with structlog.testing.capture_logs():
        asyncio.run(_populate(fleet))
    return fleet


def _run(capsys: pytest.CaptureFixture[str], fleet: Fleet, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(fleet.config_path), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_without_the_daemon_shows_the_database_and_exits_1(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, err = _run(capsys, fleet, "status", "--json")
    assert code == 1
    assert err.startswith("panicctl: daemon not reachable (")
    snap: dict[str, Any] = json.loads(out)
    assert snap["daemon"]["reachable"] is False
    assert [i["id"] for i in snap["open_incidents"]] == [1]
    assert snap["sources"] == [{"name": "local", "kind": "mqtt", "connected": None,
                                "since": None, "since_epoch": None}]
    code, out, _ = _run(capsys, fleet, "status")
    assert code == 1
    assert "NOT REACHABLE" in out
    assert "Open incidents: 1" in out


def test_status_without_the_daemon_says_why_in_plain_words(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, _, err = _run(capsys, fleet, "status")
    assert code == 1
    # Not aiohttp's TCP wording ("Cannot connect to unix socket … ssl:default […]").
    socket_path = fleet.config_path.parent / "control.sock"
    assert err == (f"panicctl: daemon not reachable ({socket_path}: No such file or "
                   "directory); showing the database only\n")


def test_status_flags_urgent_incidents_as_incidents_does(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    with sqlite3.connect(fleet.database) as conn:
        conn.execute("UPDATE incidents SET urgent = 1 WHERE id = 1")
    _, listed, _ = _run(capsys, fleet, "incidents", "--open")
    _, out, _ = _run(capsys, fleet, "status")
    lines = out.splitlines()
    header = lines.index("Open incidents: 1") + 1
    assert lines[header].split()[:3] == ["ID", "STATUS", "FLAGS"]
    assert lines[header + 1].split()[:3] == ["1", "open", "URGENT"]
    assert listed.splitlines()[1].split()[:3] == ["1", "open", "URGENT"]


def test_status_and_devices_agree_on_what_is_unhealthy(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    # SIM-00000 reported 12 % (low battery, and silent since T0), SIM-00001 is silent,
    # SIM-00002 was never heard; the health monitor (no daemon here) raised nothing.
    _, out, _ = _run(capsys, fleet, "devices", "--json")
    expected = sorted((f"device:{d['id']}", c) for d in json.loads(out)
                      for c in d["state"].split(",") if d["state"] != "ok")
    _, out, _ = _run(capsys, fleet, "status", "--json")
    unhealthy = json.loads(out)["unhealthy"]
    assert sorted((u["subject"], u["condition"]) for u in unhealthy) == expected
    assert ("device:SIM-00000", "low_battery") in expected
    _, out, _ = _run(capsys, fleet, "status")
    assert f"Unhealthy: {len(expected)}" in out.splitlines()


def test_unhealthy_keeps_a_raised_battery_alert_until_the_monitor_would_clear_it(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    # 22 % is above the 20 % threshold but within the 5-point clearing margin: once the
    # monitor raised low_battery, both views keep showing it (and the source alert too).
    with sqlite3.connect(fleet.database) as conn:
        conn.execute("UPDATE devices SET battery = 22 WHERE id = 'SIM-00000'")
        conn.execute("INSERT INTO device_health (subject, condition, raised_at)"
                     " VALUES ('device:SIM-00000', 'low_battery', ?),"
                     " ('source:local', 'source_down', ?)", (T0, T0 + 5))
    _, out, _ = _run(capsys, fleet, "devices", "--json")
    assert "low_battery" in {d["id"]: d for d in json.loads(out)}["SIM-00000"]["state"]
    _, out, _ = _run(capsys, fleet, "status", "--json")
    by_key = {(u["subject"], u["condition"]): u for u in json.loads(out)["unhealthy"]}
    assert by_key["device:SIM-00000", "low_battery"]["raised_at_epoch"] == T0
    assert by_key["source:local", "source_down"]["raised_at_epoch"] == T0 + 5
    assert by_key["device:SIM-00001", "offline"]["raised_at"] is None


def test_devices_shows_last_seen_battery_and_filters(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, _ = _run(capsys, fleet, "devices", "--json")
    assert code == 0
    by_id = {d["id"]: d for d in json.loads(out)}
    assert by_id["SIM-00000"]["battery"] == 12
    assert by_id["SIM-00000"]["last_seen_at_epoch"] == T0
    assert by_id["SIM-00000"]["last_seen_at"] == "2025-06-15T22:06:40.000+07:00"
    assert "low_battery" in by_id["SIM-00000"]["state"]
    assert by_id["SIM-00002"]["state"] == "never_seen"
    # T0 is long past: every heard device is silent beyond 1.5 x its hour now.
    assert "offline" in by_id["SIM-00001"]["state"]
    _, out, _ = _run(capsys, fleet, "devices", "--low-battery", "--json")
    assert [d["id"] for d in json.loads(out)] == ["SIM-00000"]
    _, out, _ = _run(capsys, fleet, "devices", "--offline")
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["DEVICE", "STATE", "LAST", "SEEN"]
    assert [line.split()[0] for line in lines] == ["SIM-00000", "SIM-00001", "SIM-00002"]
    assert "12%" in lines[0]


def test_backup_is_a_readable_copy_and_refuses_to_overwrite(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, tmp_path: Path
) -> None:
    target = tmp_path / "backup.sqlite3"
    code, out, _ = _run(capsys, fleet, "backup", str(target), "--json")
    assert code == 0
    assert json.loads(out)["incidents"] == 2
    for table in ("incidents", "presses", "incident_events", "dead_letters", "devices"):
        sql = f"SELECT * FROM {table} ORDER BY 1"
        assert rows(target, sql) == rows(fleet.database, sql)
    assert rows(target, "PRAGMA integrity_check") == [("ok",)]
    code, _, err = _run(capsys, fleet, "backup", str(target))
    assert code == 2
    assert "exists (use --force" in err
    code, out, _ = _run(capsys, fleet, "backup", str(target), "--force")
    assert (code, out.startswith(f"backup written to {target}")) == (0, True)


def test_purge_deletes_closed_incidents_and_old_rows_but_keeps_open_ones(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    before = rows(fleet.database, "SELECT COUNT(*) FROM presses")
    code, out, _ = _run(capsys, fleet, "purge", "--older-than", "1", "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["deleted"]["incidents"] == 1
    assert report["deleted"]["presses"] == 2
    assert report["deleted"]["dead_letters"] == 1
    assert rows(fleet.database, "SELECT COUNT(*) FROM presses") == before
    code, out, _ = _run(capsys, fleet, "purge", "--older-than", "1")
    assert code == 0
    assert "deleted" in out
    assert rows(fleet.database, "SELECT id, status FROM incidents") == [(1, "open")]
    assert rows(fleet.database, "SELECT DISTINCT incident_id FROM incident_events") == [(1,)]
    assert rows(fleet.database, "SELECT COUNT(*) FROM dead_letters") == [(0,)]
    assert rows(fleet.database, "SELECT incident_id FROM presses") == [(1,)]
    # Too recent: nothing goes.
    code, out, _ = _run(capsys, fleet, "purge", "--older-than", "100000", "--json")
    assert set(json.loads(out)["deleted"].values()) == {0}
    assert _run(capsys, fleet, "purge", "--older-than", "0")[0] == 2


def test_an_acknowledged_incident_is_never_purged(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    conn = sqlite3.connect(fleet.database)
    with conn:
        conn.execute("UPDATE incidents SET status = 'acknowledged' WHERE id = 1")
    conn.close()
    _run(capsys, fleet, "purge", "--older-than", "1")
    assert rows(fleet.database, "SELECT id, status FROM incidents") == [(1, "acknowledged")]


def test_reassign_without_the_daemon_exits_1(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, _, err = _run(capsys, fleet, "reassign", "1", "--to", "lurah-klegen")
    assert code == 1
    assert "cannot reach panicd" in err


@pytest.fixture
def client_id(mosquitto: Mosquitto) -> Iterator[str]:
    """A fresh persistent-session client id, forgotten by the broker afterwards."""
    name = f"panicd-ctl-{uuid.uuid4().hex[:10]}"
    yield name

    async def forget() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                                  clean_session=True):
            pass

    asyncio.run(forget())


@pytest.mark.slow
def test_status_test_press_and_reassign_through_the_running_daemon(
    capsys: pytest.CaptureFixture[str], mosquitto: Mosquitto, tmp_path: Path, client_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = tmp_path / "cfg"
    fleet = make_fleet(directory, devices=2, mqtt_port=mosquitto.port, client_id=client_id,
                       extra_toml=_dispatch_toml(directory))
    monkeypatch.setenv("PANICD_DEVICE_KEYS_FILE", str(fleet.keys_path))
    with DaemonProcess(fleet.config_path, fleet.keys_path, tmp_path / "run") as daemon:
        code, out, err = _run(capsys, fleet, "status", "--json")
        assert (code, err) == (0, ""), daemon.log()
        snap = json.loads(out)
        assert snap["daemon"]["reachable"] is True
        assert [(s["name"], s["connected"]) for s in snap["sources"]] == [("local", True)]
        assert snap["open_incidents"] == []

        code, out, err = _run(capsys, fleet, "test-press", "SIM-00000", "--json")
        assert (code, err) == (0, ""), daemon.log()
        result = json.loads(out)
        assert result["received"] is True
        incident = result["feedback"]["incident"]
        (test_flag,) = rows(fleet.database, "SELECT test FROM incidents WHERE id = ?",
                            (incident,))
        assert test_flag == (1,)

        code, out, _ = _run(capsys, fleet, "reassign", str(incident), "--to", "lurah-klegen",
                            "--by", "Operator Rina")
        assert code == 0, out
        assert out.startswith(f"incident {incident}: paging lurah-klegen")
        events = rows(fleet.database, "SELECT event, actor FROM incident_events"
                      " WHERE incident_id = ? AND event = 'incident.reassigned'", (incident,))
        assert events == [("incident.reassigned", "Operator Rina")]
        pages = rows(fleet.database, "SELECT channel FROM outbox WHERE incident_id = ?"
                     " AND person_id = 'lurah-klegen' ORDER BY channel", (incident,))
        assert pages == [("sms",), ("voice",)]

        assert _run(capsys, fleet, "reassign", str(incident), "--to", "nobody")[0] == 2
        assert _run(capsys, fleet, "reassign", "999", "--to", "lurah-klegen")[0] == 1
        assert _run(capsys, fleet, "test-press", "NO-SUCH")[0] == 1
        assert daemon.terminate() == 0
