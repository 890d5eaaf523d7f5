"""Tests for gateway.locate: kelurahan lookup, the location ladder and map links."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import shapely
import shapely.ops
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import shape

from gateway.errors import ConfigError
from gateway.locate import Locator, locate, map_link
from gateway.model import (
    Device,
    GeoFix,
    Kelurahan,
    KelurahanMatch,
    Location,
    LocationSource,
)

GEOJSON = Path(__file__).parent.parent / "config" / "geo" / "kelurahan.geojson"

# Extent of the data, from config/geo/README.md ("Checks done").
MIN_LAT, MAX_LAT = -7.6805, -7.5949
MIN_LON, MAX_LON = 111.4957, 111.5590

# The verified test points of config/geo/README.md: lat, lon, kelurahan, kecamatan, kode.
README_POINTS = [
    (-7.62182, 111.53096, "Oro-oro Ombo", "Kartoharjo", "35.77.01.1001"),
    (-7.61364, 111.53369, "Sukosari", "Kartoharjo", "35.77.01.1002"),
    (-7.62804, 111.53908, "Klegen", "Kartoharjo", "35.77.01.1003"),
    (-7.61577, 111.54032, "Rejomulyo", "Kartoharjo", "35.77.01.1004"),
    (-7.61924, 111.54837, "Pilangbango", "Kartoharjo", "35.77.01.1005"),
    (-7.60471, 111.54222, "Tawangrejo", "Kartoharjo", "35.77.01.1006"),
    (-7.63069, 111.54585, "Kanigoro", "Kartoharjo", "35.77.01.1007"),
    (-7.62657, 111.52278, "Kartoharjo", "Kartoharjo", "35.77.01.1008"),
    (-7.60059, 111.55428, "Kelun", "Kartoharjo", "35.77.01.1009"),
    (-7.63152, 111.50474, "Manguharjo", "Manguharjo", "35.77.02.1001"),
    (-7.60091, 111.52180, "Sogaten", "Manguharjo", "35.77.02.1002"),
    (-7.60599, 111.53016, "Patihan", "Manguharjo", "35.77.02.1003"),
    (-7.61092, 111.50494, "Ngegong", "Manguharjo", "35.77.02.1004"),
    (-7.61718, 111.51251, "Winongo", "Manguharjo", "35.77.02.1005"),
    (-7.61933, 111.52335, "Madiun Lor", "Manguharjo", "35.77.02.1006"),
    (-7.62701, 111.51689, "Pangongangan", "Manguharjo", "35.77.02.1007"),
    (-7.63377, 111.51402, "Nambangan Lor", "Manguharjo", "35.77.02.1008"),
    (-7.64748, 111.51454, "Nambangan Kidul", "Manguharjo", "35.77.02.1009"),
    (-7.63942, 111.53463, "Mojorejo", "Taman", "35.77.03.1001"),
    (-7.64656, 111.53177, "Pandean", "Taman", "35.77.03.1002"),
    (-7.65500, 111.53608, "Banjarejo", "Taman", "35.77.03.1003"),
    (-7.65599, 111.51408, "Kuncen", "Taman", "35.77.03.1004"),
    (-7.64275, 111.54389, "Manisrejo", "Taman", "35.77.03.1005"),
    (-7.63492, 111.52772, "Kejuron", "Taman", "35.77.03.1006"),
    (-7.65557, 111.51877, "Josenan", "Taman", "35.77.03.1007"),
    (-7.65946, 111.52491, "Demangan", "Taman", "35.77.03.1008"),
    (-7.64070, 111.52496, "Taman", "Taman", "35.77.03.1009"),
    # Edge case: inside the detached part of Pangongangan, ~155 m from its edge.
    (-7.64802, 111.50357, "Pangongangan", "Manguharjo", "35.77.02.1007"),
]

# Edge cases of the README that lie in no kelurahan, each kilometres from the city.
README_OUTSIDE = [(-7.55, 111.52), (-7.63, 111.60), (-7.70, 111.52)]

# Found with shapely: the pole of inaccessibility of the largest Winongo/Madiun Lor
# overlap (about 1,800 m²), rounded to 6 decimals and re-checked to lie in both.
WINONGO_MADIUN_LOR_OVERLAP = GeoFix(-7.618059, 111.519215)
# Found with shapely on a 0.5 m grid over that overlap: points ~6.8 m inside one of the
# two and ~0.8 m inside the other, so the depth rule has a clear answer either way.
WINONGO_DEEPER = GeoFix(-7.61814, 111.5192)
MADIUN_LOR_DEEPER = GeoFix(-7.61824, 111.51927)
# Found with shapely: the pole of inaccessibility of the largest sliver hole in the
# union (~5,700 m²), ~4 m from Kejuron and covered by no kelurahan.
SLIVER_HOLE = GeoFix(-7.63976, 111.519605)

KEJURON = Kelurahan("35.77.03.1006", "Kejuron", "Taman")
OVERRIDE_KODE = "35.77.01.1009"  # Kelun, far from every other point used below


@pytest.fixture(scope="module")
def locator() -> Locator:
    return Locator.from_geojson(GEOJSON)


@pytest.fixture(scope="module")
def raw_shapes() -> dict[str, Any]:
    """The features as plain lon/lat shapely geometries, to check the Locator against."""
    document = json.loads(GEOJSON.read_text(encoding="utf-8"))
    return {f["properties"]["kode"]: shape(f["geometry"]) for f in document["features"]}


def haversine_m(a: GeoFix, b: GeoFix) -> float:
    """Great-circle distance, an independent check on the Locator's metres."""
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(h))


def haversine_depth_m(geom: Any, fix: GeoFix) -> float:
    """Metres from a fix to the nearest point of a lon/lat geometry's boundary."""
    nearest = shapely.ops.nearest_points(geom.boundary, shapely.Point(fix.lon, fix.lat))[0]
    return haversine_m(fix, GeoFix(nearest.y, nearest.x))


def east_of(fix: GeoFix, metres: float) -> GeoFix:
    return GeoFix(fix.lat, fix.lon + metres / (111_195.08 * math.cos(math.radians(fix.lat))))


def easternmost_vertex(raw_shapes: dict[str, Any]) -> GeoFix:
    """The vertex with the largest longitude; nothing in the data lies east of it."""
    coords = shapely.get_coordinates(list(raw_shapes.values()))
    lon, lat = max(coords.tolist())
    return GeoFix(lat, lon)


def square(lon: float, lat: float, half_deg: float) -> Any:
    return shapely.box(lon - half_deg, lat - half_deg, lon + half_deg, lat + half_deg)


def device(
    *,
    location: GeoFix | None,
    kelurahan_kode: str | None = None,
    mobile: bool = False,
) -> Device:
    return Device(
        id="btn-0001",
        hardware="esp32-lora",
        key=b"k" * 32,
        location=location,
        mobile=mobile,
        address="Jl. Pahlawan 1",
        landmark="depan masjid",
        kelurahan_kode=kelurahan_kode,
        heartbeat_interval_s=3600,
    )


def write_collection(tmp_path: Path, features: list[dict[str, Any]]) -> Path:
    path = tmp_path / "kelurahan.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def feature(coordinates: Any = None, **properties: object) -> dict[str, Any]:
    """A valid Feature; a property given as None is left out."""
    props: dict[str, object] = {
        "kode": "35.77.01.1001",
        "kelurahan": "Oro-oro Ombo",
        "kecamatan": "Kartoharjo",
    }
    props.update(properties)
    ring = coordinates or [[111.52, -7.62], [111.53, -7.62], [111.53, -7.61], [111.52, -7.62]]
    return {
        "type": "Feature",
        "properties": {k: v for k, v in props.items() if v is not None},
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }


# --- kelurahan_at -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row", README_POINTS, ids=[f"{row[2]}@{row[0]},{row[1]}" for row in README_POINTS]
)
def test_readme_point_is_inside_its_kelurahan(
    locator: Locator, row: tuple[float, float, str, str, str]
) -> None:
    lat, lon, name, kecamatan, kode = row

    assert locator.kelurahan_at(GeoFix(lat, lon)) == (
        Kelurahan(kode, name, kecamatan),
        KelurahanMatch.INSIDE,
        0.0,
    )


@pytest.mark.parametrize(("lat", "lon"), README_OUTSIDE)
def test_readme_point_outside_the_city_has_no_kelurahan(
    locator: Locator, lat: float, lon: float
) -> None:
    kelurahan, match, distance_m = locator.kelurahan_at(GeoFix(lat, lon))
    assert (kelurahan, match) == (None, KelurahanMatch.NONE)
    assert distance_m is not None
    assert distance_m > 1_000


@pytest.mark.parametrize(
    ("fix", "deeper", "shallower"),
    [
        (WINONGO_DEEPER, "35.77.02.1005", "35.77.02.1006"),
        (MADIUN_LOR_DEEPER, "35.77.02.1006", "35.77.02.1005"),
    ],
)
def test_overlap_picks_the_kelurahan_the_point_is_deepest_inside(
    locator: Locator, raw_shapes: dict[str, Any], fix: GeoFix, deeper: str, shallower: str
) -> None:
    point = shapely.Point(fix.lon, fix.lat)
    assert sorted(k for k, g in raw_shapes.items() if g.covers(point)) == sorted(
        [deeper, shallower]
    )
    assert haversine_depth_m(raw_shapes[deeper], fix) > 5.0
    assert haversine_depth_m(raw_shapes[shallower], fix) < 1.0

    kelurahan, match, _ = locator.kelurahan_at(fix)

    assert match is KelurahanMatch.OVERLAP
    assert kelurahan is not None
    assert kelurahan.kode == deeper


def test_overlap_result_is_the_same_on_every_call(locator: Locator) -> None:
    results = {locator.kelurahan_at(WINONGO_MADIUN_LOR_OVERLAP) for _ in range(5)}

    assert len(results) == 1
    assert results.pop()[1] is KelurahanMatch.OVERLAP


def test_overlap_choice_does_not_depend_on_feature_order(raw_shapes: dict[str, Any]) -> None:
    names = {k.kode: k for k in Locator.from_geojson(GEOJSON).kelurahan}
    pairs = [(names[kode], geom) for kode, geom in raw_shapes.items()]

    forward = Locator(pairs).kelurahan_at(WINONGO_MADIUN_LOR_OVERLAP)
    backward = Locator(reversed(pairs)).kelurahan_at(WINONGO_MADIUN_LOR_OVERLAP)

    assert forward == backward


def test_overlap_prefers_the_deeper_polygon_over_the_lower_kode() -> None:
    shallow = Kelurahan("35.77.01.1001", "A", "K")
    deep = Kelurahan("35.77.01.1002", "B", "K")
    # Point at (111.5, -7.6): 0.0009° inside the small square, 0.01° inside the big one.
    locator = Locator(
        [(shallow, square(111.5009, -7.6, 0.0018)), (deep, square(111.5, -7.6, 0.01))]
    )

    assert locator.kelurahan_at(GeoFix(-7.6, 111.5)) == (deep, KelurahanMatch.OVERLAP, 0.0)


def test_overlap_of_equal_depth_goes_to_the_lowest_kode() -> None:
    low = Kelurahan("35.77.01.1001", "A", "K")
    high = Kelurahan("35.77.01.1002", "B", "K")
    same = square(111.5, -7.6, 0.01)

    for order in ([(high, same), (low, same)], [(low, same), (high, same)]):
        result = Locator(order).kelurahan_at(GeoFix(-7.6, 111.5))
        assert result == (low, KelurahanMatch.OVERLAP, 0.0)


def test_sliver_hole_takes_the_nearest_kelurahan(
    locator: Locator, raw_shapes: dict[str, Any]
) -> None:
    point = shapely.Point(SLIVER_HOLE.lon, SLIVER_HOLE.lat)
    assert not any(g.covers(point) for g in raw_shapes.values())

    kelurahan, match, distance_m = locator.kelurahan_at(SLIVER_HOLE)

    assert (kelurahan, match) == (KEJURON, KelurahanMatch.NEAREST)
    assert distance_m == pytest.approx(3.9, abs=0.5)


def test_sliver_hole_beyond_a_zero_tolerance_has_no_kelurahan() -> None:
    strict = Locator.from_geojson(GEOJSON, nearest_within_m=0.0)

    kelurahan, match, distance_m = strict.kelurahan_at(SLIVER_HOLE)

    assert (kelurahan, match) == (None, KelurahanMatch.NONE)
    assert distance_m == pytest.approx(3.9, abs=0.5)


@pytest.mark.parametrize("metres", [10.0, 100.0, 149.0])
def test_point_just_outside_the_city_edge_takes_the_nearest_kelurahan(
    locator: Locator, raw_shapes: dict[str, Any], metres: float
) -> None:
    edge = easternmost_vertex(raw_shapes)
    fix = east_of(edge, metres)

    kelurahan, match, distance_m = locator.kelurahan_at(fix)

    assert match is KelurahanMatch.NEAREST
    assert kelurahan is not None
    # The easternmost vertex of the whole data set (lon 111.559014) is Pilangbango's.
    assert kelurahan.name == "Pilangbango"
    # Nothing lies east of the vertex, so the vertex is the nearest point: true metres.
    assert distance_m == pytest.approx(haversine_m(fix, edge), rel=2e-3)


@pytest.mark.parametrize("metres", [151.0, 400.0])
def test_point_beyond_the_tolerance_has_no_kelurahan_but_a_distance(
    locator: Locator, raw_shapes: dict[str, Any], metres: float
) -> None:
    edge = easternmost_vertex(raw_shapes)
    fix = east_of(edge, metres)

    kelurahan, match, distance_m = locator.kelurahan_at(fix)

    assert (kelurahan, match) == (None, KelurahanMatch.NONE)
    assert distance_m == pytest.approx(haversine_m(fix, edge), rel=2e-3)


def test_tolerance_is_configurable(raw_shapes: dict[str, Any]) -> None:
    fix = east_of(easternmost_vertex(raw_shapes), 300.0)
    wide = Locator.from_geojson(GEOJSON, nearest_within_m=500.0)

    assert wide.kelurahan_at(fix)[1] is KelurahanMatch.NEAREST


def test_non_finite_fix_has_no_kelurahan(locator: Locator) -> None:
    assert locator.kelurahan_at(GeoFix(math.nan, 111.52)) == (None, KelurahanMatch.NONE, None)


@settings(max_examples=300, deadline=None)
@given(
    lat=st.floats(min_value=MIN_LAT - 0.01, max_value=MAX_LAT + 0.01),
    lon=st.floats(min_value=MIN_LON - 0.01, max_value=MAX_LON + 0.01),
)
def test_any_point_near_the_city_resolves_consistently_and_deterministically(
    locator: Locator, raw_shapes: dict[str, Any], lat: float, lon: float
) -> None:
    fix = GeoFix(lat, lon)
    kelurahan, match, distance_m = locator.kelurahan_at(fix)

    assert locator.kelurahan_at(fix) == (kelurahan, match, distance_m)
    assert distance_m is not None
    point = shapely.Point(lon, lat)
    # 1e-9° (0.1 mm) of slack: the Locator's projection may round a point lying exactly
    # on a boundary to either side.
    near = {k for k, g in raw_shapes.items() if g.distance(point) <= 1e-9}
    strictly_inside = {k for k, g in raw_shapes.items() if g.contains(point)}
    match match:
        case KelurahanMatch.INSIDE | KelurahanMatch.OVERLAP:
            assert kelurahan is not None
            assert kelurahan.kode in near
            assert distance_m == 0.0
        case KelurahanMatch.NEAREST:
            assert kelurahan is not None
            assert not strictly_inside
            assert 0.0 <= distance_m <= locator.nearest_within_m
        case KelurahanMatch.NONE:
            assert kelurahan is None
            assert not strictly_inside
            assert distance_m > locator.nearest_within_m
        case _:
            pytest.fail(f"unexpected match {match}")


# --- Locator metadata ---------------------------------------------------------------------


def test_locator_lists_all_27_kelurahan_sorted_by_kode(locator: Locator) -> None:
    kodes = [k.kode for k in locator.kelurahan]
    assert len(kodes) == 27
    assert kodes == sorted(kodes)
    assert locator.kecamatan_names == ("Kartoharjo", "Manguharjo", "Taman")


def test_by_kode_finds_a_kelurahan_and_rejects_an_unknown_one(locator: Locator) -> None:
    assert locator.by_kode("35.77.03.1006") == KEJURON
    assert locator.by_kode("35.77.09.9999") is None


# --- locate: the DESIGN §2 ladder ---------------------------------------------------------

KELUN_FIX = GeoFix(-7.60059, 111.55428)
KEJURON_FIX = GeoFix(-7.63492, 111.52772)
WINONGO_FIX = GeoFix(-7.61718, 111.51251)


def test_gps_fix_wins_over_registered_location_and_gateway(locator: Locator) -> None:
    result = locate(
        gps=KEJURON_FIX,
        device=device(location=WINONGO_FIX),
        gateway_fix=KELUN_FIX,
        locator=locator,
    )

    assert result == Location(LocationSource.GPS, KEJURON_FIX, KEJURON, KelurahanMatch.INSIDE, 0.0)


def test_gps_fix_is_not_replaced_by_the_operator_override(locator: Locator) -> None:
    result = locate(
        gps=KEJURON_FIX,
        device=device(location=WINONGO_FIX, kelurahan_kode=OVERRIDE_KODE),
        gateway_fix=None,
        locator=locator,
    )

    assert (result.source, result.kelurahan, result.match) == (
        LocationSource.GPS,
        KEJURON,
        KelurahanMatch.INSIDE,
    )


def test_registered_location_is_used_without_gps(locator: Locator) -> None:
    result = locate(
        gps=None, device=device(location=KEJURON_FIX), gateway_fix=KELUN_FIX, locator=locator
    )

    assert result == Location(
        LocationSource.REGISTERED, KEJURON_FIX, KEJURON, KelurahanMatch.INSIDE, 0.0
    )


def test_operator_override_wins_over_the_registered_location(locator: Locator) -> None:
    result = locate(
        gps=None,
        device=device(location=KEJURON_FIX, kelurahan_kode=OVERRIDE_KODE),
        gateway_fix=None,
        locator=locator,
    )

    assert result == Location(
        LocationSource.REGISTERED,
        KEJURON_FIX,
        locator.by_kode(OVERRIDE_KODE),
        KelurahanMatch.OVERRIDE,
    )


def test_unknown_override_kode_falls_back_to_the_polygon_lookup(locator: Locator) -> None:
    result = locate(
        gps=None,
        device=device(location=KEJURON_FIX, kelurahan_kode="35.77.09.9999"),
        gateway_fix=None,
        locator=locator,
    )

    assert (result.kelurahan, result.match) == (KEJURON, KelurahanMatch.INSIDE)


def test_mobile_device_without_location_uses_the_gateway(locator: Locator) -> None:
    result = locate(
        gps=None,
        device=device(location=None, mobile=True),
        gateway_fix=KEJURON_FIX,
        locator=locator,
    )

    assert result == Location(
        LocationSource.GATEWAY, KEJURON_FIX, KEJURON, KelurahanMatch.INSIDE, 0.0
    )


def test_without_gps_the_override_beats_the_gateway_position(locator: Locator) -> None:
    # A carried button issued to one kelurahan, heard by a gateway that may be far away:
    # the map shows the gateway, the kelurahan (and so the responders) is the override.
    result = locate(
        gps=None,
        device=device(location=None, kelurahan_kode=OVERRIDE_KODE, mobile=True),
        gateway_fix=KEJURON_FIX,
        locator=locator,
    )

    assert (result.source, result.fix, result.match) == (
        LocationSource.GATEWAY,
        KEJURON_FIX,
        KelurahanMatch.OVERRIDE,
    )
    assert result.kelurahan == locator.by_kode(OVERRIDE_KODE)
    assert result.kelurahan != KEJURON


def test_with_no_position_at_all_the_override_still_names_the_kelurahan(
    locator: Locator,
) -> None:
    result = locate(
        gps=None,
        device=device(location=None, kelurahan_kode=OVERRIDE_KODE, mobile=True),
        gateway_fix=None,
        locator=locator,
    )

    assert result == Location(
        LocationSource.UNKNOWN, None, locator.by_kode(OVERRIDE_KODE), KelurahanMatch.OVERRIDE
    )


def test_unknown_device_uses_the_gateway(locator: Locator) -> None:
    result = locate(gps=None, device=None, gateway_fix=KEJURON_FIX, locator=locator)

    assert result.source is LocationSource.GATEWAY
    assert result.kelurahan == KEJURON


def test_nothing_known_gives_an_unknown_location(locator: Locator) -> None:
    result = locate(gps=None, device=device(location=None), gateway_fix=None, locator=locator)

    assert result == Location(LocationSource.UNKNOWN, None, None, KelurahanMatch.NONE)


def test_a_nan_gps_fix_falls_through_to_the_registered_location(locator: Locator) -> None:
    result = locate(
        gps=GeoFix(math.nan, math.nan),
        device=device(location=KEJURON_FIX),
        gateway_fix=None,
        locator=locator,
    )

    assert (result.source, result.kelurahan) == (LocationSource.REGISTERED, KEJURON)


def test_gps_fix_outside_the_city_keeps_gps_as_source(locator: Locator) -> None:
    far = GeoFix(-7.55, 111.52)

    result = locate(gps=far, device=device(location=KEJURON_FIX), gateway_fix=None, locator=locator)

    assert (result.source, result.fix, result.kelurahan, result.match) == (
        LocationSource.GPS,
        far,
        None,
        KelurahanMatch.NONE,
    )


# --- map_link -----------------------------------------------------------------------------


def test_map_link_is_a_short_openstreetmap_marker_link() -> None:
    link = map_link(GeoFix(-7.6293456, 111.52))

    assert link == (
        "https://www.openstreetmap.org/?mlat=-7.62935&mlon=111.52000#map=18/-7.62935/111.52000"
    )
    assert len(link) <= 90


# --- from_geojson: bad files --------------------------------------------------------------


def assert_one_line(error: ConfigError, path: Path, key: str, problem_part: str) -> None:
    assert error.file == str(path)
    assert error.key == key
    assert problem_part in error.problem
    assert "\n" not in str(error)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.geojson"

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "-", "cannot read")


def test_non_json_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "kelurahan.geojson"
    path.write_text('{"type": "FeatureCollection",\n "features": [oops]}')

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "line 2", "not valid JSON")


def test_non_feature_collection_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "kelurahan.geojson"
    path.write_text(json.dumps({"type": "Feature"}))

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "type", "FeatureCollection")


@pytest.mark.parametrize("missing", ["kode", "kelurahan", "kecamatan"])
def test_missing_property_is_a_config_error(tmp_path: Path, missing: str) -> None:
    path = write_collection(
        tmp_path,
        [feature(kode="35.77.01.1001"), feature(**{"kode": "35.77.01.1002", missing: None})],
    )

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, f"features[1].properties.{missing}", "missing")


def test_non_string_property_is_a_config_error(tmp_path: Path) -> None:
    path = write_collection(tmp_path, [feature(kode=3577011001)])

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "features[0].properties.kode", "non-empty string")


def test_self_intersecting_polygon_is_a_config_error(tmp_path: Path) -> None:
    bowtie = [[111.52, -7.62], [111.53, -7.61], [111.53, -7.62], [111.52, -7.61], [111.52, -7.62]]
    path = write_collection(tmp_path, [feature(coordinates=bowtie)])

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "features[0].geometry", "Self-intersection")


def test_unreadable_coordinates_are_a_config_error(tmp_path: Path) -> None:
    path = write_collection(tmp_path, [feature(coordinates=[[111.52, -7.62], [111.53, -7.61]])])

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "features[0].geometry", "unreadable coordinates")


def test_lat_lon_swapped_file_is_a_config_error(tmp_path: Path) -> None:
    swapped = [[-7.62, 111.52], [-7.62, 111.53], [-7.61, 111.53], [-7.62, 111.52]]
    path = write_collection(tmp_path, [feature(coordinates=swapped)])

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "features[0].geometry", "swapped")


def test_point_geometry_is_a_config_error(tmp_path: Path) -> None:
    point = feature()
    point["geometry"] = {"type": "Point", "coordinates": [111.52, -7.62]}
    path = write_collection(tmp_path, [point])

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "features[0].geometry", "Polygon or MultiPolygon")


def test_duplicate_kode_is_a_config_error(tmp_path: Path) -> None:
    path = write_collection(
        tmp_path,
        [
            feature(kode="35.77.01.1001"),
            feature(kode="35.77.01.1002"),
            feature(kode="35.77.01.1001"),
        ],
    )

    with pytest.raises(ConfigError) as caught:
        Locator.from_geojson(path)

    assert_one_line(caught.value, path, "features[2].properties.kode", "also features[0]")


def test_shipped_file_matches_the_readme_checksum() -> None:
    digest = hashlib.sha256(GEOJSON.read_bytes()).hexdigest()
    assert digest == "6d10e451877bbf3036ceb648e168fc05926db008e1eb056e5ff66d694367588b"
