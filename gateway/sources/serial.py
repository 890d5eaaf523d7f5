"""Serial receiver source: REYAX RYLR896/998, RAK3172 in LoRa P2P mode, or JSON lines.

The pure part splits the byte stream into bounded lines and turns each line into an
uplink (a decoded frame or a DecodeError for the dead letters), a module reply, or
nothing. The I/O shell owns the port: pyserial opens it and sets the line discipline;
reads and writes go through the event loop (``add_reader``/``add_writer``) on the
non-blocking descriptor. A vanished port (USB unplugged) ends the connection; the source
reopens it with capped, jittered backoff and is not ``connected`` meanwhile.

Downlinks (docs/FRAMES.md "Serial receivers") go out only from the ingest pipeline's
commit callback: ``AT+SEND`` (REYAX) or ``AT+PSEND`` (RAK) with a signed ACK, or an ack
line (JSON lines). A REYAX/RAK module takes one command at a time and answers ``+OK`` /
``OK`` (or an error) when it is done, so the writer waits for that reply before the next.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Self

import serial
import structlog

from gateway.backoff import Attempts, Backoff, Jitter
from gateway.config import SerialSourceConfig
from gateway.errors import DecodeError
from gateway.formats import lora_ack, lora_frame, native, serial_lines
from gateway.formats.serial_lines import Err, Ok, Ready, Received, RxData, RxMeta
from gateway.ingest import Inbound, Ingestor, Outcome, Repeated, Stored
from gateway.model import Device, Frame, Reception

log = structlog.get_logger("panicd.serial")

MAX_LINE_BYTES = serial_lines.MAX_LINE_BYTES
REPLY_TIMEOUT_S = 3.0  # an SF12 REYAX transmission of an 18-byte ACK takes about 1.5 s
WRITE_TIMEOUT_S = 2.0
DOWNLINK_QUEUE_MAX = 256
_READ_CHUNK = 4096


# ---------------------------------------------------------------- pure: lines and frames


class LineSplitter:
    """Splits a byte stream at LF; a line longer than ``max_bytes`` becomes one DecodeError."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_bytes
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | DecodeError]:
        """The complete lines (or over-long line errors) that ``data`` finishes."""
        out: list[bytes | DecodeError] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if not self._skipping and len(self._buffer) > self._max:
                    out.append(_overlong(self._buffer))
                    self._skipping = True
                if self._skipping:
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False  # the tail of an over-long line: already reported
            elif len(line) > self._max:
                out.append(_overlong(line))
            else:
                out.append(line)

    def flush(self) -> bytes | None:
        """The partial line left when the port went away (None if there is none)."""
        rest = bytes(self._buffer)
        skipping = self._skipping
        self._buffer.clear()
        self._skipping = False
        return rest if rest.strip() and not skipping else None


def _overlong(line: bytes | bytearray) -> DecodeError:
    return DecodeError("line_too_long", f"more than {MAX_LINE_BYTES} bytes: {bytes(line[:32])!r}")


@dataclass(frozen=True, slots=True)
class Uplink:
    """A frame heard by the receiver (or why it could not be decoded)."""

    decoded: Frame | DecodeError
    line: bytes
    rssi: float | None = None
    snr: float | None = None
    addr: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The module's answer to the last command."""

    ok: bool
    text: str


@dataclass(frozen=True, slots=True)
class ModuleReady:
    """The module (re)started: ``+READY``."""


LineEvent = Uplink | Reply | ModuleReady | None


def decode_radio_data(data: bytes) -> Frame:
    """Decode a radio payload: a native JSON frame, a binary frame, or a hex-encoded one."""
    if data.startswith(b"{"):
        return native.decode("", data)
    if lora_frame.looks_like_frame(data):
        return lora_frame.decode_bytes(data, format_name=lora_frame.FORMAT)
    try:
        raw = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise DecodeError("bad_hex", f"{data[:32]!r}") from None
    return lora_frame.decode_bytes(raw, format_name=lora_frame.FORMAT)


def _uplink(packet: Received, line: bytes) -> Uplink:
    try:
        decoded: Frame | DecodeError = decode_radio_data(packet.data)
    except DecodeError as exc:
        decoded = exc
    return Uplink(decoded, line, float(packet.rssi), packet.snr, packet.addr)


class LineInterpreter:
    """Turns one receiver line into an event, per mode (keeps old-RAK two-line state)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._rak_meta: RxMeta | None = None

    def interpret(self, line: bytes) -> LineEvent:
        """The event one line means; undecodable lines become an Uplink with a DecodeError."""
        stripped = line.rstrip(b"\r\n")
        if not stripped.strip():
            return None
        try:
            match self.mode:
                case "jsonl":
                    return self._jsonl(stripped)
                case "rylr":
                    return self._radio(serial_lines.parse_reyax_line(stripped), stripped)
                case _:
                    return self._radio(serial_lines.parse_rak_line(stripped), stripped)
        except DecodeError as exc:
            return Uplink(exc, stripped)

    def _jsonl(self, line: bytes) -> LineEvent:
        text = serial_lines.parse_json_line(line)
        if text is None:
            return None
        return Uplink(native.decode("", text), line)

    def _radio(self, parsed: serial_lines.RadioLine, line: bytes) -> LineEvent:
        meta, self._rak_meta = self._rak_meta, None
        match parsed:
            case Received():
                return _uplink(parsed, line)
            case RxMeta():
                self._rak_meta = parsed
                return None
            case RxData():
                if meta is None:
                    raise DecodeError("partial_line", "RAK data line without its RSSI/SNR line")
                return _uplink(serial_lines.join_legacy_rak(meta, parsed), line)
            case Ready():
                return ModuleReady()
            case Ok():
                return Reply(ok=True, text=line.decode("ascii", "replace"))
            case Err():
                return Reply(ok=False, text=parsed.text)
            case serial_lines.Event():
                return None
            case serial_lines.Other(text) if text.startswith("AT"):
                return None  # the module echoing our own command
            case serial_lines.Other(text):
                raise DecodeError("unexpected_line", text[:64])


def downlink(
    mode: str,
    uplink: Uplink,
    outcome: Stored | Repeated,
    key: bytes | None,
    state: lora_ack.AckState = lora_ack.AckState.RECEIVED,
) -> bytes | None:
    """The bytes to write to the receiver to acknowledge a committed press (None: none)."""
    frame = uplink.decoded
    assert isinstance(frame, Frame)
    if key is None:
        # Never an unsigned ACK: anyone in radio range could send the same and silence
        # a real panic (docs/SECURITY.md). A keyless device's press is never accepted.
        return None
    if mode == "jsonl" or frame.format == native.FORMAT:
        body = native.signed_ack(
            key, {"dev": outcome.device_id, "ctr": outcome.counter, "state": state.name.lower()}
        )
        text = json.dumps(body, separators=(",", ":")).encode()
        if mode == "jsonl":
            return text + b"\n"
        return _radio_send(mode, uplink, text, text)
    if outcome.counter is None:
        return None
    ack = lora_ack.encode(device=outcome.device_id, counter=outcome.counter, state=state, key=key)
    # REYAX carries text on air, so the button sends and receives hex; RAK carries bytes.
    return _radio_send(mode, uplink, ack.hex().upper().encode("ascii"), ack)


def _radio_send(mode: str, uplink: Uplink, text: bytes, raw: bytes) -> bytes:
    if mode == "rylr":
        return serial_lines.reyax_send(uplink.addr or 0, text)
    return serial_lines.rak_send(raw)


# ---------------------------------------------------------------- I/O shell


class PortGoneError(OSError):
    """The serial device reported end of file or an I/O error (unplugged)."""


class SerialPort:
    """A serial device opened by pyserial and driven through the event loop."""

    def __init__(self, device: serial.Serial) -> None:
        self._device = device
        self._fd = device.fileno()

    @classmethod
    def open(cls, path: str, baud: int) -> Self:
        """Open ``path`` non-blocking and exclusively (raises OSError if it is absent)."""
        device = serial.Serial(port=path, baudrate=baud, timeout=0, write_timeout=0, exclusive=True)
        return cls(device)

    def close(self) -> None:
        """Close the device (idempotent)."""
        self._device.close()

    async def _ready(self, add: str) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        if add == "read":
            loop.add_reader(self._fd, wake)
        else:
            loop.add_writer(self._fd, wake)
        try:
            await waiter
        finally:
            if add == "read":
                loop.remove_reader(self._fd)
            else:
                loop.remove_writer(self._fd)

    async def read(self) -> bytes:
        """The next bytes from the device; raises PortGoneError when it went away."""
        while True:
            await self._ready("read")
            try:
                data = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:  # EIO: the USB adapter (or the pty's other end) is gone
                raise PortGoneError(exc.errno, exc.strerror) from None
            if not data:
                # pyserial sets VMIN=0/VTIME=0, so an idle read returns b"" too; only after
                # the loop reported the descriptor readable does b"" mean a hang-up.
                raise PortGoneError("hang-up: readable but no data")
            return data

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` (raises TimeoutError if the device stops taking bytes)."""
        view = memoryview(data)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            while view:
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    await self._ready("write")
                    continue
                except OSError as exc:
                    raise PortGoneError(exc.errno, exc.strerror) from None
                view = view[written:]


class SerialSource:
    """One serial receiver feeding the ingest pipeline, acknowledging after commit."""

    def __init__(
        self,
        config: SerialSourceConfig,
        ingestor: Ingestor,
        *,
        devices: Mapping[str, Device],
        drain_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self._config = config
        self._ingestor = ingestor
        self._devices = devices
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._path = f"serial:{config.name}:{config.port}"
        self._connected = False
        self._first_connect = asyncio.Event()
        self._downlinks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=DOWNLINK_QUEUE_MAX)
        # The last uplink per device, to address a later "help coming" ACK to it.
        self._last_heard: dict[str, tuple[Uplink, Stored | Repeated]] = {}
        self._reply: asyncio.Future[Reply] | None = None
        self.received = 0
        self.acked = 0
        self.connections = 0

    @property
    def connected(self) -> bool:
        """Whether the serial port is open."""
        return self._connected

    async def wait_connected(self) -> None:
        """Return once the port has been opened the first time."""
        await self._first_connect.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Open, read and reopen the port until ``stop``; then drain, send ACKs and close."""
        cfg = self._config
        backoff = Attempts(Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, Jitter.ABOVE_BASE))
        while not stop.is_set():
            try:
                port = SerialPort.open(cfg.port, cfg.baud)
            except OSError as exc:
                await self._pause(stop, backoff, "serial.connect_failed", str(exc))
                continue
            self._connected = True
            self.connections += 1
            self._first_connect.set()
            backoff.reset()
            log.info(
                "serial.connected", source=self.name, port=cfg.port, mode=cfg.mode, baud=cfg.baud
            )
            try:
                error = await self._session(port, stop)
            finally:
                self._connected = False
                port.close()
            if error is not None:
                await self._pause(stop, backoff, "serial.disconnected", error)
        log.info("serial.stopped", source=self.name, received=self.received, acked=self.acked)

    async def _pause(self, stop: asyncio.Event, backoff: Attempts, event: str, error: str) -> None:
        delay = backoff.next_delay()
        log.warning(
            event, source=self.name, port=self._config.port, error=error, retry_in_s=round(delay, 2)
        )
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass

    async def _session(self, port: SerialPort, stop: asyncio.Event) -> str | None:
        """One open port: the error that ended it, or None after a graceful stop."""
        prefix = f"serial.{self.name}"
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self._read_loop(port), name=f"{prefix}.reader")
            writer = group.create_task(self._write_loop(port), name=f"{prefix}.writer")
            stopper = group.create_task(stop.wait(), name=f"{prefix}.stop")
            await asyncio.wait({reader, writer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done():
                reader.cancel()
                # Keep the port open while the pipeline commits what we handed it, so
                # those ACKs still reach the buttons (they would retry otherwise).
                drained = await self._ingestor.drain(self._drain_timeout_s)
                try:
                    async with asyncio.timeout(self._drain_timeout_s):
                        await self._downlinks.join()
                except TimeoutError:
                    drained = False
                log.info("serial.draining_done", source=self.name, drained=drained)
            for task in (reader, writer, stopper):
                task.cancel()
        for task in (reader, writer):
            if not task.cancelled() and task.result() is not None:
                return task.result()
        return None if stop.is_set() else "session ended"

    async def _read_loop(self, port: SerialPort) -> str:
        splitter = LineSplitter()
        interpreter = LineInterpreter(self._config.mode)
        while True:
            try:
                data = await port.read()
            except PortGoneError as exc:
                partial_line = splitter.flush()
                if partial_line is not None:
                    detail = f"port closed mid-line: {partial_line[:32]!r}"
                    await self._submit(Uplink(DecodeError("partial_line", detail), partial_line))
                return str(exc)
            for line in splitter.feed(data):
                if isinstance(line, DecodeError):
                    await self._submit(Uplink(line, b""))
                    continue
                event = interpreter.interpret(line)
                match event:
                    case Uplink():
                        await self._submit(event)
                    case Reply():
                        if not event.ok:
                            log.warning("serial.module_error", source=self.name, reply=event.text)
                        if self._reply is not None and not self._reply.done():
                            self._reply.set_result(event)
                    case ModuleReady():
                        log.info("serial.module_ready", source=self.name)
                    case None:
                        pass

    async def _submit(self, uplink: Uplink) -> None:
        self.received += 1
        await self._ingestor.submit(
            Inbound(
                decoded=uplink.decoded,
                payload=uplink.line[:MAX_LINE_BYTES],
                reception=self._reception(uplink),
                format=self._config.mode,
                trust=self._config.trust,
                on_done=partial(self._acknowledge, uplink),
            )
        )

    def _reception(self, uplink: Uplink) -> Reception:
        return Reception(
            path=self._path,
            received_at=self._clock(),
            source=self.name,
            rssi=uplink.rssi,
            snr=uplink.snr,
        )

    def send_feedback(self, device_id: str, body: dict[str, object]) -> bool:
        """ "Help is coming" to a button last heard on this receiver (after a responder ack).

        Other states (cancelled, resolved) have no LoRa ACK form; the button's LED times out.
        """
        last = self._last_heard.get(device_id)
        if last is None or body.get("state") != "help_coming":
            return False
        uplink, outcome = last
        return self._queue_downlink(uplink, outcome, lora_ack.AckState.HELP_COMING)

    def _acknowledge(self, uplink: Uplink, outcome: Outcome) -> None:
        """Queue the ACK downlink; runs after commit (DESIGN §2 Durability)."""
        if not isinstance(outcome, Stored | Repeated):
            return
        self._last_heard[outcome.device_id] = (uplink, outcome)
        self._queue_downlink(uplink, outcome, lora_ack.AckState.RECEIVED)

    def _queue_downlink(
        self, uplink: Uplink, outcome: Stored | Repeated, state: lora_ack.AckState
    ) -> bool:
        device = self._devices.get(outcome.device_id)
        try:
            data = downlink(
                self._config.mode, uplink, outcome, device.key if device else None, state
            )
        except ValueError as exc:  # an ACK that does not fit the module's limits
            log.warning(
                "serial.downlink_unsendable",
                source=self.name,
                error=str(exc),
                device=outcome.device_id,
            )
            return False
        if data is None:
            return False
        try:
            self._downlinks.put_nowait(data)
        except asyncio.QueueFull:
            # The press is stored; the button retries and is acknowledged on the retry.
            log.warning(
                "serial.downlink_dropped",
                source=self.name,
                device=outcome.device_id,
                counter=outcome.counter,
                queued=self._downlinks.qsize(),
            )
            return False
        return True

    async def _write_loop(self, port: SerialPort) -> str:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._downlinks.get()
            try:
                expects_reply = self._config.mode != "jsonl"
                self._reply = loop.create_future() if expects_reply else None
                try:
                    await port.write(data)
                except TimeoutError:
                    log.warning("serial.write_timeout", source=self.name)
                    continue
                except PortGoneError as exc:
                    return str(exc)
                self.acked += 1
                log.debug("serial.downlink_sent", source=self.name, command=data[:80])
                if self._reply is not None:
                    try:
                        async with asyncio.timeout(REPLY_TIMEOUT_S):
                            reply = await self._reply
                    except TimeoutError:
                        log.warning("serial.downlink_unanswered", source=self.name)
                    else:
                        if not reply.ok:
                            log.warning(
                                "serial.downlink_failed", source=self.name, reply=reply.text
                            )
            finally:
                self._reply = None
                self._downlinks.task_done()
