"""The end-to-end demo: a private broker, the real daemon, and a morning of button presses.

Everything runs on embedded defaults: SQLite under var/demo, Mosquitto on 127.0.0.1:18830
with the project's broker settings, the demo device registry, and (once dispatch is
configured) the console channel. It checks what it shows and exits non-zero if the
daemon did not do what an operator would expect.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import aiomqtt

from firmware_sim import button
from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import CounterState, SimDevice, load_keys
from gateway.config import load_config
from gateway.model import GeoFix, PressKind
from gateway.verify import REPLAY_WINDOW

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "config" / "demo" / "panicd.toml"
DEMO_KEYS = REPO / "config" / "demo" / "device-keys.toml"


def _say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def wait_ready(sock: socket.socket, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for READY=1 on our NOTIFY_SOCKET (the same handshake systemd uses)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        sock.settimeout(0.2)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in data.split(b"\n"):
            return True
    return False


async def _scenario(host: str, port: int, fleet: dict[str, SimDevice], state: CounterState) -> None:
    async def press(
        device_id: str,
        kind: PressKind,
        *,
        note: str,
        counter: int | None = None,
        repeat: int = 1,
        via_gateway: str | None = None,
        gps: GeoFix | None = None,
        battery: int = 90,
        tamper: bool = False,
    ) -> None:
        sent, feedback = await button.press(
            host, port, fleet[device_id], kind,
            state.next(device_id) if counter is None else counter,
            battery=battery, gps=gps, via_gateway=via_gateway, tamper=tamper, repeat=repeat,
            feedback_timeout_s=3.0,
        )
        shown = feedback or "no feedback (rejected or lost)"
        print(f"--> {device_id} {kind.value} ctr={sent.counter}: {note}\n    feedback: {shown}",
              flush=True)

    _say("A resident in Oro-oro Ombo presses the panic button")
    await press("MDN-OOO-0001", PressKind.PANIC, note="opens an incident")
    last = state.next("MDN-OOO-0001") - 1
    await press("MDN-OOO-0001", PressKind.PANIC, counter=last, repeat=2,
                note="the button retransmits: same press, not a new one")
    await press("MDN-OOO-0001", PressKind.PANIC, counter=last, via_gateway="gw-balaikota",
                note="also heard through the Balai Kota relay: one press, two paths")
    await press("MDN-OOO-0001", PressKind.PANIC, note="pressed again: attached to the incident")
    await press("MDN-OOO-0001", PressKind.PANIC, note="third press: the incident turns urgent")

    _say("Pangongangan: a press, then a cancel within the grace window")
    await press("MDN-PGA-0001", PressKind.PANIC, note="opens an incident")
    await press("MDN-PGA-0001", PressKind.CANCEL, note="cancels it (within 120 s)")

    _say("A carried button with GPS, a test press, and a heartbeat with a weak battery")
    await press("MDN-MOB-0001", PressKind.PANIC, gps=GeoFix(-7.65557, 111.51877, 8),
                note="located by its GPS fix (Josenan)")
    await press("MDN-TMN-0001", PressKind.TEST, note="a TES incident, for operations only")
    await press("MDN-KLN-0001", PressKind.HEARTBEAT, battery=15, note="device health only")

    _say("Bad input: each becomes a dead letter with its reason, and panicd keeps running")
    await press("MDN-KLG-0001", PressKind.PANIC, tamper=True, note="a forged tag")
    await press("MDN-OOO-0001", PressKind.PANIC, counter=last - REPLAY_WINDOW - 5,
                note="a replayed counter older than the anti-replay window")
    async with aiomqtt.Client(host, port, identifier="demo-garbage") as client:
        await client.publish("panicd/v1/dev/MDN-XXX-9999/up",
                             b'{"v":1,"dev":"MDN-XXX-9999","ctr":1,"kind":"panic","tag":"'
                             + b"0" * 64 + b'"}', qos=1)
        await client.publish("panicd/v1/dev/MDN-KLG-0001/up", b"\xff\xfe not text", qos=1)
        await client.publish("panicd/v1/dev/MDN-KLG-0001/up", b'{"v":1,"dev":', qos=1)
    print("--> an unregistered device and a garbage frame were published", flush=True)
    await asyncio.sleep(0.5)
    state.save()


async def _respond(database: Path) -> None:
    """A responder opens the link from their SMS and presses "Saya tangani"."""
    _say("Dispatch: a linmas volunteer opens the link in the SMS and presses 'Saya tangani'")
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        body = conn.execute(
            "SELECT body FROM outbox WHERE incident_id = 1 AND channel = 'sms'"
            " AND purpose = 'alert' ORDER BY id LIMIT 1"
        ).fetchone()[0]
    finally:
        conn.close()
    link = re.search(r"https?://\S+", body)
    if link is None:
        raise RuntimeError(f"no ack link in the SMS: {body!r}")
    async with aiohttp.ClientSession() as session:
        async with session.get(link.group(0)) as page:
            print(f"--> GET {link.group(0)} -> {page.status}", flush=True)
        async with session.post(link.group(0)) as page:
            text = await page.text()
            print(f"--> POST (Saya tangani) -> {page.status}: "
                  f"{'acknowledged' if 'tercatat menangani' in text else text[:120]}", flush=True)
    await asyncio.sleep(0.5)


def _check(database: Path) -> list[str]:
    """What an operator would expect to find after the scenario."""
    problems = []
    conn = sqlite3.connect(database)
    try:
        rows = conn.execute(
            "SELECT device_id, status, test, urgent, press_count, kelurahan, location_source"
            " FROM incidents ORDER BY id"
        ).fetchall()
        reasons = sorted(r[0] for r in conn.execute("SELECT reason FROM dead_letters"))
        paths = conn.execute("SELECT COUNT(*) FROM press_paths").fetchone()[0]
        handled = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE incident_id = 1 AND purpose = 'handled'"
            " AND state = 'sent'"
        ).fetchone()[0]
        sent = conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'sent'").fetchone()[0]
    finally:
        conn.close()
    expect: list[tuple[str, Callable[[tuple[object, ...]], bool]]] = [
        ("MDN-OOO-0001", lambda r: r[1] == "acknowledged" and r[3] == 1 and r[4] == 3
         and r[5] == "Oro-oro Ombo"),
        ("MDN-PGA-0001", lambda r: r[1] == "cancelled" and r[5] == "Pangongangan"),
        ("MDN-MOB-0001", lambda r: r[1] == "resolved" and r[5] == "Josenan"
         and r[6] == "gps"),
        ("MDN-TMN-0001", lambda r: r[2] == 1 and r[5] == "Taman"),
    ]
    by_device = {r[0]: r for r in rows}
    for device_id, ok in expect:
        row = by_device.get(device_id)
        if row is None or not ok(row):
            problems.append(f"incident for {device_id} not as expected: {row}")
    if len(rows) != 4:
        problems.append(f"expected 4 incidents, found {len(rows)}")
    problems.extend(
        f"no dead letter with reason {reason} (have {reasons})"
        for reason in ("bad_encoding", "bad_json", "bad_tag", "stale_counter", "unknown_device")
        if reason not in reasons
    )
    if handled < 1:
        problems.append("nobody was told 'ditangani oleh …' after the ack")
    if sent < 10:
        problems.append(f"expected the console channel to send the pages, sent {sent}")
    if paths < 8:
        problems.append(f"expected the relay path to be recorded, only {paths} paths")
    return problems


def _panicctl(*args: str) -> None:
    subprocess.run(  # noqa: S603 -- our own CLI
        [sys.executable, "-m", "gateway.cli", "--config", str(DEMO_CONFIG), *args], check=False
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo end to end; returns 0 when everything behaved."""
    config_path: Path = args.config
    env = dict(os.environ)
    env.setdefault("PANICD_DEVICE_KEYS_FILE", str(DEMO_KEYS))
    config = load_config(config_path, env)
    var = config.database.parent
    for stale in (config.database, Path(f"{config.database}-wal"), Path(f"{config.database}-shm")):
        stale.unlink(missing_ok=True)
    var.mkdir(parents=True, exist_ok=True)
    fleet = {
        device_id: SimDevice(device_id, key, config.devices[device_id].location)
        for device_id, key in load_keys(Path(env["PANICD_DEVICE_KEYS_FILE"])).items()
    }
    state_path = var / "counters.json"
    state_path.unlink(missing_ok=True)
    state = CounterState(state_path)
    source = config.mqtt[0]
    broker_dir = var / "broker"
    shutil.rmtree(broker_dir, ignore_errors=True)

    _say(f"Starting Mosquitto on {source.host}:{source.port} with config/mosquitto.conf")
    with Mosquitto(broker_dir, port=source.port) as broker, tempfile.TemporaryDirectory() as tmp:
        notify_path = Path(tmp) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            env["NOTIFY_SOCKET"] = str(notify_path)
            _say("Starting panicd (logs below are the daemon's own)")
            daemon = subprocess.Popen(  # noqa: S603 -- our own daemon
                [sys.executable, "-m", "gateway.daemon", "--config", str(config_path),
                 "--log-format", "console"],
                env=env,
            )
            try:
                if not wait_ready(notify, daemon, 30):
                    print("panic-sim demo: panicd did not become ready", file=sys.stderr)
                    return 1
                asyncio.run(_scenario(broker.host, broker.port, fleet, state))
                asyncio.run(_respond(config.database))
                _say("The operator resolves the GPS incident from the shell")
                _panicctl("resolve", "3", "--note", "petugas patroli sudah di lokasi",
                          "--by", "operator-112")
                time.sleep(0.5)
            finally:
                if daemon.poll() is None:
                    daemon.send_signal(signal.SIGTERM)
                code = daemon.wait(timeout=30)
    _say(f"panicd stopped with exit code {code}")
    _say("panicctl incidents")
    _panicctl("incidents")
    _say("panicctl show 1")
    _panicctl("show", "1")
    _say("panicctl dead-letters")
    _panicctl("dead-letters")
    problems = _check(config.database)
    if code != 0:
        problems.append(f"panicd exited with {code}")
    if problems:
        _say("DEMO FAILED")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    _say("Demo OK: every press stored once, duplicates merged, bad frames dead-lettered")
    return 0
