"""The real ``panicd`` subprocess: config errors, systemd handshake, drain, schema guard.

DESIGN §3 Operations: a bad file exits 2 with one clear line; Type=notify readiness and
STOPPING; SIGTERM drains what was received before exiting 0.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import write_fleet
from firmware_sim.storm import storm
from panicd.daemon import GC_YOUNG_THRESHOLD, settle_gc
from store.sqlite_schema import SCHEMA_VERSION
from tests.daemon_proc import DaemonProcess, count_rows, wait_until
from tests.prism import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "config" / "demo"


class NotifiedDaemon(DaemonProcess):
    """DaemonProcess that can also collect the datagrams still queued after exit."""

    def collect_pending(self) -> list[bytes]:
        """Every notify datagram received so far, including those sent just before exit."""
        assert self._sock is not None
        self._sock.setblocking(False)
        try:
            while True:
                self.messages.append(self._sock.recv(65536))
        except BlockingIOError:
            pass
        finally:
            self._sock.setblocking(True)
        return self.messages




def _run_panicd(config: Path, keys: Path | None = None,
                **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    if keys is not None:
        env["PANICD_DEVICE_KEYS_FILE"] = str(keys)
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "panicd.daemon", "--config", str(config), "--log-format", "json"],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )


@pytest.fixture
def client_id(mosquitto: Mosquitto) -> Iterator[str]:
    name = f"panicd-daemon-{uuid.uuid4().hex[:10]}"
    yield name

    async def forget() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                                  clean_session=True):
            pass

    asyncio.run(forget())


def test_an_unknown_key_exits_2_with_one_line_naming_the_file_and_key(tmp_path: Path) -> None:
    config, keys, _ = write_fleet(tmp_path, devices=1, mqtt_port=1, extra_toml="topcis = []\n")
    result = _run_panicd(config, keys)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line == f"panicd: {config}: mqtt[0].topcis: unknown key (did you mean 'topics'?)"
    assert result.stdout == ""


def test_invalid_toml_exits_2_with_one_line_naming_the_file(tmp_path: Path) -> None:
    config, keys, _ = write_fleet(tmp_path, devices=1, mqtt_port=1)
    config.write_text('[panicd\nsite = "x"\n', encoding="utf-8")
    result = _run_panicd(config, keys)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"panicd: {config}: not valid TOML")


def test_a_missing_registry_file_exits_2_with_one_line_naming_that_file(tmp_path: Path) -> None:
    config, keys, _ = write_fleet(tmp_path, devices=1, mqtt_port=1)
    (tmp_path / "devices.toml").unlink()
    result = _run_panicd(config, keys)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line == (f"panicd: {config}: devices.registry: "
                    f"{tmp_path / 'devices.toml'} does not exist")


def test_a_postgresql_store_with_dispatch_but_no_ack_key_exits_2_naming_file_and_key(
    tmp_path: Path,
) -> None:
    # Any instance on a shared store may answer an ack link, so all must sign with one
    # given key: refused at start, before anything is opened, never on the first page.
    config, keys, _ = write_fleet(
        tmp_path, devices=1, mqtt_port=1, store_url="postgresql://panicd@db1,db2/panicd",
        extra_toml=(f'\n[dispatch]\nresponders = "{REPO / "config/demo/responders.toml"}"\n'
                    f'policies = "{REPO / "config/demo/policies.toml"}"\n'
                    'public_base_url = "https://panicd.example"\n'),
    )
    result = _run_panicd(config, keys, PANICD_STORE_PASSWORD="pg-Secret-4711")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line == (f"panicd: {config}: store.url: a PostgreSQL store needs the ack-link "
                    "key, the same on every instance: credential ack-link-secret or "
                    "$PANICD_ACK_SECRET")
    assert "pg-Secret-4711" not in result.stdout + result.stderr
    assert not (tmp_path / "panicd.sqlite3").exists()


def test_an_unreachable_postgresql_exits_1_naming_the_server_but_not_the_password(
    tmp_path: Path,
) -> None:
    port = free_port()  # nobody listens: connection refused
    url = f"postgresql://panicd@127.0.0.1:{port}/panicd"
    config, keys, _ = write_fleet(tmp_path, devices=1, mqtt_port=1, store_url=url)
    result = _run_panicd(config, keys, PANICD_STORE_PASSWORD="pg-Secret-4711")
    assert result.returncode == 1, result.stderr
    (unusable,) = [json.loads(line) for line in result.stderr.splitlines()
                   if '"store.unusable"' in line]
    assert unusable["error"].startswith(f"cannot connect to {url}: "), unusable
    assert unusable["store"] == url
    assert "pg-Secret-4711" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "panicd.sqlite3").exists()


def test_sigterm_after_ready_exits_0_and_notifies_ready_before_stopping(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    config, keys, _ = write_fleet(
        tmp_path / "cfg", devices=2, mqtt_port=mosquitto.port, client_id=client_id
    )
    daemon = NotifiedDaemon(config, keys, tmp_path / "run")
    with daemon:
        assert daemon.terminate() == 0
        messages = daemon.collect_pending()
    states = [
        assignment
        for message in messages
        for assignment in message.decode().split("\n")
        if assignment in ("READY=1", "STOPPING=1")
    ]
    assert states == ["READY=1", "STOPPING=1"], messages
    events = [e["event"] for e in daemon.events()]
    assert "daemon.devices_without_key" not in events  # every device has its key
    assert events.index("daemon.ready") < events.index("daemon.stopping")
    assert events.index("daemon.stopping") < events.index("daemon.stopped")


def test_presses_received_before_sigterm_are_committed_before_exit(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    config, keys, devices = write_fleet(
        tmp_path / "cfg", devices=10, mqtt_port=mosquitto.port, client_id=client_id
    )
    database = tmp_path / "cfg" / "panicd.sqlite3"
    daemon = NotifiedDaemon(config, keys, tmp_path / "run")
    with daemon:
        result = asyncio.run(
            storm(mosquitto.host, mosquitto.port, devices, count=200, rate=100_000,
                  counter_base=1)
        )
        assert len(result.sent) == 200
        assert wait_until("SELECT COUNT(*) FROM presses", database, 1, 30) >= 1, daemon.log()
        assert daemon.terminate() == 0
    events = daemon.events()
    (drained,) = [e for e in events if e["event"] == "mqtt.draining_done"]
    assert drained["drained"] is True
    (stopped,) = [e for e in events if e["event"] == "daemon.stopped"]
    assert stopped["pending"] == 0
    # Whatever panicd took from the broker is in the database; nothing half-done.
    assert count_rows(database, "SELECT COUNT(*) FROM presses") == stopped["committed"]

    # The rest is still the broker's: a restart on the same session collects it.
    daemon2 = NotifiedDaemon(config, keys, tmp_path / "run2")
    with daemon2:
        assert wait_until("SELECT COUNT(*) FROM presses", database, 200, 30) == 200
        assert daemon2.terminate() == 0
    conn = sqlite3.connect(database)
    try:
        stored = set(conn.execute("SELECT device_id, counter FROM presses"))
    finally:
        conn.close()
    assert stored == set(result.sent)
    assert count_rows(database, "SELECT COUNT(*) FROM presses") == 200


def test_a_database_from_a_newer_schema_exits_1_with_store_unusable(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    config, keys, _ = write_fleet(
        tmp_path / "cfg", devices=1, mqtt_port=mosquitto.port, client_id=client_id
    )
    database = tmp_path / "cfg" / "panicd.sqlite3"
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    daemon = NotifiedDaemon(config, keys, tmp_path / "run")
    try:
        daemon.start(wait_ready=False)
        assert daemon.process is not None
        assert daemon.process.wait(timeout=30) == 1
        messages = daemon.collect_pending()
    finally:
        daemon.__exit__(None, None, None)
    assert not any(b"READY=1" in m for m in messages)
    (unusable,) = daemon.events("store.unusable")
    assert unusable["error"] == (
        f"database schema version 99 is newer than this panicd ({SCHEMA_VERSION})"
    )
    assert unusable["store"] == f"sqlite:///{database.resolve()}"
    # That is the one thing said about it: no traceback, no second error line.
    assert "Traceback" not in daemon.log()
    problems = [e for e in daemon.events() if e["log_level"] in ("error", "critical")]
    assert problems == [unusable]
    # The file was left as it was: panicd never downgrades a schema.
    conn = sqlite3.connect(database)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
    finally:
        conn.close()



def test_a_receiver_missing_at_boot_gives_a_degraded_ready_instead_of_a_restart_loop(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    config, keys, _ = write_fleet(
        tmp_path / "cfg", devices=2, mqtt_port=mosquitto.port, client_id=client_id,
        extra_toml=f'\n[[serial]]\nname = "rx1"\nport = "{tmp_path}/no-such-tty"\n'
        'mode = "rylr"\n',
    )
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[panicd]\n", "[panicd]\nready_timeout_s = 1\n", 1),
                      encoding="utf-8")
    daemon = NotifiedDaemon(config, keys, tmp_path / "run")
    with daemon:
        # READY comes although rx1 never connects; the MQTT source is up and ingesting.
        daemon.wait_for(b"READY=1", 30)
        assert daemon.terminate() == 0
    degraded = daemon.events("daemon.ready_degraded")
    assert [e["down"] for e in degraded] == [["rx1"]]
    ready = next(e for e in daemon.events() if e["event"] == "daemon.ready")
    assert ready["up"] == ["local"]


def test_devices_no_frame_of_theirs_can_pass_are_warned_of_at_start(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    config, keys, _ = write_fleet(
        tmp_path / "cfg", devices=3, mqtt_port=mosquitto.port, client_id=client_id
    )
    keys.write_text(keys.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    registry = tmp_path / "cfg" / "devices.toml"
    # A third-party button is heard unsigned, through its own network: not keyless news.
    registry.write_text(registry.read_text(encoding="utf-8")
                        + '\n[[device]]\nid = "ZB-SOS-1"\nhardware = "zigbee-sos"\n'
                        "location = { lat = -7.61364, lon = 111.53369 }\n"
                        'external_ids = { zigbee2mqtt = "sos_button_1" }\n', encoding="utf-8")
    daemon = NotifiedDaemon(config, keys, tmp_path / "run")
    with daemon:
        assert daemon.terminate() == 0  # a warning, not a refusal to run
    (warning,) = daemon.events("daemon.devices_without_key")
    assert warning["log_level"] == "warning"
    assert (warning["count"], warning["of"]) == (2, 4)
    assert warning["devices"] == ["SIM-00001", "SIM-00002"]
    assert any(e["event"] == "daemon.ready" for e in daemon.events())


def _bind_and_leave(path: Path) -> None:
    """Leave a socket file at ``path`` as a killed process does: bound, then closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_a_clean_stop_removes_the_control_socket_and_a_stale_one_does_not_stop_a_start(
    mosquitto: Mosquitto, tmp_path: Path, client_id: str
) -> None:
    directory = tmp_path / "cfg"
    control = directory / "control.sock"
    config, keys, _ = write_fleet(
        directory, devices=1, mqtt_port=mosquitto.port, client_id=client_id,
        extra_toml=f'\n[dispatch]\nresponders = "{DEMO / "responders.toml"}"\n'
        f'policies = "{DEMO / "policies.toml"}"\npublic_base_url = "http://127.0.0.1:9"\n'
        f'listen_host = "127.0.0.1"\nlisten_port = 0\ncontrol_socket = "{control}"\n',
    )
    _bind_and_leave(control)  # a crash's leftover
    daemon = NotifiedDaemon(config, keys, tmp_path / "run")
    with daemon:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(control))  # the new daemon's socket, listening
        assert daemon.terminate() == 0
    assert not control.exists(), daemon.log()


def test_a_stop_leaves_a_socket_another_process_bound_since(tmp_path: Path) -> None:
    from dispatch.service import remove_own_socket  # noqa: PLC0415 -- only this test

    path = tmp_path / "control.sock"
    _bind_and_leave(path)
    ours = (path.stat().st_dev, path.stat().st_ino)
    # A second panicd on the same path (bound while the first file exists, so the two
    # cannot share an inode number).
    _bind_and_leave(tmp_path / "other.sock")
    (tmp_path / "other.sock").replace(path)
    assert remove_own_socket(path, ours) is False
    assert path.exists()
    theirs = (path.stat().st_dev, path.stat().st_ino)
    assert remove_own_socket(path, theirs) is True
    assert not path.exists()
    assert remove_own_socket(path, theirs) is False


def test_network_availability_maps_to_the_registered_device_and_clears_on_return(
    tmp_path: Path,
) -> None:
    from gateway.sdnotify import Notifier  # noqa: PLC0415
    from panicd.daemon import Daemon, Loaded  # noqa: PLC0415 -- only this test needs them
    from tests.pipeline import make_fleet  # noqa: PLC0415

    fleet = make_fleet(
        tmp_path / "cfg",
        extra_registry='[[device]]\nid = "ZB-SOS-1"\nhardware = "zigbee-sos"\n'
        "location = { lat = -7.61364, lon = 111.53369 }\n"
        'external_ids = { zigbee2mqtt = "sos_button_1" }\n',
    )
    daemon = Daemon(Loaded(fleet.config, fleet.locator, None), Notifier({}))
    daemon._availability("zigbee2mqtt", "sos_button_1", False, 100.0)
    daemon._availability("zigbee2mqtt", "sos_button_1", False, 200.0)
    daemon._availability("zigbee2mqtt", "unknown_name", False, 100.0)
    # The first report's time is kept: it is when the device dropped off.
    assert daemon.reported_offline == {"ZB-SOS-1": 100.0}
    daemon._availability("zigbee2mqtt", "sos_button_1", True, 300.0)
    assert daemon.reported_offline == {}


def test_start_up_objects_are_frozen_out_of_every_later_full_collection() -> None:
    start_up = [{"kelurahan": n} for n in range(10_000)]
    thresholds = gc.get_threshold()
    try:
        frozen = settle_gc()
        tracked = {id(obj) for obj in gc.get_objects()}
        assert frozen >= len(start_up)
        assert not any(id(obj) in tracked for obj in start_up)
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
