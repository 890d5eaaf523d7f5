"""Two panicd instances on one PostgreSQL answer each transmission of a press once.

Issue 13 item 2: every instance keeps its own MQTT session and receives every press, and
the "received" feedback goes to the button once, not once per instance. The real daemons
(one shared database, one Mosquitto, a native button's signed frame) are counted from
the button's side: what arrives on its command topic.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.button import build_frame, read_feedback, topic_for
from gateway.formats import native, payload_bytes
from gateway.model import PressKind
from tests.daemon_proc import DaemonProcess, count_rows, wait_until
from tests.dispatch_e2e import (
    RecordingPeer,
    client_id,
    deploy,
    forget_sessions,
    instance_configs,
    policies_toml,
    shared_store,
    twilio_env,
    twilio_peer,
)

__all__ = ["client_id", "shared_store", "twilio_env", "twilio_peer"]  # fixtures used by name

COUNTER = 7
# Longer than copies of one transmission take to reach both instances and be answered.
SETTLE_S = 2.0


@pytest.mark.usefixtures("twilio_env")
def test_two_instances_answer_each_transmission_of_a_press_once(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    shared_store: str,
) -> None:
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(60),
                  store_url=shared_store)
    daemons = [DaemonProcess(config, site.keys, tmp_path / f"i{k}")
               for k, config in enumerate(instance_configs(site, 2, client_id))]
    device = site.devices[0]
    frame = build_frame(device, PressKind.HEARTBEAT, COUNTER)
    answers: list[int] = []

    async def button() -> tuple[int, int]:
        """Send the frame, then the same bytes again (a retransmission, as a button whose
        feedback was lost sends it a second later); count "received" after each."""
        async with aiomqtt.Client(mosquitto.host, mosquitto.port,
                                  identifier=f"{client_id}-button") as link:
            await link.subscribe(native.command_topic(device.id), qos=1)

            async def listen() -> None:
                async for message in link.messages:
                    feedback = read_feedback(device.id, device.key,
                                             payload_bytes(message.payload))
                    if feedback is not None and feedback.counter == COUNTER \
                            and feedback.body.get("state") == "received":
                        answers.append(COUNTER)

            listening = asyncio.create_task(listen())
            try:
                await link.publish(topic_for(device, None), frame, qos=1)
                await asyncio.to_thread(
                    wait_until, "SELECT COALESCE(SUM(heard), 0) FROM press_paths",
                    site.database, 2, 30)
                await asyncio.sleep(SETTLE_S)
                first = len(answers)
                await link.publish(topic_for(device, None), frame, qos=1)
                await asyncio.to_thread(
                    wait_until, "SELECT COALESCE(SUM(heard), 0) FROM press_paths",
                    site.database, 4, 30)
                await asyncio.sleep(SETTLE_S)
                return first, len(answers) - first
            finally:
                listening.cancel()

    for daemon in daemons:
        daemon.start()
    try:
        first, second = asyncio.run(button())
        for daemon in daemons:
            assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.kill9()
        forget_sessions(mosquitto, [f"{client_id}-{k}" for k in range(2)])
    # Both instances stored or saw both transmissions (two copies each) ...
    assert count_rows(site.database, "SELECT COUNT(*) FROM presses") == 1
    assert count_rows(site.database, "SELECT SUM(heard) FROM press_paths") == 4
    # ... and the button heard "received" once for each.
    assert (first, second) == (1, 1)
