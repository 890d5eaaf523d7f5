"""Tests for dispatch.oncall: the rows behind ``panicctl oncall``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from dispatch.oncall import OncallRow, oncall_report
from dispatch.policy import Routing, load_policies
from dispatch.responders import WIB, Responders, Roster, load_responders
from gateway.model import Kelurahan

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo"


def demo() -> tuple[Routing, Responders, dict[str, tuple[str, str]]]:
    geo = ROOT / "config" / "geo" / "kelurahan.geojson"
    if not geo.exists():
        geo = Path("/work/shared/data/madiun/kelurahan.geojson")
    props = [f["properties"] for f in json.loads(geo.read_text(encoding="utf-8"))["features"]]
    kelurahan = [Kelurahan(p["kode"], p["kelurahan"], p["kecamatan"]) for p in props]
    people, _ = load_responders(DEMO / "responders.toml")
    routing, _ = load_policies(DEMO / "policies.toml", people, kelurahan)
    return routing, people, {k.kode: (k.name, k.kecamatan) for k in kelurahan}


def persons(rows: list[OncallRow]) -> list[tuple[int, str | None]]:
    return [(r.level, r.person_id) for r in rows]


def test_report_for_one_kelurahan_lists_each_level_with_its_people() -> None:
    routing, people, kelurahan = demo()
    # Monday 12:00 WIB: weekday day watches everywhere.
    rows = oncall_report(
        routing, people, datetime(2026, 3, 2, 12, 0, tzinfo=WIB), "35.77.03.1004", kelurahan
    )
    assert persons(rows) == [
        (0, "linmas-kuncen-1"),
        (1, "lurah-kuncen"),
        (1, "staf-kuncen"),
        (2, "camat-taman-1"),
        (3, "siaga112-1"),
    ]
    first = rows[0]
    assert (first.kelurahan, first.kecamatan, first.policy_id, first.route) == (
        "Kuncen",
        "Taman",
        "kel-kuncen",
        "kelurahan",
    )
    assert first.via == "roster:linmas-kuncen"
    assert first.phone == people.people["linmas-kuncen-1"].phone
    assert [r.after_s for r in rows] == [0, 60, 60, 180, 360]


def test_each_level_is_resolved_when_a_press_now_would_reach_it() -> None:
    routing, people, kelurahan = demo()
    # 18:58 WIB: the camat day watch ends at 19:00, and the camat level is 3 minutes in.
    rows = oncall_report(
        routing, people, datetime(2026, 3, 2, 18, 58, tzinfo=WIB), "Kuncen", kelurahan
    )
    assert [r.person_id for r in rows if r.level == 0] == ["linmas-kuncen-2"]
    assert [r.person_id for r in rows if r.level == 2] == ["camat-taman-3"]


def test_all_kelurahan_are_reported_in_kode_order() -> None:
    routing, people, kelurahan = demo()
    rows = oncall_report(routing, people, datetime(2026, 8, 17, 9, 0, tzinfo=WIB), None, kelurahan)
    kodes = list(dict.fromkeys(r.kelurahan_kode for r in rows))
    assert kodes == sorted(kelurahan)
    assert len(kodes) == 27
    # The HUT RI override in the demo file puts the RT/RW volunteer on for the day.
    oro = [r.person_id for r in rows if r.kelurahan == "Oro-oro Ombo" and r.level == 0]
    assert oro == ["linmas-oro-oro-ombo-3"]


def test_a_roster_gap_shows_as_an_empty_row() -> None:
    routing, people, kelurahan = demo()
    gappy = people.rosters["linmas-kuncen"]
    holes = Responders(
        people.people,
        people.groups,
        {**people.rosters, "linmas-kuncen": Roster(gappy.id, ())},
    )
    rows = oncall_report(
        routing, holes, datetime(2026, 3, 2, 12, 0, tzinfo=WIB), "35.77.03.1004", kelurahan
    )
    assert (rows[0].level, rows[0].person_id, rows[0].via) == (0, None, "roster:linmas-kuncen")


def test_unknown_kelurahan_and_naive_time_are_refused() -> None:
    routing, people, kelurahan = demo()
    with pytest.raises(LookupError, match="Atlantis"):
        oncall_report(routing, people, datetime(2026, 3, 2, tzinfo=WIB), "Atlantis", kelurahan)
    with pytest.raises(ValueError, match="aware"):
        oncall_report(routing, people, datetime(2026, 3, 2), None, kelurahan)  # noqa: DTZ001
