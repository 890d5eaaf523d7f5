"""Zigbee2MQTT device messages (``{base_topic}/{friendly_name}``).

Sources: Koenkk/zigbee2mqtt.io docs/guide/usage/mqtt_topics_and_messages.md (payloads are
always JSON; friendly names may contain ``/``), docs/guide/configuration/
device-availability.md (retained ``{friendly_name}/availability``: legacy ``online`` /
``offline`` or ``{"state":"online"}``), device pages docs/devices/TS0215A_sos.md and
BT400B (``action: "emergency"``), HS1EB_HS1EB-E.md (``off``/``single``/``double``/
``hold``, deprecated ``click``), and the settings schema (``legacy_action_sensor`` sends
an empty ``action`` after every action).

Quirks handled:

* ``action: ""`` (Home Assistant legacy action sensor reset) and messages without an
  action (battery/linkquality reports) are Ignored — unless ``state_as_heartbeat`` is
  set, in which case a message with ``battery`` becomes a heartbeat.
* The deprecated ``click`` property of HEIMAN buttons is used when ``action`` is absent.
* ``…/availability``, ``…/set``, ``…/get`` and ``bridge/…`` topics are not presses.
* Zigbee2MQTT has no frame counter: ``counter`` is None and the broker's QoS 1 session
  is the only duplicate protection.

The source must not feed retained device-state messages (a device configured with
``retain: true`` replays its last ``action`` on every reconnect); availability messages
are retained by design and decode to Ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gateway.errors import DecodeError
from gateway.formats import _common as c
from gateway.model import Frame, Ignored, PressKind

FORMAT = "zigbee2mqtt"
OPTIONS = ("actions", "ignore_actions", "base_topic", "state_as_heartbeat")

# Dedicated SOS buttons report these; ordinary buttons are mapped through ``actions``.
DEFAULT_ACTIONS: Mapping[str, PressKind] = {
    "emergency": PressKind.PANIC,
    "sos": PressKind.PANIC,
    "panic": PressKind.PANIC,
}
# Release/idle actions that follow a real one; never presses, never dead letters.
DEFAULT_IGNORED = ("off", "release", "hold_release", "button_release")
_COMMAND_SUFFIXES = ("set", "get")


@dataclasses.dataclass(frozen=True, slots=True)
class Zigbee2MqttDecoder:
    """Decoder for Zigbee2MQTT device state messages."""

    actions: Mapping[str, PressKind] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_ACTIONS)
    )
    ignore_actions: frozenset[str] = frozenset(DEFAULT_IGNORED)
    base_topic: str = "zigbee2mqtt"
    state_as_heartbeat: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Zigbee2MqttDecoder:
        """Build from options, e.g. ``actions = {single = "panic", double = "cancel"}``."""
        c.reject_unknown_options(options, OPTIONS)
        return cls(
            actions=c.action_map(options, "actions", DEFAULT_ACTIONS, fold=False),
            ignore_actions=c.name_set(options, "ignore_actions", DEFAULT_IGNORED, fold=False),
            base_topic=c.text_option(options, "base_topic", "zigbee2mqtt"),
            state_as_heartbeat=c.flag(options, "state_as_heartbeat", False),
        )

    def __call__(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message."""
        return self.decode(topic, payload)

    def decode(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message published by Zigbee2MQTT."""
        name, suffix = self._split(topic)
        if suffix is not None:
            return Ignored(suffix)
        doc = c.load_object(payload)
        action = doc.get("action")
        if action is None:
            action = doc.get("click")  # deprecated HEIMAN property, still on by default
        battery = c.battery_percent(doc.get("battery"))
        if action is None or action == "":
            if self.state_as_heartbeat and battery is not None:
                return Frame(
                    format=FORMAT, device_ref=name, kind=PressKind.HEARTBEAT, battery=battery
                )
            return Ignored("no_action")
        if not isinstance(action, str):
            raise DecodeError("bad_action", type(action).__name__)
        if action in self.ignore_actions:
            return Ignored("ignored_action")
        kind = self.actions.get(action)
        if kind is None:
            # A dead letter, not Ignored: an unmapped press on a panic button is a config
            # error the operators must see.
            raise DecodeError("unmapped_action", action[:64])
        return Frame(format=FORMAT, device_ref=name, kind=kind, counter=None, battery=battery)

    def availability(self, topic: str, payload: bytes) -> c.DeviceHealth | None:
        """Device health from a ``{friendly_name}/availability`` message, else None."""
        try:
            name, suffix = self._split(topic)
        except DecodeError:
            return None
        if suffix != "availability":
            return None
        online = parse_availability(payload)
        return None if online is None else c.DeviceHealth(device_ref=name, online=online)

    def _split(self, topic: str) -> tuple[str, str | None]:
        """Friendly name and a non-press suffix (availability/set/get/bridge) if any."""
        prefix = self.base_topic + "/"
        if not topic.startswith(prefix) or len(topic) == len(prefix):
            raise DecodeError("unexpected_topic", topic[:200])
        rest = topic[len(prefix) :]
        if rest == "bridge" or rest.startswith("bridge/"):
            return rest, "bridge"
        head, _, last = rest.rpartition("/")
        if head and last == "availability":
            return head, "availability"
        parts = rest.split("/")
        # ``{name}/set`` and ``{name}/set/state`` are commands to the device, not state.
        for index in range(1, len(parts)):
            if parts[index] in _COMMAND_SUFFIXES:
                return "/".join(parts[:index]), "command"
        return rest, None


def parse_availability(payload: bytes) -> bool | None:
    """Online (True) / offline (False) from a legacy or JSON availability payload."""
    text = payload.strip()
    if text in (b"online", b"offline"):
        return text == b"online"
    try:
        doc = c.load_object(payload)
    except DecodeError:
        return None
    state = doc.get("state")
    if state in ("online", "offline"):
        return state == "online"
    return None


def decode(topic: str, payload: bytes) -> Frame | Ignored:
    """Decode with default options (SOS actions only)."""
    return _DEFAULT.decode(topic, payload)


_DEFAULT = Zigbee2MqttDecoder()
