"""Escalation policies and the kelurahan → kecamatan → city routing, from ``policies.toml``.

Pure: validated against an already-loaded ``Responders`` and the list of kelurahan.

A policy is a ladder of levels; each level pages its targets (people, groups, rosters)
on its channels and waits ``wait_s`` seconds before the next level. ``repeat`` is how
many times the whole ladder runs (1 = once); after the last level of a round the next
round starts once that level's ``wait_s`` has passed. Every routing policy must end at
the command centre (Madiun Siaga 112): its last level has to page every command-centre
target. Test presses and device-health alerts use the separate ``[operations]``
policy, which never pages responders by routing.

File format::

    [command_centre]
    name = "Madiun Siaga 112"
    rosters = ["siaga112"]              # and/or people = [...], groups = [...]

    [operations]                        # test presses, device health
    levels = [{ groups = ["ops"], channels = ["sms"], wait_s = 300 }]

    [[policies]]
    id = "kota"
    city = true                         # exactly one policy is the city-wide fallback
    repeat = 2
    levels = [
      { rosters = ["siaga112"], channels = ["sms", "voice"], wait_s = 120 },
    ]

    [[policies]]
    id = "kec-taman"
    kecamatan = ["Taman"]
    repeat = 2
    levels = [ ..., { rosters = ["siaga112"], channels = ["sms", "voice"], wait_s = 120 } ]

    [[policies]]
    id = "kel-kuncen"
    kelurahan = ["35.77.03.1004"]
    then = "kec-taman"                  # continue with that policy's levels (and repeat)
    levels = [{ rosters = ["linmas-kuncen"], channels = ["sms", "voice"], wait_s = 60 }]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from dispatch.responders import IDENT, Responders
from dispatch.tomlcheck import ConfigWarning, Node, load_toml, root
from gateway.errors import ConfigError
from gateway.model import Kelurahan

MAX_WAIT_S = 86_400
MAX_REPEAT = 10
_KODE = re.compile(r"\d{2}\.\d{2}\.\d{2}\.\d{4}")


class Medium(StrEnum):
    """How a person is paged (not to be confused with dispatch.channel.Channel, the sender)."""

    SMS = "sms"
    VOICE = "voice"


class RouteReason(StrEnum):
    """Which rung of the fallback chain chose a policy."""

    KELURAHAN = "kelurahan"
    KECAMATAN = "kecamatan"
    CITY = "city"
    OPERATIONS = "operations"


@dataclass(frozen=True, slots=True)
class Targets:
    """Who to page: person, group and roster ids (rosters resolve at fire time)."""

    people: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    rosters: tuple[str, ...] = ()

    def refs(self) -> tuple[str, ...]:
        """``person:x`` / ``group:y`` / ``roster:z`` labels, for logs and reports."""
        return (
            *(f"person:{p}" for p in self.people),
            *(f"group:{g}" for g in self.groups),
            *(f"roster:{r}" for r in self.rosters),
        )


@dataclass(frozen=True, slots=True)
class Level:
    """One rung of a policy."""

    targets: Targets
    channels: tuple[Medium, ...]
    wait_s: int


@dataclass(frozen=True, slots=True)
class Policy:
    """An escalation ladder run ``repeat`` times."""

    id: str
    levels: tuple[Level, ...]
    repeat: int = 1
    description: str = ""

    def offsets(self) -> tuple[tuple[int, int, int], ...]:
        """``(round, level, seconds after opening)`` for every level of every round, in order."""
        out: list[tuple[int, int, int]] = []
        elapsed = 0
        for rnd in range(self.repeat):
            for index, level in enumerate(self.levels):
                out.append((rnd, index, elapsed))
                elapsed += level.wait_s
        return tuple(out)


@dataclass(frozen=True, slots=True)
class CommandCentre:
    """The city command centre every routing policy must end at."""

    name: str
    targets: Targets


@dataclass(frozen=True, slots=True)
class Routing:
    """Policies by id and the fallback chain that picks one for an incident."""

    policies: Mapping[str, Policy]
    by_kelurahan: Mapping[str, str]
    by_kecamatan: Mapping[str, str]
    city: str
    operations: Policy
    command_centre: CommandCentre
    kecamatan_of: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def policy_for(
        self, kelurahan_kode: str | None, kecamatan: str | None, *, test: bool = False
    ) -> tuple[Policy, RouteReason]:
        """The policy for an incident and why: kelurahan, else kecamatan, else city.

        Test presses always get the operations policy (DESIGN §2 Press kinds).
        """
        if test:
            return self.operations, RouteReason.OPERATIONS
        if kelurahan_kode is not None and kelurahan_kode in self.by_kelurahan:
            return self.policies[self.by_kelurahan[kelurahan_kode]], RouteReason.KELURAHAN
        # A known kode implies its kecamatan even when the caller did not pass it.
        if kecamatan is None and kelurahan_kode is not None:
            kecamatan = self.kecamatan_of.get(kelurahan_kode)
        if kecamatan is not None and kecamatan.casefold() in self.by_kecamatan:
            return self.policies[self.by_kecamatan[kecamatan.casefold()]], RouteReason.KECAMATAN
        return self.policies[self.city], RouteReason.CITY


def load_policies(
    path: Path, responders: Responders, kelurahan: Iterable[Kelurahan]
) -> tuple[Routing, list[ConfigWarning]]:
    """Load ``policies.toml`` and validate it against the responders and the kelurahan list."""
    return parse_policies(load_toml(path), path, responders, kelurahan)


@dataclass(frozen=True, slots=True)
class _RawPolicy:
    node: Node
    id: str
    levels: tuple[Level, ...]
    repeat: int | None
    then: Node | None
    description: str


def parse_policies(
    data: dict[str, object],
    file: Path | str,
    responders: Responders,
    kelurahan: Iterable[Kelurahan],
) -> tuple[Routing, list[ConfigWarning]]:
    """Validate an already-parsed policies document (the loader's pure half)."""
    known = {k.kode: k for k in kelurahan}
    kecamatan_names = {k.kecamatan.casefold(): k.kecamatan for k in known.values()}
    top = root(file, data).table(
        {"command_centre", "operations", "policies"},
        required={"command_centre", "operations", "policies"},
    )
    centre = _parse_command_centre(top["command_centre"], responders)
    operations = _parse_operations(top["operations"], responders)

    raw: dict[str, _RawPolicy] = {}
    by_kelurahan: dict[str, str] = {}
    by_kecamatan: dict[str, str] = {}
    city: str | None = None
    for node in top["policies"].items():
        fields = node.table(
            {"id", "description", "levels", "repeat", "then", "kelurahan", "kecamatan", "city"},
            required={"id"},
        )
        pid = fields["id"].text(IDENT, "not a valid id (lowercase letters, digits, . _ -)")
        if pid in raw:
            raise fields["id"].error(f"duplicate policy id {pid!r}")
        levels = (
            tuple(_parse_level(item, responders) for item in fields["levels"].items())
            if "levels" in fields
            else ()
        )
        if not levels and "then" not in fields:
            raise ConfigError(node.file, f"{node.key}.levels", "a policy needs levels or then")
        raw[pid] = _RawPolicy(
            node=node,
            id=pid,
            levels=levels,
            repeat=fields["repeat"].integer(1, MAX_REPEAT) if "repeat" in fields else None,
            then=fields.get("then"),
            description=fields["description"].text() if "description" in fields else "",
        )
        if "kelurahan" in fields:
            for item, kode in zip(
                fields["kelurahan"].items(), fields["kelurahan"].texts(), strict=True
            ):
                if not _KODE.fullmatch(kode) or kode not in known:
                    raise item.error(f"unknown kelurahan kode {kode!r}")
                if kode in by_kelurahan:
                    raise item.error(
                        f"kelurahan {kode} ({known[kode].name}) is already routed to "
                        f"{by_kelurahan[kode]!r}"
                    )
                by_kelurahan[kode] = pid
        if "kecamatan" in fields:
            for item, name in zip(
                fields["kecamatan"].items(), fields["kecamatan"].texts(), strict=True
            ):
                folded = name.casefold()
                if folded not in kecamatan_names:
                    raise item.error(
                        f"unknown kecamatan {name!r} (known: "
                        f"{', '.join(sorted(kecamatan_names.values()))})"
                    )
                if folded in by_kecamatan:
                    raise item.error(
                        f"kecamatan {name} is already routed to {by_kecamatan[folded]!r}"
                    )
                by_kecamatan[folded] = pid
        if "city" in fields and fields["city"].boolean():
            if city is not None:
                raise fields["city"].error(f"{city!r} is already the city policy")
            city = pid
    if city is None:
        raise ConfigError(file, "policies", "no policy has city = true (the city-wide fallback)")

    policies = {pid: _flatten(pid, raw, ()) for pid in raw}
    for pid, policy in policies.items():
        _check_ends_at_centre(policy, centre, raw[pid].node)

    referenced = {city, *by_kelurahan.values(), *by_kecamatan.values()}
    referenced.update(
        r.then.value for r in raw.values() if r.then is not None and isinstance(r.then.value, str)
    )
    warnings = [
        ConfigWarning(str(file), r.node.key, f"policy {r.id!r} is not used by any route")
        for r in raw.values()
        if r.id not in referenced
    ]
    routing = Routing(
        policies=MappingProxyType(policies),
        by_kelurahan=MappingProxyType(by_kelurahan),
        by_kecamatan=MappingProxyType(by_kecamatan),
        city=city,
        operations=operations,
        command_centre=centre,
        kecamatan_of=MappingProxyType({k.kode: k.kecamatan for k in known.values()}),
    )
    return routing, warnings


def _flatten(pid: str, raw: Mapping[str, _RawPolicy], seen: tuple[str, ...]) -> Policy:
    entry = raw[pid]
    if entry.then is None:
        return Policy(pid, entry.levels, entry.repeat or 1, entry.description)
    target = entry.then.text(IDENT, "not a valid policy id")
    if target not in raw:
        raise entry.then.error(f"unknown policy {target!r}")
    if target in seen or target == pid:
        raise entry.then.error(f"'then' loops: {' -> '.join((*seen, pid, target))}")
    base = _flatten(target, raw, (*seen, pid))
    return Policy(
        pid,
        entry.levels + base.levels,
        entry.repeat if entry.repeat is not None else base.repeat,
        entry.description,
    )


def _check_ends_at_centre(policy: Policy, centre: CommandCentre, node: Node) -> None:
    last = policy.levels[-1].targets
    missing = [
        *(f"person:{p}" for p in centre.targets.people if p not in last.people),
        *(f"group:{g}" for g in centre.targets.groups if g not in last.groups),
        *(f"roster:{r}" for r in centre.targets.rosters if r not in last.rosters),
    ]
    if missing:
        raise ConfigError(
            node.file,
            f"{node.key}.levels",
            f"policy {policy.id!r}: the last level must page the command centre "
            f"({centre.name}): missing {', '.join(missing)}",
        )


def _parse_targets(fields: Mapping[str, Node], responders: Responders) -> Targets:
    lists: dict[str, tuple[str, ...]] = {}
    for kind, known in (
        ("people", responders.people),
        ("groups", responders.groups),
        ("rosters", responders.rosters),
    ):
        if kind not in fields:
            lists[kind] = ()
            continue
        refs = fields[kind].texts()
        for item, ref in zip(fields[kind].items(), refs, strict=True):
            if ref not in known:
                singular = {"people": "person", "groups": "group", "rosters": "roster"}[kind]
                raise item.error(f"unknown {singular} {ref!r}")
        lists[kind] = tuple(refs)
    return Targets(people=lists["people"], groups=lists["groups"], rosters=lists["rosters"])


def _parse_level(node: Node, responders: Responders) -> Level:
    fields = node.table(
        {"people", "groups", "rosters", "channels", "wait_s"}, required={"channels", "wait_s"}
    )
    targets = _parse_targets(fields, responders)
    if not targets.refs():
        raise node.error("a level needs at least one of people, groups, rosters")
    names = fields["channels"].texts()
    for item, name in zip(fields["channels"].items(), names, strict=True):
        if name not in {c.value for c in Medium}:
            raise item.error(f"unknown channel {name!r} (expected sms or voice)")
    if not names:
        raise fields["channels"].error("must name at least one channel")
    return Level(
        targets=targets,
        channels=tuple(Medium(n) for n in names),
        wait_s=fields["wait_s"].integer(0, MAX_WAIT_S),
    )


def _parse_command_centre(node: Node, responders: Responders) -> CommandCentre:
    fields = node.table({"name", "people", "groups", "rosters"}, required={"name"})
    targets = _parse_targets(fields, responders)
    if not targets.refs():
        raise node.error("the command centre needs at least one of people, groups, rosters")
    return CommandCentre(name=fields["name"].text(), targets=targets)


def _parse_operations(node: Node, responders: Responders) -> Policy:
    fields = node.table({"description", "levels", "repeat"}, required={"levels"})
    levels = tuple(_parse_level(item, responders) for item in fields["levels"].items())
    if not levels:
        raise fields["levels"].error("must have at least one level")
    return Policy(
        id="operations",
        levels=levels,
        repeat=fields["repeat"].integer(1, MAX_REPEAT) if "repeat" in fields else 1,
        description=fields["description"].text() if "description" in fields else "",
    )
