"""Start-up order: what the daemon loads before an overdue escalation step can be sent.

A restart must send the steps that fell due while panicd was down within a second
(issue 12, ``bench/restart.py``); these tests keep the expensive parts (numpy/shapely,
the web server, the sources) off that path, and prove that deferring the kelurahan
geometry changes neither its answers nor its errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_sim.fleet import write_fleet
from gateway.errors import ConfigError
from gateway.locate import Locator
from gateway.model import GeoFix
from tests.dispatch_e2e import RESPONDERS_TOML, policies_toml

REPO = Path(__file__).resolve().parent.parent
GEOJSON = REPO / "config" / "geo" / "kelurahan.geojson"

# Needed only once dispatch has started: locating a press, serving HTTP, the sources.
DEFERRED_MODULES = (
    "numpy", "shapely", "aiohttp.web", "aiomqtt", "paho", "serial",
    "dispatch.web", "dispatch.health_monitor", "gateway.sources.mqtt",
    "gateway.sources.serial", "gateway.sources.app",
)

BOWTIE = {"type": "Polygon",
          "coordinates": [[[111.50, -7.60], [111.52, -7.62], [111.52, -7.60],
                           [111.50, -7.62], [111.50, -7.60]]]}


def _feature(kode: str, geometry: object) -> dict[str, object]:
    return {"type": "Feature", "geometry": geometry,
            "properties": {"kode": kode, "kelurahan": f"K {kode}", "kecamatan": "Taman"}}


def _write(path: Path, features: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}),
                    encoding="utf-8")
    return path


def test_importing_the_daemon_loads_neither_geometry_nor_web_nor_sources() -> None:
    probe = (
        "import json, sys, panicd.daemon;"
        f"print(json.dumps([m for m in {DEFERRED_MODULES!r} if m in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=True)
    assert json.loads(result.stdout) == []


def test_a_deferred_locator_answers_exactly_as_an_eager_one() -> None:
    eager = Locator.from_geojson(GEOJSON)
    deferred = Locator.deferred(GEOJSON)
    assert deferred.kelurahan == eager.kelurahan
    assert deferred.kecamatan_names == eager.kecamatan_names
    fixes = [GeoFix(-7.63 + i * 0.004, 111.50 + j * 0.004) for i in range(8) for j in range(8)]
    # The first lookup builds the index itself: no press is located against nothing.
    assert [deferred.kelurahan_at(f) for f in fixes] == [eager.kelurahan_at(f) for f in fixes]


def test_a_bad_polygon_passes_deferred_loading_and_fails_the_build(tmp_path: Path) -> None:
    path = _write(tmp_path / "kelurahan.geojson",
                  [_feature("35.77.01.0001", BOWTIE)])
    locator = Locator.deferred(path)
    assert [k.kode for k in locator.kelurahan] == ["35.77.01.0001"]
    with pytest.raises(ConfigError, match=r"features\[0\]\.geometry: invalid geometry"):
        locator.build()
    with pytest.raises(ConfigError, match=r"features\[0\]\.geometry: invalid geometry"):
        Locator.from_geojson(path)


def test_deferred_loading_still_refuses_bad_properties_and_geometry_types(
    tmp_path: Path,
) -> None:
    point = {"type": "Point", "coordinates": [111.5, -7.6]}
    wrong_type = _write(tmp_path / "a.geojson", [_feature("35.77.01.0001", point)])
    with pytest.raises(ConfigError, match=r"features\[0\]\.geometry: expected a Polygon"):
        Locator.deferred(wrong_type)
    duplicate = _write(tmp_path / "b.geojson",
                       [_feature("35.77.01.0001", BOWTIE), _feature("35.77.01.0001", BOWTIE)])
    with pytest.raises(ConfigError, match=r"features\[1\]\.properties\.kode: duplicate"):
        Locator.deferred(duplicate)


@pytest.mark.parametrize("with_dispatch", [False, True], ids=["ingest-only", "dispatch"])
def test_the_daemon_exits_2_on_a_bad_polygon_before_it_is_ready(
    tmp_path: Path, with_dispatch: bool,
) -> None:
    geo = _write(tmp_path / "bad.geojson", [_feature("35.77.01.0001", BOWTIE)])
    extra = ""
    if with_dispatch:
        # The polygons are checked once the dispatcher runs, inside its task group.
        (tmp_path / "responders.toml").write_text(RESPONDERS_TOML, encoding="utf-8")
        (tmp_path / "policies.toml").write_text(policies_toml(60), encoding="utf-8")
        extra = ('\n[dispatch]\nresponders = "responders.toml"\npolicies = "policies.toml"\n'
                 'public_base_url = "http://127.0.0.1:9"\nlisten_host = "127.0.0.1"\n'
                 f'listen_port = 0\ncontrol_socket = "{tmp_path / "control.sock"}"\n')
    config, keys, _ = write_fleet(tmp_path, devices=1, mqtt_port=1, geo_file=geo,
                                  extra_toml=extra)
    env = {key: value for key, value in os.environ.items()
           if key != "NOTIFY_SOCKET" and not key.startswith("TWILIO_")}
    env["PANICD_DEVICE_KEYS_FILE"] = str(keys)
    result = subprocess.run(
        [sys.executable, "-m", "panicd.daemon", "--config", str(config), "--log-format",
         "json"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )
    assert result.returncode == 2, result.stderr
    events = [json.loads(line) for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("{")]
    invalid = [e for e in events if e["event"] == "config.invalid"]
    assert len(invalid) == 1
    assert "features[0].geometry: invalid geometry" in invalid[0]["error"]
    assert not [e for e in events if e["event"] == "daemon.ready"]
