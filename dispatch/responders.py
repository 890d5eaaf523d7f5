"""People, groups and on-call rosters, loaded from ``responders.toml``.

Pure: nothing here reads a clock; callers pass the instant as an aware datetime.
Rosters are written in Asia/Jakarta local time (WIB, UTC+7). WIB has had no daylight
saving since 1964, so a weekly pattern maps to real instants without ambiguous or
missing local times; the code still converts through zoneinfo rather than adding a
fixed +7 so that the rule lives in one place.

A roster is a weekly pattern of shifts plus dated overrides. A shift starts on each of
its days at ``start`` and ends at ``end`` the same day, or the next day when ``end`` is
not after ``start`` (night shifts: ``start = "19:00"``, ``end = "07:00"``; ``"00:00"``
to ``"00:00"`` is a 24-hour shift). Overlapping shifts add their people together. An
override (holiday, swap) covering the instant replaces the pattern entirely; if several
cover it, the one that started last wins (a swap inside a holiday beats the holiday),
and among equal starts the one written later in the file.

File format (every table is strict: unknown keys are errors)::

    [[people]]
    id = "linmas-klegen-1"          # [a-z0-9][a-z0-9._-]*
    name = "Slamet Riyadi"
    phone = "+6281200010031"        # E.164
    role = "linmas"                 # optional, free text
    language = "id"                 # optional, default "id"

    [[groups]]
    id = "kantor-klegen"
    members = ["lurah-klegen", "staf-klegen"]

    [[rosters]]
    id = "linmas-klegen"
    shifts = [
      { days = "daily", start = "06:00", end = "18:00", people = ["linmas-klegen-1"] },
      { days = ["mon-fri"], start = "18:00", end = "06:00", people = ["linmas-klegen-2"] },
    ]
    overrides = [
      { date = 2025-08-17, people = ["linmas-klegen-3"], reason = "HUT RI" },
      { start = 2025-09-01T18:00:00, end = 2025-09-02T06:00:00, people = ["..."] },
    ]

Days are ``mon`` … ``sun``, ranges such as ``mon-fri`` or ``fri-mon``, or ``daily``.
Override times without an offset are WIB; ``date`` is the whole WIB day.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo

from dispatch.tomlcheck import ConfigWarning, Node, load_toml, root
from gateway.errors import ConfigError

WIB = ZoneInfo("Asia/Jakarta")

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_S = 86_400
_WEEK_S = 7 * _DAY_S

# ITU-T E.164: "+", a country code that does not start with 0, at most 15 digits in all.
# Eight digits is a floor that still admits the shortest real national numbers.
E164 = re.compile(r"\+[1-9][0-9]{7,14}")
IDENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_LANGUAGE = re.compile(r"[a-z]{2,3}")
_HHMM = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]")


@dataclass(frozen=True, slots=True)
class Person:
    """Someone who can be paged."""

    id: str
    name: str
    phone: str
    role: str = ""
    language: str = "id"


@dataclass(frozen=True, slots=True)
class Group:
    """A named, fixed list of people paged together (for example a kelurahan office)."""

    id: str
    members: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Shift:
    """A weekly slot: on each of ``days`` (0 = Monday) from ``start_s`` for ``length_s``."""

    days: frozenset[int]
    start_s: int
    length_s: int
    people: tuple[str, ...]

    def covers(self, local: datetime) -> bool:
        """Whether the WIB wall-clock instant ``local`` falls in this shift."""
        at_s = local.weekday() * _DAY_S + local.hour * 3600 + local.minute * 60 + local.second
        # Modular distance from each start handles both midnight and Sunday→Monday wrap.
        return any(
            (at_s - (d * _DAY_S + self.start_s)) % _WEEK_S < self.length_s for d in self.days
        )


@dataclass(frozen=True, slots=True)
class Override:
    """A dated replacement of a roster's pattern over ``[start, end)``."""

    start: datetime
    end: datetime
    people: tuple[str, ...]
    reason: str = ""

    def covers(self, at: datetime) -> bool:
        """Whether the aware instant ``at`` falls in this override."""
        return self.start <= at < self.end


@dataclass(frozen=True, slots=True)
class Roster:
    """An on-call rota: a weekly pattern in WIB plus dated overrides."""

    id: str
    shifts: tuple[Shift, ...]
    overrides: tuple[Override, ...] = ()
    description: str = ""

    def on_call(self, at: datetime) -> tuple[str, ...]:
        """The person ids on call at the aware instant ``at`` (empty in a coverage gap)."""
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("Roster.on_call needs an aware datetime")
        winner: Override | None = None
        for override in self.overrides:
            # ">=" so that among equal starts the later entry in the file wins.
            if override.covers(at) and (winner is None or override.start >= winner.start):
                winner = override
        if winner is not None:
            return winner.people
        local = at.astimezone(WIB)
        people: list[str] = []
        for shift in self.shifts:
            if shift.covers(local):
                people.extend(p for p in shift.people if p not in people)
        return tuple(people)

    def coverage_gaps(self) -> tuple[tuple[int, int], ...]:
        """The ``[start, end)`` seconds-of-week (Monday 00:00 WIB = 0) the pattern leaves empty."""
        covered: list[tuple[int, int]] = []
        for shift in self.shifts:
            for day in shift.days:
                begin = day * _DAY_S + shift.start_s
                end = begin + shift.length_s
                if end <= _WEEK_S:
                    covered.append((begin, end))
                else:
                    covered.extend([(begin, _WEEK_S), (0, end - _WEEK_S)])
        gaps: list[tuple[int, int]] = []
        cursor = 0
        for begin, end in sorted(covered):
            if begin > cursor:
                gaps.append((cursor, begin))
            cursor = max(cursor, end)
        if cursor < _WEEK_S:
            gaps.append((cursor, _WEEK_S))
        # A gap that runs from Sunday night into Monday morning is one gap, not two.
        if len(gaps) > 1 and gaps[0][0] == 0 and gaps[-1][1] == _WEEK_S:
            gaps = [(gaps[-1][0], gaps[0][1] + _WEEK_S), *gaps[1:-1]]
        return tuple(gaps)


@dataclass(frozen=True, slots=True)
class Responders:
    """Everything ``responders.toml`` defines, by id."""

    people: Mapping[str, Person]
    groups: Mapping[str, Group]
    rosters: Mapping[str, Roster]


def format_week_time(seconds: int) -> str:
    """``"mon 19:00"`` for a seconds-of-week offset (wrapping past Sunday)."""
    seconds %= _WEEK_S
    day, rest = divmod(seconds, _DAY_S)
    return f"{DAY_NAMES[day]} {rest // 3600:02d}:{rest % 3600 // 60:02d}"


def load_responders(path: Path) -> tuple[Responders, list[ConfigWarning]]:
    """Load and validate ``responders.toml``; errors raise ConfigError, gaps are warnings."""
    return parse_responders(load_toml(path), path)


def parse_responders(
    data: dict[str, object], file: Path | str
) -> tuple[Responders, list[ConfigWarning]]:
    """Validate an already-parsed responders document (the loader's pure half)."""
    top = root(file, data).table({"people", "groups", "rosters"}, required={"people"})
    people: dict[str, Person] = {}
    for node in top["people"].items():
        person = _parse_person(node)
        if person.id in people:
            raise ConfigError(node.file, f"{node.key}.id", f"duplicate person id {person.id!r}")
        people[person.id] = person

    groups: dict[str, Group] = {}
    if "groups" in top:
        for node in top["groups"].items():
            group = _parse_group(node, people)
            if group.id in groups:
                raise ConfigError(node.file, f"{node.key}.id", f"duplicate group id {group.id!r}")
            groups[group.id] = group

    rosters: dict[str, Roster] = {}
    warnings: list[ConfigWarning] = []
    if "rosters" in top:
        for node in top["rosters"].items():
            roster = _parse_roster(node, people)
            if roster.id in rosters:
                raise ConfigError(node.file, f"{node.key}.id", f"duplicate roster id {roster.id!r}")
            rosters[roster.id] = roster
            gaps = roster.coverage_gaps()
            if gaps:
                spans = ", ".join(f"{format_week_time(a)}-{format_week_time(b)}" for a, b in gaps)
                warnings.append(
                    ConfigWarning(
                        node.file, node.key, f"roster {roster.id!r} has no one on call {spans} WIB"
                    )
                )
    return (
        Responders(
            people=MappingProxyType(people),
            groups=MappingProxyType(groups),
            rosters=MappingProxyType(rosters),
        ),
        warnings,
    )


def _parse_person(node: Node) -> Person:
    fields = node.table(
        {"id", "name", "phone", "role", "language"}, required={"id", "name", "phone"}
    )
    return Person(
        id=fields["id"].text(IDENT, "not a valid id (lowercase letters, digits, . _ -)"),
        name=fields["name"].text(),
        phone=fields["phone"].text(E164, "not an E.164 number"),
        role=fields["role"].text() if "role" in fields else "",
        language=(
            fields["language"].text(_LANGUAGE, "not a language code")
            if "language" in fields
            else "id"
        ),
    )


def _people_refs(node: Node, people: Mapping[str, Person]) -> tuple[str, ...]:
    refs = node.texts()
    if not refs:
        raise node.error("must name at least one person")
    for item, ref in zip(node.items(), refs, strict=True):
        if ref not in people:
            raise item.error(f"unknown person {ref!r}")
    return tuple(refs)


def _parse_group(node: Node, people: Mapping[str, Person]) -> Group:
    fields = node.table({"id", "members", "description"}, required={"id", "members"})
    return Group(
        id=fields["id"].text(IDENT, "not a valid id (lowercase letters, digits, . _ -)"),
        members=_people_refs(fields["members"], people),
        description=fields["description"].text() if "description" in fields else "",
    )


def _parse_roster(node: Node, people: Mapping[str, Person]) -> Roster:
    fields = node.table({"id", "description", "shifts", "overrides"}, required={"id", "shifts"})
    shifts = tuple(_parse_shift(item, people) for item in fields["shifts"].items())
    overrides: tuple[Override, ...] = ()
    if "overrides" in fields:
        overrides = tuple(_parse_override(item, people) for item in fields["overrides"].items())
    return Roster(
        id=fields["id"].text(IDENT, "not a valid id (lowercase letters, digits, . _ -)"),
        shifts=shifts,
        overrides=overrides,
        description=fields["description"].text() if "description" in fields else "",
    )


def parse_days(spec: Iterable[str]) -> frozenset[int]:
    """Weekday numbers (0 = Monday) for tokens like ``mon``, ``mon-fri``, ``fri-mon``, ``daily``."""
    days: set[int] = set()
    for token in spec:
        word = token.strip().lower()
        if word in {"daily", "all"}:
            days.update(range(7))
            continue
        first, _, last = word.partition("-")
        if first not in DAY_NAMES or (last and last not in DAY_NAMES):
            raise ValueError(token)
        a = DAY_NAMES.index(first)
        b = DAY_NAMES.index(last) if last else a
        # A range may wrap the week end ("fri-mon").
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _clock_seconds(node: Node, *, end: bool) -> int:
    value = node.text()
    if end and value == "24:00":
        return _DAY_S
    if not _HHMM.fullmatch(value):
        raise node.error(f"not a time of day HH:MM: {value!r}")
    hours, minutes = value.split(":")
    return int(hours) * 3600 + int(minutes) * 60


def _parse_shift(node: Node, people: Mapping[str, Person]) -> Shift:
    fields = node.table(
        {"days", "start", "end", "people"}, required={"days", "start", "end", "people"}
    )
    days_node = fields["days"]
    tokens = [days_node.text()] if isinstance(days_node.value, str) else days_node.texts()
    try:
        days = parse_days(tokens)
    except ValueError as exc:
        raise days_node.error(f"not a day or day range (mon..sun, mon-fri, daily): {exc}") from None
    if not days:
        raise days_node.error("must name at least one day")
    start = _clock_seconds(fields["start"], end=False)
    end = _clock_seconds(fields["end"], end=True)
    # end <= start means the shift runs past midnight into the next day.
    length = end - start if end > start else end + _DAY_S - start
    return Shift(
        days=days, start_s=start, length_s=length, people=_people_refs(fields["people"], people)
    )


def _instant(node: Node) -> datetime:
    value = node.value
    if isinstance(value, datetime):
        # TOML local date-times (no offset) are WIB, the zone rosters are written in.
        return value.replace(tzinfo=WIB) if value.tzinfo is None else value
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=WIB)
    raise node.error("expected a TOML date-time such as 2025-08-17T07:00:00")


def _parse_override(node: Node, people: Mapping[str, Person]) -> Override:
    fields = node.table({"date", "start", "end", "people", "reason"}, required={"people"})
    if "date" in fields:
        if "start" in fields or "end" in fields:
            raise fields["date"].error("use either date or start/end, not both")
        day = fields["date"].value
        if isinstance(day, datetime) or not isinstance(day, date):
            raise fields["date"].error("expected a TOML date such as 2025-08-17")
        start = datetime.combine(day, time(0), tzinfo=WIB)
        end = start + timedelta(days=1)
    else:
        for name in ("start", "end"):
            if name not in fields:
                raise ConfigError(node.file, f"{node.key}.{name}", "missing (or give date)")
        start = _instant(fields["start"])
        end = _instant(fields["end"])
        if end <= start:
            raise fields["end"].error("must be after start")
    return Override(
        start=start.astimezone(UTC),
        end=end.astimezone(UTC),
        people=_people_refs(fields["people"], people),
        reason=fields["reason"].text() if "reason" in fields else "",
    )
