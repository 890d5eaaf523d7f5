"""``panicctl`` in-process against a database written by the real ingest pipeline.

DESIGN §3: incidents (list/show timeline), dead letters, locate, check-config with clear
file+key errors; exit codes 0 / 1 (not found) / 2 (bad configuration).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway import queries
from gateway.cli import main
from gateway.dedup import DedupPolicy
from gateway.formats import native
from gateway.ingest import Ingestor
from gateway.model import PressKind
from gateway.store import SqliteStore
from tests.pipeline import T0, Collector, Fleet, frame_bytes, make_fleet
from tests.query_plans import whole_reads


@pytest.fixture
async def fleet(tmp_path: Path) -> Fleet:
    """A database with an open incident heard twice, a cancelled one, a test one and junk."""
    fleet = make_fleet(tmp_path / "cfg")
    async with (
        SqliteStore(fleet.database) as store,
        Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor,
    ):
        pipe = Collector(ingestor)
        # The pipeline's log lines would otherwise land in the stdout the tests read.
        with structlog.testing.capture_logs():
            await _populate(pipe, fleet)
    return fleet


async def _populate(pipe: Collector, fleet: Fleet) -> None:
    one, two, three = fleet.devices
    relay_topic = f"{native.TOPIC_PREFIX}gw/gw-sim/up"
    await pipe.send(
        pipe.item(frame_bytes(one, 1), at=T0, path="mqtt:local:direct"),
        pipe.item(frame_bytes(one, 1), at=T0 + 1, path="mqtt:local:relay", topic=relay_topic),
    )
    await pipe.send(pipe.item(frame_bytes(two, 1), at=T0 + 10))
    await pipe.send(pipe.item(frame_bytes(two, 2, PressKind.CANCEL), at=T0 + 20))
    await pipe.send(pipe.item(frame_bytes(three, 1, PressKind.TEST), at=T0 + 30))
    await pipe.send(pipe.item(b"garbage", at=T0 + 40))

def _run(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, *argv: str
) -> tuple[int, str, str]:
    code = main(["--config", str(fleet.config_path), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(out: str) -> Any:
    return json.loads(out)


def test_incidents_lists_newest_first_as_a_table_with_flags(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, err = _run(capsys, fleet, "incidents")
    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split() == [
        "ID", "STATUS", "FLAGS", "OPENED", "DEVICE", "PRESSES", "KELURAHAN", "KECAMATAN",
        "LANDMARK",
    ]
    assert [line.split()[0] for line in lines] == ["3", "2", "1"]
    assert lines[0].split()[1:3] == ["open", "TES"]
    assert lines[1].split()[1] == "cancelled"
    assert "Oro-oro Ombo" in lines[2]
    assert "Kartoharjo" in lines[2]
    assert "WIB" in lines[2]


def test_incidents_json_and_filters(capsys: pytest.CaptureFixture[str], fleet: Fleet) -> None:
    code, out, _ = _run(capsys, fleet, "incidents", "--json")
    assert code == 0
    rows = _json(out)
    assert [(r["id"], r["status"], r["test"], r["kelurahan"]) for r in rows] == [
        (3, "open", 1, "Klegen"),
        (2, "cancelled", 0, "Sukosari"),
        (1, "open", 0, "Oro-oro Ombo"),
    ]
    assert rows[2]["press_count"] == 1
    assert rows[2]["kelurahan_kode"] == "35.77.01.1001"

    _, out, _ = _run(capsys, fleet, "incidents", "--open", "--json")
    assert [r["id"] for r in _json(out)] == [3, 1]
    _, out, _ = _run(capsys, fleet, "incidents", "--kelurahan", "sukosari", "--json")
    assert [r["id"] for r in _json(out)] == [2]
    _, out, _ = _run(capsys, fleet, "incidents", "--kelurahan", "35.77.01.1001", "--json")
    assert [r["id"] for r in _json(out)] == [1]
    code, out, _ = _run(capsys, fleet, "incidents", "--kelurahan", "Josenan", "--json")
    assert (code, _json(out)) == (0, [])


def test_listing_the_open_incidents_reads_no_whole_table(fleet: Fleet) -> None:
    # Newest first by rowid, a few open incidents among years of closed ones meant
    # walking all of them: 7.0 ms on 50,000 incidents (query-plan audit's database).
    statements: list[str] = []
    with queries.read_only(fleet.database) as conn:
        conn.set_trace_callback(statements.append)
        listed = queries.incidents(conn, active_only=True)
        conn.set_trace_callback(None)
        assert len(statements) == 1
        assert [row["id"] for row in listed] == [3, 1]
        assert {sql: whole_reads(conn, sql) for sql in statements} == {
            sql: [] for sql in statements
        }


def test_show_prints_the_location_paths_and_timeline(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, err = _run(capsys, fleet, "show", "2")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "Incident 2  status=cancelled  presses=2"
    assert "Sukosari (Kartoharjo; inside)" in out
    assert "incident.opened (panic_press) by device:SIM-00001" in out
    assert "incident.cancelled (cancel_press_in_grace) by device:SIM-00001" in out
    assert "https://www.openstreetmap.org/?mlat=" in out

    code, out, _ = _run(capsys, fleet, "show", "1", "--json")
    assert code == 0
    shown = _json(out)
    (press,) = shown["presses"]
    assert sorted((p["path"], p["heard"]) for p in press["paths"]) == [
        ("mqtt:local:direct", 1), ("mqtt:local:relay", 1),
    ]
    assert [t["event"] for t in shown["timeline"]] == ["incident.opened"]
    assert shown["timeline"][0]["detail"]["location_source"] == "registered"

    _, out, _ = _run(capsys, fleet, "show", "3")
    assert out.splitlines()[0].startswith("Incident 3 TES")


def test_show_of_a_missing_incident_exits_1(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, err = _run(capsys, fleet, "show", "999")
    assert (code, out) == (1, "")
    assert err == "panicctl: no incident 999\n"


def test_dead_letters_shows_the_reason_and_a_payload_preview(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, _ = _run(capsys, fleet, "dead-letters")
    assert code == 0
    header, line = out.splitlines()
    assert header.split()[:3] == ["ID", "RECEIVED", "REASON"]
    assert "bad_json" in line
    _, out, _ = _run(capsys, fleet, "dead-letters", "--json")
    (row,) = _json(out)
    assert (row["reason"], row["payload_preview"], row["payload_bytes"]) == ("bad_json",
                                                                            "garbage", 7)


def test_locate_names_the_kelurahan_of_a_verified_point(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, _ = _run(capsys, fleet, "locate", "-7.65557", "111.51877")
    assert code == 0
    found = _json(out)
    assert (found["kelurahan"], found["kecamatan"], found["kode"], found["match"]) == (
        "Josenan", "Taman", "35.77.03.1007", "inside",
    )
    assert found["distance_m"] == 0.0


def test_locate_outside_the_city_exits_1(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, _ = _run(capsys, fleet, "locate", "-7.55", "111.52")
    assert code == 1
    found = _json(out)
    assert (found["kelurahan"], found["kode"], found["match"]) == (None, None, "none")
    assert found["distance_m"] > 150


def test_check_config_reports_ok_with_a_summary(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PANICD_DEVICE_KEYS_FILE", str(fleet.keys_path))
    code, out, err = _run(capsys, fleet, "check-config")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"{fleet.config_path}: OK"
    _, out, _ = _run(capsys, fleet, "check-config", "--json")
    summary = _json(out)
    assert (summary["devices"], summary["devices_without_key"], summary["kelurahan"]) == (
        3, [], 27,
    )
    assert summary["mqtt_sources"] == ["local"]


def test_check_config_of_a_broken_file_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = make_fleet(tmp_path / "cfg")
    text = broken.config_path.read_text(encoding="utf-8")
    broken.config_path.write_text(text.replace("[geo]\n", "[geo]\nnearest_within_m = -1\n"),
                                  encoding="utf-8")
    code, out, err = _run(capsys, broken, "check-config")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"panicctl: {broken.config_path}: geo.nearest_within_m: must be between 0 and 5000"
    ]


def test_a_missing_database_exits_1_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = make_fleet(tmp_path / "cfg")
    assert not empty.database.exists()
    code, out, err = _run(capsys, empty, "incidents")
    assert (code, out) == (1, "")
    assert err == f"panicctl: no database at {empty.database} (has panicd run yet?)\n"
    assert not empty.database.exists(), "a read-only view must not create the database"
