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
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import aiomqtt

from dispatch.messages import build_alert_twiml, build_voice_message
from firmware_sim import button
from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import CounterState, SimDevice, load_keys
from gateway.config import load_config
from gateway.model import GeoFix, PressKind
from gateway.verify import REPLAY_WINDOW

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "config" / "demo" / "panicd.toml"
DEMO_KEYS = REPO / "config" / "demo" / "device-keys.toml"


_OUT = threading.Lock()  # the daemon's echoed lines and the demo's own never mix mid-line

# Seconds the demo waits for what a scene should make the daemon do before it fails.
SCENE_TIMEOUT_S = 15.0
# config/demo/policies.toml: kel-mojorejo's first level waits this long for an answer.
MOJOREJO_WAIT_S = 6
MOJOREJO_SECOND_LEVEL = 1  # escalation_steps.level counts from 0
_PAGE_EVENTS = ("sms.sent", "call.placed")


def _print(text: str) -> None:
    with _OUT:
        print(text, flush=True)


def _say(text: str) -> None:
    _print(f"\n=== {text}")


class DemoError(RuntimeError):
    """Something the demo waited for never happened: the demo fails (exit 1)."""


# A console log line: "2026-…Z [info     ] sms.sent   incident=1 to=… purpose=alert …"
_LOG_LINE = re.compile(r"^(?P<at>\S+) \[(?P<level>\w+)\s*\] (?P<event>\S+)(?P<fields>.*)$")


class DaemonLog:
    """The daemon's output, echoed line by line, which scenes wait on before moving on.

    The daemon logs and pages asynchronously; waiting for a scene's own events (each
    bounded by a deadline) keeps them under that scene's heading.
    """

    def __init__(self, stream: IO[bytes], timeout_s: float = SCENE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lines: list[tuple[str, str, str]] = []  # (timestamp, event, fields)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(stream,),
                                        name="demo-daemon-log", daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            _print(line)
            if (match := _LOG_LINE.match(line)) is not None:
                with self._changed:
                    self._lines.append((match["at"], match["event"], f"{match['fields']} "))
                    self._changed.notify_all()

    def quiet(self, quiet_s: float, max_s: float) -> None:
        """Wait (at most ``max_s``) until the daemon has logged nothing for ``quiet_s``:
        its start-up work (the day's operations summary, when one is due) has no single
        event to wait for, and its lines belong before the first scene."""
        deadline = time.monotonic() + max_s
        with self._changed:
            seen = len(self._lines)
            while (left := deadline - time.monotonic()) > 0:
                self._changed.wait(min(quiet_s, left))
                if len(self._lines) == seen:
                    return
                seen = len(self._lines)

    def join(self, timeout_s: float) -> None:
        """Wait for the daemon's last lines once it has exited."""
        self._reader.join(timeout_s)

    def _matching(self, events: tuple[str, ...], fields: Mapping[str, object]
                  ) -> list[tuple[str, str]]:
        wanted = [f" {key}={value} " for key, value in fields.items()]
        return [(at, rest) for at, event, rest in self._lines
                if event in events and all(w in rest for w in wanted)]

    def wait(self, events: tuple[str, ...], fields: Mapping[str, object], count: int = 1
             ) -> list[tuple[str, str]]:
        """Wait until ``count`` lines of one of ``events`` carry every ``key=value`` of
        ``fields``; return (timestamp, fields) of those seen, or raise DemoError at the
        deadline."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: len(self._matching(events, fields)) >= count, self.timeout_s
            ):
                found = len(self._matching(events, fields))
                raise DemoError(f"waited {self.timeout_s:.0f} s for {count} x "
                                f"{'|'.join(events)} {dict(fields)}, saw {found}")
            return self._matching(events, fields)

    def wait_pages(self, incident: int, level: int) -> str:
        """Wait for the step of ``level`` and for every page sent so far for ``incident``;
        return the step's timestamp."""
        at, _ = self.wait(("escalation.step_due",), {"incident": incident, "level": level})[0]
        with self._changed:
            steps = self._matching(("escalation.step_due",), {"incident": incident})
        messages = sum(int(m[1]) for _, rest in steps
                       if (m := re.search(r" messages=(\d+) ", rest)) is not None)
        self.wait(_PAGE_EVENTS, {"incident": incident, "purpose": "alert"}, messages)
        return at


@dataclass(frozen=True, slots=True)
class Stage:
    """What every scene plays on: the broker, the fleet, the daemon's log and database."""

    host: str
    port: int
    fleet: dict[str, SimDevice]
    state: CounterState
    log: DaemonLog
    database: Path
    base_url: str


async def _logged(log: DaemonLog, *events: str, count: int = 1, **fields: object) -> None:
    await asyncio.to_thread(log.wait, events, fields, count)


async def _paged(log: DaemonLog, incident: int, level: int) -> str:
    return await asyncio.to_thread(log.wait_pages, incident, level)


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


async def _scenario(stage: Stage) -> None:
    host, port, fleet, state, log = stage.host, stage.port, stage.fleet, stage.state, stage.log

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
    ) -> dict[str, Any] | None:
        sent, feedback = await button.press(
            host, port, fleet[device_id], kind,
            state.next(device_id) if counter is None else counter,
            battery=battery, gps=gps, via_gateway=via_gateway, tamper=tamper, repeat=repeat,
            feedback_timeout_s=3.0,
        )
        shown = feedback or "no feedback (rejected or lost)"
        _print(f"--> {device_id} {kind.value} ctr={sent.counter}: {note}\n    feedback: {shown}")
        return feedback

    _say("A resident in Oro-oro Ombo presses the panic button")
    await press("MDN-OOO-0001", PressKind.PANIC, note="opens an incident")
    last = state.next("MDN-OOO-0001") - 1
    await press("MDN-OOO-0001", PressKind.PANIC, counter=last, repeat=2,
                note="the button retransmits: same press, not a new one")
    await press("MDN-OOO-0001", PressKind.PANIC, counter=last, via_gateway="gw-balaikota",
                note="also heard through the Balai Kota relay: one press, two paths")
    await press("MDN-OOO-0001", PressKind.PANIC, note="pressed again: attached to the incident")
    await press("MDN-OOO-0001", PressKind.PANIC, note="third press: the incident turns urgent")
    await _paged(log, 1, 2)  # urgent: level 2 is paged at once, not after level 1's wait

    _say("Pangongangan: a press, then a cancel within the grace window")
    await press("MDN-PGA-0001", PressKind.PANIC, note="opens an incident")
    await _paged(log, 2, 1)
    await press("MDN-PGA-0001", PressKind.CANCEL, note="cancels it (within 120 s)")
    await _logged(log, "sms.sent", incident=2, purpose="cancelled")

    _say("A carried button with GPS, a test press, and a heartbeat with a weak battery")
    await press("MDN-MOB-0001", PressKind.PANIC, gps=GeoFix(-7.65557, 111.51877, 8),
                note="located by its GPS fix (Josenan)")
    await press("MDN-TMN-0001", PressKind.TEST, note="a TES incident, for operations only")
    await press("MDN-KLN-0001", PressKind.HEARTBEAT, battery=15, note="device health only")
    await _paged(log, 3, 1)
    await _paged(log, 4, 1)
    await _logged(log, "press.accepted", device="MDN-KLN-0001", kind="heartbeat")

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
    _print("--> an unregistered device and a garbage frame were published")
    for reason in ("unknown_device", "bad_encoding", "bad_json"):
        await _logged(log, "press.rejected", reason=reason)
    state.save()


async def _respond(stage: Stage) -> None:
    """A responder opens the link from their SMS and presses "Saya tangani"."""
    database, log = stage.database, stage.log
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
        raise DemoError(f"no ack link in the SMS: {body!r}")
    async with aiohttp.ClientSession() as session:
        async with session.get(link.group(0)) as page:
            _print(f"--> GET {link.group(0)} -> {page.status}")
        async with session.post(link.group(0)) as page:
            text = await page.text()
            _print(f"--> POST (Saya tangani) -> {page.status}: "
                   f"{'acknowledged' if 'tercatat menangani' in text else text[:120]}")
    await _logged(log, "incident.acknowledged", incident=1, via="link")
    # Everyone paged before the ack hears who took it: level 2's lurah and staf.
    await _logged(log, "sms.sent", count=2, incident=1, purpose="handled")


def _voice_row(database: Path, incident: int) -> tuple[int, str, str, str, str, bool]:
    """The first call of ``incident``: (outbox id, sid, kelurahan, landmark, address, test)."""
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT o.id, o.provider_sid, i.kelurahan, i.landmark, i.address, i.test"
            " FROM outbox o JOIN incidents i ON i.id = o.incident_id"
            " WHERE o.incident_id = ? AND o.channel = 'voice' ORDER BY o.id LIMIT 1",
            (incident,),
        ).fetchone()
    finally:
        conn.close()
    if row is None:
        raise DemoError(f"no call was placed for incident {incident}")
    return row[0], row[1] or "", row[2] or "", row[3] or "", row[4] or "", bool(row[5])


async def _unanswered(stage: Stage) -> None:
    """Nobody answers in Mojorejo: what the call says, and the next level at its due time."""
    state, log, database, base_url = stage.state, stage.log, stage.database, stage.base_url
    _say(f"Mojorejo: nobody answers, so level 2 is paged when level 1's {MOJOREJO_WAIT_S} s "
         "wait runs out (config/demo/policies.toml)")
    sent, feedback = await button.press(stage.host, stage.port, stage.fleet["MDN-MJR-0001"],
                                        PressKind.PANIC, state.next("MDN-MJR-0001"),
                                        feedback_timeout_s=3.0)
    state.save()
    if feedback is None or "incident" not in feedback:
        raise DemoError(f"no incident opened for the Mojorejo press: {feedback}")
    incident = int(feedback["incident"])
    _print(f"--> MDN-MJR-0001 panic ctr={sent.counter}: opens incident {incident}")
    first = await _paged(log, incident, 1)

    outbox_id, sid, kelurahan, landmark, address, test = _voice_row(database, incident)
    script = f"{base_url}/twilio/voice/{outbox_id}"
    _say(f"What the call to the Mojorejo volunteer says ({script})")
    async with aiohttp.ClientSession() as session:
        form = {"CallSid": sid, "AnsweredBy": "human"}
        async with session.post(script, data=form) as answer:
            _print(f"--> POST {script} without a Twilio signature -> {answer.status}: "
                   f"{(await answer.text()).strip()}")
        async with session.post(f"{base_url}/twilio/gather/{outbox_id}",
                                data={**form, "Digits": "1"}) as answer:
            _print(f"--> POST .../twilio/gather/{outbox_id} Digits=1 without a signature -> "
                   f"{answer.status}: a forged key press acks nothing")
    # The demo runs the console channel: panicd has no Twilio auth token, so it refuses
    # every webhook and the demo cannot play Twilio. This is the script as dispatch/web.py's
    # voice handler builds it for this row (same builders, same arguments).
    twiml = build_alert_twiml(
        message=build_voice_message(
            incident_code=str(incident), kelurahan=kelurahan or "di luar Kota Madiun",
            place=", ".join(p for p in (landmark, address) if p) or "-", test=test,
        ),
        action_url=f"{base_url}/twilio/gather/{outbox_id}",
        repeat_url=f"{base_url}/twilio/voice/{outbox_id}?repeat=1",
    )
    _print("--> without a Twilio auth token panicd serves no script, so here is the TwiML "
           f"dispatch/messages.py builds for call {outbox_id}, as Twilio would get it:")
    _print("    " + twiml.replace("><", ">\n    <"))

    _say(f"Still nobody has answered incident {incident}: waiting for level 2")
    second = await asyncio.to_thread(log.wait_pages, incident, 2)
    waited = datetime.fromisoformat(second) - datetime.fromisoformat(first)
    _print(f"--> level 2 paged {waited.total_seconds():.1f} s after level 1 "
           f"(policy wait {MOJOREJO_WAIT_S} s)")


async def _story(stage: Stage) -> None:
    """Every scene in order, each waiting for its own events before the next heading."""
    await _logged(stage.log, "daemon.ready")
    await asyncio.to_thread(stage.log.quiet, 0.3, 3.0)
    await _scenario(stage)
    await _respond(stage)
    await _unanswered(stage)
    _say("The operator resolves the GPS incident from the shell")
    await asyncio.to_thread(_panicctl, "resolve", "3", "--note",
                            "petugas patroli sudah di lokasi", "--by", "operator-112")
    await _logged(stage.log, "sms.sent", incident=3, purpose="resolved")


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
        # Mojorejo's second step: fired by its due time alone (fired_at - due_at: how late).
        timed_out = conn.execute(
            "SELECT s.fired_at - s.due_at FROM escalation_steps s"
            " JOIN incidents i ON i.id = s.incident_id"
            " WHERE i.device_id = 'MDN-MJR-0001' AND s.level = ? AND s.state = 'fired'",
            (MOJOREJO_SECOND_LEVEL,),
        ).fetchone()
    finally:
        conn.close()
    expect: list[tuple[str, Callable[[tuple[object, ...]], bool]]] = [
        ("MDN-OOO-0001", lambda r: r[1] == "acknowledged" and r[3] == 1 and r[4] == 3
         and r[5] == "Oro-oro Ombo"),
        ("MDN-PGA-0001", lambda r: r[1] == "cancelled" and r[5] == "Pangongangan"),
        ("MDN-MOB-0001", lambda r: r[1] == "resolved" and r[5] == "Josenan"
         and r[6] == "gps"),
        ("MDN-TMN-0001", lambda r: r[2] == 1 and r[5] == "Taman"),
        ("MDN-MJR-0001", lambda r: r[1] == "open" and r[3] == 0 and r[5] == "Mojorejo"),
    ]
    by_device = {r[0]: r for r in rows}
    for device_id, ok in expect:
        row = by_device.get(device_id)
        if row is None or not ok(row):
            problems.append(f"incident for {device_id} not as expected: {row}")
    if len(rows) != len(expect):
        problems.append(f"expected {len(expect)} incidents, found {len(rows)}")
    if timed_out is None:
        problems.append("Mojorejo's second level never fired after the first level's wait")
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
        [sys.executable, "-m", "panicd.cli", "--config", str(DEMO_CONFIG), *args], check=False
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo end to end; returns 0 when everything behaved."""
    config_path: Path = args.config
    env = dict(os.environ)
    env.setdefault("PANICD_DEVICE_KEYS_FILE", str(DEMO_KEYS))
    config = load_config(config_path, env)
    if config.dispatch is None:
        print(f"panic-sim demo: {config_path} has no [dispatch] table to page with",
              file=sys.stderr)
        return 2
    base_url = config.dispatch.public_base_url
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
            # PYTHONUNBUFFERED: the daemon's lines reach the demo (and the screen) as written.
            daemon = subprocess.Popen(  # noqa: S603 -- our own daemon
                [sys.executable, "-m", "panicd.daemon", "--config", str(config_path),
                 "--log-format", "console"],
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert daemon.stdout is not None  # stdout=PIPE above
            log = DaemonLog(daemon.stdout)
            failure: str | None = None
            try:
                if not wait_ready(notify, daemon, 30):
                    print("panic-sim demo: panicd did not become ready", file=sys.stderr)
                    return 1
                asyncio.run(_story(Stage(broker.host, broker.port, fleet, state, log,
                                         config.database, base_url)))
            except DemoError as exc:
                failure = str(exc)
            finally:
                if daemon.poll() is None:
                    daemon.send_signal(signal.SIGTERM)
                code = daemon.wait(timeout=30)
                log.join(5)
    _say(f"panicd stopped with exit code {code}")
    return _report(config.database, code, failure)


def _report(database: Path, code: int, failure: str | None) -> int:
    """Show what panicctl sees, then check it; 0 when everything behaved."""
    _say("panicctl incidents")
    _panicctl("incidents")
    _say("panicctl show 1")
    _panicctl("show", "1")
    _say("panicctl dead-letters")
    _panicctl("dead-letters")
    problems = [] if failure is None else [failure]
    problems.extend(_check(database))
    if code != 0:
        problems.append(f"panicd exited with {code}")
    if problems:
        _say("DEMO FAILED")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    _say("Demo OK: every press stored once, duplicates merged, bad frames dead-lettered, "
         "and an unanswered page escalated on time")
    return 0
