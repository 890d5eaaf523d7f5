"""Tasmota buttons and switches detached from their relays.

Sources: tasmota/docs docs/Buttons-and-Switches.md (SetOption73 multi-press actions,
SetOption114 ``{"Switch1":{"Action":"ON"}}``, ButtonTopic ``cmnd/{topic}/POWER``),
arendst/Tasmota tasmota/tasmota_support/support_button.ino (``MqttButtonTopic``:
``{"Button<n>":{"Action":"<SINGLE|DOUBLE|TRIPLE|QUAD|PENTA|CLEAR>"}}`` or StateText4
``HOLD``, published to ``stat/{topic}/RESULT``, or ``stat/{topic}/BUTTON<n>`` with
SetOption4 1, and only while SetOption19 is off), and the 9.1.0 changelog ("When
SetOption73 1 JSON result from {"ACTION":"SINGLE"} to {"Button1":{"Action":"SINGLE"}}").

Accepted forms:

* current: ``stat/{topic}/RESULT`` or ``stat/{topic}/BUTTON<n>`` / ``SWITCH<n>`` with
  ``{"Button<n>":{"Action":X}}`` / ``{"Switch<n>":{"Action":X}}``;
* pre-9.1: the same topics with ``{"ACTION":"SINGLE"}`` (button number only in the topic);
* ButtonTopic/SwitchTopic: ``cmnd/{topic}/POWER[<n>]`` with ``TOGGLE``/``ON``/``OFF``/``HOLD``
  where ``{topic}`` is the configured button topic;
* LWT ``tele/{topic}/LWT`` ``Online``/``Offline``: Ignored, see :meth:`availability`.

``tele/{topic}/SENSOR`` repeats ``"Switch1":"ON"`` every TelePeriod, so a plain switch
state is never a press; only an ``Action`` is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from gateway.errors import DecodeError
from gateway.formats import _common as c
from gateway.model import Frame, Ignored, PressKind

FORMAT = "tasmota"
OPTIONS = ("actions", "ignore_actions")

# Keys are matched case-insensitively; "button1:single" overrides "single" for one input.
DEFAULT_ACTIONS: Mapping[str, PressKind] = {
    "single": PressKind.PANIC,
    "hold": PressKind.PANIC,
    "double": PressKind.CANCEL,
    "triple": PressKind.TEST,
    "toggle": PressKind.PANIC,
    "on": PressKind.PANIC,  # a push-button wired as a SwitchMode 1 switch: ON while pressed
}
# CLEAR follows a release in SetOption73 mode; OFF is a switch returning to rest.
DEFAULT_IGNORED = ("clear", "off", "inc_dec", "inv")
_INPUT = re.compile(r"(?i)(button|switch)(\d{1,2})")
_POWER = re.compile(r"(?i)power(\d{0,2})")


@dataclasses.dataclass(frozen=True, slots=True)
class TasmotaDecoder:
    """Decoder for Tasmota button/switch action messages."""

    actions: Mapping[str, PressKind] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_ACTIONS)
    )
    ignore_actions: frozenset[str] = frozenset(DEFAULT_IGNORED)

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> TasmotaDecoder:
        """Build from options, e.g. ``actions = {SINGLE = "panic", "Button2:SINGLE" = "test"}``."""
        c.reject_unknown_options(options, OPTIONS)
        return cls(
            actions=c.action_map(options, "actions", DEFAULT_ACTIONS, fold=True),
            ignore_actions=c.name_set(options, "ignore_actions", DEFAULT_IGNORED, fold=True),
        )

    def __call__(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message."""
        return self.decode(topic, payload)

    def decode(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one message with Tasmota's default FullTopic ``%prefix%/%topic%/``."""
        parts = topic.split("/")
        if len(parts) != 3 or not parts[1]:
            raise DecodeError("unexpected_topic", topic[:200])
        prefix, device, leaf = parts
        if prefix == "tele":
            return Ignored("telemetry")  # LWT, STATE, SENSOR: health, not presses
        if prefix == "cmnd":
            return self._power_command(device, leaf, payload)
        if prefix != "stat":
            raise DecodeError("unexpected_topic", topic[:200])
        topic_input = _INPUT.fullmatch(leaf)
        if leaf.upper() != "RESULT" and topic_input is None:
            return Ignored("not_an_action")
        doc = c.load_object(payload)
        for key, value in doc.items():
            match = _INPUT.fullmatch(key)
            inner = c.as_object(value)
            if match is None or inner is None:
                continue
            action = inner.get("Action", inner.get("ACTION"))
            if isinstance(action, str):
                return self._press(device, f"{match[1]}{match[2]}", action)
        legacy = doc.get("ACTION", doc.get("Action"))
        if isinstance(legacy, str):
            # Pre-9.1 SetOption73: the input number is only in a BUTTON<n> topic.
            name = f"{topic_input[1]}{topic_input[2]}" if topic_input else "Button1"
            return self._press(device, name, legacy)
        return Ignored("not_an_action")

    def _power_command(self, device: str, leaf: str, payload: bytes) -> Frame | Ignored:
        match = _POWER.fullmatch(leaf)
        if match is None:
            return Ignored("not_an_action")
        try:
            action = payload.decode("ascii").strip()
        except UnicodeDecodeError:
            raise DecodeError("not_ascii", "POWER payload") from None
        if not action or len(action) > 32:
            raise DecodeError("bad_action", action[:32])
        return self._press(device, f"Button{match[1] or '1'}", action)

    def _press(self, device: str, input_name: str, action: str) -> Frame | Ignored:
        folded = action.casefold()
        if folded in self.ignore_actions:
            return Ignored("ignored_action")
        kind = self.actions.get(f"{input_name.casefold()}:{folded}", self.actions.get(folded))
        if kind is None:
            raise DecodeError("unmapped_action", f"{input_name}:{action}"[:64])
        # Tasmota sends no sequence number with an action.
        return Frame(format=FORMAT, device_ref=device, kind=kind, counter=None)

    def availability(self, topic: str, payload: bytes) -> c.DeviceHealth | None:
        """Device health from ``tele/{topic}/LWT`` (``Online``/``Offline``), else None."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "tele" or parts[2] != "LWT" or not parts[1]:
            return None
        text = payload.strip()
        if text not in (b"Online", b"Offline"):
            return None
        return c.DeviceHealth(device_ref=parts[1], online=text == b"Online")


def decode(topic: str, payload: bytes) -> Frame | Ignored:
    """Decode with the default action mapping."""
    return _DEFAULT.decode(topic, payload)


_DEFAULT = TasmotaDecoder()
