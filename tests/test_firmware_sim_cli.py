"""panic-sim follows the configuration's broker list as panicd does ([[mqtt]] brokers)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import aiomqtt
import pytest

from firmware_sim import cli
from firmware_sim.broker import Mosquitto, free_port
from firmware_sim.fleet import write_fleet
from gateway.formats import native


def test_a_button_moves_to_the_next_configured_broker_when_the_first_is_gone(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config, keys, devices = write_fleet(tmp_path, devices=1, mqtt_port=mosquitto.port)
    dead = free_port()  # nothing listens there
    text = config.read_text(encoding="utf-8").replace(
        f'host = "127.0.0.1"\nport = {mosquitto.port}\n',
        f'brokers = ["127.0.0.1:{dead}", "{mosquitto.host}:{mosquitto.port}"]\n')
    config.write_text(text, encoding="utf-8")
    topic = native.TOPIC_PREFIX + f"dev/{devices[0].id}/up"
    heard: list[bytes] = []
    subscribed = threading.Event()

    async def listen() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.subscribe(topic, qos=1)
            subscribed.set()
            async with asyncio.timeout(20):
                async for message in client.messages:
                    heard.append(bytes(message.payload))
                    return

    listener = threading.Thread(target=asyncio.run, args=(listen(),))
    listener.start()
    assert subscribed.wait(10)
    code = cli.main(["button", "--config", str(config), "--keys", str(keys), "--device",
                     devices[0].id, "--wait", "0", "--state", str(tmp_path / "state.json")])
    listener.join(25)
    assert code == 0
    sent = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert sent["device"] == devices[0].id
    assert len(heard) == 1, "the press never reached the second broker"
