"""Shelly buttons over MQTT: Gen1 (Button1, i3) and Gen2+ RPC notifications.

Sources: Shelly Gen1 API (shelly-api-docs.shelly.cloud/gen1, Button1 MQTT:
``shellies/{id}/input_event/0`` = ``{"event":"S","event_cnt":N}``, ``shellies/{id}/
sensor/battery``, LWT ``shellies/{id}/online``; the same topics and S/SS/SSS/L values in
public Node-RED and homebridge-mqttthing configs for shellybutton1-A4CF12F45301; the
i3's SL/LS combinations are left unmapped on purpose); Shelly Gen2 docs General/Notifications
and RPCProtocol (``{prefix}/events/rpc``, ``NotifyEvent`` with ``params.events[]`` of
``{"component":"input:0","id":0,"event":"single_push","ts":…}``) and ComponentsAndServices/
Input (btn_down, btn_up, single_push, double_push, triple_push, long_push).

Quirks handled:

* Gen1 ``event_cnt`` restarts at 0 when the device reboots (the Button1 sleeps and
  reboots on battery), so it is not a replay counter: ``counter`` is None and the count
  is available separately through :func:`gen1_event_count`.
* Gen1 publishes ``{"event":"","event_cnt":0}`` before any press: Ignored.
* Gen2 ``events/rpc`` also carries NotifyStatus/NotifyFullStatus; only a ``devicepower``
  battery in them is used (heartbeat), the rest is Ignored.
* Device identity: Gen1 ``{id}`` from the topic (e.g. ``shellybutton1-A4CF12F45301``);
  Gen2 the notification's ``src``, because the MQTT topic prefix is user-configurable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gateway.errors import DecodeError
from gateway.formats import _common as c
from gateway.model import Frame, Ignored, PressKind

FORMAT = "shelly"
OPTIONS = ("actions", "ignore_actions", "inputs")

# Defaults chosen for a panic button: one press or a long press asks for help, a double
# press cancels, a triple press is a test. Gen1 letters and Gen2 names share the table.
DEFAULT_ACTIONS: Mapping[str, PressKind] = {
    "S": PressKind.PANIC,
    "L": PressKind.PANIC,
    "SS": PressKind.CANCEL,
    "SSS": PressKind.TEST,
    "single_push": PressKind.PANIC,
    "long_push": PressKind.PANIC,
    "double_push": PressKind.CANCEL,
    "triple_push": PressKind.TEST,
}
# Edges that accompany a real push; counting them would double every press.
DEFAULT_IGNORED = ("btn_down", "btn_up")


@dataclasses.dataclass(frozen=True, slots=True)
class ShellyDecoder:
    """Decoder for Shelly Gen1 ``shellies/…`` topics and Gen2+ ``…/events/rpc``."""

    actions: Mapping[str, PressKind] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_ACTIONS)
    )
    ignore_actions: frozenset[str] = frozenset(DEFAULT_IGNORED)
    inputs: frozenset[int] | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> ShellyDecoder:
        """Build from options: ``actions``, ``ignore_actions``, ``inputs`` (input ids)."""
        c.reject_unknown_options(options, OPTIONS)
        raw_inputs = options.get("inputs")
        inputs = None
        if raw_inputs is not None:
            if not isinstance(raw_inputs, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in raw_inputs
            ):
                raise c.OptionError("option 'inputs' must be a list of input ids")
            inputs = frozenset(int(i) for i in raw_inputs)
        return cls(
            actions=c.action_map(options, "actions", DEFAULT_ACTIONS, fold=False),
            ignore_actions=c.name_set(options, "ignore_actions", DEFAULT_IGNORED, fold=False),
            inputs=inputs,
        )

    def __call__(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message."""
        return self.decode(topic, payload)

    def decode(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one Gen1 or Gen2+ MQTT message."""
        parts = topic.split("/")
        if len(parts) >= 3 and parts[0] == "shellies" and parts[1]:
            return self._gen1(parts[1], parts[2:], payload)
        if len(parts) >= 3 and parts[-2:] == ["events", "rpc"]:
            return self._gen2(payload)
        raise DecodeError("unexpected_topic", topic[:200])

    def _gen1(self, device: str, rest: list[str], payload: bytes) -> Frame | Ignored:
        if rest == ["sensor", "battery"]:
            battery = c.battery_percent(payload.decode("ascii", "replace"))
            if battery is None:
                raise DecodeError("bad_battery", payload[:32].decode("ascii", "replace"))
            return Frame(
                format=FORMAT, device_ref=device, kind=PressKind.HEARTBEAT, battery=battery
            )
        if len(rest) != 2 or rest[0] != "input_event":
            return Ignored("not_an_input_event")
        if not self._wanted_input(rest[1]):
            return Ignored("other_input")
        doc = c.load_object(payload)
        event = doc.get("event")
        if not isinstance(event, str):
            raise DecodeError("no_event", "input_event without event")
        if event == "":
            return Ignored("no_event")
        return self._press(device, event)

    def _gen2(self, payload: bytes) -> Frame | Ignored:
        doc = c.load_object(payload)
        src = c.as_str(doc.get("src"))
        if src is None:
            raise DecodeError("no_device", "notification without src")
        params = c.as_object(doc.get("params"))
        method = doc.get("method")
        if method in ("NotifyStatus", "NotifyFullStatus"):
            power = c.as_object(params.get("devicepower:0")) if params is not None else None
            cell = c.as_object(power.get("battery")) if power is not None else None
            battery = c.battery_percent(cell.get("percent")) if cell is not None else None
            if battery is None:
                return Ignored("status")
            return Frame(format=FORMAT, device_ref=src, kind=PressKind.HEARTBEAT, battery=battery)
        if method != "NotifyEvent":
            return Ignored("not_an_event")
        events = params.get("events") if params is not None else None
        if not isinstance(events, list):
            raise DecodeError("no_event", "NotifyEvent without params.events")
        for item in events:
            event = c.as_object(item)
            if event is None:
                continue
            component = c.as_str(event.get("component"))
            name = c.as_str(event.get("event"))
            if component is None or name is None or not component.startswith("input:"):
                continue
            if not self._wanted_input(component.removeprefix("input:")):
                continue
            if name in self.ignore_actions:
                continue
            return self._press(src, name)
        return Ignored("no_press_event")

    def _press(self, device: str, action: str) -> Frame | Ignored:
        if action in self.ignore_actions:
            return Ignored("ignored_action")
        kind = self.actions.get(action)
        if kind is None:
            raise DecodeError("unmapped_action", action[:64])
        # counter stays None: event_cnt (Gen1) resets on reboot, Gen2 events have none.
        return Frame(format=FORMAT, device_ref=device, kind=kind, counter=None)

    def _wanted_input(self, index: str) -> bool:
        if self.inputs is None:
            return True
        return index.isdigit() and int(index) in self.inputs

    def availability(self, topic: str, payload: bytes) -> c.DeviceHealth | None:
        """Device health from the LWT topics ``shellies/{id}/online`` / ``{prefix}/online``."""
        parts = topic.split("/")
        if len(parts) < 2 or parts[-1] != "online":
            return None
        text = payload.strip()
        if text not in (b"true", b"false"):
            return None
        device = parts[1] if parts[0] == "shellies" and len(parts) == 3 else "/".join(parts[:-1])
        return c.DeviceHealth(device_ref=device, online=text == b"true")


def gen1_event_count(payload: bytes) -> int | None:
    """The Gen1 ``event_cnt`` of an input_event (restarts at reboot: not a replay counter)."""
    try:
        doc = c.load_object(payload)
    except DecodeError:
        return None
    count = c.as_int(doc.get("event_cnt"))
    return count if count is not None and count >= 0 else None


def decode(topic: str, payload: bytes) -> Frame | Ignored:
    """Decode with the default press mapping."""
    return _DEFAULT.decode(topic, payload)


_DEFAULT = ShellyDecoder()
