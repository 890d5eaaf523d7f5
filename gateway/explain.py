"""Explain one frame: decode it and verify it against the registry (``panicctl decode``).

Operators use it to answer "why was this button ignored?": the result names the press as
the frame carries it and the verdict the pipeline would reach for it, with no stored
state (so a stale counter cannot show; a bad tag, an unknown device or a malformed frame
does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import Config
from gateway.errors import DecodeError
from gateway.formats import DECODERS, OptionError, lora_frame, native
from gateway.model import Frame, Ignored, Trust
from gateway.sources.serial import LineInterpreter, Uplink
from gateway.verify import Accept, Duplicate, verify

RADIO_FORMATS = ("rylr", "rak3172")
FORMATS = ("native", "lora-frame", "chirpstack", "ttn", "zigbee2mqtt", "shelly", "tasmota",
           "rylr", "rak3172", "app")
_HEX_TEXT = re.compile(rb"\s*(?:[0-9A-Fa-f]{2})+\s*")


class UnsupportedFormatError(Exception):
    """The format exists in the issue but not in this panicd yet."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decode result with the radio metadata a serial line carried."""

    result: Frame | Ignored | DecodeError
    rssi: float | None = None
    snr: float | None = None


def decode_any(
    format_name: str, payload: bytes, *, topic: str = "",
    options: Mapping[str, object] | None = None,
) -> Decoded:
    """Decode ``payload`` as ``format_name`` (never raises DecodeError: it is returned)."""
    try:
        match format_name:
            case "native":
                return Decoded(native.decode(topic, payload.strip()))
            case "lora-frame":
                raw = payload
                if _HEX_TEXT.fullmatch(payload):
                    raw = bytes.fromhex(payload.decode("ascii"))
                return Decoded(lora_frame.decode(topic, raw))
            case "rylr" | "rak3172":
                return _radio(format_name, payload)
            case "app":
                # The city app posts our native frame over HTTPS (docs/APP_API.md).
                return Decoded(native.decode("", payload))
            case _:
                decoder = DECODERS[format_name](options or {})
                return Decoded(decoder(topic, payload))
    except DecodeError as exc:
        return Decoded(exc)


def _radio(mode: str, payload: bytes) -> Decoded:
    """The first packet in a receiver's output (old RAK firmware spreads one over two lines)."""
    interpreter = LineInterpreter(mode)
    for line in payload.splitlines():
        event = interpreter.interpret(line)
        if isinstance(event, Uplink):
            return Decoded(event.decoded, event.rssi, event.snr)
    return Decoded(DecodeError("no_packet", "no received packet in the input"))


def _trust(config: Config, format_name: str) -> Trust:
    """The trust a configured source gives this format (signed for our own formats)."""
    if format_name in ("native", "lora-frame", *RADIO_FORMATS):
        return Trust.SIGNED
    for source in config.mqtt:
        if source.format == format_name:
            return source.trust
    return Trust.NETWORK


def format_options(config: Config, format_name: str) -> Mapping[str, object]:
    """The decoder options of the first MQTT source using ``format_name`` (none: defaults)."""
    for source in config.mqtt:
        if source.format == format_name:
            return source.format_options
    return {}


def explain(
    config: Config, format_name: str, payload: bytes, *, topic: str = "", now: float
) -> dict[str, object]:
    """The normalised press and the pipeline's verdict for one frame, as a JSON object."""
    try:
        decoded = decode_any(format_name, payload, topic=topic,
                             options=format_options(config, format_name))
    except OptionError as exc:
        return {"via": format_name, "verdict": "bad_format_options", "detail": str(exc)}
    out: dict[str, object] = {"via": format_name}
    if decoded.rssi is not None:
        out["rssi"] = decoded.rssi
        out["snr"] = decoded.snr
    frame = decoded.result
    if isinstance(frame, DecodeError):
        # What the envelope told before the press did not decode: an installer sees
        # whether the device was recognised at all, and which fields were looked at.
        if frame.device_ref is not None:
            out.update(device=frame.device_ref, counter=frame.counter)
            known = config.external_device(format_name, frame.device_ref)
            _registry(out, format_name, frame.device_ref, known.id if known else None,
                      by_id=False)
        if frame.fields:
            out["fields_read"] = list(frame.fields)
        out.update(verdict=frame.reason, detail=frame.detail)
        return out
    if isinstance(frame, Ignored):
        out.update(verdict="ignored", detail=frame.reason)
        return out
    out.update(device=frame.device_ref, counter=frame.counter, kind=frame.kind.value,
               battery=frame.battery)
    if frame.fix is not None:
        out.update(lat=frame.fix.lat, lon=frame.fix.lon)
    if frame.gateway_ref is not None:
        out["gateway"] = frame.gateway_ref
    device = config.device_for(frame)
    _registry(out, format_name, frame.device_ref, device.id if device else None,
              by_id=config.names_registry_id(frame))
    verdict = verify(frame, device=device, trust=_trust(config, format_name), state=None,
                     known=None, now=now)
    match verdict:
        case Accept() | Duplicate():
            out["verdict"] = "accepted"
        case _:
            out["verdict"] = verdict.reason
            if verdict.detail:
                out["detail"] = verdict.detail
    return out


def _registry(out: dict[str, object], format_name: str, device_ref: str,
              device_id: str | None, *, by_id: bool) -> None:
    """The registry entry a device matched, or why none did (``by_id``: the frame names
    a registry id, as our own signed frames do; else the network's identity)."""
    out["registry_device"] = device_id
    if device_id is None:
        if by_id:
            out["registry_detail"] = f"no [[device]] with id = {device_ref!r}"
        else:
            out["registry_detail"] = (f"no [[device]] with external_ids.{format_name} = "
                                      f"{device_ref!r}")
