"""Simulated devices: their keys, their persistent counters, and generated fleets.

A real button keeps its counter in flash (NVS) so it never repeats one after a reboot;
the simulator keeps it in a small JSON state file for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.model import GeoFix

# The 27 verified interior points of config/geo/README.md: generated fleets spread over
# every kelurahan of Kota Madiun.
MADIUN_POINTS: tuple[tuple[float, float], ...] = (
    (-7.62182, 111.53096), (-7.61364, 111.53369), (-7.62804, 111.53908),
    (-7.61577, 111.54032), (-7.61924, 111.54837), (-7.60471, 111.54222),
    (-7.63069, 111.54585), (-7.62657, 111.52278), (-7.60059, 111.55428),
    (-7.63152, 111.50474), (-7.60091, 111.52180), (-7.60599, 111.53016),
    (-7.61092, 111.50494), (-7.61718, 111.51251), (-7.61933, 111.52335),
    (-7.62701, 111.51689), (-7.63377, 111.51402), (-7.64748, 111.51454),
    (-7.63942, 111.53463), (-7.64656, 111.53177), (-7.65500, 111.53608),
    (-7.65599, 111.51408), (-7.64275, 111.54389), (-7.63492, 111.52772),
    (-7.65557, 111.51877), (-7.65946, 111.52491), (-7.64070, 111.52496),
)


@dataclass(frozen=True, slots=True)
class SimDevice:
    """A simulated button: its id, secret key and where it hangs."""

    id: str
    key: bytes
    location: GeoFix | None


def load_keys(path: Path) -> dict[str, bytes]:
    """Read a device-keys TOML file (``DEVICE_ID = "hex"``)."""
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    return {device_id: bytes.fromhex(str(value)) for device_id, value in raw.items()}


class CounterState:
    """Per-device counters persisted in a JSON file, never handing out a value twice."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._counters: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._counters = {}

    def next(self, device_id: str) -> int:
        """The next counter for a device (starts from the current Unix time)."""
        # Starting from the clock keeps a fresh state file above any earlier run.
        value = max(self._counters.get(device_id, 0) + 1, int(time.time()))
        self._counters[device_id] = value
        return value

    def bump_to(self, device_id: str, value: int) -> None:
        """Record that ``value`` was used, so the next counter is above it."""
        self._counters[device_id] = max(self._counters.get(device_id, 0), value)

    def save(self) -> None:
        """Persist atomically, so a crash never rewinds a counter."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._counters, sort_keys=True), encoding="utf-8")
        tmp.replace(self.path)


def default_state_path() -> Path:
    """Where the simulator keeps counters ($XDG_STATE_HOME/panic-sim/counters.json)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "panic-sim" / "counters.json"


def write_fleet(directory: Path, *, devices: int, mqtt_port: int, client_id: str = "panicd-test",
                geo_file: Path | None = None, database: Path | None = None,
                store_url: str | None = None,
                extra_toml: str = "") -> tuple[Path, Path, list[SimDevice]]:
    """Write a panicd config, registry and keys for ``devices`` generated buttons.

    The store is ``store_url`` (``[store] url``, e.g. a PostgreSQL database) if given,
    else the SQLite file ``database`` (default ``panicd.sqlite3`` in ``directory``).
    Returns (config path, keys path, devices). Used by tests and benchmarks.
    """
    directory.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    geo = geo_file or repo / "config" / "geo" / "kelurahan.geojson"
    sims: list[SimDevice] = []
    registry = ['[[gateway]]\nid = "gw-sim"\nlocation = { lat = -7.62980, lon = 111.52390 }\n']
    keys = []
    for index in range(devices):
        device_id = f"SIM-{index:05d}"
        key = hashlib.sha256(f"panic-sim:{device_id}".encode()).digest()
        lat, lon = MADIUN_POINTS[index % len(MADIUN_POINTS)]
        sims.append(SimDevice(device_id, key, GeoFix(lat, lon)))
        registry.append(
            f'[[device]]\nid = "{device_id}"\nhardware = "esp32-wifi"\n'
            f"location = {{ lat = {lat}, lon = {lon} }}\n"
            f'address = "Simulated button {index}"\nlandmark = "RT {index % 20 + 1:02d}"\n'
        )
        keys.append(f'{device_id} = "{key.hex()}"\n')
    (directory / "devices.toml").write_text("\n".join(registry), encoding="utf-8")
    keys_path = directory / "device-keys.toml"
    keys_path.write_text("".join(keys), encoding="utf-8")
    if store_url is None:
        store = f'database = "{database or directory / "panicd.sqlite3"}"\n\n'
    else:
        store = f'\n[store]\nurl = "{store_url}"\n\n'
    config = directory / "panicd.toml"
    config.write_text(
        f'[panicd]\nsite = "simulated"\n{store}'
        f'[geo]\nkelurahan_file = "{geo}"\n\n'
        '[devices]\nregistry = "devices.toml"\n\n'
        f'[[mqtt]]\nname = "local"\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
        f'client_id = "{client_id}"\nreconnect_min_s = 0.1\nreconnect_max_s = 1\n'
        + extra_toml,
        encoding="utf-8",
    )
    return config, keys_path, sims


def instance_configs(config: Path, count: int, client_id: str) -> list[Path]:
    """``count`` instances of the panicd config ``config`` (as :func:`write_fleet` wrote
    it, with a [dispatch] table) on its one store: each its own [panicd] instance name,
    persistent MQTT session (``client_id-k``), web port and control socket; the rest
    (store, devices, policies, public URL) shared. Used by tests and benchmarks."""
    from firmware_sim.broker import free_port  # noqa: PLC0415 -- only several instances

    text = config.read_text(encoding="utf-8")
    port_line = next(line for line in text.splitlines() if line.startswith("listen_port = "))
    socket_line = next(line for line in text.splitlines()
                       if line.startswith("control_socket = "))
    configs = []
    for k in range(count):
        own = (text.replace("[panicd]\n", f'[panicd]\ninstance = "i{k}"\n', 1)
               .replace(f'client_id = "{client_id}"', f'client_id = "{client_id}-{k}"', 1)
               .replace(port_line, f"listen_port = {free_port()}", 1)
               .replace(socket_line,
                        f'control_socket = "{config.parent / f"control-{k}.sock"}"', 1))
        path = config.with_name(f"panicd-{k}.toml")
        path.write_text(own, encoding="utf-8")
        configs.append(path)
    return configs
