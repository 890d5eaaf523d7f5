"""A storm of signed presses at a fixed rate, with heard-twice duplicates.

Used by the demo, the durability and fault tests and the benchmarks. Publication is QoS
1; feedback from panicd on the command topics is timed per press when ``watch_feedback``
is set, which is how end-to-end latency is taken.

Whose duty ends where: by default a press is done at the broker's PUBACK (re-published
only if no PUBACK came, e.g. across a broker restart), which is what the benchmarks
measure. With ``retransmit`` each button keeps its press until panicd's own "received"
feedback for that counter and sends the same bytes again with backoff until then
(firmware_sim.button.deliver): the end-to-end contract of docs/FRAMES.md, under which a
broker crash loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiomqtt

from firmware_sim.button import (
    BUTTON_BACKOFF,
    PUBACK_TIMEOUT_S,
    Address,
    BrokerLink,
    RetransmitPolicy,
    broker_link,
    build_frame,
    deliver,
    read_feedback,
    topic_for,
)
from firmware_sim.fleet import SimDevice
from gateway.formats import native, payload_bytes
from gateway.model import PressKind

Key = tuple[str, int]


@dataclass(slots=True)
class StormResult:
    """What a storm sent and (optionally) what came back, counted from the button side.

    ``sent`` holds every press made (first send time); ``pubacked`` those the broker
    acknowledged at least once; ``feedback`` the first "received" feedback per press.
    ``retransmissions`` counts copies of a press sent after its first (end to end, or a
    re-publish after a lost PUBACK); ``reconnects`` the broker connections re-made after
    a loss; ``forged_feedback`` feedback ignored because its tag did not verify.
    """

    sent: dict[Key, float] = field(default_factory=dict)
    duplicates: int = 0
    feedback: dict[Key, float] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    expected: int = 0
    all_feedback: asyncio.Event = field(default_factory=asyncio.Event)
    pubacked: set[Key] = field(default_factory=set)
    retransmit: bool = False
    retransmissions: int = 0
    reconnects: int = 0
    forged_feedback: int = 0

    def latencies_ms(self) -> list[float]:
        """Publish → feedback latency per press that got feedback, sorted."""
        return sorted(
            (self.feedback[key] - sent) * 1000 for key, sent in self.sent.items()
            if key in self.feedback
        )

    def confirmed(self) -> int:
        """Presses made that got their feedback."""
        return sum(1 for key in self.sent if key in self.feedback)

    def unconfirmed(self) -> list[Key]:
        """Presses made that never got their feedback, sorted."""
        return sorted(key for key in self.sent if key not in self.feedback)

    def summary(self) -> dict[str, object]:
        """The button-side figures, for a report line."""
        return {
            "presses": len(self.sent),
            "pubacked": len(self.pubacked & self.sent.keys()),
            "feedback": self.confirmed(),
            "retransmit": self.retransmit,
            "retransmissions": self.retransmissions,
            "reconnects": self.reconnects,
            "forged_feedback": self.forged_feedback,
        }


@dataclass(frozen=True, slots=True)
class StormPlan:
    """What to press: how many, how fast, which counters, heard twice how often."""

    count: int
    rate: float
    counter_base: int
    duplicate_ratio: float = 0.0
    via_gateway: str | None = None
    kind: PressKind = PressKind.PANIC
    # A mixed storm: a device's n-th press is kinds[n % len(kinds)] (else always ``kind``).
    kinds: tuple[PressKind, ...] = ()

    def kind_of(self, n: int) -> PressKind:
        """The kind of a device's ``n``-th press."""
        return self.kinds[n % len(self.kinds)] if self.kinds else self.kind


class _Storm:
    """One storm's state: the buttons' pending presses and what came back."""

    def __init__(self, devices: Sequence[SimDevice], *, retransmit: bool,
                 policy: RetransmitPolicy, seed: int, max_in_flight: int) -> None:
        self.devices = devices
        self.retransmit = retransmit
        self.policy = policy
        self.rng = random.Random(seed)
        self.result = StormResult(retransmit=retransmit)
        self.keys = {device.id: device.key for device in devices}
        self.confirmations: dict[Key, asyncio.Event] = {}
        self.limit = asyncio.Semaphore(max_in_flight)
        self.deliveries: list[asyncio.Task[None]] = []

    def on_feedback(self, message: aiomqtt.Message) -> None:
        """A message on some button's command topic: the press it confirms is done."""
        arrived = time.time()
        result = self.result
        device_id = message.topic.value.split("/")[3]
        feedback = read_feedback(
            device_id, self.keys.get(device_id), payload_bytes(message.payload)
        )
        if feedback is not None and feedback.forged:
            result.forged_feedback += 1
        if feedback is None or feedback.counter is None:
            return
        key = (device_id, feedback.counter)
        result.feedback.setdefault(key, arrived)
        confirmation = self.confirmations.get(key)
        if confirmation is not None:
            confirmation.set()
        if result.expected and len(result.feedback) >= result.expected:
            result.all_feedback.set()

    def _retransmitted(self) -> None:
        self.result.retransmissions += 1

    async def publish(self, link: BrokerLink, key: Key | None, topic: str, payload: bytes,
                      confirmed: asyncio.Event | None) -> None:
        """Deliver one press (``key``) or a heard-twice copy of one (``key`` None)."""
        held = True

        def first_sent() -> None:
            # The in-flight limit covers a press's first send, as aiomqtt's own does.
            nonlocal held
            if held:
                held = False
                self.limit.release()

        def pubacked() -> None:
            if key is not None:
                self.result.pubacked.add(key)

        try:
            await deliver(link, topic, payload, confirmed=confirmed, policy=self.policy,
                          rand=self.rng.random, on_retransmit=self._retransmitted,
                          on_puback=pubacked, after_first=first_sent)
        finally:
            first_sent()

    async def press_all(self, link: BrokerLink, plan: StormPlan,
                        group: asyncio.TaskGroup) -> None:
        """Make every press at its due time and start its delivery in ``group``."""
        result = self.result
        per_device: dict[str, int] = {}
        result.started_at = time.time()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(plan.count):
            delay = start + index / plan.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            device = self.devices[index % len(self.devices)]
            n = per_device.get(device.id, 0)
            per_device[device.id] = n + 1
            key = (device.id, plan.counter_base + n)
            payload = build_frame(device, plan.kind_of(n), key[1])
            confirmed = None
            if self.retransmit:
                confirmed = self.confirmations[key] = asyncio.Event()
                if key in result.feedback:
                    confirmed.set()
            await self.limit.acquire()
            result.sent[key] = time.time()
            self.deliveries.append(group.create_task(
                self.publish(link, key, topic_for(device, None), payload, confirmed),
                name=f"storm.publish.{index}"))
            if plan.duplicate_ratio and self.rng.random() < plan.duplicate_ratio:
                await self.limit.acquire()
                result.duplicates += 1
                self.deliveries.append(group.create_task(
                    self.publish(link, None, topic_for(device, plan.via_gateway), payload, None),
                    name=f"storm.duplicate.{index}"))

    async def settle(self, settle_s: float) -> None:
        """Wait for every delivery to be done, at most ``settle_s``; give up the rest."""
        if not self.deliveries:
            return
        _, late = await asyncio.wait(self.deliveries, timeout=settle_s)
        for task in late:
            task.cancel()


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
    retransmit: bool = False,
    policy: RetransmitPolicy = BUTTON_BACKOFF,
    client_id: str | None = None,
    kinds: Sequence[PressKind] = (),
    fallback_brokers: Sequence[Address] = (),
) -> StormResult:
    """Publish ``count`` distinct presses round-robin over ``devices`` at ``rate`` per second.

    Device ``i`` uses counters ``counter_base + n`` for its n-th press. A duplicate is the
    same frame published again — through ``via_gateway``'s topic when given (another path).
    The storm survives broker restarts (it reconnects). ``retransmit`` (which implies
    ``watch_feedback``) keeps every press until its feedback, for at most
    ``feedback_grace_s`` after the last press was made; without it a press is done at
    its PUBACK (waited for at most PUBACK_TIMEOUT_S after the last press). ``kinds`` mixes
    press kinds: a device's n-th press is ``kinds[n % len(kinds)]``. With
    ``fallback_brokers`` the buttons move to the next broker when one is gone.
    """
    plan = StormPlan(count, rate, counter_base, duplicate_ratio, via_gateway, kind,
                     tuple(kinds))
    run = _Storm(devices, retransmit=retransmit, policy=policy, seed=seed,
                 max_in_flight=max_in_flight)
    result = run.result
    client_id = client_id or f"panic-sim-storm-{os.getpid()}"
    async with contextlib.AsyncExitStack() as stack:
        link = await stack.enter_async_context(
            broker_link(host, port, client_id, max_inflight=max_in_flight, rand=run.rng.random,
                        fallback_brokers=fallback_brokers)
        )
        links = [link]
        if watch_feedback or retransmit:
            links.append(await stack.enter_async_context(broker_link(
                host, port, f"{client_id}-fb", subscribe=f"{native.TOPIC_PREFIX}dev/+/cmd",
                on_message=run.on_feedback, rand=run.rng.random,
                fallback_brokers=fallback_brokers,
            )))
        async with asyncio.TaskGroup() as group:
            await run.press_all(link, plan, group)
            if watch_feedback or retransmit:
                result.expected = len(result.sent)
                if len(result.feedback) >= result.expected:
                    result.all_feedback.set()
                if not retransmit:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(feedback_grace_s):
                            await result.all_feedback.wait()
            # Bounded: a press is done at its feedback (retransmit) or its PUBACK; one
            # that is not by then is given up, so a storm always ends by itself.
            await run.settle(feedback_grace_s if retransmit else PUBACK_TIMEOUT_S)
        result.reconnects = sum(each.reconnects for each in links)
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


class PanicAndHeartbeats:
    """Two storms in threads of their own over one stretch of time: ``panic`` buttons
    press panic twice each (an incident and a press joining its burst), the rest send
    heartbeats, ``presses`` in all; every press retransmitted until its feedback. Used
    by the multi-instance fault tests and ``bench.ha``: ``start``, then ``join``;
    ``results`` holds each storm's :class:`StormResult` by name ("panic", "heartbeat").
    """

    def __init__(self, host: str, port: int, panic: Sequence[SimDevice],
                 heartbeat: Sequence[SimDevice], *, presses: int, rate: float,
                 feedback_grace_s: float, client_id: str) -> None:
        storm_s = presses / rate
        panic_presses = 2 * len(panic)
        groups = (("panic", panic, panic_presses, PressKind.PANIC),
                  ("heartbeat", heartbeat, presses - panic_presses, PressKind.HEARTBEAT))
        self.results: dict[str, StormResult] = {}

        def publish(name: str, devices: Sequence[SimDevice], count: int,
                    kind: PressKind) -> None:
            self.results[name] = asyncio.run(storm(
                host, port, devices, count=count, rate=count / storm_s, counter_base=1,
                kind=kind, retransmit=True, feedback_grace_s=feedback_grace_s,
                client_id=f"{client_id}-storm-{name}"))

        self._threads = [threading.Thread(target=publish, args=group) for group in groups]

    def start(self) -> None:
        """Start both storms."""
        for thread in self._threads:
            thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for each; True when both ended."""
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        return not any(thread.is_alive() for thread in self._threads)
