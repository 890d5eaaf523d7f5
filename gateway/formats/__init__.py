"""Pure decoders for every uplink format, registered by name for the configuration.

Every decoder is ``decode(topic, payload) -> Frame | Ignored`` and raises only
:class:`gateway.errors.DecodeError`; ``DECODERS[name](options)`` builds one from the
source's ``options`` table (raising :class:`OptionError` on a malformed option).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.formats import chirpstack, lora_frame, shelly, tasmota, ttn, zigbee2mqtt
from gateway.formats._common import DeviceHealth, OptionError
from gateway.model import Frame, Ignored


class Decoder(Protocol):
    """Turns one received message into a frame, or says why it carries no press."""

    def __call__(self, topic: str, payload: bytes) -> Frame | Ignored: ...


DecoderFactory = Callable[[Mapping[str, object]], Decoder]


def payload_bytes(payload: object) -> bytes:
    """The bytes a decoder takes, from whatever an MQTT client hands over as a payload."""
    match payload:
        case bytes():
            return payload
        case bytearray():
            return bytes(payload)
        case str():
            return payload.encode()
        case None:
            return b""
        case _:
            return str(payload).encode()


def _lora_frame(options: Mapping[str, object]) -> Decoder:
    if options:
        raise OptionError(f"lora-frame takes no options, got {', '.join(sorted(options))}")
    return lora_frame.decode


DECODERS: dict[str, DecoderFactory] = {
    lora_frame.FORMAT: _lora_frame,
    chirpstack.FORMAT: chirpstack.ChirpstackDecoder.from_options,
    ttn.FORMAT: ttn.TtnDecoder.from_options,
    zigbee2mqtt.FORMAT: zigbee2mqtt.Zigbee2MqttDecoder.from_options,
    shelly.FORMAT: shelly.ShellyDecoder.from_options,
    tasmota.FORMAT: tasmota.TasmotaDecoder.from_options,
}

__all__ = [
    "DECODERS", "Decoder", "DecoderFactory", "DeviceHealth", "OptionError", "payload_bytes",
]
