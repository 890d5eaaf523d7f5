"""The LoRa simulator: ``panic-sim lora-rx`` on a pty, ``button --lora`` and the LoRa storm."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from firmware_sim.broker import Mosquitto
from firmware_sim.lora import ReyaxSim
from firmware_sim.lora_cmds import button_via_lora, lora_storm
from gateway.model import PressKind
from tests.test_serial_source import BUTTON, BUTTON_ID, _eventually, _rows, _running, _site


async def test_lora_rx_process_serves_buttons_that_retry_until_acked(tmp_path: Path) -> None:
    config = _site(tmp_path)
    link = Path(config.serial[0].port)
    env = dict(os.environ, PANICD_DEVICE_KEYS_FILE=str(tmp_path / "device-keys.toml"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "firmware_sim.cli", "lora-rx", "--config", str(config.path),
        "--link", str(link), "--state", str(tmp_path / "counters.json"),
        "--presses", "3", "--every", "0.05", "--retry", "1", "--noise-every", "0.05",
        env=env, stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    first = json.loads(await asyncio.wait_for(process.stdout.readline(), 10))
    assert first["link"] == str(link)
    assert first["pty"].startswith("/dev/pts/")
    assert first["buttons"] == [BUTTON_ID]
    async with _running(config) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    results = [json.loads(line) for line in out.decode().splitlines()]
    presses = [r for r in results if "tries" in r]
    assert len(presses) == 3
    assert all(r["tries"] is not None for r in presses)
    assert results[-1]["acks"] >= 3
    stored = _rows(config, "SELECT COUNT(DISTINCT counter) FROM presses")
    assert stored == [(3,)]


async def test_button_in_another_process_reaches_panicd_through_the_air_socket(
    tmp_path: Path,
) -> None:
    config = _site(tmp_path)
    link = Path(config.serial[0].port)
    sim = ReyaxSim(link=link)
    sim.open()
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as group, _running(config) as (source,):
            group.create_task(sim.serve(stop, air=Path(f"{link}.air")), name="test.reyax")
            await asyncio.wait_for(source.wait_connected(), 5)
            await _eventually(lambda: Path(f"{link}.air").exists())
            tries = await button_via_lora(link, BUTTON, PressKind.TEST, 77, battery=50, gps=None,
                                          tamper=False, retry_s=2, max_tries=2)
            bad = await button_via_lora(link, BUTTON, PressKind.TEST, 78, battery=50, gps=None,
                                        tamper=True, retry_s=0.5, max_tries=2)
            stop.set()
    finally:
        sim.close()
    assert (tries, bad) == (1, None)
    assert _rows(config, "SELECT counter, kind FROM presses") == [(77, "test")]
    assert _rows(config, "SELECT reason FROM dead_letters") == [("bad_tag",), ("bad_tag",)]


async def test_storm_mixes_lora_and_mqtt_and_heard_twice_is_one_press(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = _site(tmp_path, mqtt_port=mosquitto.port)
    link = Path(config.serial[0].port)
    sim = ReyaxSim(link=link)
    sim.open()
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as group, _running(config, mqtt=True) as sources:
            group.create_task(sim.serve(stop, air=Path(f"{link}.air")), name="test.reyax")
            for source in sources:
                await asyncio.wait_for(source.wait_connected(), 10)
            await _eventually(lambda: Path(f"{link}.air").exists())
            result = await lora_storm(link, [BUTTON], count=6, rate=50, counter_base=100,
                                      heard_twice_ratio=0.5, broker=(mosquitto.host,
                                                                     mosquitto.port))
            expected_paths = 6 + result.heard_twice
            await _eventually(
                lambda: _rows(config, "SELECT COUNT(*) FROM press_paths") == [(expected_paths,)])
            stop.set()
    finally:
        sim.close()
    assert result.acked == 6
    assert 0 < result.heard_twice < 6
    assert _rows(config, "SELECT COUNT(*), MIN(counter), MAX(counter) FROM presses") == [
        (6, 100, 105)]
    assert _rows(config, "SELECT COUNT(*) FROM press_paths WHERE path LIKE 'mqtt:%'") == [
        (result.heard_twice,)]
