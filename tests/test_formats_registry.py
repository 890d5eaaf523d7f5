"""The decoder registry in gateway.formats."""

from __future__ import annotations

import pytest

from gateway.formats import DECODERS, OptionError
from gateway.model import Ignored


def test_every_third_party_format_is_registered() -> None:
    assert {"lora-frame", "chirpstack", "ttn", "zigbee2mqtt", "shelly", "tasmota"} <= set(DECODERS)


@pytest.mark.parametrize(
    "name", ["lora-frame", "chirpstack", "ttn", "zigbee2mqtt", "shelly", "tasmota"]
)
def test_factories_build_with_empty_options_and_reject_unknown_ones(name: str) -> None:
    assert callable(DECODERS[name]({}))
    with pytest.raises(OptionError):
        DECODERS[name]({"no_such_option": 1})


def test_built_decoder_uses_its_options() -> None:
    decode = DECODERS["zigbee2mqtt"]({"actions": {"single": "panic"}})
    assert not isinstance(decode("zigbee2mqtt/b", b'{"action":"single"}'), Ignored)
