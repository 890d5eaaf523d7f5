"""Tests for dispatch.responders: people, groups, WIB rosters, overrides and validation."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.responders import (
    WIB,
    Override,
    Responders,
    Roster,
    Shift,
    load_responders,
    parse_days,
    parse_responders,
)
from dispatch.tomlcheck import ConfigWarning
from gateway.errors import ConfigError

PEOPLE = """
people = [
  { id = "ani", name = "Ani", phone = "+628120000101", role = "linmas" },
  { id = "budi", name = "Budi", phone = "+628120000102" },
  { id = "citra", name = "Citra", phone = "+628120000103", language = "jv" },
]
"""


def parse(text: str) -> tuple[Responders, list[ConfigWarning]]:
    return parse_responders(tomllib.loads(text), "responders.toml")


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def wib(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=WIB)


def roster(text: str) -> Roster:
    responders, _ = parse(PEOPLE + text)
    return next(iter(responders.rosters.values()))


# 2026-01-05 is a Monday.
MON = (2026, 1, 5)


def test_people_load_with_defaults() -> None:
    responders, warnings = parse(PEOPLE)
    assert responders.people["ani"].role == "linmas"
    assert responders.people["budi"].language == "id"
    assert responders.people["citra"].language == "jv"
    assert warnings == []


def test_bad_phone_names_file_key_and_problem() -> None:
    err = config_error(
        PEOPLE.replace("+628120000102", "0812-0000-102"),
    )
    assert err.file == "responders.toml"
    assert err.key == "people[1].phone"
    assert "not an E.164 number" in err.problem
    assert str(err).startswith("responders.toml: people[1].phone: not an E.164 number")


@pytest.mark.parametrize(
    "phone", ["+62", "62812000101", "+0628120000101", "+6281200001011234567", "+62 812 000"]
)
def test_phone_must_be_e164(phone: str) -> None:
    assert config_error(PEOPLE.replace("+628120000101", phone)).key == "people[0].phone"


def test_unknown_key_is_an_error_not_ignored() -> None:
    err = config_error(PEOPLE.replace('role = "linmas"', 'rol = "linmas"'))
    assert err.key == "people[0].rol"
    assert "unknown key" in err.problem


def test_missing_required_key_is_named() -> None:
    err = config_error('people = [{ id = "ani", name = "Ani" }]')
    assert err.key == "people[0].phone"
    assert err.problem == "missing"


def test_duplicate_person_id_is_an_error() -> None:
    err = config_error(PEOPLE.replace('"budi"', '"ani"', 1))
    assert err.key == "people[1].id"


def test_group_with_unknown_member_names_the_entry() -> None:
    err = config_error(PEOPLE + 'groups = [{ id = "kantor", members = ["ani", "dedi"] }]')
    assert err.key == "groups[0].members[1]"
    assert "unknown person 'dedi'" in err.problem


def test_shift_with_unknown_person_names_the_entry() -> None:
    err = config_error(
        PEOPLE
        + """
[[rosters]]
id = "r"
shifts = [{ days = "daily", start = "00:00", end = "00:00", people = ["zed"] }]
"""
    )
    assert err.key == "rosters[0].shifts[0].people[0]"


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("days", '"someday"', "rosters[0].shifts[0].days"),
        ("start", '"7:00"', "rosters[0].shifts[0].start"),
        ("end", '"25:00"', "rosters[0].shifts[0].end"),
    ],
)
def test_bad_shift_fields_name_their_key(field: str, value: str, key: str) -> None:
    shift = {"days": '"daily"', "start": '"07:00"', "end": '"19:00"'}
    shift[field] = value
    body = ", ".join(f"{k} = {v}" for k, v in shift.items())
    err = config_error(
        PEOPLE + f'[[rosters]]\nid = "r"\nshifts = [{{ {body}, people = ["ani"] }}]\n'
    )
    assert err.key == key


def test_override_end_before_start_is_an_error() -> None:
    err = config_error(
        PEOPLE
        + """
[[rosters]]
id = "r"
shifts = [{ days = "daily", start = "00:00", end = "00:00", people = ["ani"] }]
overrides = [{ start = 2026-01-02T10:00:00, end = 2026-01-02T09:00:00, people = ["budi"] }]
"""
    )
    assert err.key == "rosters[0].overrides[0].end"


def test_day_shift_covers_its_hours_only() -> None:
    r = roster(
        '[[rosters]]\nid = "r"\n'
        'shifts = [{ days = "mon-fri", start = "07:00", end = "19:00", people = ["ani"] }]\n'
    )
    assert r.on_call(wib(*MON, 7, 0)) == ("ani",)
    assert r.on_call(wib(*MON, 18, 59, second=59)) == ("ani",)
    assert r.on_call(wib(*MON, 19, 0)) == ()
    assert r.on_call(wib(*MON, 6, 59)) == ()
    assert r.on_call(wib(2026, 1, 10, 12, 0)) == ()  # Saturday


def test_night_shift_crosses_midnight_into_the_next_day() -> None:
    r = roster(
        '[[rosters]]\nid = "r"\n'
        'shifts = [{ days = "fri", start = "22:00", end = "06:00", people = ["budi"] }]\n'
    )
    assert r.on_call(wib(2026, 1, 9, 23, 0)) == ("budi",)  # Friday night
    assert r.on_call(wib(2026, 1, 10, 5, 59)) == ("budi",)  # Saturday small hours
    assert r.on_call(wib(2026, 1, 10, 6, 0)) == ()
    # Friday 03:00 belongs to Thursday's night, which this roster does not have.
    assert r.on_call(wib(2026, 1, 9, 3, 0)) == ()


def test_sunday_night_shift_wraps_into_monday() -> None:
    r = roster(
        '[[rosters]]\nid = "r"\n'
        'shifts = [{ days = "sun", start = "20:00", end = "04:00", people = ["ani"] }]\n'
    )
    assert r.on_call(wib(*MON, 3, 0)) == ("ani",)


def test_on_call_converts_any_aware_instant_to_wib() -> None:
    r = roster(
        '[[rosters]]\nid = "r"\n'
        'shifts = [{ days = "tue", start = "06:00", end = "07:00", people = ["ani"] }]\n'
    )
    # Monday 23:30 UTC is Tuesday 06:30 WIB.
    assert r.on_call(datetime(2026, 1, 5, 23, 30, tzinfo=UTC)) == ("ani",)


def test_wib_has_no_daylight_saving_so_the_same_utc_hour_maps_alike() -> None:
    r = roster(
        '[[rosters]]\nid = "r"\nshifts = [\n'
        '  { days = "daily", start = "07:00", end = "19:00", people = ["ani"] },\n'
        '  { days = "daily", start = "19:00", end = "07:00", people = ["budi"] },\n]\n'
    )
    for month in range(1, 13):
        at = datetime(2026, month, 15, 11, 59, tzinfo=UTC)  # 18:59 WIB all year
        assert at.astimezone(WIB).utcoffset() == timedelta(hours=7)
        assert r.on_call(at) == ("ani",)
        assert r.on_call(at + timedelta(minutes=1)) == ("budi",)


def test_overlapping_shifts_page_everyone_on_them_once() -> None:
    r = roster(
        '[[rosters]]\nid = "r"\nshifts = [\n'
        '  { days = "daily", start = "06:00", end = "18:00", people = ["ani", "budi"] },\n'
        '  { days = "daily", start = "12:00", end = "20:00", people = ["budi", "citra"] },\n]\n'
    )
    assert r.on_call(wib(*MON, 13, 0)) == ("ani", "budi", "citra")


OVERRIDES = """
[[rosters]]
id = "r"
shifts = [{ days = "daily", start = "00:00", end = "00:00", people = ["ani"] }]
overrides = [
  { date = 2026-08-17, people = ["budi"], reason = "HUT RI" },
  { start = 2026-08-17T18:00:00, end = 2026-08-18T06:00:00, people = ["citra"] },
]
"""


def test_dated_override_replaces_the_pattern_for_the_whole_wib_day() -> None:
    r = roster(OVERRIDES)
    assert r.on_call(wib(2026, 8, 16, 23, 59)) == ("ani",)
    assert r.on_call(wib(2026, 8, 17, 0, 0)) == ("budi",)
    assert r.on_call(wib(2026, 8, 17, 17, 59)) == ("budi",)


def test_later_starting_override_wins_inside_a_holiday() -> None:
    r = roster(OVERRIDES)
    assert r.on_call(wib(2026, 8, 17, 18, 0)) == ("citra",)
    assert r.on_call(wib(2026, 8, 18, 5, 59)) == ("citra",)
    assert r.on_call(wib(2026, 8, 18, 6, 0)) == ("ani",)


def test_override_times_without_offset_are_wib_and_offsets_are_honoured() -> None:
    r = roster(
        """
[[rosters]]
id = "r"
shifts = []
overrides = [
  { start = 2026-03-01T08:00:00, end = 2026-03-01T09:00:00, people = ["ani"] },
  { start = 2026-03-01T03:00:00Z, end = 2026-03-01T04:00:00Z, people = ["budi"] },
]
"""
    )
    assert r.on_call(datetime(2026, 3, 1, 1, 30, tzinfo=UTC)) == ("ani",)
    assert r.on_call(wib(2026, 3, 1, 10, 30)) == ("budi",)


def test_on_call_rejects_a_naive_datetime() -> None:
    r = roster(OVERRIDES)
    with pytest.raises(ValueError, match="aware"):
        r.on_call(datetime(2026, 1, 1, 12, 0))  # noqa: DTZ001


def test_gap_in_coverage_is_a_warning_naming_the_span() -> None:
    _, warnings = parse(
        PEOPLE + '[[rosters]]\nid = "siang"\n'
        'shifts = [{ days = "mon-fri", start = "07:00", end = "19:00", people = ["ani"] }]\n'
    )
    assert len(warnings) == 1
    (warning,) = warnings
    assert warning.key == "rosters[0]"
    assert "mon 19:00-tue 07:00" in warning.problem
    # Friday evening to Monday morning is one gap, across the week boundary.
    assert "fri 19:00-mon 07:00" in warning.problem
    assert str(warning).startswith("responders.toml: rosters[0]: roster 'siang' has no one")


def test_full_coverage_with_night_shifts_has_no_warning() -> None:
    _, warnings = parse(
        PEOPLE + '[[rosters]]\nid = "r"\nshifts = [\n'
        '  { days = "mon-fri", start = "06:00", end = "18:00", people = ["ani"] },\n'
        '  { days = "sat-sun", start = "06:00", end = "18:00", people = ["citra"] },\n'
        '  { days = "daily", start = "18:00", end = "06:00", people = ["budi"] },\n]\n'
    )
    assert warnings == []


def test_day_ranges_may_wrap_the_week() -> None:
    assert parse_days(["fri-mon"]) == {4, 5, 6, 0}
    assert parse_days(["mon-wed", "sat"]) == {0, 1, 2, 5}
    assert parse_days(["daily"]) == set(range(7))
    with pytest.raises(ValueError, match="funday"):
        parse_days(["funday"])


def test_load_reports_missing_file_and_bad_toml_as_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "responders.toml"
    with pytest.raises(ConfigError, match="file not found"):
        load_responders(missing)
    missing.write_text("people = [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_responders(missing)
    assert "not valid TOML" in str(info.value)
    assert "\n" not in str(info.value)


@given(
    start_min=st.integers(0, 1439),
    length_min=st.integers(1, 1439),
    probe_s=st.integers(0, 14 * 86_400),
)
def test_a_shift_and_its_complement_cover_every_instant_exactly_once(
    start_min: int, length_min: int, probe_s: int
) -> None:
    days = frozenset(range(7))
    start = start_min * 60
    first = Shift(days, start, length_min * 60, ("ani",))
    second = Shift(days, (start + length_min * 60) % 86_400, 86_400 - length_min * 60, ("budi",))
    r = Roster("r", (first, second))
    at = wib(*MON) + timedelta(seconds=probe_s)
    assert len(r.on_call(at)) == 1
    assert r.coverage_gaps() == ()


@given(offset_s=st.integers(-86_400, 3 * 86_400))
def test_an_override_wins_exactly_within_its_range(offset_s: int) -> None:
    begin = datetime(2026, 5, 1, 10, tzinfo=UTC)
    override = Override(begin, begin + timedelta(days=1), ("budi",))
    r = Roster("r", (Shift(frozenset(range(7)), 0, 86_400, ("ani",)),), (override,))
    at = begin + timedelta(seconds=offset_s)
    expected = ("budi",) if 0 <= offset_s < 86_400 else ("ani",)
    assert r.on_call(at) == expected
