"""Serial receiver source over real pty pairs, a real SQLite store and a real Mosquitto.

The pty's master end is played by :class:`firmware_sim.lora.ReyaxSim` (a REYAX module);
panicd opens the slave end through a symlink, as it would open /dev/serial/by-id/….
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import SimDevice
from firmware_sim.lora import ReyaxSim, address_of, lora_payload, press_until_acked
from gateway.config import Config, load_config
from gateway.dedup import DedupPolicy
from gateway.errors import ConfigError, DecodeError
from gateway.formats import lora_ack, lora_frame, native
from gateway.ingest import Ingestor
from gateway.locate import Locator
from gateway.model import GeoFix, PressKind
from gateway.sources.mqtt import MqttSource
from gateway.sources.serial import LineInterpreter, LineSplitter, SerialSource, Uplink
from store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
GEO = REPO / "config" / "geo" / "kelurahan.geojson"
BUTTON_ID = "L0000ABCD"
BUTTON = SimDevice(BUTTON_ID, hashlib.sha256(b"test:L0000ABCD").digest(),
                   GeoFix(-7.62182, 111.53096))


def _site(directory: Path, *, mode: str = "rylr", mqtt_port: int | None = None) -> Config:
    """A config with one LoRa button, one serial receiver on ``directory/ttyLORA``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "devices.toml").write_text(
        f'[[device]]\nid = "{BUTTON_ID}"\nhardware = "lora-button"\n'
        f"location = {{ lat = {BUTTON.location.lat}, lon = {BUTTON.location.lon} }}\n"  # type: ignore[union-attr]
        'address = "Jl. Pahlawan RT 03"\nlandmark = "Pos kamling"\n',
        encoding="utf-8",
    )
    keys = directory / "device-keys.toml"
    keys.write_text(f'{BUTTON_ID} = "{BUTTON.key.hex()}"\n', encoding="utf-8")
    mqtt = ""
    if mqtt_port is not None:
        mqtt = (f'[[mqtt]]\nname = "city"\nport = {mqtt_port}\n'
                f'client_id = "panicd-serial-{directory.name}"\n'
                "reconnect_min_s = 0.1\nreconnect_max_s = 1\n")
    (directory / "panicd.toml").write_text(
        f'[panicd]\ndatabase = "{directory / "panicd.sqlite3"}"\n'
        f'[geo]\nkelurahan_file = "{GEO}"\n'
        '[devices]\nregistry = "devices.toml"\n'
        f'[[serial]]\nname = "rx1"\nport = "{directory / "ttyLORA"}"\nmode = "{mode}"\n'
        "baud = 115200\nreconnect_min_s = 0.05\nreconnect_max_s = 0.2\n" + mqtt,
        encoding="utf-8",
    )
    return load_config(directory / "panicd.toml", {"PANICD_DEVICE_KEYS_FILE": str(keys)})


class GatedStore(SqliteStore):
    """SQLite whose COMMIT waits for the test, to prove nothing is acked before it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.committing = asyncio.Event()

    async def commit(self) -> None:
        """Wait at the gate, then commit."""
        self.committing.set()
        await self.gate.wait()
        await super().commit()


@asynccontextmanager
async def _running(
    config: Config, store: SqliteStore | None = None, *, mqtt: bool = False
) -> AsyncIterator[list[SerialSource | MqttSource]]:
    """The pipeline and the configured sources, running until the block ends."""
    locator = Locator.from_geojson(config.kelurahan_file)
    stop = asyncio.Event()
    opened = store or SqliteStore(config.database)
    async with opened, Ingestor(opened, config, locator, policy=DedupPolicy()) as ingestor:
        sources: list[SerialSource | MqttSource] = [
            SerialSource(cfg, ingestor, devices=config.devices, drain_timeout_s=2)
            for cfg in config.serial
        ]
        if mqtt:
            sources += [MqttSource(cfg, ingestor, drain_timeout_s=2) for cfg in config.mqtt]
        async with asyncio.TaskGroup() as group:
            for source in sources:
                group.create_task(source.run(stop), name=f"test.{source.name}")
            try:
                yield sources
            finally:
                stop.set()


@asynccontextmanager
async def _module(link: Path, **kwargs: object) -> AsyncIterator[ReyaxSim]:
    """A simulated REYAX module on a fresh pty behind ``link``."""
    sim = ReyaxSim(link=link, **kwargs)  # type: ignore[arg-type]
    sim.open()
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(sim.serve(stop), name="test.reyax")
            try:
                yield sim
            finally:
                stop.set()
    finally:
        sim.close()


async def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        # The database and the pty have no event to wait on; poll briefly.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _rows(config: Config, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(config.database)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


async def test_press_travels_pty_to_database_and_is_acked_only_after_commit(
    tmp_path: Path,
) -> None:
    config = _site(tmp_path)
    store = GatedStore(config.database)
    store.gate.clear()
    link = Path(config.serial[0].port)
    async with _module(link) as sim, _running(config, store) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        assert source.connected
        async with asyncio.TaskGroup() as group:
            listening = group.create_task(sim.downlink(address_of(BUTTON_ID)), name="test.ack")
            payload = lora_payload(BUTTON, PressKind.PANIC, 7, battery=64)
            sim.transmit(address_of(BUTTON_ID), payload)
            await asyncio.wait_for(store.committing.wait(), 5)
            await asyncio.sleep(0.3)  # ample time for a premature ACK to show up
            assert sim.stats.commands == []
            assert not listening.done()
            store.gate.set()
            downlink = await asyncio.wait_for(listening, 5)
            # The ACK is on the wire only now, so the press must already be readable.
            presses = _rows(config, "SELECT device_id, counter, kind, battery FROM presses")
            assert presses == [(BUTTON_ID, 7, "panic", 64)]
    assert sim.stats.commands[0].startswith(b"AT+SEND=%d,36," % address_of(BUTTON_ID))
    ack = lora_ack.decode(bytes.fromhex(downlink.decode()), key=BUTTON.key)
    assert ack == lora_ack.Ack(BUTTON_ID, 7, lora_ack.AckState.RECEIVED)
    paths = _rows(config, "SELECT path, rssi IS NOT NULL, snr IS NOT NULL FROM press_paths")
    assert paths == [(f"serial:rx1:{link}", 1, 1)]


async def test_a_button_retries_until_acked_and_retries_are_one_press(tmp_path: Path) -> None:
    config = _site(tmp_path)
    link = Path(config.serial[0].port)
    async with _module(link) as sim, _running(config) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        payload = lora_payload(BUTTON, PressKind.PANIC, 11)
        sim.transmit(address_of(BUTTON_ID), payload)  # a copy whose ACK the button "missed"
        tries = await press_until_acked(sim, BUTTON, payload, 11, retry_s=2, max_tries=3)
        assert tries == 1
        await _eventually(lambda: len(sim.stats.acks) == 2)
    assert _rows(config, "SELECT COUNT(*) FROM presses") == [(1,)]
    assert _rows(config, "SELECT heard FROM press_paths") == [(2,)]


async def test_port_vanishes_and_returns_and_ingest_resumes(tmp_path: Path) -> None:
    config = _site(tmp_path)
    link = Path(config.serial[0].port)
    with capture_logs() as logs:
        async with _running(config) as (source,):
            assert isinstance(source, SerialSource)
            async with _module(link) as sim:
                await asyncio.wait_for(source.wait_connected(), 5)
                tries = await press_until_acked(
                    sim, BUTTON, lora_payload(BUTTON, PressKind.PANIC, 1), 1, retry_s=2)
                assert tries == 1
            # Unplugged: the pts device is gone and the link points nowhere.
            await _eventually(lambda: not source.connected)
            await asyncio.sleep(0.5)  # several reconnect attempts fail meanwhile
            assert not source.connected
            async with _module(link) as sim:
                await _eventually(lambda: source.connected)
                tries = await press_until_acked(
                    sim, BUTTON, lora_payload(BUTTON, PressKind.HEARTBEAT, 2), 2, retry_s=2)
                assert tries == 1
    assert source.connections == 2
    assert _rows(config, "SELECT counter FROM presses ORDER BY counter") == [(1,), (2,)]
    events = [entry["event"] for entry in logs]
    assert events.count("serial.connected") == 2
    assert "serial.disconnected" in events
    assert "serial.connect_failed" in events


async def test_garbage_overlong_and_partial_lines_become_dead_letters(tmp_path: Path) -> None:
    config = _site(tmp_path)
    link = Path(config.serial[0].port)
    async with _running(config) as (source,):
        async with _module(link) as sim:
            await asyncio.wait_for(source.wait_connected(), 5)
            sim.write_line(b"\x00\xff\xfe garbage")
            sim.write_line(b"+RCV=5," + b"9" * 3000)
            sim.write_line(b"+RCV=12,40,3F0")
            sim.write_line(b"+RCV=12,4,zzzz,-80,7")
            tries = await press_until_acked(
                sim, BUTTON, lora_payload(BUTTON, PressKind.PANIC, 3), 3, retry_s=2)
            assert tries == 1
            sim.write_line(b"+OK")  # a stray reply is not a dead letter
            sim.write_line(b"+RCV=12,40,01000000ABCD")
            await _eventually(lambda: source.received >= 6)
            # The last line, unterminated, is cut off by the unplug below.
            sim.write_raw(b"+RCV=12,40,0100")
            await asyncio.sleep(0.1)
        await _eventually(lambda: not source.connected)
        await _eventually(lambda: source.received >= 7)
    reasons = [r for (r,) in _rows(config, "SELECT reason FROM dead_letters ORDER BY id")]
    assert reasons == [
        "unexpected_line", "line_too_long", "truncated_line", "bad_hex", "truncated_line",
        "partial_line",
    ]
    assert _rows(config, "SELECT counter FROM presses") == [(3,)]


async def test_same_press_heard_through_lora_serial_and_mqtt_is_one_press(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = _site(tmp_path, mqtt_port=mosquitto.port)
    link = Path(config.serial[0].port)
    counter = 4242
    async with _module(link) as sim, _running(config, mqtt=True) as sources:
        for source in sources:
            await asyncio.wait_for(source.wait_connected(), 10)
        tries = await press_until_acked(
            sim, BUTTON, lora_payload(BUTTON, PressKind.PANIC, counter), counter, retry_s=2)
        assert tries == 1
        # The same button also has Wi-Fi and sends its press as a native frame: same
        # registry id, same counter, its own tag over the canonical string.
        frame = native.encode(key=BUTTON.key, device_id=BUTTON_ID, counter=counter,
                              kind=PressKind.PANIC, battery=90)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="btn-wifi") as c:
            await c.publish(native.uplink_topic(BUTTON_ID), frame, qos=1)
        await _eventually(lambda: len(_rows(config, "SELECT 1 FROM press_paths")) == 2)
    assert _rows(config, "SELECT device_id, counter FROM presses") == [(BUTTON_ID, counter)]
    paths = sorted(str(p) for (p,) in _rows(config, "SELECT path FROM press_paths"))
    assert paths == [f"mqtt:city:{native.uplink_topic(BUTTON_ID)}", f"serial:rx1:{link}"]
    assert _rows(config, "SELECT COUNT(*) FROM incidents") == [(1,)]


async def test_rak3172_p2p_press_is_acked_with_psend(tmp_path: Path) -> None:
    config = _site(tmp_path, mode="rak3172")
    link = Path(config.serial[0].port)
    frame = lora_frame.encode(device=BUTTON_ID, counter=9, kind=PressKind.TEST, key=BUTTON.key)
    async with _module(link) as sim, _running(config) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        sim.write_line(b"+EVT:RXP2P:-71:8:" + frame.hex().upper().encode())
        # Old firmware: RSSI/SNR line, then the data line.
        frame2 = lora_frame.encode(device=BUTTON_ID, counter=10, kind=PressKind.HEARTBEAT,
                                   key=BUTTON.key)
        sim.write_line(b"+EVT:RXP2P, RSSI -90, SNR -3")
        sim.write_line(b"+EVT:" + frame2.hex().upper().encode())
        await _eventually(lambda: len(sim.stats.commands) == 2)
    assert _rows(config, "SELECT counter, kind FROM presses ORDER BY counter") == [
        (9, "test"), (10, "heartbeat")]
    assert _rows(config, "SELECT rssi, snr FROM press_paths ORDER BY press_id") == [
        (-71.0, 8.0), (-90.0, -3.0)]
    first = sim.stats.commands[0]
    assert first.startswith(b"AT+PSEND=")
    assert lora_ack.decode(bytes.fromhex(first[9:].decode()), key=BUTTON.key) == lora_ack.Ack(
        BUTTON_ID, 9, lora_ack.AckState.RECEIVED)


async def test_json_lines_receiver_gets_an_ack_line(tmp_path: Path) -> None:
    config = _site(tmp_path, mode="jsonl")
    link = Path(config.serial[0].port)
    frame = native.encode(key=BUTTON.key, device_id=BUTTON_ID, counter=5, kind=PressKind.PANIC)
    async with _module(link, answer=False) as sim, _running(config) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        sim.write_line(frame)
        sim.write_line(b"not json")
        await _eventually(lambda: len(sim.stats.commands) == 1)
    (line,) = sim.stats.commands
    ack = json.loads(line)
    assert {k: ack[k] for k in ("dev", "ctr", "state")} == {
        "dev": "L0000ABCD", "ctr": 5, "state": "received"}
    assert native.ack_tag_valid(BUTTON.key, ack)
    assert _rows(config, "SELECT reason FROM dead_letters") == [("not_a_json_frame",)]


async def test_a_native_json_frame_heard_over_lora_gets_a_signed_ack(tmp_path: Path) -> None:
    """Issue 11: an unsigned JSON ACK on air could be forged by anyone in radio range."""
    config = _site(tmp_path, mode="rylr")
    link = Path(config.serial[0].port)
    frame = native.encode(key=BUTTON.key, device_id=BUTTON_ID, counter=6, kind=PressKind.PANIC)
    async with _module(link) as sim, _running(config) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        sim.write_line(b"+RCV=7," + str(len(frame)).encode() + b"," + frame + b",-80,9")
        await _eventually(lambda: len(sim.stats.commands) == 1)
    (command,) = sim.stats.commands
    assert command.startswith(b"AT+SEND=7,")
    body = json.loads(command.split(b",", 2)[2])
    assert body["state"] == "received"
    assert native.ack_tag_valid(BUTTON.key, body)
    forged = {**body, "ctr": 7}
    assert not native.ack_tag_valid(BUTTON.key, forged)
    assert not native.ack_tag_valid(BUTTON.key, {k: v for k, v in body.items() if k != "tag"})


# ------------------------------------------------------------------ pure line handling


@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_splitter_yields_bounded_lines_or_errors(chunks: list[bytes]) -> None:
    splitter = LineSplitter()
    for chunk in chunks:
        for line in splitter.feed(chunk):
            assert isinstance(line, DecodeError) or len(line) <= splitter._max
    rest = splitter.flush()
    assert rest is None or len(rest) <= splitter._max


@pytest.mark.parametrize("mode", ["rylr", "rak3172", "jsonl"])
@given(line=st.binary(max_size=1100))
def test_interpreter_never_raises(mode: str, line: bytes) -> None:
    event = LineInterpreter(mode).interpret(line)
    if isinstance(event, Uplink) and isinstance(event.decoded, DecodeError):
        assert event.decoded.reason


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=5))
def test_arbitrary_bytes_on_the_pty_never_stop_the_source(chunks: list[bytes]) -> None:
    async def scenario(directory: Path) -> None:
        config = _site(directory)
        link = Path(config.serial[0].port)
        async with _module(link) as sim, _running(config) as (source,):
            await asyncio.wait_for(source.wait_connected(), 5)
            for chunk in chunks:
                sim.write_raw(chunk)
            sim.write_line(b"")  # end whatever line the noise left open
            tries = await press_until_acked(
                sim, BUTTON, lora_payload(BUTTON, PressKind.PANIC, 1), 1, retry_s=2)
            assert tries is not None
            assert source.connected

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory)))


# ------------------------------------------------------------------ [[serial]] config


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ('name = "rx"\nport = "/dev/x"\nmode = "lorawan"', "serial[0].mode", "unknown mode"),
        ('name = "rx"\nport = "/dev/x"\nmode = "rylr"\ntrust = "network"', "serial[0].trust",
         "only signed"),
        ('name = "rx"\nport = "/dev/x"\nmode = "rylr"\nbaud = 12345', "serial[0].baud",
         "unsupported rate"),
        ('name = "rx"\nmode = "rylr"', "serial[0].port", "is required"),
        ('name = "rx"\nport = "/dev/x"\nmode = "rylr"\nparity = "N"', "serial[0].parity",
         "unknown key"),
        ('name = "city"\nport = "/dev/x"\nmode = "rylr"', "serial[0].name", "duplicate"),
    ],
)
def test_serial_config_errors_name_file_and_key(
    tmp_path: Path, table: str, key: str, problem: str
) -> None:
    config = _site(tmp_path, mqtt_port=1883)
    # Replace the valid receiver with the one under test.
    body = config.path.read_text(encoding="utf-8")
    valid = slice(body.index("[[serial]]"), body.index("[[mqtt]]"))
    body = body[: valid.start] + body[valid.stop :] + f"\n[[serial]]\n{table}\n"
    config.path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(config.path, {"PANICD_DEVICE_KEYS_FILE": str(tmp_path / "device-keys.toml")})
    assert info.value.key == key
    assert problem in info.value.problem
    assert info.value.file == str(config.path)


async def test_a_responder_ack_sends_a_signed_help_coming_downlink_to_the_button(
    tmp_path: Path,
) -> None:
    config = _site(tmp_path)
    store = GatedStore(config.database)
    link = Path(config.serial[0].port)
    async with _module(link) as sim, _running(config, store) as (source,):
        await asyncio.wait_for(source.wait_connected(), 5)
        received = asyncio.ensure_future(sim.downlink(address_of(BUTTON_ID)))
        sim.transmit(address_of(BUTTON_ID), lora_payload(BUTTON, PressKind.PANIC, 11))
        first = await asyncio.wait_for(received, 5)
        # Dispatch says a responder acked: the daemon forwards it to the receiving source.
        coming = asyncio.ensure_future(sim.downlink(address_of(BUTTON_ID)))
        assert source.send_feedback(BUTTON_ID, {"incident": 1, "state": "help_coming"})
        second = await asyncio.wait_for(coming, 5)
        # States without a LoRa form, and devices never heard here, send nothing.
        assert not source.send_feedback(BUTTON_ID, {"incident": 1, "state": "resolved"})
        assert not source.send_feedback("L0000FFFF", {"incident": 1, "state": "help_coming"})
    assert lora_ack.decode(bytes.fromhex(first.decode()), key=BUTTON.key) == lora_ack.Ack(
        BUTTON_ID, 11, lora_ack.AckState.RECEIVED)
    assert lora_ack.decode(bytes.fromhex(second.decode()), key=BUTTON.key) == lora_ack.Ack(
        BUTTON_ID, 11, lora_ack.AckState.HELP_COMING)
