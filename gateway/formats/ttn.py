"""The Things Stack v3 (TTN / TTS) MQTT uplinks.

Sources: TheThingsIndustries/lorawan-stack-docs doc/content/integrations/data-formats/
_index.md (uplink JSON), the MQTT server page (topics ``v3/{application id}@{tenant id}/
devices/{device id}/up``; the Open Source edition omits ``@{tenant id}``), and
TheThingsNetwork/lorawan-stack api/ttn/lorawan/v3/metadata.proto (``RxMetadata``,
``Location``).

Quirks handled:

* Empty fields are omitted: ``f_cnt`` is absent for frame counter 0, ``frm_payload`` for
  an empty payload.
* ``simulated: true`` marks an uplink typed into the Console or sent with ``ttn-lw-cli
  simulate``; anyone with Console access can make one, so by default it is Ignored
  (option ``simulated = "test"`` turns it into a TEST press, ``"accept"`` takes it as is).
* Uplinks relayed by Packet Broker name the gateway ``packetbroker``; the forwarder's
  gateway id from ``packet_broker`` is used instead.
* ``last_battery_percentage`` (TTS 3.33.1+) is the device's DevStatusAns battery, used
  when the payload formatter gives none.
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

FORMAT = "ttn"
OPTIONS = ("events", "identity", "simulated", "mapping")
IDENTITIES = ("device_id", "dev_eui")
SIMULATED = ("ignore", "test", "accept")

DEFAULT_EVENTS: Mapping[str, PressKind] = {
    "panic": PressKind.PANIC,
    "sos": PressKind.PANIC,
    "emergency": PressKind.PANIC,
    "cancel": PressKind.CANCEL,
    "test": PressKind.TEST,
    "heartbeat": PressKind.HEARTBEAT,
}
_IGNORED_SUFFIXES = ("join", "down/", "service/", "location/")


@dataclasses.dataclass(frozen=True, slots=True)
class TtnDecoder:
    """Decoder for The Things Stack v3 ``.../up`` messages."""

    events: Mapping[str, PressKind] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_EVENTS)
    )
    identity: str = "device_id"
    simulated: str = "ignore"
    # For a decoded_payload without ``event`` (gateway/formats/mapping.py).
    rules: tuple[FieldRule, ...] = DEFAULT_RULES

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> TtnDecoder:
        """Build from options: ``events``, ``identity`` (device_id|dev_eui), ``simulated``,
        ``mapping`` (field values to kinds, gateway/formats/mapping.py)."""
        c.reject_unknown_options(options, OPTIONS)
        return cls(
            events=c.action_map(options, "events", DEFAULT_EVENTS, fold=True),
            identity=c.choice(options, "identity", IDENTITIES),
            simulated=c.choice(options, "simulated", SIMULATED),
            rules=rules_option(options),
        )

    def __call__(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message."""
        return self.decode(topic, payload)

    def decode(self, topic: str, payload: bytes) -> Frame | Ignored:
        """Decode one MQTT message; an empty topic is treated as an uplink (webhook)."""
        topic_device, suffix = _parse_topic(topic)
        if suffix != "up":
            if suffix.startswith(_IGNORED_SUFFIXES):
                return Ignored(f"message_{suffix.replace('/', '_')}")
            raise DecodeError("unexpected_topic", topic[:200])
        doc = c.load_object(payload)
        ids = c.as_object(doc.get("end_device_ids"))
        device_id = c.as_str(ids.get("device_id")) if ids is not None else None
        if ids is None or device_id is None:
            raise DecodeError("no_device", "end_device_ids.device_id missing")
        if topic_device is not None and topic_device != device_id:
            raise DecodeError("device_mismatch", f"topic {topic_device}, payload {device_id}")
        up = c.as_object(doc.get("uplink_message"))
        if up is None:
            raise DecodeError("no_uplink", "uplink_message missing")
        simulated = doc.get("simulated") is True
        if simulated and self.simulated == "ignore":
            return Ignored("simulated")
        frame = self._uplink(up, self._device_ref(ids, device_id))
        if simulated and self.simulated == "test":
            frame = dataclasses.replace(frame, kind=PressKind.TEST)
        return frame

    def _device_ref(self, ids: dict[str, object], device_id: str) -> str:
        if self.identity == "device_id":
            return device_id
        dev_eui = c.as_str(ids.get("dev_eui"))
        if dev_eui is None:
            raise DecodeError("no_device", "end_device_ids.dev_eui missing")
        # TTS prints EUIs in upper case; the registry keys them the same way.
        return dev_eui.upper()

    def _uplink(self, up: dict[str, object], device_ref: str) -> Frame:
        gateway_ref, gateway_fix = _best_gateway(up.get("rx_metadata"))
        data = _frm_payload(up.get("frm_payload"))
        decoded = c.as_object(up.get("decoded_payload"))
        if data is not None and lora_frame.looks_like_frame(data):
            try:
                inner = lora_frame.decode_bytes(data, format_name=FORMAT)
            except DecodeError:
                if decoded is None:
                    raise
            else:
                return dataclasses.replace(inner, gateway_ref=gateway_ref, gateway_fix=gateway_fix)
        if decoded is None:
            if data is not None:
                inner = lora_frame.decode_bytes(data, format_name=FORMAT)
                return dataclasses.replace(inner, gateway_ref=gateway_ref, gateway_fix=gateway_fix)
            raise DecodeError("no_payload", "neither decoded_payload nor frm_payload")
        f_cnt = up.get("f_cnt", 0)  # omitted when 0
        counter = c.as_int(f_cnt)
        try:
            kind = press_kind(decoded, self.events, self.rules, "decoded_payload")
        except DecodeError as exc:
            raise exc.about(device_ref, counter) from None
        if counter is None or not 0 <= counter <= c.MAX_FCNT:
            raise DecodeError("bad_counter", repr(f_cnt)[:64])
        battery = c.battery_percent(decoded.get("battery"))
        if battery is None:
            last = c.as_object(up.get("last_battery_percentage"))
            battery = c.battery_percent(last.get("value")) if last is not None else None
        return Frame(
            format=FORMAT,
            device_ref=device_ref,
            kind=kind,
            counter=counter,
            battery=battery,
            fix=c.geo_fix(decoded.get("lat"), decoded.get("lon"), decoded.get("accuracy")),
            gateway_fix=gateway_fix,
            gateway_ref=gateway_ref,
        )


def decode(topic: str, payload: bytes) -> Frame | Ignored:
    """Decode with default options (simulated uplinks ignored)."""
    return _DEFAULT.decode(topic, payload)


def _parse_topic(topic: str) -> tuple[str | None, str]:
    """Device id and message suffix (``up``, ``join``, ``down/sent`` …) from the topic."""
    if not topic:
        return None, "up"
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "v3" or parts[2] != "devices" or not parts[3]:
        raise DecodeError("unexpected_topic", topic[:200])
    return parts[3], "/".join(parts[4:])


def _frm_payload(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError("bad_data", "frm_payload is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("bad_data", "frm_payload is not valid base64") from None


def _gateway_id(meta: dict[str, object]) -> str | None:
    ids = c.as_object(meta.get("gateway_ids"))
    gateway_id = c.as_str(ids.get("gateway_id")) if ids is not None else None
    if gateway_id == "packetbroker":
        broker = c.as_object(meta.get("packet_broker"))
        if broker is not None:
            forwarder = c.as_str(broker.get("forwarder_gateway_id")) or c.as_str(
                broker.get("forwarder_gateway_eui")
            )
            if forwarder is not None:
                return forwarder
    return gateway_id


def _best_gateway(rx_metadata: object) -> tuple[str | None, GeoFix | None]:
    if not isinstance(rx_metadata, list):
        return None, None
    heard: list[tuple[float | None, str, GeoFix | None]] = []
    for item in rx_metadata:
        meta = c.as_object(item)
        gateway_id = _gateway_id(meta) if meta is not None else None
        if meta is not None and gateway_id is not None:
            heard.append(
                (c.as_float(meta.get("rssi", 0)), gateway_id, c.location_fix(meta.get("location")))
            )
    return c.pick_gateway(heard)


_DEFAULT = TtnDecoder()
