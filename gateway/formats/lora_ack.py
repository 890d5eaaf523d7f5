"""The ACK downlink panicd sends a LoRa button once its press is committed (docs/FRAMES.md).

Layout (big-endian), 18 bytes; the tag covers every byte before it:

    0      type             0x81 (bit 7 = downlink, low bits = version 1)
    1..4   device number    the uplink frame's device number
    5..8   counter          the uplink frame's counter
    9      state            1 = stored ("received"), 2 = a responder is coming
    10..17 tag              HMAC-SHA256(device key, bytes 0..9)[:8]

A button retries its frame until an ACK for its own device number and counter arrives with
a valid tag; the tag matters because a forged ACK would silence a real panic.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from gateway.formats import lora_frame

ACK_TYPE = 0x81
_BODY = struct.Struct(">BIIB")
ACK_BYTES = _BODY.size + lora_frame.TAG_BYTES


class AckState(IntEnum):
    """What the ACK tells the presser (DESIGN §2 Presser feedback)."""

    RECEIVED = 1
    HELP_COMING = 2


@dataclass(frozen=True, slots=True)
class Ack:
    """A verified ACK downlink."""

    device: str
    counter: int
    state: AckState


def encode(*, device: str, counter: int, state: AckState, key: bytes) -> bytes:
    """The signed ACK for ``device``'s frame ``counter``."""
    body = _BODY.pack(ACK_TYPE, lora_frame.device_number(device), counter, state)
    return body + hmac.digest(key, body, hashlib.sha256)[: lora_frame.TAG_BYTES]


def decode(payload: bytes, *, key: bytes) -> Ack | None:
    """The ACK in ``payload`` if it is one with a valid tag for ``key``; None otherwise."""
    if len(payload) != ACK_BYTES or payload[0] != ACK_TYPE:
        return None
    body, tag = payload[: _BODY.size], payload[_BODY.size :]
    expected = hmac.digest(key, body, hashlib.sha256)[: lora_frame.TAG_BYTES]
    if not hmac.compare_digest(expected, tag):
        return None
    _, number, counter, state = _BODY.unpack(body)
    if number == 0 or state not in AckState.__members__.values():
        return None
    return Ack(lora_frame.device_id(number), counter, AckState(state))
