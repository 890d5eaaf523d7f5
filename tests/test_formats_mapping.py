"""Field mappings (gateway/formats/mapping.py): codec fields and values to press kinds."""

from __future__ import annotations

import copy
import json

import pytest

from gateway.errors import DecodeError
from gateway.formats import chirpstack, ttn
from gateway.formats._common import OptionError
from gateway.formats.mapping import kind_by_rules, rules_option
from gateway.model import Frame, Ignored, PressKind
from tests.test_formats_chirpstack import TOPIC as CS_TOPIC
from tests.test_formats_chirpstack import UP_EVENT
from tests.test_formats_ttn import TOPIC as TTN_TOPIC
from tests.test_formats_ttn import _up as ttn_up


def _press(decoded: Frame | Ignored) -> Frame:
    assert isinstance(decoded, Frame), decoded
    return decoded


def _cs_up(obj: dict[str, object], f_cnt: int = 7) -> bytes:
    doc = copy.deepcopy(UP_EVENT)
    doc.pop("data", None)
    doc.update(object=obj, fCnt=f_cnt)
    return json.dumps(doc).encode()


def test_chirpstack_sos_true_is_a_panic_without_configuration() -> None:
    # The uplink a new user tried (issue 16): it used to be "codec object has no event".
    frame = _press(chirpstack.decode(CS_TOPIC, _cs_up({"sos": True, "button": "single"})))
    assert frame.kind is PressKind.PANIC
    assert frame.counter == 7


def test_ttn_sos_true_is_a_panic_with_its_battery() -> None:
    frame = _press(ttn.decode(TTN_TOPIC, ttn_up(f_cnt=12,
                                              decoded_payload={"sos": True, "battery": 94})))
    assert frame.kind is PressKind.PANIC
    assert frame.battery == 94
    assert frame.counter == 12


def test_an_uplink_no_rule_maps_is_a_dead_letter_saying_what_was_read() -> None:
    with pytest.raises(DecodeError) as info:
        chirpstack.decode(CS_TOPIC, _cs_up({"sos": False}))
    assert info.value.reason == "no_event"
    assert "sos=False" in str(info.value)
    with pytest.raises(DecodeError) as absent:
        ttn.decode(TTN_TOPIC, ttn_up(decoded_payload={"door": "open"}))
    assert absent.value.reason == "no_event"
    assert "sos" in str(absent.value)


def test_configured_rules_map_strings_numbers_and_nested_fields() -> None:
    decoder = chirpstack.ChirpstackDecoder.from_options({"mapping": [
        {"field": "button", "panic": ["single", "long"], "cancel": ["double"]},
        {"field": "status.alarm", "test": [2], "panic": [1]},
    ]})
    assert _press(decoder(CS_TOPIC, _cs_up({"button": "Double"}))).kind is PressKind.CANCEL
    assert _press(decoder(CS_TOPIC, _cs_up({"button": "long"}))).kind is PressKind.PANIC
    assert _press(decoder(CS_TOPIC, _cs_up({"status": {"alarm": 2.0}}))).kind is PressKind.TEST
    # The default rule still follows the configured ones.
    assert _press(decoder(CS_TOPIC, _cs_up({"sos": True}))).kind is PressKind.PANIC
    # An event name still wins over the mapping.
    named = _press(decoder(CS_TOPIC, _cs_up({"event": "test", "button": "single"})))
    assert named.kind is PressKind.TEST


def test_booleans_match_only_booleans() -> None:
    rules = rules_option({"mapping": {"field": "alarm", "panic": [1]}})
    assert kind_by_rules({"alarm": True}, rules)[0] is None
    assert kind_by_rules({"alarm": 1}, rules)[0] is PressKind.PANIC
    assert kind_by_rules({"sos": 1}, rules)[0] is None  # the default wants true


def test_ttn_takes_the_mapping_option() -> None:
    decoder = ttn.TtnDecoder.from_options({"mapping": {"field": "alarm_1", "panic": [True]}})
    frame = _press(decoder(TTN_TOPIC, ttn_up(decoded_payload={"alarm_1": True})))
    assert frame.kind is PressKind.PANIC


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ("nonsense", "table or a list"),
        ([], "1 to 32"),
        ([{"panic": [True]}], "field must be"),
        ([{"field": "a..b", "panic": [True]}], "field must be"),
        ([{"field": "sos"}], "names no value"),
        ([{"field": "sos", "panic": True}], "non-empty list"),
        ([{"field": "sos", "panic": [[1]]}], "not a boolean"),
        ([{"field": "sos", "panic": ["x"], "cancel": ["X"]}], "means both panic and cancel"),
        ([{"field": "sos", "panik": [True]}], "unknown key(s) panik"),
    ],
)
def test_bad_mappings_are_refused_at_load(mapping: object, problem: str) -> None:
    with pytest.raises(OptionError) as info:
        chirpstack.ChirpstackDecoder.from_options({"mapping": mapping})
    assert problem in str(info.value)

