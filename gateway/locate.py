"""Location stage: resolve a press to a position and a kelurahan (DESIGN §2 Location).

Pure core: the boundaries are loaded once (``Locator.from_geojson``) and every lookup after
that is plain computation, with no I/O, clock or globals.

Geometry is kept in a local equirectangular projection (metres east/north of the centre of
the data's bounding box), so that distances, nearest-kelurahan tolerances and "deepest
inside" depths are true metres. Across a city ~10 km wide the projection's error is far
below the few hundred metres of uncertainty in the source boundaries (config/geo/README.md).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from gateway.errors import ConfigError
from gateway.model import (
    Device,
    GeoFix,
    Kelurahan,
    KelurahanMatch,
    Location,
    LocationSource,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import shapely

# IUGG mean Earth radius; the sphere is accurate to ~0.3% here, well inside the data's error.
_EARTH_RADIUS_M = 6_371_008.8
_METRES_PER_DEGREE = _EARTH_RADIUS_M * math.pi / 180.0
_PROPERTIES = ("kode", "kelurahan", "kecamatan")
_POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass(frozen=True, slots=True)
class _Index:
    """The projected polygons and their STRtree: the part of a Locator that needs GEOS."""

    lon0: float
    lat0: float
    scale_x: float
    geoms: npt.NDArray[np.object_]
    boundaries: npt.NDArray[np.object_]
    tree: shapely.STRtree


def _build_index(lonlat_geoms: list[Any]) -> _Index:
    # numpy and shapely cost ~160 ms to import; only locating a press needs them, so a
    # daemon restarting with overdue escalation steps sends those first (Locator.deferred).
    import numpy as np  # noqa: PLC0415
    import shapely  # noqa: PLC0415

    lonlat = np.array(lonlat_geoms, dtype=object)
    min_lon, min_lat, max_lon, max_lat = shapely.total_bounds(lonlat)
    lon0 = (min_lon + max_lon) / 2.0
    lat0 = (min_lat + max_lat) / 2.0
    scale_x = _METRES_PER_DEGREE * math.cos(math.radians(lat0))
    origin = np.array([lon0, lat0])
    scale = np.array([scale_x, _METRES_PER_DEGREE])
    geoms = shapely.transform(lonlat, lambda xy: (xy - origin) * scale)
    tree = shapely.STRtree(geoms)
    # The tree prepares its geometries lazily on the first predicate query; doing it here
    # keeps that cost off the first press.
    tree.query(shapely.Point(0.0, 0.0), predicate="intersects")
    return _Index(float(lon0), float(lat0), scale_x, geoms, shapely.boundary(geoms), tree)


class Locator:
    """Point-in-polygon lookup of kelurahan, with an overlap tie rule and a nearest fallback.

    The kelurahan list (kode, names) is there from construction. The polygon index is
    built by the constructor and :meth:`from_geojson`, or, for a :meth:`deferred` locator,
    by :meth:`build` (the daemon runs it in a thread once dispatch has started); a lookup
    before that builds it first, so a press is never located against a missing index.
    """

    __slots__ = (
        "_build_lock",
        "_by_kode",
        "_index",
        "_kecamatan_names",
        "_kelurahan",
        "_nearest_within_m",
        "_pending",
    )

    def __init__(
        self,
        features: Iterable[tuple[Kelurahan, Any]],
        *,
        nearest_within_m: float = 150.0,
    ) -> None:
        """Index ``(kelurahan, shapely lon/lat geometry)`` pairs; kode must be unique."""
        ordered = sorted(features, key=lambda pair: pair[0].kode)
        self._setup([k for k, _ in ordered], nearest_within_m)
        geoms = [g for _, g in ordered]
        self._pending: Callable[[], list[Any]] | None = lambda: geoms
        self.build()

    def _setup(self, kelurahan: list[Kelurahan], nearest_within_m: float) -> None:
        if not (math.isfinite(nearest_within_m) and nearest_within_m >= 0):
            raise ValueError(f"nearest_within_m must be >= 0 metres, got {nearest_within_m!r}")
        # Index order is kode order, so "lowest index" is the kode tie-break everywhere below.
        if not kelurahan:
            raise ValueError("a Locator needs at least one kelurahan")
        kodes = [k.kode for k in kelurahan]
        if len(set(kodes)) != len(kodes):
            raise ValueError("kelurahan kode values must be unique")
        self._kelurahan = tuple(kelurahan)
        self._by_kode = {k.kode: k for k in self._kelurahan}
        self._kecamatan_names = tuple(sorted({k.kecamatan for k in self._kelurahan}))
        self._nearest_within_m = float(nearest_within_m)
        self._index: _Index | None = None
        self._build_lock = threading.Lock()

    @classmethod
    def from_geojson(cls, path: Path, *, nearest_within_m: float = 150.0) -> Self:
        """Load a kelurahan FeatureCollection, raising ConfigError naming the first bad entry."""
        features = _read_features(path, _parse_geometry)
        return cls(features, nearest_within_m=nearest_within_m)

    @classmethod
    def deferred(cls, path: Path, *, nearest_within_m: float = 150.0) -> Self:
        """Like :meth:`from_geojson`, but the polygons are checked and indexed by :meth:`build`.

        The file's structure, properties, kode and geometry types are checked now
        (ConfigError); errors inside a polygon are raised by :meth:`build`, which needs
        GEOS. The daemon uses this to send overdue escalation steps before importing it.
        """
        features = _read_features(path, _polygonal)
        ordered = sorted(features, key=lambda pair: pair[0].kode)
        locator = cls.__new__(cls)
        locator._setup([k for k, _ in ordered], nearest_within_m)

        def parse() -> list[Any]:
            return [_parse_geometry(path, key, raw) for _kelurahan, (key, raw) in ordered]

        locator._pending = parse
        return locator

    def build(self) -> None:
        """Check and index the polygons now (idempotent, thread-safe); ConfigError if bad."""
        with self._build_lock:
            if self._index is not None:
                return
            assert self._pending is not None
            self._index = _build_index(self._pending())
            self._pending = None

    def _ready_index(self) -> _Index:
        index = self._index
        if index is None:
            self.build()
            index = self._index
            assert index is not None
        return index

    @property
    def kelurahan(self) -> tuple[Kelurahan, ...]:
        """Every kelurahan, sorted by kode."""
        return self._kelurahan

    @property
    def kecamatan_names(self) -> tuple[str, ...]:
        """The distinct kecamatan names, sorted."""
        return self._kecamatan_names

    @property
    def nearest_within_m(self) -> float:
        """How far outside every polygon a point may be and still take the nearest kelurahan."""
        return self._nearest_within_m

    def by_kode(self, kode: str) -> Kelurahan | None:
        """The kelurahan with this kode, or None if there is none."""
        return self._by_kode.get(kode)

    def kelurahan_at(self, fix: GeoFix) -> tuple[Kelurahan | None, KelurahanMatch, float | None]:
        """Assign a fix to a kelurahan; the float is metres to it (0.0 inside, None if unknown).

        One polygon hit is INSIDE. Several (the source overlaps slightly) is OVERLAP and
        picks the polygon whose boundary is farthest from the point, then the lowest kode.
        No hit is NEAREST when the closest polygon is within ``nearest_within_m`` (ties:
        lowest kode), else NONE with the distance to the closest polygon.
        """
        if not (math.isfinite(fix.lat) and math.isfinite(fix.lon)):
            return None, KelurahanMatch.NONE, None
        index = self._ready_index()
        import shapely  # noqa: PLC0415  # loaded by _build_index; a dict lookup here

        point = shapely.Point(
            (fix.lon - index.lon0) * index.scale_x, (fix.lat - index.lat0) * _METRES_PER_DEGREE
        )
        hits = index.tree.query(point, predicate="intersects")
        if len(hits) == 1:
            return self._kelurahan[int(hits[0])], KelurahanMatch.INSIDE, 0.0
        if len(hits) > 1:
            depths = shapely.distance(index.boundaries[hits], point)
            deepest, _ = min(
                zip(hits.tolist(), depths.tolist(), strict=True),
                key=lambda hit: (-hit[1], hit[0]),
            )
            return self._kelurahan[deepest], KelurahanMatch.OVERLAP, 0.0
        indices, distances = index.tree.query_nearest(
            point, return_distance=True, all_matches=True
        )
        if len(indices) == 0:
            return None, KelurahanMatch.NONE, None
        nearest = int(indices.min())
        distance = float(distances.min())
        if distance <= self._nearest_within_m:
            return self._kelurahan[nearest], KelurahanMatch.NEAREST, distance
        return None, KelurahanMatch.NONE, distance


def locate(
    *,
    gps: GeoFix | None,
    device: Device | None,
    gateway_fix: GeoFix | None,
    locator: Locator,
) -> Location:
    """Resolve a press's location by DESIGN §2's ladder: GPS, registered, gateway, unknown.

    A device's ``kelurahan_kode`` (operator override) decides the kelurahan whenever there
    is no GPS fix: it replaces the polygon lookup of the registered location, and for a
    device with no registered location (a carried button issued to one kelurahan's patrol)
    it beats the receiving gateway, which may hear a LoRa button kilometres away. A GPS fix
    says where the button actually is and wins over it. An override kode the boundaries do
    not know is ignored, since this stage must always produce a location; the daemon
    rejects such a registry at load.
    """
    if gps is not None and _is_usable(gps):
        return _resolved(LocationSource.GPS, gps, locator)
    override = (
        locator.by_kode(device.kelurahan_kode)
        if device is not None and device.kelurahan_kode is not None
        else None
    )
    registered = device.location if device is not None else None
    if registered is not None and _is_usable(registered):
        if override is not None:
            return Location(
                LocationSource.REGISTERED, registered, override, KelurahanMatch.OVERRIDE
            )
        return _resolved(LocationSource.REGISTERED, registered, locator)
    if gateway_fix is not None and _is_usable(gateway_fix):
        if override is not None:
            return Location(LocationSource.GATEWAY, gateway_fix, override, KelurahanMatch.OVERRIDE)
        return _resolved(LocationSource.GATEWAY, gateway_fix, locator)
    if override is not None:
        return Location(LocationSource.UNKNOWN, None, override, KelurahanMatch.OVERRIDE)
    return Location(LocationSource.UNKNOWN, None, None, KelurahanMatch.NONE)


def map_link(fix: GeoFix) -> str:
    """An OpenStreetMap link with a marker at the fix, short enough for an SMS."""
    # 5 decimals is ~1 m, finer than any button's fix; more digits only cost SMS characters.
    lat = f"{fix.lat:.5f}"
    lon = f"{fix.lon:.5f}"
    return f"https://www.openstreetmap.org/?mlat={lat}&mlon={lon}#map=18/{lat}/{lon}"


def _resolved(source: LocationSource, fix: GeoFix, locator: Locator) -> Location:
    kelurahan, match, distance_m = locator.kelurahan_at(fix)
    return Location(source, fix, kelurahan, match, distance_m)


def _is_usable(fix: GeoFix) -> bool:
    # A NaN or out-of-range fix (firmware glitch) must not hide a good lower rung.
    return (
        math.isfinite(fix.lat)
        and math.isfinite(fix.lon)
        and -90.0 <= fix.lat <= 90.0
        and -180.0 <= fix.lon <= 180.0
    )


def _read_features(
    path: Path, geometry: Callable[[Path, str, Mapping[str, Any]], Any]
) -> list[tuple[Kelurahan, Any]]:
    """Read the FeatureCollection: each feature's kelurahan and ``geometry(path, key, raw)``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "-", f"not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"line {exc.lineno}", f"not valid JSON: {exc.msg} (column {exc.colno})"
        ) from exc
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise ConfigError(path, "type", "expected a GeoJSON FeatureCollection")
    raw_features = document.get("features")
    if not isinstance(raw_features, list) or not raw_features:
        raise ConfigError(path, "features", "expected a non-empty list of features")

    features: list[tuple[Kelurahan, Any]] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(raw_features):
        key = f"features[{index}]"
        if not isinstance(raw, Mapping) or raw.get("type") != "Feature":
            raise ConfigError(path, key, "expected a GeoJSON Feature")
        kelurahan = _parse_properties(path, key, raw)
        geom = geometry(path, key, raw)
        if (earlier := first_seen.get(kelurahan.kode)) is not None:
            raise ConfigError(
                path,
                f"{key}.properties.kode",
                f"duplicate kode {kelurahan.kode!r} (also features[{earlier}])",
            )
        first_seen[kelurahan.kode] = index
        features.append((kelurahan, geom))
    return features


def _polygonal(path: Path, key: str, raw: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The geometry type check of :func:`_parse_geometry`, without GEOS; keeps the feature."""
    geometry = raw.get("geometry")
    if not isinstance(geometry, Mapping) or geometry.get("type") not in _POLYGONAL:
        raise ConfigError(path, f"{key}.geometry", "expected a Polygon or MultiPolygon")
    return key, raw


def _parse_properties(path: Path, key: str, raw: Mapping[str, Any]) -> Kelurahan:
    properties = raw.get("properties")
    if not isinstance(properties, Mapping):
        raise ConfigError(path, f"{key}.properties", f"expected an object with {_PROPERTIES}")
    values: list[str] = []
    for name in _PROPERTIES:
        value = properties.get(name)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if value is None else f"expected a non-empty string, got {value!r}"
            raise ConfigError(path, f"{key}.properties.{name}", problem)
        values.append(value.strip())
    kode, name, kecamatan = values
    return Kelurahan(kode=kode, name=name, kecamatan=kecamatan)


def _parse_geometry(path: Path, key: str, raw: Mapping[str, Any]) -> Any:
    # shapely is imported here, not at the top: see _build_index.
    import shapely  # noqa: PLC0415
    from shapely.errors import ShapelyError  # noqa: PLC0415
    from shapely.geometry import shape  # noqa: PLC0415

    key = f"{key}.geometry"
    geometry = raw.get("geometry")
    if not isinstance(geometry, Mapping) or geometry.get("type") not in _POLYGONAL:
        raise ConfigError(path, key, "expected a Polygon or MultiPolygon")
    try:
        geom = shape(geometry)
    except (ValueError, TypeError, ShapelyError) as exc:
        raise ConfigError(path, key, f"unreadable coordinates: {exc}") from exc
    if geom.is_empty:
        raise ConfigError(path, key, "empty geometry")
    if not shapely.is_valid(geom):
        raise ConfigError(path, key, f"invalid geometry: {shapely.is_valid_reason(geom)}")
    min_lon, min_lat, max_lon, max_lat = geom.bounds
    if not (-180.0 <= min_lon <= max_lon <= 180.0 and -90.0 <= min_lat <= max_lat <= 90.0):
        raise ConfigError(
            path, key, "coordinates outside WGS84 [lon, lat] ranges (lat/lon swapped?)"
        )
    return geom
