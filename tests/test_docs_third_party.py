"""docs/THIRD_PARTY.md: every configuration example loads as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.model import Trust

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = re.findall(r"```toml\n(.*?)```", (REPO / "docs" / "THIRD_PARTY.md").read_text(), re.S)
SOURCES = [block for block in EXAMPLES if "[[mqtt]]" in block]
REGISTRY = next(block for block in EXAMPLES if "[[device]]" in block)


@pytest.mark.parametrize("block", SOURCES, ids=lambda b: re.findall(r'format = "(.*?)"', b)[0])
def test_source_example_loads_with_explicit_network_trust(tmp_path: Path, block: str) -> None:
    (tmp_path / "devices.toml").write_text(REGISTRY, encoding="utf-8")
    (tmp_path / "panicd.toml").write_text(
        f'[geo]\nkelurahan_file = "{REPO / "config" / "geo" / "kelurahan.geojson"}"\n' + block,
        encoding="utf-8",
    )
    config = load_config(tmp_path / "panicd.toml", {})
    (source,) = config.mqtt
    assert source.trust is Trust.NETWORK
    assert 'trust = "network"' in block


def test_every_third_party_format_has_an_example() -> None:
    formats = {re.findall(r'format = "(.*?)"', block)[0] for block in SOURCES}
    assert formats == {"chirpstack", "ttn", "zigbee2mqtt", "shelly", "tasmota"}
