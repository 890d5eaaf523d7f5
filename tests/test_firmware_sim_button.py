"""The simulated MQTT button keeps a press until panicd's feedback (docs/FRAMES.md).

Against a real Mosquitto, with a stand-in for panicd that answers only the copies it is
told to: the button retransmits the same bytes with backoff, across a broker restart,
and accepts only feedback whose tag (when present) verifies with its key.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.button import (
    RetransmitPolicy,
    broker_link,
    deliver,
    press,
    read_feedback,
)
from firmware_sim.fleet import SimDevice
from gateway.formats import native, payload_bytes
from gateway.model import PressKind

DEVICE = SimDevice("SIM-BTN-1", bytes(range(32)), None)
OTHER_KEY = bytes(range(1, 33))
QUICK = RetransmitPolicy(first_s=0.1, cap_s=0.4)
# Generous: bounds a hang, times nothing.
DEADLINE_S = 20.0


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    policy = RetransmitPolicy(first_s=1.0, cap_s=8.0, jitter=0.0)
    assert [policy.delay(attempt, 0.5) for attempt in range(6)] == [1, 2, 4, 8, 8, 8]


def test_backoff_jitter_stays_within_its_share_of_the_delay() -> None:
    policy = RetransmitPolicy(first_s=1.0, cap_s=8.0, jitter=0.2)
    assert policy.delay(0, 0.0) == pytest.approx(0.8)
    assert policy.delay(0, 0.999999) == pytest.approx(1.2)
    assert policy.delay(10**6, 0.5) == pytest.approx(8.0)  # no overflow on a long outage


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_untagged_received_feedback_confirms_its_counter() -> None:
    feedback = read_feedback(DEVICE.id, DEVICE.key, _body(ctr=7, state="received", press=1))
    assert feedback is not None
    assert (feedback.counter, feedback.forged) == (7, False)


def test_tagged_feedback_confirms_only_with_the_buttons_own_key() -> None:
    body: dict[str, object] = {"dev": DEVICE.id, "ctr": 7, "state": "received", "press": 1}
    good = read_feedback(DEVICE.id, DEVICE.key, _body(**native.signed_ack(DEVICE.key, body)))
    forged = read_feedback(DEVICE.id, DEVICE.key, _body(**native.signed_ack(OTHER_KEY, body)))
    assert good is not None and (good.counter, good.forged) == (7, False)
    assert forged is not None and (forged.counter, forged.forged) == (None, True)


def test_tagged_feedback_for_another_device_is_forged() -> None:
    body: dict[str, object] = {"dev": "SIM-BTN-2", "ctr": 7, "state": "received"}
    feedback = read_feedback(DEVICE.id, DEVICE.key, _body(**native.signed_ack(DEVICE.key, body)))
    assert feedback is not None and feedback.forged


def test_a_tag_without_dev_is_checked_against_the_buttons_own_id() -> None:
    signed = native.signed_ack(DEVICE.key, {"dev": DEVICE.id, "ctr": 3, "state": "received"})
    del signed["dev"]
    feedback = read_feedback(DEVICE.id, DEVICE.key, _body(**signed))
    assert feedback is not None and feedback.counter == 3


@pytest.mark.parametrize("payload", [
    _body(ctr=7, state="help_coming"),
    _body(ctr=True, state="received"),
    _body(ctr="7", state="received"),
    _body(incident=3, state="received"),
])
def test_feedback_that_is_not_a_received_for_a_counter_confirms_nothing(payload: bytes) -> None:
    feedback = read_feedback(DEVICE.id, DEVICE.key, payload)
    assert feedback is not None and feedback.counter is None


def test_feedback_that_is_not_a_json_object_is_no_feedback() -> None:
    assert read_feedback(DEVICE.id, DEVICE.key, b"[1]") is None
    assert read_feedback(DEVICE.id, DEVICE.key, b"\xff") is None


@dataclass(slots=True)
class StandIn:
    """A stand-in for panicd: sees every uplink copy, answers the ones ``answer`` picks."""

    answer: Callable[[int, dict[str, object]], dict[str, object] | None]
    copies: list[bytes] = field(default_factory=list)
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_copies(self, count: int) -> None:
        """Return once ``count`` copies have arrived."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.copies) >= count)


@asynccontextmanager
async def stand_in(broker: Mosquitto, panicd: StandIn) -> AsyncIterator[None]:
    """Subscribe to every uplink (reconnecting as the button does) and answer."""
    outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def on_message(message: aiomqtt.Message) -> None:
        payload = payload_bytes(message.payload)
        panicd.copies.append(payload)
        panicd.seen.set()
        outbox.put_nowait(("", b""))  # wakes the sender, which notifies copy waiters
        frame = json.loads(payload)
        reply = panicd.answer(len(panicd.copies), frame)
        if reply is not None:
            outbox.put_nowait((native.command_topic(frame["dev"]), json.dumps(reply).encode()))

    async with broker_link(broker.host, broker.port, "stand-in-panicd",
                           subscribe=f"{native.TOPIC_PREFIX}dev/+/up",
                           on_message=on_message) as link:

        async def send() -> None:
            while True:
                topic, body = await outbox.get()
                if not topic:
                    async with panicd.arrived:
                        panicd.arrived.notify_all()
                    continue
                await deliver(link, topic, body, confirmed=None, policy=QUICK,
                              rand=random.random)

        async with asyncio.TaskGroup() as group:
            sender = group.create_task(send(), name="stand-in.send")
            try:
                yield
            finally:
                sender.cancel()


def received(frame: dict[str, object]) -> dict[str, object]:
    """panicd's feedback for the press ``frame`` (untagged, as panicd sends it today)."""
    return {"ctr": frame["ctr"], "state": "received", "press": 1}


def silent(_copy: int, _frame: dict[str, object]) -> None:
    """Answer nothing: every copy lost."""


async def test_press_retransmits_the_same_bytes_until_its_feedback_arrives(
    mosquitto: Mosquitto,
) -> None:
    # The first two copies are "lost at the broker": never answered.
    panicd = StandIn(lambda n, frame: received(frame) if n >= 3 else None)
    async with stand_in(mosquitto, panicd):
        sent, feedback = await press(mosquitto.host, mosquitto.port, DEVICE, PressKind.PANIC, 41,
                                     feedback_timeout_s=DEADLINE_S, policy=QUICK)
    assert feedback == {"ctr": 41, "state": "received", "press": 1}
    assert sent.retransmissions == 2
    assert panicd.copies == [sent.payload] * 3


async def test_press_without_retransmit_waits_for_feedback_after_one_copy(
    mosquitto: Mosquitto,
) -> None:
    panicd = StandIn(silent)
    async with stand_in(mosquitto, panicd):
        sent, feedback = await press(mosquitto.host, mosquitto.port, DEVICE, PressKind.PANIC, 42,
                                     feedback_timeout_s=1.0, policy=QUICK, retransmit=False)
    assert feedback is None
    assert sent.retransmissions == 0
    assert len(panicd.copies) == 1


async def test_press_ignores_forged_feedback_and_keeps_retransmitting(
    mosquitto: Mosquitto,
) -> None:
    def answer(n: int, frame: dict[str, object]) -> dict[str, object]:
        body = {"dev": DEVICE.id, **received(frame)}
        return native.signed_ack(OTHER_KEY if n == 1 else DEVICE.key, body)

    panicd = StandIn(answer)
    async with stand_in(mosquitto, panicd):
        sent, feedback = await press(mosquitto.host, mosquitto.port, DEVICE, PressKind.PANIC, 43,
                                     feedback_timeout_s=DEADLINE_S, policy=QUICK)
    assert feedback is not None
    assert native.ack_tag_valid(DEVICE.key, feedback)
    assert sent.retransmissions >= 1
    assert len(panicd.copies) >= 2


async def test_press_gives_up_when_its_feedback_timeout_has_passed(
    mosquitto: Mosquitto,
) -> None:
    panicd = StandIn(silent)
    loop = asyncio.get_running_loop()
    async with stand_in(mosquitto, panicd):
        started = loop.time()
        sent, feedback = await press(mosquitto.host, mosquitto.port, DEVICE, PressKind.PANIC, 44,
                                     feedback_timeout_s=1.0, policy=QUICK)
        took = loop.time() - started
    assert feedback is None
    assert took < 1.0 + 2.0  # the timeout, the connect and the disconnect
    assert sent.retransmissions >= 2  # 0.1, 0.2, 0.4 … s apart within 1 s
    assert len(panicd.copies) == sent.retransmissions + 1


async def test_press_retransmits_across_a_broker_restart(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    await asyncio.to_thread(broker.start)
    restarted = asyncio.Event()
    # Nothing is answered until the broker has been restarted under the button.
    panicd = StandIn(lambda _n, frame: received(frame) if restarted.is_set() else None)
    try:
        async with stand_in(broker, panicd), asyncio.TaskGroup() as group:
            pressing = group.create_task(press(
                broker.host, broker.port, DEVICE, PressKind.PANIC, 45,
                feedback_timeout_s=DEADLINE_S, policy=QUICK,
            ), name="test.press")
            async with asyncio.timeout(DEADLINE_S):
                await panicd.seen.wait()
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)
            restarted.set()
            sent, feedback = await pressing
    finally:
        await asyncio.to_thread(broker.stop)
    assert feedback is not None and feedback["ctr"] == 45
    assert sent.retransmissions >= 1
    assert set(panicd.copies) == {sent.payload}


async def test_press_without_feedback_timeout_ends_at_the_puback(mosquitto: Mosquitto) -> None:
    panicd = StandIn(silent)
    async with stand_in(mosquitto, panicd):
        sent, feedback = await press(mosquitto.host, mosquitto.port, DEVICE, PressKind.TEST, 46,
                                     repeat=2)
        async with asyncio.timeout(DEADLINE_S):
            await panicd.wait_copies(2)
    assert feedback is None
    assert sent.retransmissions == 0
    assert panicd.copies == [sent.payload, sent.payload]
