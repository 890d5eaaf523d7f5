"""``config/panicd.example.toml``: it loads, and it shows every key the loader knows.

The key list comes from the loader itself (:func:`gateway.config.config_keys`), so a key
added to ``gateway/config.py`` fails this test until it is documented in the example.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

from gateway.config import config_keys, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "panicd.example.toml"
# A commented-out key or table header, as the example writes them: "# key = value",
# "# [app]", "# [[serial]]". Prose comments ("# The …", "# # Per …") are not matched.
_COMMENTED = re.compile(r"^# (?=[a-z_]+ = |\[\[?[a-z]+\]\]?$)", re.MULTILINE)


def _keys_of(document: dict[str, object], prefix: str = "") -> set[str]:
    """Every key path of a parsed TOML document, array indexes dropped (``mqtt.port``)."""
    keys: set[str] = set()
    for name, value in document.items():
        key = f"{prefix}.{name}" if prefix else name
        keys.add(key)
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if isinstance(row, dict) and name != "format_options":
                keys |= _keys_of(row, key)
    return keys


def _install(tmp_path: Path, text: str) -> Path:
    """The example as /etc/panicd would hold it (systemd/README.md, step 3)."""
    shutil.copytree(ROOT / "config" / "geo", tmp_path / "geo")
    for name in ("devices.toml", "responders.toml", "policies.toml"):
        shutil.copy(ROOT / "config" / "demo" / name, tmp_path / name)
    (tmp_path / "ca.pem").write_text("", encoding="utf-8")
    path = tmp_path / "panicd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_loads_as_installed(tmp_path: Path) -> None:
    config = load_config(_install(tmp_path, EXAMPLE.read_text(encoding="utf-8")), {})
    assert config.dispatch is not None
    assert config.mqtt[0].port == 8883
    # Under the unit's StateDirectory=panicd, whatever directory the file is installed in.
    assert config.store.backend == "sqlite"
    assert config.database == Path("/var/lib/panicd/panicd.sqlite3")


def test_every_key_the_loader_knows_is_in_the_example(tmp_path: Path) -> None:
    # Uncommented, the optional blocks ([app], [[serial]], ca_file …) load too, so the
    # loader asks for every key of every table: that set is what it knows.
    activated = _COMMENTED.sub("", EXAMPLE.read_text(encoding="utf-8"))
    known = config_keys(_install(tmp_path, activated), {})
    assert {"dispatch.twilio_base_url", "health.low_battery_percent", "mqtt.port"} <= known
    shown = _keys_of(tomllib.loads(activated))
    assert sorted(known - shown) == []
    # And nothing in the example is a key the loader does not know (it would not load).
    assert sorted(shown - known) == []


def test_a_key_missing_from_the_example_is_noticed(tmp_path: Path) -> None:
    # The check above can fail: drop one key from the example and it is missing.
    text = EXAMPLE.read_text(encoding="utf-8")
    without = re.sub(r"^send_concurrency = .*\n", "", _COMMENTED.sub("", text), flags=re.M)
    known = config_keys(_install(tmp_path, without), {})
    assert "dispatch.send_concurrency" in known
    assert "dispatch.send_concurrency" not in _keys_of(tomllib.loads(without))

