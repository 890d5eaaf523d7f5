"""Who would be paged right now: the pure half of ``panicctl oncall [--at] [--kelurahan]``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from dispatch.escalation import resolve_targets_via
from dispatch.policy import Medium, RouteReason, Routing
from dispatch.responders import Responders


@dataclass(frozen=True, slots=True)
class OncallRow:
    """One person (or an empty level) of one kelurahan's first escalation round.

    ``person_id`` and the fields after it are None when the level resolves to nobody at
    its due time, so a roster gap shows up in the report instead of vanishing.
    """

    kelurahan_kode: str
    kelurahan: str
    kecamatan: str
    policy_id: str
    route: RouteReason
    level: int
    after_s: int
    channels: tuple[Medium, ...]
    via: str
    person_id: str | None
    name: str | None
    phone: str | None
    role: str | None


def oncall_report(
    routing: Routing,
    responders: Responders,
    at: datetime,
    kelurahan_kode: str | None,
    kelurahan: Mapping[str, tuple[str, str]],
) -> list[OncallRow]:
    """Rows for every level of round 0, per kelurahan (all when ``kelurahan_kode`` is None).

    ``kelurahan`` maps kode → (name, kecamatan); ``kelurahan_kode`` may also be a name
    (case-insensitive). Each level's rosters are resolved at ``at`` plus the level's
    offset, i.e. at the moment a press made at ``at`` would reach that level.
    Raises LookupError for an unknown kelurahan.
    """
    if at.tzinfo is None:
        raise ValueError("oncall_report needs an aware datetime")
    kodes = sorted(kelurahan) if kelurahan_kode is None else [_find(kelurahan_kode, kelurahan)]
    rows: list[OncallRow] = []
    for kode in kodes:
        name, kecamatan = kelurahan[kode]
        policy, route = routing.policy_for(kode, kecamatan)
        for rnd, index, after_s in policy.offsets():
            if rnd > 0:
                break
            level = policy.levels[index]
            when = at + timedelta(seconds=after_s)
            resolved = resolve_targets_via(level, responders, when)
            # An empty level still gets a row so a roster gap is visible to the operator.
            entries = resolved or ((None, ",".join(level.targets.refs())),)
            for person_id, via in entries:
                person = responders.people[person_id] if person_id is not None else None
                rows.append(
                    OncallRow(
                        kelurahan_kode=kode,
                        kelurahan=name,
                        kecamatan=kecamatan,
                        policy_id=policy.id,
                        route=route,
                        level=index,
                        after_s=after_s,
                        channels=level.channels,
                        via=via,
                        person_id=person_id,
                        name=person.name if person else None,
                        phone=person.phone if person else None,
                        role=person.role if person else None,
                    )
                )
    return rows


def _find(wanted: str, kelurahan: Mapping[str, tuple[str, str]]) -> str:
    if wanted in kelurahan:
        return wanted
    for kode, (name, _) in kelurahan.items():
        if name.casefold() == wanted.casefold():
            return kode
    raise LookupError(f"unknown kelurahan {wanted!r}")
