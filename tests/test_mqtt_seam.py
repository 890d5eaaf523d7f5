"""The private corners of aiomqtt that panicd relies on (gateway/sources/mqtt_seam.py),
checked against the installed aiomqtt and a real Mosquitto: an upgrade that changes them
fails here, with the seam's own message, not as a client that PUBACKs on receipt."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import pytest

from firmware_sim.broker import Mosquitto
from gateway.sources.mqtt_seam import MqttSeamError, open_seam, paho_of


async def test_the_installed_aiomqtt_still_has_the_paho_client_panicd_reaches_into() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, identifier="seam-check")
    paho = paho_of(client)
    open_seam(client)
    assert paho._manual_ack is True


async def test_a_changed_aiomqtt_is_refused_with_one_clear_line() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, identifier="seam-check")
    client._client = object()  # type: ignore[assignment]
    with pytest.raises(MqttSeamError, match=r"aiomqtt 2\.5\.\d+ changed .*Client\._client"):
        open_seam(client)


async def test_a_message_is_redelivered_until_the_seam_acknowledges_it(
    mosquitto: Mosquitto,
) -> None:
    """Manual acknowledgement really withholds the PUBACK, and session present is read."""
    name = f"seam-{uuid.uuid4().hex[:8]}"
    topic = f"seam/{name}"
    present: list[bool] = []

    async def receive_one(ack: bool) -> int:
        client = aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                                clean_session=False)
        seam = open_seam(client, present.append)
        async with client:
            await client.subscribe(topic, qos=1)
            if not present[-1]:
                async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
                    await publisher.publish(topic, b"press", qos=1)
            async with asyncio.timeout(10):
                message = await anext(aiter(client.messages))
            if ack:
                seam.ack(message.mid, 1)
                await asyncio.sleep(0.2)  # let the loop write the PUBACK
            return message.mid

    await receive_one(ack=False)  # received, never acknowledged: still the broker's
    await receive_one(ack=True)  # so it comes again, and is acknowledged now
    assert present[:2] == [False, True]
    client = aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                            clean_session=False)
    open_seam(client, present.append)
    async with client:
        await client.subscribe(topic, qos=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await anext(aiter(client.messages))
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                              clean_session=True):
        pass
