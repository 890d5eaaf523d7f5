"""A simulated native button: signs a frame, publishes it (QoS 1), waits for feedback.

The button's duty ends at panicd's own "received" feedback for the press's counter, not
at the broker's PUBACK (DESIGN §2 Durability, docs/FRAMES.md): a broker acknowledges
from memory, so a broker crash can lose a press it has already PUBACKed. The button
keeps each press and retransmits the same bytes, with backoff, across reconnects, until
that feedback arrives (:func:`deliver`, over a :class:`BrokerLink` that reconnects).
Given fallback brokers, the link moves to the next broker when one is gone, as panicd's
own source does (docs/OPERATIONS.md, "Broker failover").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt

from firmware_sim.fleet import SimDevice
from gateway.backoff import Backoff, Jitter
from gateway.formats import native, payload_bytes
from gateway.model import GeoFix, PressKind

# How long one publish may wait for its PUBACK when the press's duty ends there.
PUBACK_TIMEOUT_S = 30.0

# A broker as (host, port).
Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SentPress:
    """What the button published; ``retransmissions`` counts copies sent after the first."""

    device_id: str
    counter: int
    kind: PressKind
    topic: str
    payload: bytes
    published_at: float
    retransmissions: int = 0


@dataclass(frozen=True, slots=True)
class RetransmitPolicy:
    """Capped exponential backoff with jitter: ``first_s``, doubling, at most ``cap_s``.

    Each delay is scaled by a factor in [1 - jitter, 1 + jitter], so a fleet that lost
    its broker at one instant does not retransmit in lockstep.
    """

    first_s: float = 1.0
    cap_s: float = 8.0
    jitter: float = 0.2

    def delay(self, attempt: int, rand: float) -> float:
        """The wait after attempt ``attempt`` (0 = the first send); ``rand`` in [0, 1)."""
        return Backoff(self.first_s, self.cap_s, Jitter.SPREAD, self.jitter).delay_s(
            attempt, rand)


@dataclass(frozen=True, slots=True)
class Feedback:
    """One message on a button's command topic, as the button reads it.

    ``counter`` is the press it confirms ("received" feedback), else None; ``forged``
    marks a body whose tag does not verify with the button's key (ignored).
    """

    body: dict[str, Any]
    counter: int | None
    forged: bool = False


# A button retransmits a press 1, 2, 4, 8, 8 … s apart (±20%) until its feedback.
BUTTON_BACKOFF = RetransmitPolicy()
# A button tries a lost broker again soon and often: a restart takes well under a second.
RECONNECT = RetransmitPolicy(first_s=0.1, cap_s=0.5)


def read_feedback(device_id: str, key: bytes | None, payload: bytes) -> Feedback | None:
    """Parse feedback for ``device_id``; None when it is not a JSON object at all.

    A body with a ``tag`` must verify (:func:`native.ack_tag_valid`) when the key is
    known; an untagged body is accepted (panicd's feedback before signed acks).
    """
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if "tag" in body and key is not None:
        named = body.get("dev", device_id)
        if named != device_id or not native.ack_tag_valid(key, {"dev": device_id, **body}):
            return Feedback(body, None, forged=True)
    counter = body.get("ctr")
    if body.get("state") != "received" or isinstance(counter, bool) or not isinstance(
        counter, int
    ):
        return Feedback(body, None)
    return Feedback(body, counter)


class Connection:
    """One broker connection; every wait on it ends early once it is lost."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.lost = False
        self._waits: set[asyncio.Timeout] = set()

    def lose(self) -> None:
        """The connection is gone: end every publish and wait pending on it now."""
        self.lost = True
        now = asyncio.get_running_loop().time()
        for bound in list(self._waits):
            if not bound.expired():
                bound.reschedule(now)

    async def publish(self, topic: str, payload: bytes, timeout_s: float) -> bool:
        """Publish at QoS 1; True on the broker's PUBACK, False if lost, failed or late."""
        return await self._bounded(
            self.client.publish(topic, payload, qos=1, timeout=math.inf), timeout_s
        )

    async def wait(self, event: asyncio.Event | None, timeout_s: float) -> bool:
        """True once ``event`` is set; False after ``timeout_s`` or if the link drops."""
        if event is not None and event.is_set():
            return True
        waiting = asyncio.get_running_loop().create_future() if event is None else event.wait()
        return await self._bounded(waiting, timeout_s)

    async def _bounded(
        self, waiting: Coroutine[Any, Any, object] | asyncio.Future[Any], timeout_s: float
    ) -> bool:
        if self.lost or timeout_s <= 0:
            if isinstance(waiting, asyncio.Future):
                waiting.cancel()
            else:
                waiting.close()  # never awaited: no "coroutine was never awaited" warning
            return False
        try:
            async with asyncio.timeout(timeout_s) as bound:
                self._waits.add(bound)
                try:
                    await waiting
                finally:
                    self._waits.discard(bound)
        except (TimeoutError, aiomqtt.MqttError):
            return False
        return True


class BrokerLink:
    """A broker connection kept up: after a loss it reconnects with backoff, for ever.

    The first connect must succeed (a wrong port fails at once); a later loss only makes
    :meth:`connection` wait for the next one. ``subscribe`` is renewed on every connect
    (clean sessions: the broker may have forgotten it, or restarted empty). With
    ``fallback_brokers`` a failed connect or a loss moves on to the next broker of
    ``[(host, port), *fallback_brokers]``, round robin, and the backoff is waited once per
    full round of failures; the first connect fails only when every broker refused it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        identifier: str,
        *,
        subscribe: str | None = None,
        on_message: Callable[[aiomqtt.Message], None] | None = None,
        max_inflight: int | None = None,
        reconnect: RetransmitPolicy | None = None,
        rand: Callable[[], float] = random.random,
        fallback_brokers: Sequence[Address] = (),
    ) -> None:
        self._brokers: tuple[Address, ...] = ((host, port), *fallback_brokers)
        self.identifier = identifier
        self._subscribe = subscribe
        self._on_message = on_message
        self._max_inflight = max_inflight
        self._reconnect = reconnect or RECONNECT
        self._rand = rand
        self._current: Connection | None = None
        self._up = asyncio.Event()
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reconnects = 0
        # The broker of the live connection (or of the last one).
        self.broker: Address = self._brokers[0]

    async def connection(self) -> Connection:
        """The live connection, waiting for the next one while the broker is away."""
        while self._current is None:
            await self._up.wait()
        return self._current

    async def wait_first(self) -> None:
        """Return once connected the first time; raises the first connect's MqttError."""
        await self._first

    async def keep(self) -> None:
        """Connect, subscribe, hand messages over; on a loss reconnect, until cancelled."""
        attempt = 0
        index = 0
        failures = 0  # failed connects and losses since the round began
        while True:
            host, port = self._brokers[index]
            client = aiomqtt.Client(
                host, port, identifier=self.identifier, clean_session=True,
                max_inflight_messages=self._max_inflight,
            )
            # A storm has up to max_inflight publishes awaiting PUBACK by design.
            client.pending_calls_threshold = max(10, self._max_inflight or 0)
            try:
                async with client:
                    if self._subscribe is not None:
                        await client.subscribe(self._subscribe, qos=1)
                    attempt = 0
                    failures = 0
                    self.broker = (host, port)
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                if not self._first.done() and failures + 1 >= len(self._brokers):
                    self._first.set_exception(exc)
                    return
            # The next broker at once; the backoff only once every broker has failed.
            index = (index + 1) % len(self._brokers)
            failures += 1
            if failures < len(self._brokers):
                continue
            failures = 0
            delay = self._reconnect.delay(attempt, self._rand())
            attempt = min(attempt + 1, 32)
            await asyncio.sleep(delay)

    async def _serve(self, client: aiomqtt.Client) -> None:
        connection = Connection(client)
        self._current = connection
        self._up.set()
        if self._first.done():
            self.reconnects += 1
        else:
            self._first.set_result(None)
        try:
            # Ends only by MqttError (the broker went away) or cancellation.
            async for message in client.messages:
                if self._on_message is not None:
                    self._on_message(message)
        finally:
            self._up.clear()
            self._current = None
            connection.lose()


@contextlib.asynccontextmanager
async def broker_link(
    host: str,
    port: int,
    identifier: str,
    *,
    subscribe: str | None = None,
    on_message: Callable[[aiomqtt.Message], None] | None = None,
    max_inflight: int | None = None,
    rand: Callable[[], float] = random.random,
    fallback_brokers: Sequence[Address] = (),
) -> AsyncIterator[BrokerLink]:
    """A :class:`BrokerLink` whose keeper task lives as long as the ``async with``."""
    link = BrokerLink(host, port, identifier, subscribe=subscribe, on_message=on_message,
                      max_inflight=max_inflight, rand=rand, fallback_brokers=fallback_brokers)
    async with asyncio.TaskGroup() as group:
        keeper = group.create_task(link.keep(), name=f"link.{identifier}")
        await link.wait_first()
        try:
            yield link
        finally:
            keeper.cancel()


async def deliver(
    link: BrokerLink,
    topic: str,
    payload: bytes,
    *,
    confirmed: asyncio.Event | None,
    policy: RetransmitPolicy,
    rand: Callable[[], float],
    on_retransmit: Callable[[], None] = lambda: None,
    on_puback: Callable[[], None] = lambda: None,
    after_first: Callable[[], None] = lambda: None,
) -> None:
    """Publish one press until its duty ends; bound it from outside (cancel or timeout).

    With ``confirmed`` (end to end) the duty ends when that event is set — panicd's
    feedback for this counter — and the same bytes are sent again after each backoff
    delay and at once on every reconnect. Without it the duty ends at the broker's
    PUBACK, and the press is sent again only when no PUBACK came (as QoS 1 does).
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        connection = await link.connection()
        if attempt:
            on_retransmit()
        delay = policy.delay(attempt, rand())
        started = loop.time()
        timeout_s = delay if confirmed is not None else PUBACK_TIMEOUT_S
        acked = await connection.publish(topic, payload, timeout_s)
        if attempt == 0:
            after_first()
        if acked:
            on_puback()
        if confirmed is None:
            if acked:
                return
            # No PUBACK: wait for the next connection (or the delay) before sending again.
            await connection.wait(None, delay)
        elif await connection.wait(confirmed, started + delay - loop.time()):
            return
        attempt += 1


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
    retransmit: bool = True,
    policy: RetransmitPolicy = BUTTON_BACKOFF,
    fallback_brokers: Sequence[Address] = (),
) -> tuple[SentPress, dict[str, Any] | None]:
    """Publish one press (``repeat`` copies) and, given a timeout, await its feedback.

    While waiting for feedback the button retransmits the press (``retransmit``), across
    broker reconnects (to the next of ``fallback_brokers`` when one is gone), until
    "received" arrives or ``feedback_timeout_s`` has passed. Without a timeout the press
    ends at the broker's PUBACK, as before.
    """
    payload = build_frame(device, kind, counter, battery=battery, gps=gps, tamper=tamper)
    topic = topic_for(device, via_gateway)
    waiting = feedback_timeout_s > 0
    confirmed = asyncio.Event()
    got: list[dict[str, Any]] = []
    retransmissions = 0

    def on_message(message: aiomqtt.Message) -> None:
        feedback = read_feedback(device.id, device.key, payload_bytes(message.payload))
        if feedback is not None and feedback.counter == counter and not confirmed.is_set():
            got.append(feedback.body)
            confirmed.set()

    def count_retransmission() -> None:
        nonlocal retransmissions
        retransmissions += 1

    rand = random.Random(f"{device.id}:{counter}").random
    async with broker_link(
        host, port, f"sim-{device.id}",
        subscribe=native.command_topic(device.id) if waiting else None,
        on_message=on_message, fallback_brokers=fallback_brokers,
    ) as link:
        published_at = time.time()
        for _ in range(repeat - 1 if waiting else repeat):
            await deliver(link, topic, payload, confirmed=None, policy=policy, rand=rand)
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(feedback_timeout_s):
                    if retransmit:
                        await deliver(link, topic, payload, confirmed=confirmed, policy=policy,
                                      rand=rand, on_retransmit=count_retransmission)
                    else:
                        await deliver(link, topic, payload, confirmed=None, policy=policy,
                                      rand=rand)
                        await confirmed.wait()
    sent = SentPress(device.id, counter, kind, topic, payload, published_at, retransmissions)
    return sent, (got[0] if got else None)
