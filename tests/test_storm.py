"""The storm counts from the button side: presses made, confirmed, retransmitted, reconnects.

A real Mosquitto and a stand-in for panicd that answers the copies it is told to
(tests/test_firmware_sim_button.py); the fault suite (tests/faults/test_broker.py) runs
the same storm against the real panicd while the broker is killed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from firmware_sim.broker import Mosquitto
from firmware_sim.button import RetransmitPolicy
from firmware_sim.fleet import SimDevice
from firmware_sim.storm import StormResult, storm
from gateway.formats import native
from tests.test_firmware_sim_button import StandIn, received, silent, stand_in

DEVICES = [SimDevice(f"SIM-STORM-{i}", bytes([i]) * 32, None) for i in range(5)]
QUICK = RetransmitPolicy(first_s=0.1, cap_s=0.4)
# Where copies are counted exactly: no feedback on a loaded machine takes 0.8 s.
PATIENT = RetransmitPolicy(first_s=1.0, cap_s=1.0)
DEADLINE_S = 20.0


def lose_first_copy_of_every_third_press() -> tuple[StandIn, set[tuple[str, int]]]:
    """A panicd behind a broker that lost the first copy of every third press."""
    copies: Counter[tuple[str, int]] = Counter()
    dropped: set[tuple[str, int]] = set()

    def answer(_n: int, frame: dict[str, object]) -> dict[str, object] | None:
        key = (str(frame["dev"]), int(str(frame["ctr"])))
        copies[key] += 1
        if key[1] % 3 == 0 and copies[key] == 1:
            dropped.add(key)
            return None
        return received(frame)

    return StandIn(answer), dropped


async def test_retransmitting_storm_confirms_every_press_and_counts_the_copies(
    mosquitto: Mosquitto,
) -> None:
    panicd, dropped = lose_first_copy_of_every_third_press()
    async with stand_in(mosquitto, panicd):
        result = await storm(mosquitto.host, mosquitto.port, DEVICES, count=60, rate=500,
                             counter_base=300, retransmit=True, policy=PATIENT,
                             feedback_grace_s=DEADLINE_S)
    assert len(result.sent) == 60
    assert result.unconfirmed() == []
    assert result.confirmed() == 60
    assert dropped and result.retransmissions == len(dropped)
    assert len(panicd.copies) == 60 + len(dropped)
    assert result.summary()["feedback"] == 60


async def test_default_storm_ends_each_press_at_its_puback(mosquitto: Mosquitto) -> None:
    panicd = StandIn(silent)
    async with stand_in(mosquitto, panicd):
        result = await storm(mosquitto.host, mosquitto.port, DEVICES, count=30, rate=10_000,
                             counter_base=400)
        async with asyncio.timeout(DEADLINE_S):
            await panicd.wait_copies(30)
    assert not result.retransmit
    assert result.pubacked == set(result.sent)
    assert result.retransmissions == 0
    assert result.feedback == {}
    assert len(panicd.copies) == 30


async def test_retransmitting_storm_gives_up_after_its_grace_when_nobody_answers(
    mosquitto: Mosquitto,
) -> None:
    panicd = StandIn(silent)
    async with stand_in(mosquitto, panicd):
        started = time.monotonic()
        result = await storm(mosquitto.host, mosquitto.port, DEVICES, count=10, rate=10_000,
                             counter_base=500, retransmit=True, policy=QUICK,
                             feedback_grace_s=1.0)
        took = time.monotonic() - started
    assert took < 1.0 + 3.0
    assert result.unconfirmed() == sorted(result.sent)
    assert result.pubacked == set(result.sent)  # the broker took every copy: not enough
    assert result.retransmissions >= 10 * 2


async def test_storm_ignores_feedback_with_a_forged_tag(mosquitto: Mosquitto) -> None:
    def answer(_n: int, frame: dict[str, object]) -> dict[str, object]:
        body = {"dev": frame["dev"], **received(frame)}
        return native.signed_ack(b"\x99" * 32, body)

    async with stand_in(mosquitto, StandIn(answer)):
        result = await storm(mosquitto.host, mosquitto.port, DEVICES, count=5, rate=10_000,
                             counter_base=600, retransmit=True, policy=QUICK,
                             feedback_grace_s=0.5)
    assert result.confirmed() == 0
    assert result.forged_feedback >= 5


async def test_storm_signed_feedback_confirms_its_press(mosquitto: Mosquitto) -> None:
    keys = {device.id: device.key for device in DEVICES}

    def answer(_n: int, frame: dict[str, object]) -> dict[str, object]:
        body = {"dev": frame["dev"], **received(frame)}
        return native.signed_ack(keys[str(frame["dev"])], body)

    async with stand_in(mosquitto, StandIn(answer)):
        result = await storm(mosquitto.host, mosquitto.port, DEVICES, count=10, rate=10_000,
                             counter_base=700, retransmit=True, policy=QUICK,
                             feedback_grace_s=DEADLINE_S)
    assert result.confirmed() == 10
    assert result.forged_feedback == 0


async def test_storm_reconnects_after_a_broker_restart_and_confirms_every_press(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "broker")
    await asyncio.to_thread(broker.start)
    restarted = asyncio.Event()
    # Until the restart nothing is answered: every press made before it needs a copy after.
    panicd = StandIn(lambda _n, frame: received(frame) if restarted.is_set() else None)
    try:
        async with stand_in(broker, panicd), asyncio.TaskGroup() as group:
            storming = group.create_task(storm(
                broker.host, broker.port, DEVICES, count=40, rate=40, counter_base=800,
                retransmit=True, policy=QUICK, feedback_grace_s=DEADLINE_S,
            ), name="test.storm")
            async with asyncio.timeout(DEADLINE_S):
                await panicd.wait_copies(5)
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)
            restarted.set()
            result: StormResult = await storming
    finally:
        await asyncio.to_thread(broker.stop)
    assert len(result.sent) == 40
    assert result.unconfirmed() == []
    assert result.reconnects == 2  # the publishing and the feedback connection, once each
    assert result.retransmissions >= 5
