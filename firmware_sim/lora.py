"""A simulated REYAX RYLR998 on a pty, and LoRa buttons that retry until acknowledged.

The receiver side is a pseudo-terminal (``os.openpty``): panicd opens the slave end as its
serial port, the simulator plays the module on the master end — ``+READY`` at start,
``+RCV=…`` for every packet a button transmits, now and then a noise line, and ``+OK`` to
each ``AT+SEND`` (``+ERR=4``/``+ERR=5`` to malformed commands, as the REYAX AT guide
lists them). A downlink sent with ``AT+SEND=<addr>,…`` reaches the button with that
address.

Buttons outside the simulator process (``panic-sim button --lora``) reach the module
through a Unix socket next to the pty link (``<link>.air``), one line per packet:
``TX <addr> <data>`` up, ``RX <data>`` down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tty
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from firmware_sim.fleet import SimDevice
from gateway.formats import lora_ack, lora_frame
from gateway.model import GeoFix, PressKind

NOISE_LINES: tuple[bytes, ...] = (
    b"\x00\xff\xfe+RC",  # line noise while the USB adapter settles
    b"+RCV=12,40,3F0",  # a packet cut short by a brown-out
    b"~~ garbage ~~",
)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def air_socket(link: Path) -> Path:
    """Where buttons in other processes reach the simulated module."""
    return link.with_name(link.name + ".air")


class Radio(Protocol):
    """What a simulated button transmits with and hears downlinks on."""

    def transmit(self, addr: int, data: bytes) -> None:
        """Send one packet from the button at ``addr``."""
        ...

    def listening(self, addr: int) -> AbstractContextManager[asyncio.Queue[bytes]]:
        """Collect the packets sent to ``addr`` while the block runs."""
        ...


@dataclass(slots=True)
class ModuleStats:
    """What the simulated module did, for tests and the summary line."""

    transmitted: int = 0
    dropped: int = 0
    noise: int = 0
    commands: list[bytes] = field(default_factory=list)
    acks: list[bytes] = field(default_factory=list)


class ReyaxSim:
    """The pty and the module behaviour on its master end."""

    def __init__(
        self,
        *,
        link: Path | None = None,
        noise_every_s: float = 0.0,
        airtime_s: float = 0.02,
        rng: random.Random | None = None,
        answer: bool = True,
    ) -> None:
        self.link = link
        self.noise_every_s = noise_every_s
        self.airtime_s = airtime_s
        # False plays a home-made JSON-lines receiver that only listens (records lines).
        self.answer = answer
        self.rng = rng or random.Random(1)
        self.stats = ModuleStats()
        self._master = -1
        self._slave = -1
        self.pty_path = ""
        self._listeners: dict[int, list[asyncio.Queue[bytes]]] = {}

    def open(self) -> str:
        """Create the pty (raw, so nothing is echoed) and point ``link`` at it."""
        self._master, self._slave = os.openpty()
        # Keep the slave open ourselves: the master then never reads EIO while panicd is
        # away, and panicd's own open sets the line discipline it wants.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.pty_path = os.ttyname(self._slave)
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
            self.link.symlink_to(self.pty_path)
        return self.pty_path

    def close(self) -> None:
        """Unplug: close both ends (the pts device disappears) and remove the link."""
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def write_line(self, line: bytes) -> None:
        """Emit one line from the module (dropped if panicd is not reading: buffer full)."""
        try:
            os.write(self._master, line + b"\r\n")
        except BlockingIOError:
            self.stats.dropped += 1

    def write_raw(self, data: bytes) -> None:
        """Put raw bytes on the line (noise, or a line the unplug will cut short)."""
        os.write(self._master, data)

    def transmit(self, addr: int, data: bytes) -> None:
        """A button's packet as the module reports it: ``+RCV=addr,len,data,rssi,snr``."""
        rssi = -self.rng.randint(40, 115)
        snr = self.rng.randint(-10, 12)
        self.stats.transmitted += 1
        self.write_line(b"+RCV=%d,%d,%s,%d,%d" % (addr, len(data), data, rssi, snr))

    async def downlink(self, addr: int) -> bytes:
        """The next packet panicd sends to ``addr``."""
        with self.listening(addr) as queue:
            return await queue.get()

    @contextlib.contextmanager
    def listening(self, addr: int) -> Iterator[asyncio.Queue[bytes]]:
        """Collect the packets panicd sends to ``addr`` while the block runs."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._listeners.setdefault(addr, []).append(queue)
        try:
            yield queue
        finally:
            self._listeners[addr].remove(queue)

    async def serve(self, stop: asyncio.Event, *, air: Path | None = None) -> None:
        """Play the module until ``stop``: ``+READY``, noise, and answers to AT commands."""
        self.write_line(b"+READY")
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._commands(), name="reyax.commands")]
            if self.noise_every_s > 0:
                tasks.append(group.create_task(self._noise(), name="reyax.noise"))
            if air is not None:
                server = await asyncio.start_unix_server(self._air_client, path=str(air))
                tasks.append(group.create_task(server.serve_forever(), name="reyax.air"))
            await stop.wait()
            for task in tasks:
                task.cancel()
        if air is not None:
            _remove(air)

    async def _noise(self) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1 / self.noise_every_s))
            self.stats.noise += 1
            self.write_line(self.rng.choice(NOISE_LINES))

    async def _commands(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        while True:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._master, _wake, readable)
            try:
                await readable
            finally:
                loop.remove_reader(self._master)
            try:
                buffer += os.read(self._master, 4096)
            except BlockingIOError:
                continue
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                await self._command(line.rstrip(b"\r"))

    async def _command(self, line: bytes) -> None:
        self.stats.commands.append(line)
        if not self.answer:
            return
        if line == b"AT":
            self.write_line(b"+OK")
            return
        if line.startswith(b"AT+PSEND="):
            # RAK3172 (RUI3) downlinks, so the same pty can stand in for a RAK receiver.
            self.stats.acks.append(line[9:])
            self.write_line(b"OK")
            return
        if not line.startswith(b"AT+SEND="):
            self.write_line(b"+ERR=4")
            return
        try:
            addr_text, length_text, data = line[8:].split(b",", 2)
            addr, length = int(addr_text), int(length_text)
        except ValueError:
            self.write_line(b"+ERR=4")
            return
        if len(data) != length:
            self.write_line(b"+ERR=5")
            return
        await asyncio.sleep(self.airtime_s)  # the module answers once it has transmitted
        self.write_line(b"+OK")
        self.stats.acks.append(data)
        for queue in self._listeners.get(addr, []) + self._listeners.get(0, []):
            queue.put_nowait(data)

    async def _air_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard: set[int] = set()
        # One queue for every address this client transmitted from.
        down: asyncio.Queue[bytes] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as group:
                forward = group.create_task(self._forward(down, writer), name="reyax.air.down")
                async for raw in reader:
                    parts = raw.split()
                    if len(parts) == 3 and parts[0] == b"TX" and parts[1].isdigit():
                        addr = int(parts[1])
                        if addr not in heard:
                            heard.add(addr)
                            self._listeners.setdefault(addr, []).append(down)
                        self.transmit(addr, parts[2])
                forward.cancel()
        finally:
            for addr in heard:
                self._listeners[addr].remove(down)
            writer.close()

    async def _forward(self, down: asyncio.Queue[bytes], writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(b"RX " + await down.get() + b"\n")
            await writer.drain()


class AirClient:
    """A button in another process, on the module's air socket (an async context manager)."""

    def __init__(self, link: Path) -> None:
        self._path = air_socket(link)
        self._writer: asyncio.StreamWriter | None = None
        self._queues: list[asyncio.Queue[bytes]] = []
        self._group: asyncio.TaskGroup | None = None
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        reader, self._writer = await asyncio.open_unix_connection(str(self._path))
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._pump = self._group.create_task(self._receive(reader), name="air.receive")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._group is not None and self._pump is not None and self._writer is not None
        self._pump.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        await self._group.__aexit__(exc_type, exc, tb)

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        async for line in reader:
            if line.startswith(b"RX "):
                for queue in self._queues:
                    queue.put_nowait(line[3:].rstrip(b"\n"))

    def transmit(self, addr: int, data: bytes) -> None:
        """Send one packet."""
        assert self._writer is not None
        self._writer.write(b"TX %d %s\n" % (addr, data))

    @contextlib.contextmanager
    def listening(self, addr: int) -> Iterator[asyncio.Queue[bytes]]:
        """Every downlink the module forwards to this client (it only forwards ours)."""
        del addr
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.append(queue)
        try:
            yield queue
        finally:
            self._queues.remove(queue)


def address_of(device_id: str) -> int:
    """The REYAX address a LoRa button uses: the low 16 bits of its number (never 0)."""
    return (lora_frame.device_number(device_id) & 0xFFFF) or 1


def lora_payload(
    device: SimDevice,
    kind: PressKind,
    counter: int,
    *,
    battery: int | None = 90,
    gps: GeoFix | None = None,
    tamper: bool = False,
) -> bytes:
    """The binary frame as a REYAX button transmits it: upper-case hex text."""
    frame = bytearray(lora_frame.encode(device=device.id, counter=counter, kind=kind,
                                        key=device.key, battery=battery, fix=gps))
    if tamper:
        frame[-1] ^= 0x01
    return bytes(frame).hex().upper().encode("ascii")


async def press_until_acked(
    radio: Radio,
    device: SimDevice,
    payload: bytes,
    counter: int,
    *,
    retry_s: float = 1.0,
    max_tries: int = 8,
) -> int | None:
    """Transmit until a valid ACK for ``counter`` arrives; the tries it took, or None."""
    addr = address_of(device.id)
    with radio.listening(addr) as heard:
        for attempt in range(1, max_tries + 1):
            radio.transmit(addr, payload)
            try:
                async with asyncio.timeout(retry_s):
                    while not _is_ack(await heard.get(), device, counter):
                        pass
            except TimeoutError:
                continue
            return attempt
    return None


def _is_ack(heard: bytes, device: SimDevice, counter: int) -> bool:
    try:
        raw = bytes.fromhex(heard.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    ack = lora_ack.decode(raw, key=device.key)
    return ack is not None and ack.device == device.id and ack.counter == counter


@dataclass(slots=True)
class LoraRun:
    """What a batch of simulated LoRa presses achieved."""

    sent: dict[tuple[str, int], int | None] = field(default_factory=dict)

    @property
    def acked(self) -> int:
        """Presses that got their ACK."""
        return sum(1 for tries in self.sent.values() if tries is not None)


async def press_many(
    radio: Radio,
    devices: Sequence[SimDevice],
    counters: dict[str, int],
    *,
    kind: PressKind = PressKind.PANIC,
    retry_s: float = 1.0,
    max_tries: int = 8,
    spacing_s: float = 0.05,
) -> LoraRun:
    """One press per device (counter from ``counters``), concurrently, each retrying."""
    run = LoraRun()

    async def one(device: SimDevice) -> None:
        counter = counters[device.id]
        payload = lora_payload(device, kind, counter)
        run.sent[device.id, counter] = await press_until_acked(
            radio, device, payload, counter, retry_s=retry_s, max_tries=max_tries)

    async with asyncio.TaskGroup() as group:
        for index, device in enumerate(devices):
            group.create_task(one(device), name=f"lora.button.{device.id}")
            if index + 1 < len(devices):
                await asyncio.sleep(spacing_s)
    return run
