"""A simulated native button: signs a frame, publishes it (QoS 1), waits for feedback."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiomqtt

from firmware_sim.fleet import SimDevice
from gateway.formats import native, payload_bytes
from gateway.model import GeoFix, PressKind


@dataclass(frozen=True, slots=True)
class SentPress:
    """What the button published."""

    device_id: str
    counter: int
    kind: PressKind
    topic: str
    payload: bytes
    published_at: float


def build_frame(
    device: SimDevice,
    kind: PressKind,
    counter: int,
    *,
    battery: int | None = 90,
    gps: GeoFix | None = None,
    tamper: bool = False,
) -> bytes:
    """A signed native frame; ``tamper`` flips one tag bit (for demos of rejection)."""
    payload = native.encode(
        key=device.key,
        device_id=device.id,
        counter=counter,
        kind=kind,
        device_time=int(time.time()),
        battery=battery,
        fix=gps,
    )
    if tamper:
        body = json.loads(payload)
        tag = bytearray(bytes.fromhex(body["tag"]))
        tag[0] ^= 0x01
        body["tag"] = tag.hex()
        payload = json.dumps(body, separators=(",", ":")).encode()
    return payload


def topic_for(device: SimDevice, via_gateway: str | None) -> str:
    """The device's own uplink topic, or a relay gateway's."""
    if via_gateway:
        return f"{native.TOPIC_PREFIX}gw/{via_gateway}/up"
    return native.uplink_topic(device.id)


async def press(
    host: str,
    port: int,
    device: SimDevice,
    kind: PressKind,
    counter: int,
    *,
    battery: int | None = 90,
    gps: GeoFix | None = None,
    via_gateway: str | None = None,
    tamper: bool = False,
    repeat: int = 1,
    feedback_timeout_s: float = 0.0,
) -> tuple[SentPress, dict[str, Any] | None]:
    """Publish one press (``repeat`` copies, as a button retrying would) and await feedback."""
    payload = build_frame(device, kind, counter, battery=battery, gps=gps, tamper=tamper)
    topic = topic_for(device, via_gateway)
    async with aiomqtt.Client(host, port, identifier=f"sim-{device.id}", clean_session=True) as c:
        if feedback_timeout_s > 0:
            await c.subscribe(native.command_topic(device.id), qos=1)
        published_at = time.time()
        for _ in range(repeat):
            await c.publish(topic, payload, qos=1)
        feedback = None
        if feedback_timeout_s > 0:
            try:
                async with asyncio.timeout(feedback_timeout_s):
                    async for message in c.messages:
                        body = json.loads(payload_bytes(message.payload))
                        if isinstance(body, dict) and body.get("ctr") == counter:
                            feedback = body
                            break
            except TimeoutError:
                feedback = None
    return SentPress(device.id, counter, kind, topic, payload, published_at), feedback
