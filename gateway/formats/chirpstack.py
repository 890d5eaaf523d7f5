"""ChirpStack v4 MQTT integration events, JSON marshaler.

Sources: chirpstack/chirpstack-docs src/chirpstack/integrations/{mqtt,events}.md and
chirpstack/chirpstack api/proto/{integration/integration.proto,gw/gw.proto,
common/common.proto}. Topic: ``application/{application_id}/device/{dev_eui}/event/{type}``.

Quirks handled:

* The JSON is the Protocol Buffers JSON mapping, which omits default values: ``fCnt`` is
  absent for frame counter 0, ``data`` for an empty payload, ``latitude`` for 0.
* ``object`` exists only when the device profile has a codec; otherwise only base64
  ``data``. A ``data`` that is one of our signed binary frames wins over ``object``
  because it carries our own HMAC and counter.
* ``status`` events carry ``batteryLevel`` (percent, float) unless
  ``batteryLevelUnavailable`` or ``externalPowerSource`` is set.
* Gateway positions (``rxInfo[].location``) are the location fallback; the best-RSSI
  gateway with a position wins.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping

from gateway.errors import DecodeError
from gateway.formats import _common as c
from gateway.formats import lora_frame
from gateway.formats.mapping import DEFAULT_RULES, FieldRule, press_kind, rules_option
from gateway.model import Frame, GeoFix, Ignored, PressKind

FORMAT = "chirpstack"
OPTIONS = ("events", "mapping")

# What a device-profile codec is expected to put in ``object.event``.
DEFAULT_EVENTS: Mapping[str, PressKind] = {
    "panic": PressKind.PANIC,
    "sos": PressKind.PANIC,
    "emergency": PressKind.PANIC,
    "cancel": PressKind.CANCEL,
    "test": PressKind.TEST,
    "heartbeat": PressKind.HEARTBEAT,
}
_IGNORED_EVENTS = frozenset({"join", "ack", "txack", "log", "location", "integration"})


@dataclasses.dataclass(frozen=True, slots=True)
class ChirpstackDecoder:
    """Decoder for ChirpStack v4 ``up`` and ``status`` events."""

    events: Mapping[str, PressKind] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_EVENTS)
    )
    # For a codec object without ``event`` (gateway/formats/mapping.py).
    rules: tuple[FieldRule, ...] = DEFAULT_RULES

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> ChirpstackDecoder:
        """Build from config options: ``events`` maps codec event names to kinds,
        ``mapping`` field values to kinds."""
        c.reject_unknown_options(options, OPTIONS)
        return cls(events=c.action_map(options, "events", DEFAULT_EVENTS, fold=True),
                   rules=rules_option(options))

    def __call__(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message."""
        return self.decode(topic, payload)

    def decode(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message; an empty topic is treated as an ``up`` event."""
        topic_eui, event = _parse_topic(topic)
        if event in _IGNORED_EVENTS:
            return Ignored(f"event_{event}")
        if event not in ("up", "status"):
            raise DecodeError("unknown_event_type", event)
        doc = c.load_object(payload)
        dev_eui = _dev_eui(doc)
        if topic_eui is not None and topic_eui != dev_eui:
            # ChirpStack derives the topic from the same DevEUI; a mismatch is a forgery.
            raise DecodeError("device_mismatch", f"topic {topic_eui}, payload {dev_eui}")
        if event == "status":
            return _status(doc, dev_eui)
        return self._uplink(doc, dev_eui)

    def _uplink(self, doc: dict[str, object], dev_eui: str) -> Frame:
        gateway_ref, gateway_fix = _best_gateway(doc.get("rxInfo"))
        data = _data_bytes(doc.get("data"))
        obj = c.as_object(doc.get("object"))
        if data is not None and lora_frame.looks_like_frame(data):
            try:
                inner = lora_frame.decode_bytes(data, format_name=FORMAT)
            except DecodeError:
                if obj is None:
                    raise
            else:
                return _with_gateway(inner, gateway_ref, gateway_fix)
        if obj is not None:
            return self._from_object(obj, doc, dev_eui, gateway_ref, gateway_fix)
        if data is not None:
            # Not our frame and no codec: decoding it raises the precise reason.
            return _with_gateway(
                lora_frame.decode_bytes(data, format_name=FORMAT), gateway_ref, gateway_fix
            )
        raise DecodeError("no_payload", "neither object nor data")

    def _from_object(
        self,
        obj: dict[str, object],
        doc: dict[str, object],
        dev_eui: str,
        gateway_ref: str | None,
        gateway_fix: GeoFix | None,
    ) -> Frame:
        f_cnt = doc.get("fCnt", 0)  # proto3 JSON omits fCnt when it is 0
        counter = c.as_int(f_cnt)
        try:
            kind = press_kind(obj, self.events, self.rules, "codec object")
        except DecodeError as exc:
            raise exc.about(dev_eui, counter) from None
        if counter is None or not 0 <= counter <= c.MAX_FCNT:
            raise DecodeError("bad_counter", repr(f_cnt)[:64])
        return Frame(
            format=FORMAT,
            device_ref=dev_eui,
            kind=kind,
            counter=counter,
            battery=c.battery_percent(obj.get("battery")),
            fix=c.geo_fix(obj.get("lat"), obj.get("lon"), obj.get("accuracy")),
            gateway_fix=gateway_fix,
            gateway_ref=gateway_ref,
        )


def decode(topic: str, payload: bytes) -> Frame | Ignored:
    """Decode with the default event names."""
    return _DEFAULT.decode(topic, payload)


def _parse_topic(topic: str) -> tuple[str | None, str]:
    if not topic:
        return None, "up"
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != "application" or parts[2] != "device":
        raise DecodeError("unexpected_topic", topic[:200])
    if parts[4] != "event":
        raise DecodeError("unexpected_topic", topic[:200])
    return parts[3].casefold(), parts[5]


def _dev_eui(doc: dict[str, object]) -> str:
    info = c.as_object(doc.get("deviceInfo"))
    dev_eui = c.as_str(info.get("devEui")) if info is not None else None
    if dev_eui is None:
        raise DecodeError("no_device", "deviceInfo.devEui missing")
    if len(dev_eui) != 16 or any(ch not in "0123456789abcdefABCDEF" for ch in dev_eui):
        raise DecodeError("bad_device", dev_eui[:64])
    # ChirpStack v4 prints EUIs in lower case; normalise so registry ids compare equal.
    return dev_eui.casefold()


def _data_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError("bad_data", "data is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("bad_data", "data is not valid base64") from None


def _status(doc: dict[str, object], dev_eui: str) -> Frame | Ignored:
    if doc.get("batteryLevelUnavailable") is True or doc.get("externalPowerSource") is True:
        battery = None
    else:
        battery = c.battery_percent(doc.get("batteryLevel", 0))
    return Frame(format=FORMAT, device_ref=dev_eui, kind=PressKind.HEARTBEAT, battery=battery)


def _best_gateway(rx_info: object) -> tuple[str | None, GeoFix | None]:
    if not isinstance(rx_info, list):
        return None, None
    heard: list[tuple[float | None, str, GeoFix | None]] = []
    for item in rx_info:
        rx = c.as_object(item)
        gateway_id = c.as_str(rx.get("gatewayId")) if rx is not None else None
        if rx is not None and gateway_id is not None:
            heard.append(
                (c.as_float(rx.get("rssi", 0)), gateway_id, c.location_fix(rx.get("location")))
            )
    return c.pick_gateway(heard)


def _with_gateway(frame: Frame, gateway_ref: str | None, gateway_fix: GeoFix | None) -> Frame:
    return dataclasses.replace(frame, gateway_ref=gateway_ref, gateway_fix=gateway_fix)


_DEFAULT = ChirpstackDecoder()
