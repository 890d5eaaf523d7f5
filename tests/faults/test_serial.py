"""The LoRa receiver's serial port vanishes and returns mid-stream (issue 12 item 5, serial).

A real panicd (tests/daemon_proc.py) reads a REYAX module played by
:class:`firmware_sim.lora.ReyaxSim` on a pty, opened through a symlink as it would open
/dev/serial/by-id/…. Buttons press before, during and after the module is unplugged (its
pts device disappears) and plugged in again on a new pty: each button retries until its
press is acknowledged (firmware_sim.lora.press_until_acked), so a press made while the
receiver is away is heard once it is back. Every press must be stored exactly once, every
button must get its ACK, and panicd must reconnect by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

from firmware_sim.fleet import SimDevice
from firmware_sim.lora import ReyaxSim, lora_payload, press_until_acked
from gateway.model import GeoFix, PressKind
from tests.daemon_proc import DaemonProcess, count_rows, wait_until

REPO = Path(__file__).resolve().parent.parent.parent
GEO = REPO / "config" / "geo" / "kelurahan.geojson"
BUTTONS = [
    SimDevice(f"L00{0xA100 + index:06X}", hashlib.sha256(f"faults:{index}".encode()).digest(),
              GeoFix(-7.62182 + index * 1e-4, 111.53096))
    for index in range(8)
]
RETRY_S = 0.5


def _site(directory: Path) -> tuple[Path, Path, Path]:
    """panicd's config with the buttons and one serial receiver; (config, keys, link)."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "ttyLORA"
    (directory / "devices.toml").write_text("".join(
        f'[[device]]\nid = "{b.id}"\nhardware = "lora-button"\n'
        f"location = {{ lat = {b.location.lat}, lon = {b.location.lon} }}\n"  # type: ignore[union-attr]
        f'address = "Jl. Pahlawan {n}"\n'
        for n, b in enumerate(BUTTONS)), encoding="utf-8")
    keys = directory / "device-keys.toml"
    keys.write_text("".join(f'{b.id} = "{b.key.hex()}"\n' for b in BUTTONS), encoding="utf-8")
    config = directory / "panicd.toml"
    config.write_text(
        f'[panicd]\ndatabase = "{directory / "panicd.sqlite3"}"\n'
        f'[geo]\nkelurahan_file = "{GEO}"\n'
        '[devices]\nregistry = "devices.toml"\n'
        f'[[serial]]\nname = "rx1"\nport = "{link}"\nmode = "rylr"\n'
        "baud = 115200\nreconnect_min_s = 0.05\nreconnect_max_s = 0.5\n",
        encoding="utf-8",
    )
    return config, keys, link


class Air:
    """The radio channel the buttons share; the receiver module is plugged in or not.

    Downlinks reach a button through this object's listeners whichever module sent them,
    so a button keeps waiting for its ACK across the unplug.
    """

    def __init__(self, link: Path) -> None:
        self.link = link
        self.module: ReyaxSim | None = None
        self.unheard = 0
        self._listeners: dict[int, list[asyncio.Queue[bytes]]] = {}
        self._stop = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None

    def plug(self) -> None:
        """A module on a fresh pty behind the link."""
        module = ReyaxSim(link=self.link)
        # The module hands downlinks to its listeners: make them ours (shared across modules).
        module._listeners = self._listeners
        module.open()
        self._stop = asyncio.Event()
        self._serving = asyncio.get_running_loop().create_task(
            module.serve(self._stop), name="test.reyax")
        self.module = module

    async def unplug(self) -> None:
        """The USB cable is pulled: the pts device is gone and the link points nowhere."""
        module, self.module = self.module, None
        assert module is not None and self._serving is not None
        self._stop.set()
        await self._serving
        module.close()

    def transmit(self, addr: int, data: bytes) -> None:
        """A button's packet: heard only while a module is plugged in."""
        if self.module is None:
            self.unheard += 1
            return
        self.module.transmit(addr, data)

    @contextlib.contextmanager
    def listening(self, addr: int) -> Iterator[asyncio.Queue[bytes]]:
        """The downlinks to ``addr`` while the block runs."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._listeners.setdefault(addr, []).append(queue)
        try:
            yield queue
        finally:
            self._listeners[addr].remove(queue)


async def _press_all(air: Air, counter: int) -> list[int | None]:
    """Every button presses once (``counter``) and retries until acked; tries per button."""
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(press_until_acked(
                air, button, lora_payload(button, PressKind.PANIC, counter), counter,
                retry_s=RETRY_S, max_tries=40), name=f"test.button.{button.id}")
            for button in BUTTONS
        ]
    return [task.result() for task in tasks]




async def test_receiver_unplugged_mid_stream_loses_nothing_and_reconnects(
    tmp_path: Path,
) -> None:
    config, keys, link = _site(tmp_path / "cfg")
    database = tmp_path / "cfg" / "panicd.sqlite3"
    air = Air(link)
    air.plug()
    daemon = DaemonProcess(config, keys, tmp_path / "run")
    await asyncio.to_thread(daemon.start)
    try:
        assert all(await _press_all(air, 1))

        # Mid-stream: the buttons press, and the receiver vanishes under them.
        during = asyncio.get_running_loop().create_task(_press_all(air, 2), name="test.during")
        await asyncio.sleep(0.05)
        await air.unplug()
        unplugged_at = time.monotonic()
        await asyncio.sleep(1.5)  # several of panicd's reconnect attempts fail meanwhile
        assert not during.done()
        air.plug()
        tries = await during
        recovered_s = time.monotonic() - unplugged_at - 1.5
        assert all(tries), tries

        assert all(await _press_all(air, 3))
        stored = await asyncio.to_thread(
            wait_until, "SELECT COUNT(*) FROM presses", database, 3 * len(BUTTONS), 10)
        await asyncio.sleep(RETRY_S)  # a (wrong) second copy of a retry would land now
        assert await asyncio.to_thread(daemon.terminate) == 0
    finally:
        daemon.__exit__(None, None, None)
        if air.module is not None:
            await air.unplug()

    assert stored == 3 * len(BUTTONS)
    assert count_rows(database, "SELECT COUNT(*) FROM presses") == 3 * len(BUTTONS)
    assert count_rows(database, "SELECT COUNT(DISTINCT device_id || ':' || counter)"
                      " FROM presses") == 3 * len(BUTTONS)
    assert count_rows(database, "SELECT COUNT(*) FROM dead_letters"
                      " WHERE reason != 'partial_line'") == 0
    assert air.unheard > 0, "no button pressed while the receiver was away"
    assert len(daemon.events("serial.connected")) == 2
    assert len(daemon.events("serial.disconnected")) == 1
    print(f"serial: presses={3 * len(BUTTONS)} unheard_while_unplugged={air.unheard} "  # noqa: T201
          f"lost=0 twice=0 acked_after_replug_s={recovered_s:.2f}")
