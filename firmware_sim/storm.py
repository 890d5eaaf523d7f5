"""A storm of signed presses at a fixed rate, with heard-twice duplicates.

Used by the demo, the durability test and the benchmarks. Publication is QoS 1 (each
publish completes on the broker's PUBACK); feedback from panicd on the command topics is
timed per press when ``watch_feedback`` is set, which is how end-to-end latency is taken.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiomqtt

from firmware_sim.button import build_frame, topic_for
from firmware_sim.fleet import SimDevice
from gateway.formats import native, payload_bytes
from gateway.model import PressKind


@dataclass(slots=True)
class StormResult:
    """What a storm sent and (optionally) what came back."""

    sent: dict[tuple[str, int], float] = field(default_factory=dict)
    duplicates: int = 0
    feedback: dict[tuple[str, int], float] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    expected: int = 0
    all_feedback: asyncio.Event = field(default_factory=asyncio.Event)

    def latencies_ms(self) -> list[float]:
        """Publish → feedback latency per press that got feedback, sorted."""
        return sorted(
            (self.feedback[key] - sent) * 1000 for key, sent in self.sent.items()
            if key in self.feedback
        )


async def storm(
    host: str,
    port: int,
    devices: Sequence[SimDevice],
    *,
    count: int,
    rate: float,
    counter_base: int,
    duplicate_ratio: float = 0.0,
    via_gateway: str | None = None,
    kind: PressKind = PressKind.PANIC,
    watch_feedback: bool = False,
    feedback_grace_s: float = 5.0,
    seed: int = 1,
    max_in_flight: int = 2000,
) -> StormResult:
    """Publish ``count`` distinct presses round-robin over ``devices`` at ``rate`` per second.

    Device ``i`` uses counters ``counter_base + n`` for its n-th press. A duplicate is the
    same frame published again — through ``via_gateway``'s topic when given (another path).
    """
    rng = random.Random(seed)
    result = StormResult()
    limit = asyncio.Semaphore(max_in_flight)
    per_device: dict[str, int] = {}
    client_id = f"panic-sim-storm-{os.getpid()}"
    async with aiomqtt.Client(host, port, identifier=client_id, clean_session=True,
                              max_inflight_messages=max_in_flight) as client:
        watcher: aiomqtt.Client | None = None
        async with aiomqtt.Client(host, port, identifier=f"{client_id}-fb",
                                  clean_session=True) as fb:
            async with asyncio.TaskGroup() as group:
                if watch_feedback:
                    watcher = fb
                    await fb.subscribe(f"{native.TOPIC_PREFIX}dev/+/cmd", qos=1)
                    listen = group.create_task(_collect(fb, result), name="storm.feedback")

                async def publish(topic: str, payload: bytes) -> None:
                    try:
                        await client.publish(topic, payload, qos=1, timeout=30)
                    finally:
                        limit.release()

                result.started_at = time.time()
                loop = asyncio.get_running_loop()
                start = loop.time()
                for index in range(count):
                    due = start + index / rate
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    device = devices[index % len(devices)]
                    n = per_device.get(device.id, 0)
                    per_device[device.id] = n + 1
                    counter = counter_base + n
                    payload = build_frame(device, kind, counter)
                    await limit.acquire()
                    result.sent[device.id, counter] = time.time()
                    group.create_task(publish(topic_for(device, None), payload),
                                      name=f"storm.publish.{index}")
                    if duplicate_ratio and rng.random() < duplicate_ratio:
                        await limit.acquire()
                        result.duplicates += 1
                        group.create_task(publish(topic_for(device, via_gateway), payload),
                                          name=f"storm.duplicate.{index}")
                if watcher is not None:
                    # _collect sets the event once every sent press has its feedback.
                    result.expected = len(result.sent)
                    if len(result.feedback) >= result.expected:
                        result.all_feedback.set()
                    try:
                        async with asyncio.timeout(feedback_grace_s):
                            await result.all_feedback.wait()
                    except TimeoutError:
                        pass
                    listen.cancel()
            result.finished_at = time.time()
    return result


async def publish_all(host: str, port: int, messages: Sequence[tuple[str, bytes]], *,
                      rate: float) -> int:
    """Publish prepared (topic, payload) pairs at ``rate`` per second, QoS 1; returns count."""
    async with aiomqtt.Client(host, port, identifier=f"panic-sim-3p-{os.getpid()}",
                              clean_session=True) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, (topic, payload) in enumerate(messages):
            delay = start + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await client.publish(topic, payload, qos=1, timeout=30)
    return len(messages)


async def _collect(client: aiomqtt.Client, result: StormResult) -> None:
    async for message in client.messages:
        arrived = time.time()
        device_id = message.topic.value.split("/")[3]
        try:
            body = json.loads(payload_bytes(message.payload))
        except ValueError:
            continue
        if isinstance(body, dict) and isinstance(body.get("ctr"), int):
            result.feedback.setdefault((device_id, body["ctr"]), arrived)
            if result.expected and len(result.feedback) >= result.expected:
                result.all_feedback.set()
