"""Durable ingest throughput and publish→commit latency of the whole panicd pipeline.

Two measurements against a private Mosquitto started with the project's own config
(``firmware_sim.broker``), all on loopback:

* **Throughput.** ``--presses`` signed presses over ``--devices`` buttons are queued in
  the broker for two offline persistent sessions (QoS 1, ``clean_session`` false): a bare
  aiomqtt subscriber that only counts (paho auto-acks), and the real ``panicd``
  subprocess. Each then drains the same backlog; the time is taken from its first
  message received to its last one (baseline) or to the moment every press is committed
  (panicd, polled read-only on its database), so process start-up is not counted.
  A third session drains it too: the *durable floor* (``bench.floor``), a subscriber
  that only commits each message as one row and then acks it and sends a "received"
  message, which is the least any ack-after-commit subscriber can do.
* **Latency.** A fixed-rate storm (``--rate`` per second for ``--duration`` seconds)
  against the running panicd, timing each press from publish to the arrival of panicd's
  "received" feedback, which is published right after COMMIT: an upper bound of
  publish→commit.

The store is SQLite in the run's temp dir, or what ``--store-url`` names; ``--both`` runs
SQLite and PostgreSQL in turn (a private cluster unless ``--store-url`` names a server)
and prints them side by side with the ratio PostgreSQL/SQLite (``bench.stores``).

The last line of output is one JSON object with the figures (the median over ``--runs``;
with ``--both`` one object per backend and the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from bench.common import (
    Panicd,
    add_run_options,
    add_store_options,
    chosen_backends,
    cpu_seconds,
    labelled_runs,
    percentile,
    profiled,
    side_by_side,
)
from bench.floor import FLOOR_CLIENT_ID, drain_floor
from bench.history import fill_history
from bench.stores import Backend, BenchStore, Reader, Stores, server_cpu_s
from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import SimDevice, write_fleet
from firmware_sim.storm import storm
from gateway.formats import native

REPO = Path(__file__).resolve().parent.parent
TOPICS = ("panicd/v1/dev/+/up", "panicd/v1/gw/+/up")  # panicd's default subscription
PANICD_CLIENT_ID = "panicd-bench"
BASELINE_CLIENT_ID = "bench-bare-subscriber"
BACKLOG_COUNTER_BASE = 1_000
LATENCY_COUNTER_BASE = 10_000_000
POLL_S = 0.005


@dataclass(frozen=True, slots=True)
class RunFigures:
    """The figures of one run."""

    presses_per_s: float
    baseline_per_s: float
    ratio: float
    floor_per_s: float
    floor_ratio: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    latency_sent: int
    latency_feedback: int
    rss_mb: float
    load_per_s: float
    feedback_lag_s: float
    inbound_p50_ms: float
    inbound_p99_ms: float
    commit_fb_p50_ms: float
    commit_fb_p99_ms: float
    drain_cpu: float
    drain_store_cpu: float
    storm_cpu: float
    storm_broker_cpu: float
    storm_bench_cpu: float


@dataclass(frozen=True, slots=True)
class Latency:
    """Per-press latencies of the storm (each list sorted, ms)."""

    sent: int
    total_ms: list[float]
    inbound_ms: list[float]
    after_receive_ms: list[float]


async def park_session(host: str, port: int, client_id: str) -> None:
    """Create a persistent QoS 1 session for ``client_id`` and leave it offline."""
    async with aiomqtt.Client(host, port, identifier=client_id, clean_session=False) as client:
        for topic in TOPICS:
            await client.subscribe(topic, qos=1)


async def drain_bare(host: str, port: int, expected: int, timeout_s: float) -> float:
    """Reconnect the baseline session and count its backlog; seconds first→last message."""
    first = last = 0.0
    seen = 0
    async with aiomqtt.Client(host, port, identifier=BASELINE_CLIENT_ID,
                              clean_session=False) as client, asyncio.timeout(timeout_s):
        async for _message in client.messages:
            last = time.time()
            if seen == 0:
                first = last
            seen += 1
            if seen >= expected:
                break
    return last - first


def broker_pid(broker: Mosquitto) -> int:
    """The pid of our private Mosquitto, found by its config file on the command line."""
    conf = str(broker.workdir / "mosquitto.conf").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if conf in (entry / "cmdline").read_bytes().split(b"\0"):
                    return int(entry.name)
    raise RuntimeError("cannot find the broker process")


def wait_committed(
    store: BenchStore, expected: int, timeout_s: float, history: int = 0
) -> tuple[float, float]:
    """Poll the database read-only until ``expected`` presses past ``history`` are stored.

    Returns (first press received_at, time the last press was seen committed).
    """
    deadline = time.monotonic() + timeout_s
    with store.reader(timeout_s) as reader:
        while time.monotonic() < deadline:
            try:
                count = int(reader.scalar("SELECT COUNT(*) FROM presses WHERE id > ?",
                                          (history,)))
            except LookupError:  # schema not created yet
                count = 0
            if count >= expected:
                done = time.time()
                first = float(reader.scalar("SELECT MIN(received_at) FROM presses WHERE id > ?",
                                            (history,)))
                return first, done
            time.sleep(POLL_S)
    raise RuntimeError(f"panicd stored fewer than {expected} presses in {timeout_s}s")


async def wait_feedback_quiet(host: str, port: int, quiet_s: float, timeout_s: float) -> float:
    """Wait until panicd's feedback stream is quiet for ``quiet_s``; when did the last arrive.

    panicd publishes one QoS 1 feedback per stored press; after a backlog those queue in
    its client, and a latency storm started too early would wait behind them.
    """
    last = time.time()
    async with aiomqtt.Client(host, port, identifier="bench-feedback-quiet",
                              clean_session=True) as client:
        await client.subscribe(f"{native.TOPIC_PREFIX}dev/+/cmd", qos=1)
        async with asyncio.timeout(timeout_s):
            messages = aiter(client.messages)
            while True:
                try:
                    async with asyncio.timeout(quiet_s):
                        await anext(messages)
                except TimeoutError:
                    return last
                last = time.time()


def one_run(
    args: argparse.Namespace, workdir: Path, stores: Stores, backend: Backend
) -> RunFigures:
    """A fresh store of ``backend``, then :func:`measure` on it."""
    with stores.fresh(backend, workdir) as store:
        return measure(args, workdir, store, stores)


def add_history(store: BenchStore, presses: int) -> None:
    """Fill the (SQLite) store with ``presses`` past presses before panicd starts."""
    if store.sqlite_path is None:  # main() refuses --history with PostgreSQL
        raise ValueError("--history fills a SQLite database only")
    took = fill_history(store.sqlite_path, presses)
    # A real history is long on disk; without this the kernel writes the fresh
    # hundreds of MB back during the run and panicd's fsyncs queue behind them.
    os.sync()
    print(f"history: {presses} past presses stored in {took:.1f}s", file=sys.stderr)


def panicd_process(args: argparse.Namespace, config: Path, keys: Path, workdir: Path) -> Panicd:
    """The panicd subprocess of a run (not started yet)."""
    panicd = Panicd(config, keys, workdir / "run", args.log_level)
    if args.switch_interval_ms is not None:
        # Informative only: how much the GIL hand-off between the event loop and
        # aiosqlite's thread (default 5 ms) costs the pipeline.
        panicd.launcher = [
            "-c",
            f"import runpy, sys; sys.setswitchinterval({args.switch_interval_ms / 1000!r}); "
            "sys.argv[0] = 'panicd'; runpy.run_module('panicd.daemon', run_name='__main__')",
        ]
    return panicd


def measure(
    args: argparse.Namespace, workdir: Path, store: BenchStore, stores: Stores
) -> RunFigures:
    """Broker, backlog, both drains, then the latency storm; one set of figures."""
    with Mosquitto(workdir / "broker") as broker:
        config, keys, devices = write_fleet(
            workdir / "cfg", devices=args.devices, mqtt_port=broker.port,
            client_id=PANICD_CLIENT_ID, extra_toml=args.extra_toml,
            database=store.sqlite_path,
            store_url=None if store.sqlite_path is not None else store.url,
        )
        if args.history:
            add_history(store, args.history)
        for client_id in (BASELINE_CLIENT_ID, FLOOR_CLIENT_ID, PANICD_CLIENT_ID):
            asyncio.run(park_session(broker.host, broker.port, client_id))

        started = time.monotonic()
        loaded = asyncio.run(storm(broker.host, broker.port, devices, count=args.presses,
                                   rate=1e9, counter_base=BACKLOG_COUNTER_BASE))
        load_per_s = len(loaded.sent) / (time.monotonic() - started)
        print(f"loaded {len(loaded.sent)} presses into the broker ({load_per_s:.0f}/s)",
              file=sys.stderr)

        bare_s = asyncio.run(drain_bare(broker.host, broker.port, args.presses, args.timeout))
        baseline_per_s = args.presses / bare_s
        print(f"bare subscriber drained {args.presses} in {bare_s:.3f}s", file=sys.stderr)
        floor_s = asyncio.run(drain_floor(broker.host, broker.port, args.presses,
                                          workdir / "floor.sqlite3", args.timeout))
        floor_per_s = args.presses / floor_s
        print(f"durable floor stored {args.presses} in {floor_s:.3f}s", file=sys.stderr)

        with panicd_process(args, config, keys, workdir) as panicd:
            assert panicd.process is not None
            pid = panicd.process.pid
            profile = args.profile
            with profiled(pid, profile / "drain.txt" if profile else None):
                panicd.wait_ready(args.timeout)
                cpu_before = panicd.cpu_s()
                server_before = server_cpu_s(stores.server)
                first, done = wait_committed(store, args.presses, args.timeout,
                                             args.history)
            panicd_s = done - first
            # READY comes a little after the first messages; close enough for a share.
            drain_cpu = (panicd.cpu_s() - cpu_before) / panicd_s
            # The private PostgreSQL's processes (0 for SQLite, which runs in panicd);
            # the benchmark's own polling query is in it.
            drain_store_cpu = (server_cpu_s(stores.server) - server_before) / panicd_s
            presses_per_s = args.presses / panicd_s
            print(f"panicd committed {args.presses} in {panicd_s:.3f}s", file=sys.stderr)
            quiet_at = asyncio.run(wait_feedback_quiet(broker.host, broker.port, 1.0,
                                                       args.timeout))
            feedback_lag_s = max(0.0, quiet_at - done)
            print(f"backlog feedback still flowing {feedback_lag_s:.3f}s after the last commit",
                  file=sys.stderr)

            mosquitto = broker_pid(broker)
            cpu_before = panicd.cpu_s()
            broker_before = cpu_seconds(mosquitto)
            bench_before = time.process_time()
            with profiled(pid, profile / "storm.txt" if profile else None):
                latency = latency_storm(broker, devices, args, store)
            storm_cpu = (panicd.cpu_s() - cpu_before) / args.duration
            broker_cpu = (cpu_seconds(mosquitto) - broker_before) / args.duration
            bench_cpu = (time.process_time() - bench_before) / args.duration
            rss_mb = panicd.peak_rss_mb()
            if args.keep_log:
                args.keep_log.write_bytes(panicd.log_path.read_bytes())
    latencies = latency.total_ms

    return RunFigures(
        presses_per_s=round(presses_per_s, 1),
        baseline_per_s=round(baseline_per_s, 1),
        ratio=round(presses_per_s / baseline_per_s, 3),
        floor_per_s=round(floor_per_s, 1),
        floor_ratio=round(floor_per_s / baseline_per_s, 3),
        p50_ms=round(percentile(latencies, 0.50), 2),
        p95_ms=round(percentile(latencies, 0.95), 2),
        p99_ms=round(percentile(latencies, 0.99), 2),
        p999_ms=round(percentile(latencies, 0.999), 2),
        max_ms=round(latencies[-1] if latencies else float("nan"), 2),
        latency_sent=latency.sent,
        latency_feedback=len(latencies),
        inbound_p50_ms=round(percentile(latency.inbound_ms, 0.50), 2),
        inbound_p99_ms=round(percentile(latency.inbound_ms, 0.99), 2),
        commit_fb_p50_ms=round(percentile(latency.after_receive_ms, 0.50), 2),
        commit_fb_p99_ms=round(percentile(latency.after_receive_ms, 0.99), 2),
        drain_cpu=round(drain_cpu, 2),
        drain_store_cpu=round(drain_store_cpu, 2),
        storm_cpu=round(storm_cpu, 2),
        storm_broker_cpu=round(broker_cpu, 2),
        storm_bench_cpu=round(bench_cpu, 2),
        rss_mb=round(rss_mb, 1),
        load_per_s=round(load_per_s, 1),
        feedback_lag_s=round(feedback_lag_s, 3),
    )


def latency_storm(
    broker: Mosquitto, devices: Sequence[SimDevice], args: argparse.Namespace,
    store: BenchStore,
) -> Latency:
    """Fixed-rate presses with feedback timing, split at panicd's own receive timestamp."""
    count = int(args.rate * args.duration)
    result = asyncio.run(storm(broker.host, broker.port, devices, count=count, rate=args.rate,
                               counter_base=LATENCY_COUNTER_BASE, watch_feedback=True,
                               feedback_grace_s=10.0))
    reader: Reader
    with store.reader(args.timeout) as reader:
        received = {
            (str(device_id), int(counter)): float(at)
            for device_id, counter, at in reader.rows(
                "SELECT device_id, counter, received_at FROM presses WHERE counter >= ?",
                (LATENCY_COUNTER_BASE,),
            )
        }
    inbound = sorted((received[key] - sent) * 1000 for key, sent in result.sent.items()
                     if key in received)
    after = sorted((result.feedback[key] - at) * 1000 for key, at in received.items()
                   if key in result.feedback)
    total = result.latencies_ms()
    print(f"latency storm: {len(result.sent)} sent at {args.rate:.0f}/s, "
          f"{len(total)} with feedback", file=sys.stderr)
    return Latency(len(result.sent), total, inbound, after)




def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print one JSON line of figures last."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--presses", type=int, default=20_000, help="backlog size (%(default)s)")
    parser.add_argument("--devices", type=int, default=500, help="buttons (%(default)s)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="latency storm presses/s (%(default)s)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="latency storm seconds (%(default)s)")
    parser.add_argument("--history", type=int, default=0,
                        help="past presses already in panicd's database (%(default)s)")
    add_run_options(
        parser, timeout_s=120.0, timeout_help="bound on every wait",
        extra_toml_help="appended to panicd.toml, e.g. '[ingest]\\nbatch_max = 512\\n'",
        profile_help="write py-spy stacks of panicd (drain.txt, storm.txt) here",
    )
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="run panicd with sys.setswitchinterval (informative comparison)")
    add_store_options(parser)
    args = parser.parse_args(argv)
    args.extra_toml = args.extra_toml.replace("\\n", "\n")
    # aiomqtt warns per publish once many are pending; the storm keeps thousands in flight.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    if args.presses < 1 or args.devices < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--presses, --devices, --rate and --duration must be positive")

    with Stores(args.store_url) as stores:
        backends = chosen_backends(args.store, stores.given)
        if stores.given and stores.given not in backends:
            parser.error(f"--store-url names a {stores.given} store, not {args.store}")
        if args.history and "postgresql" in backends:
            parser.error("--history fills a SQLite database only")
        by_backend = labelled_runs(
            args.runs, "panicd-bench-", backends,
            lambda tmp, backend: one_run(args, tmp, stores, backend),
        )
    summaries = {backend: summary_of(*by_backend[backend]) for backend in backends}
    ok = all(r["latency_feedback"] == r["latency_sent"]
             for _, runs in by_backend.values() for r in runs)
    if len(backends) == 1:
        print(json.dumps({**summaries[backends[0]], "store": backends[0]}))
        return 0 if ok else 1
    ratios = side_by_side({b: by_backend[b][0] for b in backends}, COMPARED)
    print(json.dumps({**summaries, "pg_over_sqlite": ratios, "runs": args.runs}))
    return 0 if ok else 1


# The figures --both prints side by side (and whose ratio PostgreSQL/SQLite it gives).
COMPARED = ("presses_per_s", "ratio", "floor_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms",
            "commit_fb_p50_ms", "commit_fb_p99_ms", "drain_cpu", "drain_store_cpu",
            "storm_cpu", "rss_mb")


def summary_of(summary: dict[str, float], runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """The JSON summary of one backend's runs (medians)."""
    return {
        "presses_per_s": summary["presses_per_s"],
        "baseline_per_s": summary["baseline_per_s"],
        "ratio": summary["ratio"],
        "floor_per_s": summary["floor_per_s"],
        "floor_ratio": summary["floor_ratio"],
        "p50_ms": summary["p50_ms"],
        "p95_ms": summary["p95_ms"],
        "p99_ms": summary["p99_ms"],
        "rss_mb": summary["rss_mb"],
        "p999_ms": summary["p999_ms"],
        "max_ms": summary["max_ms"],
        "drain_cpu": summary["drain_cpu"],
        "drain_store_cpu": summary["drain_store_cpu"],
        "latency_feedback": summary["latency_feedback"],
        "latency_sent": summary["latency_sent"],
        "runs": len(runs),
    }


if __name__ == "__main__":
    sys.exit(main())
