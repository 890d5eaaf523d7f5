"""Restart → first overdue escalation step: how long a city waits after panicd comes back.

Everything runs on loopback and stops by itself. One run:

1. a private Mosquitto, the recording proxy of ``bench.dispatch`` answering as Twilio
   (``--peer self``, so the figure is panicd's own), and the real ``panicd`` with Twilio
   credentials and a policy whose level 1 waits ``--wait`` seconds before level 2;
2. one signed panic press; once level 1's SMS is recorded, panicd is killed (SIGKILL);
3. once level 2 is overdue, panicd is started again; the figure is the time from that
   process start to the first request that reaches the provider (level 2's SMS), split
   into process start → READY=1 and READY → request.

Issue 12 asks for process start → first overdue step's request ≤ 1.0 s. The last line of
output is one JSON object with the medians over ``--runs`` and the worst run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import Panicd, add_run_options, repeated_runs
from bench.dispatch import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    FROM_NUMBER,
    RESPONDERS_TOML,
    RecordingProxy,
    wait_dispatched,
)
from bench.stores import BenchStore
from firmware_sim.broker import Mosquitto, free_port
from firmware_sim.button import press
from firmware_sim.fleet import write_fleet
from gateway.model import PressKind


def policies_toml(wait_s: int) -> str:
    """Level 1 waits ``wait_s`` before level 2 pages the same operator again."""
    return f"""\
[command_centre]
name = "Madiun Siaga 112"
people = ["siaga-1"]

[operations]
levels = [{{ people = ["siaga-1"], channels = ["sms"], wait_s = 600 }}]

[[policies]]
id = "kota"
city = true
levels = [
  {{ people = ["siaga-1"], channels = ["sms"], wait_s = {wait_s} }},
  {{ people = ["siaga-1"], channels = ["sms"], wait_s = 3600 }},
]
"""


@dataclass(frozen=True, slots=True)
class RestartFigures:
    """One restart's timings, milliseconds from the new process's start."""

    start_to_ready_ms: float
    ready_to_request_ms: float
    start_to_request_ms: float
    overdue_by_ms: float


def _wait_for(database: Path, expected: int, timeout_s: float) -> None:
    """Until ``expected`` alert pages left the outbox (bench.dispatch's own poll)."""
    store = BenchStore("sqlite", f"sqlite:///{database}", database)
    if wait_dispatched(store, expected, timeout_s) < expected:
        raise RuntimeError(f"fewer than {expected} alert pages sent in {timeout_s} s")


def one_run(args: argparse.Namespace, workdir: Path) -> RestartFigures:
    """Kill panicd between two levels, restart it, time the overdue level's request."""
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(workdir / "broker"))
        proxy = stack.enter_context(RecordingProxy(None, workdir))
        cfg = workdir / "cfg"
        cfg.mkdir()
        (cfg / "responders.toml").write_text(RESPONDERS_TOML, encoding="utf-8")
        (cfg / "policies.toml").write_text(policies_toml(args.wait), encoding="utf-8")
        listen = free_port()
        dispatch_toml = (
            f'\n[dispatch]\npublic_base_url = "http://127.0.0.1:{listen}"\n'
            f'listen_port = {listen}\ncontrol_socket = "{cfg}/control.sock"\n'
            f'from_number = "{FROM_NUMBER}"\ntwilio_base_url = "{proxy.url}"\n' + args.extra_toml
        )
        config, keys, devices = write_fleet(cfg, devices=1, mqtt_port=broker.port,
                                            client_id="panicd-bench-restart",
                                            extra_toml=dispatch_toml)
        database = cfg / "panicd.sqlite3"
        env = {"PANICD_ACK_SECRET": "bench-ack-secret",
               "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
        first = Panicd(config, keys, workdir / "run1", args.log_level, extra_env=env)
        with first:
            first.wait_ready(args.timeout)
            asyncio.run(press(broker.host, broker.port, devices[0], PressKind.PANIC, 1000))
            _wait_for(database, 1, args.timeout)
            assert first.process is not None
            first.process.kill()
            first.process.wait()
        overdue_at = _count_due(database)
        # Let level 2 fall due, plus a margin, with panicd down.
        time.sleep(max(0.0, overdue_at - time.time()) + args.overdue)
        second = Panicd(config, keys, workdir / "run2", args.log_level, extra_env=env)
        started = time.time()
        with second:
            second.wait_ready(args.timeout)
            ready = time.time()
            _wait_for(database, 2, args.timeout)
        records = proxy.records()
        after = sorted(arrived for arrived, _answered, _status, path, _body in records
                       if arrived >= started and path.endswith("/Messages.json"))
        if not after:
            raise RuntimeError("no provider request after the restart")
        if args.keep_log:
            args.keep_log.write_bytes(second.log_path.read_bytes())
    return RestartFigures(
        start_to_ready_ms=round((ready - started) * 1000, 1),
        ready_to_request_ms=round((after[0] - ready) * 1000, 1),
        start_to_request_ms=round((after[0] - started) * 1000, 1),
        overdue_by_ms=round((started - overdue_at) * 1000, 1),
    )


def _count_due(database: Path) -> float:
    """When the next pending escalation step falls due (wall clock)."""
    uri = f"{database.resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        row = conn.execute(
            "SELECT MIN(due_at) FROM escalation_steps WHERE state = 'pending'"
        ).fetchone()
    if row is None or row[0] is None:
        raise RuntimeError("no pending escalation step after level 1")
    return float(row[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print one JSON line of figures last."""
    parser = argparse.ArgumentParser(prog="python -m bench.restart",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=int, default=2,
                        help="level 1's wait before level 2, seconds (%(default)s)")
    parser.add_argument("--overdue", type=float, default=0.5,
                        help="how long level 2 is overdue when panicd starts (%(default)s)")
    add_run_options(
        parser, timeout_s=60.0, timeout_help="bound on each wait",
        extra_toml_help="appended to [dispatch]",
        profile_help="unused (start-up is too short to sample)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.wait < 1:
        parser.error("--runs and --wait must be positive")
    summary, runs = repeated_runs(
        args.runs, "panicd-bench-restart-", lambda tmp: one_run(args, tmp)
    )
    print(json.dumps({
        "benchmark": "restart",
        "runs": args.runs,
        "start_to_request_ms": summary["start_to_request_ms"],
        "start_to_ready_ms": summary["start_to_ready_ms"],
        "ready_to_request_ms": summary["ready_to_request_ms"],
        "worst_start_to_request_ms": max(r["start_to_request_ms"] for r in runs),
        "goal_ms": 1000.0,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
