"""Tests for dispatch.policy: the routing fallback chain and policies.toml validation."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from dispatch.policy import Medium, RouteReason, Routing, load_policies, parse_policies
from dispatch.responders import Responders, load_responders, parse_responders
from dispatch.tomlcheck import ConfigWarning
from gateway.errors import ConfigError
from gateway.model import Kelurahan

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo"


def madiun_geojson() -> Path:
    local = ROOT / "config" / "geo" / "kelurahan.geojson"
    return local if local.exists() else Path("/work/shared/data/madiun/kelurahan.geojson")


def madiun_kelurahan() -> list[Kelurahan]:
    features = json.loads(madiun_geojson().read_text(encoding="utf-8"))["features"]
    return [
        Kelurahan(
            f["properties"]["kode"], f["properties"]["kelurahan"], f["properties"]["kecamatan"]
        )
        for f in features
    ]


KELURAHAN = [
    Kelurahan("35.77.01.1001", "Oro-oro Ombo", "Kartoharjo"),
    Kelurahan("35.77.01.1002", "Sukosari", "Kartoharjo"),
    Kelurahan("35.77.03.1004", "Kuncen", "Taman"),
]

RESPONDERS = """
people = [
  { id = "linmas-1", name = "Ani", phone = "+628120000101" },
  { id = "lurah-1", name = "Budi", phone = "+628120000111" },
  { id = "camat-1", name = "Citra", phone = "+628120009001" },
  { id = "op-1", name = "Dedi", phone = "+628120009901" },
  { id = "ops-1", name = "Eka", phone = "+628120009801" },
]
groups = [
  { id = "kantor-1", members = ["lurah-1"] },
  { id = "ops", members = ["ops-1"] },
]
[[rosters]]
id = "linmas-oro"
shifts = [{ days = "daily", start = "00:00", end = "00:00", people = ["linmas-1"] }]
[[rosters]]
id = "siaga112"
shifts = [{ days = "daily", start = "00:00", end = "00:00", people = ["op-1"] }]
"""

CENTRE = '{ rosters = ["siaga112"], channels = ["sms", "voice"], wait_s = 120 }'

POLICIES = f"""
[command_centre]
name = "Madiun Siaga 112"
rosters = ["siaga112"]

[operations]
levels = [{{ groups = ["ops"], channels = ["sms"], wait_s = 300 }}]

[[policies]]
id = "kota"
city = true
repeat = 2
levels = [{CENTRE}]

[[policies]]
id = "kec-kartoharjo"
kecamatan = ["Kartoharjo"]
repeat = 3
levels = [
  {{ people = ["camat-1"], channels = ["voice"], wait_s = 180 }},
  {CENTRE},
]

[[policies]]
id = "kel-oro"
kelurahan = ["35.77.01.1001"]
then = "kec-kartoharjo"
levels = [
  {{ rosters = ["linmas-oro"], channels = ["sms", "voice"], wait_s = 60 }},
  {{ groups = ["kantor-1"], channels = ["sms", "voice"], wait_s = 120 }},
]
"""


def responders() -> Responders:
    loaded, _ = parse_responders(tomllib.loads(RESPONDERS), "responders.toml")
    return loaded


def parse(text: str = POLICIES) -> tuple[Routing, list[ConfigWarning]]:
    return parse_policies(tomllib.loads(text), "policies.toml", responders(), KELURAHAN)


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.file == "policies.toml"
    return info.value


def test_kelurahan_policy_wins_and_continues_with_its_kecamatan() -> None:
    routing, warnings = parse()
    policy, why = routing.policy_for("35.77.01.1001", "Kartoharjo")
    assert why == "kelurahan"
    assert policy.id == "kel-oro"
    assert [lvl.wait_s for lvl in policy.levels] == [60, 120, 180, 120]
    assert policy.levels[0].targets.rosters == ("linmas-oro",)
    assert policy.levels[-1].targets.rosters == ("siaga112",)
    # repeat is inherited from the policy it continues with.
    assert policy.repeat == 3
    assert warnings == []


def test_kelurahan_without_own_policy_falls_back_to_its_kecamatan() -> None:
    routing, _ = parse()
    policy, why = routing.policy_for("35.77.01.1002", None)
    assert (policy.id, why) == ("kec-kartoharjo", RouteReason.KECAMATAN)


def test_kecamatan_name_alone_routes_case_insensitively() -> None:
    routing, _ = parse()
    policy, why = routing.policy_for(None, "KARTOHARJO")
    assert (policy.id, why) == ("kec-kartoharjo", "kecamatan")


def test_unknown_location_falls_back_to_the_city_policy() -> None:
    routing, _ = parse()
    assert routing.policy_for(None, None)[1] == "city"
    assert routing.policy_for("35.77.03.1004", "Taman") == (routing.policies["kota"], "city")
    assert routing.policy_for("99.99.99.9999", "Nowhere")[0].id == "kota"


def test_test_presses_go_to_operations_only() -> None:
    routing, _ = parse()
    policy, why = routing.policy_for("35.77.01.1001", "Kartoharjo", test=True)
    assert why == RouteReason.OPERATIONS
    assert policy is routing.operations
    assert policy.levels[0].targets.groups == ("ops",)
    assert policy.levels[0].channels == (Medium.SMS,)


def test_offsets_sum_the_waits_across_rounds() -> None:
    routing, _ = parse()
    kota = routing.policies["kota"]
    assert kota.offsets() == ((0, 0, 0), (1, 0, 120))
    kel = routing.policies["kel-oro"]
    assert [o for _, _, o in kel.offsets()[:5]] == [0, 60, 180, 360, 480]


def test_last_level_must_page_the_command_centre() -> None:
    err = config_error(POLICIES.replace(f"  {CENTRE},\n", ""))
    assert err.key == "policies[1].levels"
    assert "Madiun Siaga 112" in err.problem
    assert "roster:siaga112" in err.problem


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ('"35.77.01.1001"]', '"35.77.01.1099"]', "policies[2].kelurahan[0]", "unknown kelurahan"),
        (
            'kecamatan = ["Kartoharjo"]',
            'kecamatan = ["Madiun"]',
            "policies[1].kecamatan[0]",
            "unknown kecamatan",
        ),
        (
            'rosters = ["linmas-oro"]',
            'rosters = ["linmas-x"]',
            "policies[2].levels[0].rosters[0]",
            "unknown roster",
        ),
        (
            'people = ["camat-1"]',
            'people = ["camat-9"]',
            "policies[1].levels[0].people[0]",
            "unknown person",
        ),
        (
            'groups = ["kantor-1"]',
            'groups = ["kantor-9"]',
            "policies[2].levels[1].groups[0]",
            "unknown group",
        ),
        (
            'channels = ["voice"]',
            'channels = ["fax"]',
            "policies[1].levels[0].channels[0]",
            "unknown channel",
        ),
        ("wait_s = 180", "wait_s = -1", "policies[1].levels[0].wait_s", "between"),
        ("wait_s = 180", "wait_s = true", "policies[1].levels[0].wait_s", "integer"),
        ("repeat = 3", "repeat = 0", "policies[1].repeat", "between"),
        ('then = "kec-kartoharjo"', 'then = "kec-nowhere"', "policies[2].then", "unknown policy"),
        ("city = true", "city = false", "policies", "city"),
        ("wait_s = 180", "wait = 180", "policies[1].levels[0].wait", "unknown key"),
    ],
)
def test_validation_errors_name_the_key(old: str, new: str, key: str, problem: str) -> None:
    assert old in POLICIES
    err = config_error(POLICIES.replace(old, new, 1))
    assert err.key == key
    assert problem in err.problem


def test_a_kelurahan_routed_twice_is_an_error() -> None:
    err = config_error(
        POLICIES.replace('kecamatan = ["Kartoharjo"]', 'kelurahan = ["35.77.01.1001"]')
    )
    assert err.key == "policies[2].kelurahan[0]"
    assert "already routed to 'kec-kartoharjo'" in err.problem


def test_then_loops_are_detected() -> None:
    text = POLICIES.replace(
        'kecamatan = ["Kartoharjo"]', 'kecamatan = ["Kartoharjo"]\nthen = "kel-oro"'
    )
    err = config_error(text)
    assert "loops" in err.problem


def test_missing_command_centre_is_named() -> None:
    err = config_error(POLICIES.replace("[command_centre]", "[centre]"))
    assert err.key == "centre"


def test_unused_policy_is_a_warning() -> None:
    extra = f'\n[[policies]]\nid = "spare"\nlevels = [{CENTRE}]\n'
    _, warnings = parse(POLICIES + extra)
    assert [w.problem for w in warnings] == ["policy 'spare' is not used by any route"]


def test_error_str_is_one_operator_line(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(POLICIES.replace('"35.77.01.1001"]', '"35.77.01.1099"]'), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_policies(path, responders(), KELURAHAN)
    assert str(info.value) == (
        f"{path}: policies[2].kelurahan[0]: unknown kelurahan kode '35.77.01.1099'"
    )


def test_demo_config_gives_every_madiun_kelurahan_its_own_policy() -> None:
    people, warnings = load_responders(DEMO / "responders.toml")
    assert warnings == []
    kelurahan = madiun_kelurahan()
    assert len(kelurahan) == 27
    routing, policy_warnings = load_policies(DEMO / "policies.toml", people, kelurahan)
    assert policy_warnings == []
    for k in kelurahan:
        policy, why = routing.policy_for(k.kode, k.kecamatan)
        assert why == "kelurahan", k
        assert policy.repeat == 2
        # Mojorejo's first level waits 6 s: the demo's "nobody answers" scene.
        first = 6 if k.kode == "35.77.03.1001" else 60
        assert [lvl.wait_s for lvl in policy.levels] == [first, 120, 180, 120]
        linmas, kantor, camat, centre = policy.levels
        (roster,) = linmas.targets.rosters
        assert k.name in people.rosters[roster].description
        (group,) = kantor.targets.groups
        assert k.name in people.groups[group].description
        assert camat.targets.rosters == (f"camat-{k.kecamatan.lower()}",)
        assert centre.targets.rosters == ("siaga112",)
        for level in policy.levels:
            assert level.channels == (Medium.SMS, Medium.VOICE)
    for kecamatan in {k.kecamatan for k in kelurahan}:
        assert routing.policy_for(None, kecamatan)[1] == "kecamatan"
    assert routing.policy_for(None, None)[1] == "city"


def test_demo_numbers_are_fake_and_unique() -> None:
    people, _ = load_responders(DEMO / "responders.toml")
    phones = [p.phone for p in people.people.values()]
    assert len(set(phones)) == len(phones)
    assert all(phone.startswith("+62812000") and len(phone) == 13 for phone in phones)
