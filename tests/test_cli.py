"""``panicctl`` in-process against a database written by the real ingest pipeline.

DESIGN §3: incidents (list/show timeline), dead letters, locate, check-config with clear
file+key errors; exit codes 0 / 1 (not found) / 2 (bad configuration).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.dedup import DedupPolicy
from gateway.formats import native, ttn
from gateway.ingest import Ingestor
from gateway.model import Frame, PressKind, Trust
from panicd.cli import main
from store import queries
from store.sqlite import SqliteStore
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
        (3, "open", True, "Klegen"),
        (2, "cancelled", False, "Sukosari"),
        (1, "open", False, "Oro-oro Ombo"),
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


def test_json_flags_are_booleans_and_times_rfc3339_with_the_epoch_beside(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    _, out, _ = _run(capsys, fleet, "incidents", "--json")
    oldest = _json(out)[-1]
    assert (oldest["test"], oldest["urgent"]) == (False, False)
    assert all(type(r[k]) is bool for r in _json(out) for k in ("test", "urgent"))
    # T0 = 2025-06-15 15:06:40 UTC, 22:06:40 in Madiun (WIB, UTC+7).
    assert oldest["opened_at"] == "2025-06-15T22:06:40.000+07:00"
    assert oldest["opened_at_epoch"] == T0
    assert datetime.fromisoformat(oldest["opened_at"]).timestamp() == T0
    assert (oldest["closed_at"], oldest["closed_at_epoch"]) == (None, None)
    _, out, _ = _run(capsys, fleet, "show", "1", "--json")
    shown = _json(out)
    (press,) = shown["presses"]
    assert press["received_at"] == "2025-06-15T22:06:40.000+07:00"
    assert press["paths"][0]["first_heard_at_epoch"] == T0
    assert shown["timeline"][0]["at_epoch"] == T0
    assert shown["timeline"][0]["at"].endswith("+07:00")
    _, out, _ = _run(capsys, fleet, "dead-letters", "--json")
    (dead,) = _json(out)
    assert (dead["received_at"], dead["received_at_epoch"]) == (
        "2025-06-15T22:07:20.000+07:00", T0 + 40)


def test_listing_the_open_incidents_reads_no_whole_table(fleet: Fleet) -> None:
    # Newest first by rowid, a few open incidents among years of closed ones meant
    # walking all of them: 7.0 ms on 50,000 incidents (query-plan audit's database).
    statements: list[str] = []
    with queries.read_only(fleet.database) as conn:
        conn.set_trace_callback(statements.append)
        listed = asyncio.run(queries.SqliteReader(conn).incidents(active_only=True))
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


@pytest.mark.parametrize(
    ("lat", "lon", "problem"),
    [
        ("10", "200", "longitude 200 is outside -180..180"),
        ("10", "-180.5", "longitude -180.5 is outside -180..180"),
        ("91", "111.5", "latitude 91 is outside -90..90"),
        ("nan", "111.5", "latitude nan is outside -90..90"),
    ],
)
def test_locate_refuses_coordinates_off_the_globe_with_exit_2(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, lat: str, lon: str, problem: str
) -> None:
    code, out, err = _run(capsys, fleet, "locate", "--", lat, lon)
    assert (code, out) == (2, "")
    assert err.startswith(f"panicctl: locate: {problem} (")
    assert len(err.splitlines()) == 1


def test_locate_accepts_the_edges_of_the_globe(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, _ = _run(capsys, fleet, "locate", "--", "-90", "180")
    assert code == 1  # valid, and far outside Kota Madiun
    assert _json(out)["match"] == "none"


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
    assert summary["warnings"] == []
    assert _run(capsys, fleet, "check-config", "--strict")[0] == 0


def test_check_config_says_devices_without_a_key_are_a_warning_and_strict_fails(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PANICD_DEVICE_KEYS_FILE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    code, out, err = _run(capsys, fleet, "check-config")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{fleet.config_path}: OK with 1 warning(s)"
    warning = (
        "3 of 3 devices have no key (device-keys credential or PANICD_DEVICE_KEYS_FILE) and"
        " no third-party id: every press from them will be refused: SIM-00000, SIM-00001,"
        " SIM-00002"
    )
    assert lines[-2:] == ["warnings:", f"  warning: {warning}"]
    _, out, _ = _run(capsys, fleet, "check-config", "--json")
    summary = _json(out)
    assert summary["warnings"] == [warning]
    assert summary["devices_without_key"] == ["SIM-00000", "SIM-00001", "SIM-00002"]
    code, out, err = _run(capsys, fleet, "check-config", "--strict")
    assert (code, err) == (1, "")
    assert f"  warning: {warning}" in out.splitlines()


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


# -- terminal escapes from the wire never reach the operator's terminal raw ------------------

# Clear the screen, home the cursor, reverse the text, forge a line: what an attacker puts
# in a JSON key, a device id or anything else panicctl later prints from the database.
HOSTILE = "\x1b[2J\x1b[H\u202eFAKE: all OK\r\n\tpanicd: running\x7f\x9b31m\u2066\u2028"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069"
                         "\u2028\u2029\ufeff]")


@pytest.fixture
async def hostile(tmp_path: Path) -> Fleet:
    """Dead letters and stored rows whose every wire-borne string is HOSTILE."""
    fleet = make_fleet(tmp_path / "cfg")
    ttn_uplink = json.dumps({"end_device_ids": {"device_id": HOSTILE}, "uplink_message": {
        "decoded_payload": {"event": "panic"}}}).encode()
    ttn_frame = ttn.decode("", ttn_uplink)
    assert isinstance(ttn_frame, Frame)
    async with (
        SqliteStore(fleet.database) as store,
        Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor,
    ):
        pipe = Collector(ingestor)
        with structlog.testing.capture_logs():
            await pipe.send(pipe.item(json.dumps({HOSTILE: 1}, ensure_ascii=False).encode(),
                                      at=T0))
            await pipe.send(pipe.item(ttn_uplink, at=T0 + 1, decoded=ttn_frame,
                                      trust=Trust.NETWORK, format_name="ttn"))
            await pipe.send(pipe.item(HOSTILE.encode(), at=T0 + 2))
            await pipe.send(pipe.item(frame_bytes(fleet.devices[0], 1), at=T0 + 3))
    conn = sqlite3.connect(fleet.database)
    with conn:
        # Stored strings of any origin: what the output boundary must escape whatever the path.
        conn.execute("UPDATE incidents SET landmark = ?, address = ?, kelurahan = ?",
                     (HOSTILE, HOSTILE, HOSTILE))
        conn.execute("UPDATE incident_events SET reason = ?, actor = ?", (HOSTILE, HOSTILE))
        conn.execute("UPDATE press_paths SET path = ?", (HOSTILE,))
        conn.execute("UPDATE devices SET last_kind = ?", (HOSTILE,))
    conn.close()
    return fleet


def _strings(value: object) -> list[str]:
    match value:
        case str():
            return [value]
        case dict():
            return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
        case list():
            return [s for v in value for s in _strings(v)]
        case _:
            return []


@pytest.mark.parametrize(
    "argv",
    [["dead-letters"], ["incidents"], ["show", "1"], ["devices"], ["status"]],
    ids=" ".join,
)
def test_a_hostile_string_is_printed_as_visible_escapes(
    capsys: pytest.CaptureFixture[str], hostile: Fleet, argv: list[str]
) -> None:
    _, out, err = _run(capsys, hostile, *argv)
    assert RAW_CONTROL.findall(out + err) == []
    # Shown, not dropped, and on one line: the CR LF inside it forged no line of its own.
    assert "\\x1b[2J\\x1b[H\\u202eFAKE: all OK\\r\\n\\tpanicd: running\\x7f\\x9b31m" in out
    assert not any(line.startswith(("\tpanicd", "panicd: running")) for line in out.splitlines())


@pytest.mark.parametrize(
    "argv",
    [["dead-letters", "--json"], ["incidents", "--json"], ["show", "1", "--json"],
     ["devices", "--json"], ["status", "--json"]],
    ids=" ".join,
)
def test_json_output_escapes_what_a_terminal_acts_on_and_loses_nothing(
    capsys: pytest.CaptureFixture[str], hostile: Fleet, argv: list[str]
) -> None:
    _, out, err = _run(capsys, hostile, *argv)
    assert RAW_CONTROL.findall(out + err) == []
    assert any(HOSTILE in s for s in _strings(json.loads(out)))


def test_dead_letters_show_the_hostile_key_device_and_payload_escaped(
    capsys: pytest.CaptureFixture[str], hostile: Fleet
) -> None:
    _, out, _ = _run(capsys, hostile, "dead-letters", "--json")
    by_reason = {row["reason"]: row for row in json.loads(out)}
    assert by_reason["unknown_field"]["detail"] == HOSTILE
    assert by_reason["bad_json"]["payload_preview"] == HOSTILE
    assert by_reason["unknown_device"]["device_ref"] == HOSTILE


@pytest.mark.parametrize("fmt", ["native", "ttn"])
def test_decode_of_a_hostile_frame_prints_no_raw_control_character(
    capsys: pytest.CaptureFixture[str], hostile: Fleet, tmp_path: Path, fmt: str
) -> None:
    frame = tmp_path / "frame.json"
    body = {HOSTILE: 1} if fmt == "native" else {
        "end_device_ids": {"device_id": HOSTILE},
        "uplink_message": {"decoded_payload": {"event": "panic"}}}
    frame.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    _, out, err = _run(capsys, hostile, "decode", "--format", fmt, str(frame))
    assert RAW_CONTROL.findall(out + err) == []
    assert HOSTILE in _strings(json.loads(out))


def test_panicctl_prints_only_through_the_escaping_boundary() -> None:
    # One boundary (panicd.ctl_format.out / err / print_json) escapes everything, so a
    # command added later cannot print a wire string raw by forgetting to escape it.
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for module in ("panicd/cli.py", "panicd/ctl_ops.py", "panicd/ctl_dispatch.py",
                   "gateway/explain.py"):
        tree = ast.parse((root / module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Name) and func.id == "print") or (
                isinstance(func, ast.Attribute) and func.attr in ("write", "writelines")
                and isinstance(func.value, ast.Attribute) and func.value.attr in (
                    "stdout", "stderr")):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []
