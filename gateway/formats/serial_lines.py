"""Line parsers for serial LoRa receivers: REYAX RYLR896/RYLR998, RAK3172 (RUI3 P2P), JSON lines.

These return typed line events; the frame inside (hex binary frame or native JSON) is
decoded by :mod:`gateway.formats.lora_frame` or the native decoder.

Sources:

* REYAX "LoRa AT Command Guide" for RYLR896/RYLR406 (2022) and RYLR998/RYLR498 (2023):
  ``+RCV=<Address>,<Length>,<Data>,<RSSI>,<SNR>``, ``+READY``, ``+OK``, ``+ERR=<n>``,
  ``AT+SEND=<Address>,<Payload Length>,<Data>``; address 0..65535, data ≤ 240 bytes,
  every command ends in CR LF.
* RAKwireless Knowledge Hub, "AT Migration Guide" (RUI3): ``+EVT:RXP2P:<rssi>:<snr>:<hex>``
  on one line; old RAK3172 firmware printed two lines, ``+EVT:RXP2P, RSSI -60, SNR 11``
  then ``+EVT:<hex>``; ``+EVT:RXP2P RECEIVE TIMEOUT`` when a timed ``AT+PRECV`` expires.

Quirk: REYAX ``<Data>`` may itself contain commas, so it is sliced by ``<Length>`` rather
than split; RSSI and SNR are the two fields after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import DecodeError

MAX_LINE_BYTES = 1024
REYAX_MAX_DATA = 240
REYAX_MAX_ADDRESS = 65535


@dataclass(frozen=True, slots=True)
class Received:
    """A LoRa packet the receiver heard; ``addr`` is the REYAX sender address (None on RAK)."""

    data: bytes
    rssi: int
    snr: float
    addr: int | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """The module (re)started: ``+READY``."""


@dataclass(frozen=True, slots=True)
class Ok:
    """The previous command succeeded: ``+OK`` (REYAX) or ``OK`` (RAK)."""


@dataclass(frozen=True, slots=True)
class Err:
    """The previous command failed: ``+ERR=<code>`` (REYAX) or ``AT_…_ERROR`` (RAK, code None)."""

    code: int | None
    text: str = ""


@dataclass(frozen=True, slots=True)
class RxMeta:
    """Old RAK3172 firmware: RSSI/SNR line that precedes the ``+EVT:<hex>`` data line."""

    rssi: int
    snr: float


@dataclass(frozen=True, slots=True)
class RxData:
    """Old RAK3172 firmware: the data line that follows :class:`RxMeta`."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """Any other ``+EVT:`` line (``TXP2P DONE``, ``RXP2P RECEIVE TIMEOUT`` …)."""

    text: str


@dataclass(frozen=True, slots=True)
class Other:
    """A line that is none of the above (echo, version banner, blank)."""

    text: str


RadioLine = Received | Ready | Ok | Err | RxMeta | RxData | Event | Other

_REYAX_RCV = re.compile(r"\+RCV=(\d{1,5}),(\d{1,3}),")
_REYAX_TAIL = re.compile(r",(-?\d{1,3}),(-?\d{1,3}(?:\.\d+)?)")
_RAK_RX = re.compile(r"\+EVT:RXP2P:(-?\d{1,3}):(-?\d{1,3}(?:\.\d+)?):([0-9A-Fa-f]*)")
_RAK_LEGACY_META = re.compile(r"\+EVT:RXP2P, RSSI (-?\d{1,3}), SNR (-?\d{1,3}(?:\.\d+)?)")
_RAK_LEGACY_DATA = re.compile(r"\+EVT:((?:[0-9A-Fa-f]{2})+)")


def parse_reyax_line(line: bytes) -> RadioLine:
    """Parse one line from a REYAX RYLR896/RYLR998 (CR LF already stripped or not)."""
    raw = _strip(line)
    if raw.startswith(b"+RCV="):
        return _reyax_rcv(raw)
    text = raw.decode("ascii", "replace")
    if text == "+READY":
        return Ready()
    if text == "+OK":
        return Ok()
    if text.startswith("+ERR="):
        code = text[5:]
        if not code.isdigit() or len(code) > 3:
            raise DecodeError("bad_line", text[:64])
        return Err(code=int(code), text=text)
    return Other(text)


def _reyax_rcv(raw: bytes) -> Received:
    head = _REYAX_RCV.match(raw.decode("latin-1"))
    if head is None:
        raise DecodeError("bad_line", "malformed +RCV header")
    addr, length = int(head[1]), int(head[2])
    if addr > REYAX_MAX_ADDRESS or length > REYAX_MAX_DATA:
        raise DecodeError("bad_line", f"address {addr} / length {length} out of range")
    start = head.end()
    data = raw[start : start + length]
    if len(data) != length:
        raise DecodeError("truncated_line", f"{len(data)} of {length} data bytes")
    tail = _REYAX_TAIL.fullmatch(raw[start + length :].decode("latin-1"))
    if tail is None:
        raise DecodeError("bad_line", "missing RSSI/SNR after data")
    return Received(data=bytes(data), rssi=int(tail[1]), snr=float(tail[2]), addr=addr)


def parse_rak_line(line: bytes) -> RadioLine:
    """Parse one line from a RAK3172 in LoRa P2P mode (RUI3 and the older firmware)."""
    text = _strip(line).decode("ascii", "replace")
    if match := _RAK_RX.fullmatch(text):
        hex_data = match[3]
        if len(hex_data) % 2:
            raise DecodeError("bad_line", "odd number of hex digits")
        return Received(data=bytes.fromhex(hex_data), rssi=int(match[1]), snr=float(match[2]))
    if match := _RAK_LEGACY_META.fullmatch(text):
        return RxMeta(rssi=int(match[1]), snr=float(match[2]))
    if match := _RAK_LEGACY_DATA.fullmatch(text):
        return RxData(data=bytes.fromhex(match[1]))
    if text.startswith("+EVT:RXP2P:"):
        raise DecodeError("bad_line", text[:64])
    if text.startswith("+EVT:"):
        return Event(text[5:])
    if text == "OK":
        return Ok()
    if text.startswith("AT_") and text.endswith("ERROR"):
        return Err(code=None, text=text)
    if text == "+READY" or text.startswith("RAKwireless"):
        return Ready()
    return Other(text)


def join_legacy_rak(meta: RxMeta, data: RxData) -> Received:
    """Combine the two lines old RAK3172 firmware prints for one packet."""
    return Received(data=data.data, rssi=meta.rssi, snr=meta.snr)


def parse_json_line(line: bytes) -> bytes | None:
    """One frame per line from a JSON-lines receiver: the JSON text, or None for a blank line."""
    raw = _strip(line)
    if not raw:
        return None
    if not raw.startswith(b"{"):
        raise DecodeError("not_a_json_frame", raw[:32].decode("ascii", "replace"))
    return raw


def reyax_send(addr: int, data: bytes) -> bytes:
    """The ``AT+SEND`` command (with CR LF) that sends ``data`` to REYAX address ``addr``."""
    if not 0 <= addr <= REYAX_MAX_ADDRESS:
        raise ValueError(f"REYAX address {addr} outside 0..{REYAX_MAX_ADDRESS}")
    if len(data) > REYAX_MAX_DATA:
        raise ValueError(f"REYAX payload of {len(data)} bytes exceeds {REYAX_MAX_DATA}")
    if b"\r" in data or b"\n" in data:
        # The module ends the command at the first CR LF; send binary data hex-encoded.
        raise ValueError("REYAX payload must not contain CR or LF")
    return b"AT+SEND=%d,%d,%s\r\n" % (addr, len(data), data)


def rak_send(data: bytes) -> bytes:
    """The RUI3 ``AT+PSEND`` command (with CR LF) that sends ``data`` in P2P mode."""
    if not data or len(data) > 255:
        raise ValueError("RAK P2P payload must be 1..255 bytes")
    return b"AT+PSEND=%s\r\n" % data.hex().upper().encode("ascii")


def _strip(line: bytes) -> bytes:
    if len(line) > MAX_LINE_BYTES:
        raise DecodeError("line_too_long", f"{len(line)} bytes")
    return line.rstrip(b"\r\n")
