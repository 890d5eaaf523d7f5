"""Every benchmark in one command (``bench/run``), one JSON object per benchmark.

Each benchmark runs as its own ``python -m bench.X`` process, exactly as it runs alone;
its figures go to stderr as it runs and its last stdout line is its JSON summary, which
is printed here as ``{"benchmark": NAME, "command": …, "figures": {…}}`` (or with
``"error"`` if it failed, and the suite exits non-zero). The first line is the machine.

The benchmarks (docs/PERFORMANCE.md has their latest figures):

* ``ingest``: durable drain throughput against the bare aiomqtt subscriber and the
  durable floor in the same run, and publish→"received" latency at 1,000 presses/s, on
  SQLite and on a private PostgreSQL in turn, with the ratios PostgreSQL/SQLite;
* ``dispatch``: publish → the first provider request, SMS at 200 presses/s, Prism as the
  provider behind the recording proxy, on SQLite and on PostgreSQL in turn;
* ``city``: a city-wide storm, 10,000 buttons pressing within 10 s out of 100,000
  registered, every incident paged (the provider answered by the proxy): latency, lost
  pages and panicd's peak memory with 100,000 devices and 10,000 open incidents;
* ``restart``: process start → the request of an escalation step that fell due while
  panicd was down;
* ``pgdriver``: asyncpg against psycopg 3 on a private PostgreSQL: group commits,
  ``SKIP LOCKED`` claims and LISTEN/NOTIFY wakes (issue 13's driver choice, docs/STORE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import cpu_model

REPO = Path(__file__).resolve().parent.parent

BENCHMARKS: dict[str, list[str]] = {
    "ingest": ["bench.ingest", "--both"],
    "dispatch": ["bench.dispatch", "--peer", "prism", "--both"],
    "city": ["bench.dispatch", "--peer", "self", "--rate", "1000", "--duration", "10",
             "--registered", "100000", "--timeout", "300", "--grace", "120"],
    "restart": ["bench.restart"],
    "pgdriver": ["bench.pgdriver"],
}
# Runs per benchmark unless --runs says otherwise: restart is short and noisy.
# None: the benchmark repeats nothing (it takes no --runs).
DEFAULT_RUNS: dict[str, int | None] = {"ingest": 1, "dispatch": 1, "city": 1, "restart": 5,
                                       "pgdriver": None}


def run_one(name: str, argv: Sequence[str], extra: Sequence[str]) -> dict[str, object]:
    """Run one benchmark; its summary (last stdout line) as a dict."""
    command = [sys.executable, "-m", *argv, *extra]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    result: dict[str, object] = {
        "benchmark": name,
        "command": " ".join(["python", "-m", *argv, *extra]),
        "seconds": round(time.monotonic() - started, 1),
    }
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        result["figures"] = json.loads(lines[-1])
    except (IndexError, ValueError):
        result["error"] = f"exit {done.returncode}, no JSON summary"
        return result
    if done.returncode != 0:
        result["error"] = f"exit {done.returncode}"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks (all by default) one after another."""
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--runs", type=int, default=None,
                        help="passed to each benchmark (its own default otherwise)")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})")
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "cpu": cpu_model(),
                                  "python": platform.python_version(),
                                  "load": round(os.getloadavg()[0], 2)}}), flush=True)
    failed = 0
    for name in names:
        default = DEFAULT_RUNS[name]
        runs = default if args.runs is None or default is None else args.runs
        result = run_one(name, BENCHMARKS[name], [] if runs is None else ["--runs", str(runs)])
        failed += "error" in result
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
