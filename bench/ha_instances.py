"""High availability, part 2: three panicd instances on one PostgreSQL, one of them
SIGKILLed and restarted every few seconds during a storm (``python -m bench.ha --kill
instances``, the default).

Issue 13 item 6. The instances share one database (a private PostgreSQL cluster unless
``--store-url`` names a server) and one Mosquitto; each keeps its own persistent MQTT
session, so every instance receives every press. 500 buttons send 5,000 signed presses
(50 of them press panic twice: 50 incidents escalating through two levels with nobody
answering, six pages each, through Prism behind a recording proxy), retransmitting until
they hear "received". Every ``--kill-every`` seconds one random instance is SIGKILLed,
left dead ``--down-s`` and started again under the same name, ``--kills`` times.

Counted afterwards in the database, at the provider and in the buttons' own record, as
tests/faults/test_instances.py asserts them: presses lost (sent, never stored), stored
twice, incidents twice for one button, steps fired twice (``escalation.step_due`` in
every run's journal), pages sent twice for one outbox row (accepted creates per status
callback), apart from those in the documented window between the provider's accept and
its record (a row that went in doubt), and per kill the longest a step due in the 5 s
after it waited past its due time (``failover_s``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Panicd, percentile
from bench.dispatch import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, RecordingProxy, prism
from bench.stores import Reader, Stores
from firmware_sim.broker import Mosquitto, free_port
from firmware_sim.fleet import instance_configs, write_fleet
from firmware_sim.storm import PanicAndHeartbeats

RESPONDERS_TOML = """
people = [
  { id = "ani", name = "Ani Rahayu", phone = "+628120001001", role = "linmas" },
  { id = "budi", name = "Budi Santoso", phone = "+628120001002", role = "linmas" },
  { id = "dewi", name = "Dewi Siaga", phone = "+628120009901", role = "siaga112" },
]
"""
# Level 1 (two people, SMS and voice: four pages) waits level_wait_s; level 2 the command
# centre (SMS and voice: two): six pages per incident, nobody answering.
POLICIES_TOML = """
[command_centre]
name = "Madiun Siaga 112"
people = ["dewi"]

[operations]
levels = [{{ people = ["dewi"], channels = ["sms"], wait_s = 600 }}]

[[policies]]
id = "kota"
city = true
levels = [
  {{ people = ["ani", "budi"], channels = ["sms", "voice"], wait_s = {wait} }},
  {{ people = ["dewi"], channels = ["sms", "voice"], wait_s = 600 }},
]
"""
# How long after a kill a step's due time may fall and still count for that kill.
FAILOVER_WINDOW_S = 5.0
CLIENT_ID = "panicd-bench-ha"


@dataclass(slots=True)
class Instance:
    """One instance of the set: its config and every run of it (one per restart)."""

    name: str
    config: Path
    runs: list[Panicd]


def step_failover(kills: Sequence[float], steps: Sequence[tuple[Any, ...]]) -> list[float]:
    """Per kill with a step due in the window after it: the longest such a step waited
    past its due time before some instance fired it."""
    figures = []
    for at in kills:
        waits = [float(fired) - float(due) for due, fired in steps
                 if at <= float(due) < at + FAILOVER_WINDOW_S]
        if waits:
            figures.append(max(waits))
    return figures


def journal_events(run: Panicd, name: str) -> list[dict[str, Any]]:
    """The JSON journal lines of one run named ``name``."""
    found = []
    for line in run.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if f'"{name}"' not in line:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def accepted_per_callback(records: Sequence[tuple[float, float, int, str, str]]) -> dict[str, int]:
    """Creates the provider accepted (2xx), by the StatusCallback they carried."""
    counts: dict[str, int] = {}
    for _arrived, _answered, status, path, body in records:
        if not 200 <= status < 300 or not path.endswith(("/Messages.json", "/Calls.json")):
            continue
        callback = urllib.parse.parse_qs(body).get("StatusCallback", [""])[0]
        counts[callback] = counts.get(callback, 0) + 1
    return counts


def keep_logs(instance: Instance, directory: Path | None) -> None:
    """Copy every run's journal of ``instance`` into ``directory`` (``--keep-log``)."""
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for k, run in enumerate(instance.runs):
        shutil.copyfile(run.log_path, directory / f"{instance.name}-run{k}.log")


def run_instances(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:  # noqa: PLR0915 -- one scenario, read top to bottom
    """The storm with instance kills; the figures of issue 13 item 6."""
    chance = random.Random(args.seed)
    env = {"PANICD_ACK_SECRET": "bench-ha-ack-link-key-" + "5" * 32,
           "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
    with contextlib.ExitStack() as stack:
        stores = stack.enter_context(Stores(args.store_url))
        store = stack.enter_context(stores.fresh("postgresql", workdir))
        broker = stack.enter_context(Mosquitto(workdir / "broker"))
        proxy = stack.enter_context(RecordingProxy(
            stack.enter_context(prism(workdir, args.timeout)), workdir))
        cfg = workdir / "cfg"
        cfg.mkdir()
        (cfg / "responders.toml").write_text(RESPONDERS_TOML, encoding="utf-8")
        (cfg / "policies.toml").write_text(POLICIES_TOML.format(wait=args.level_wait_s),
                                           encoding="utf-8")
        listen = free_port()
        dispatch_toml = (
            '\n[dispatch]\nresponders = "responders.toml"\npolicies = "policies.toml"\n'
            f'public_base_url = "http://127.0.0.1:{listen}"\nlisten_host = "127.0.0.1"\n'
            f'listen_port = {listen}\ncontrol_socket = "{cfg}/control.sock"\n'
            f'from_number = "{FROM_NUMBER}"\ntwilio_base_url = "{proxy.url}"\n'
        )
        config, keys, devices = write_fleet(
            cfg, devices=args.devices, mqtt_port=broker.port, client_id=CLIENT_ID,
            store_url=store.url, extra_toml=dispatch_toml)
        instances = [Instance(f"i{k}", path, [])
                     for k, path in enumerate(instance_configs(config, args.instances, CLIENT_ID))]

        def start(instance: Instance) -> None:
            run = Panicd(instance.config, keys, workdir / f"{instance.name}-run"
                         f"{len(instance.runs)}", args.log_level, extra_env=env)
            instance.runs.append(run)
            run.__enter__()
            run.wait_ready(args.timeout)

        try:
            for instance in instances:
                start(instance)
            buttons = PanicAndHeartbeats(
                broker.host, broker.port, devices[:args.panic_buttons],
                devices[args.panic_buttons:], presses=args.presses, rate=args.rate,
                feedback_grace_s=args.grace, client_id=CLIENT_ID)
            kills: list[float] = []
            started = time.monotonic()
            buttons.start()
            for n in range(1, args.kills + 1):
                time.sleep(max(0.0, started + n * args.kill_every - time.monotonic()))
                victim = instances[chance.randrange(len(instances))]
                process = victim.runs[-1].process
                assert process is not None
                process.kill()
                process.wait()
                kills.append(time.time())
                print(f"{time.monotonic() - started:6.1f}s kill {n}: {victim.name}"
                      f" (run {len(victim.runs) - 1}) SIGKILLed", file=sys.stderr, flush=True)
                time.sleep(args.down_s)
                start(victim)
            buttons.join(args.timeout + args.grace)
            reader = stack.enter_context(Reader(store, args.timeout))
            deadline = time.monotonic() + args.grace
            while (reader.scalar("SELECT COUNT(*) FROM escalation_steps WHERE state ="
                                 " 'pending' AND due_at < ?", (time.time() + 60,))
                   or reader.scalar("SELECT COUNT(*) FROM outbox WHERE state IN"
                                    " ('pending', 'sending') AND due_at < ?",
                                    (time.time() + 60,))) and time.monotonic() < deadline:
                time.sleep(0.2)
            duration_s = time.monotonic() - started
            for instance in instances:
                instance.runs[-1].__exit__(None, None, None)
            records = proxy.records()
            stored = reader.rows("SELECT device_id, counter, COUNT(*) FROM presses"
                                 " GROUP BY device_id, counter")
            incidents = reader.rows("SELECT device_id, COUNT(*) FROM incidents"
                                    " GROUP BY device_id")
            alerts = reader.rows("SELECT id, channel, in_doubt_since FROM outbox"
                                 " WHERE purpose = 'alert'")
            steps = reader.rows("SELECT due_at, fired_at FROM escalation_steps"
                                " WHERE state = 'fired'")
        finally:
            for instance in instances:
                for run in instance.runs:
                    run.__exit__(None, None, None)
                keep_logs(instance, args.keep_log)
    results = buttons.results
    sent = {**results["panic"].sent, **results["heartbeat"].sent}
    feedback = {**results["panic"].feedback, **results["heartbeat"].feedback}
    stored_keys = {(str(d), int(c)) for d, c, _ in stored}
    accepted = accepted_per_callback(records)
    public = f"http://127.0.0.1:{listen}"

    def callback(outbox_id: object, channel: object) -> str:
        return f"{public}/twilio/status/{'sms' if channel == 'sms' else 'call'}/{outbox_id}"

    twice = [doubt for i, ch, doubt in alerts if accepted.get(callback(i, ch), 0) > 1]
    fired: dict[tuple[object, object], int] = {}
    for instance in instances:
        for run in instance.runs:
            for entry in journal_events(run, "escalation.step_due"):
                if entry.get("incident") is not None:
                    key = (entry["incident"], entry["level"])
                    fired[key] = fired.get(key, 0) + 1
    failover = step_failover(kills, steps)
    return {
        "mode": "instances", "instances": len(instances), "kills": len(kills),
        "presses": len(sent), "stored": len(stored),
        "lost": len(set(sent) - stored_keys),
        "stored_twice": sum(1 for *_, n in stored if int(n) > 1),
        "unconfirmed": len(set(sent) - set(feedback)),
        "retransmissions": sum(r.retransmissions for r in results.values()),
        "incidents": sum(int(n) for _, n in incidents),
        "incidents_twice": sum(1 for _, n in incidents if int(n) > 1),
        "steps": len(steps), "steps_fired_twice": sum(1 for n in fired.values() if n > 1),
        "pages": len(alerts),
        "pages_twice": sum(1 for doubt in twice if doubt is None),
        "pages_twice_in_window": sum(1 for doubt in twice if doubt is not None),
        "pages_in_doubt": sum(1 for *_, doubt in alerts if doubt is not None),
        "pages_never": sum(1 for i, ch, _ in alerts if callback(i, ch) not in accepted),
        "failover_s_max": round(max(failover), 3) if failover else None,
        "failover_s_p50": round(percentile(sorted(failover), 0.5), 3) if failover else None,
        "failover_kills": len(failover),
        "duration_s": round(duration_s, 1),
    }


def add_options(parser: argparse.ArgumentParser) -> None:
    """The instances mode's options (bench/ha.py's parser)."""
    parser.add_argument("--instances", type=int, default=3, help="panicd instances (3)")
    parser.add_argument("--panic-buttons", type=int, default=50,
                        help="buttons pressing panic twice (50); the rest heartbeat")
    parser.add_argument("--level-wait-s", type=int, default=6,
                        help="level 1's wait before level 2 (6)")
    parser.add_argument("--store-url", default=None,
                        help="a PostgreSQL server (a fresh database per run); default: a"
                             " private cluster")


def summary(out: dict[str, Any]) -> str:
    """The figures as one human-readable paragraph (the JSON line follows)."""
    return (
        f"{out['instances']} instances on PostgreSQL, SIGKILL x{out['kills']}: presses"
        f" {out['presses']}, stored {out['stored']}, lost {out['lost']}, stored twice"
        f" {out['stored_twice']}, unconfirmed {out['unconfirmed']}, retransmissions"
        f" {out['retransmissions']}; incidents {out['incidents']}, twice"
        f" {out['incidents_twice']}; steps {out['steps']}, fired twice"
        f" {out['steps_fired_twice']}; pages {out['pages']}, twice {out['pages_twice']},"
        f" twice in the accept-record window {out['pages_twice_in_window']} (in doubt"
        f" {out['pages_in_doubt']}), never {out['pages_never']}; step failover max"
        f" {out['failover_s_max']} s, p50 {out['failover_s_p50']} s over"
        f" {out['failover_kills']} kills; {out['duration_s']} s in all"
    )


def clean(out: dict[str, Any], kills: int) -> bool:
    """Every kill made and nothing lost, unconfirmed or done twice."""
    return out["kills"] == kills and all(out[name] == 0 for name in (
        "lost", "stored_twice", "unconfirmed", "incidents_twice", "steps_fired_twice",
        "pages_twice", "pages_never"))
