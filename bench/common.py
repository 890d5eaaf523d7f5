"""What both benchmarks share: the panicd subprocess, its CPU and memory, py-spy
sampling, percentiles and the machine's description."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from bench.stores import BACKENDS, Backend

REPO = Path(__file__).resolve().parent.parent
Label = TypeVar("Label", bound=str)


class Panicd:
    """``python -m panicd.daemon`` as a subprocess, with the sd_notify READY handshake."""

    def __init__(self, config: Path, keys: Path, workdir: Path, log_level: str,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self._config = config
        self._keys = keys
        self._workdir = workdir
        self._notify_path = workdir / "notify.sock"
        self._sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "panicd.log"
        self.log_level = log_level
        self.extra_env = dict(extra_env or {})
        self.launcher: list[str] = ["-m", "panicd.daemon"]

    def __enter__(self) -> Self:
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._notify_path))
        env = dict(os.environ)
        env.update(PANICD_DEVICE_KEYS_FILE=str(self._keys), NOTIFY_SOCKET=str(self._notify_path),
                   PANICD_LOG_LEVEL=self.log_level)
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.launcher, "--config", str(self._config),
                 "--log-format", "json"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for READY=1 (every source connected)."""
        assert self._sock is not None and self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"panicd exited with {code}; see {self.log_path}")
            self._sock.settimeout(0.1)
            try:
                if b"READY=1" in self._sock.recv(65536).split(b"\n"):
                    return
            except TimeoutError:
                continue
        raise RuntimeError(f"panicd not ready in {timeout_s}s; see {self.log_path}")

    def peak_rss_mb(self) -> float:
        """The process's peak resident set size (VmHWM) in MiB."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text(encoding="utf-8")
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far (all its threads)."""
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._sock is not None:
            self._sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    fields = stat.rpartition(")")[2].split()
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" of comm.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def profiled(pid: int, out: Path | None) -> Iterator[None]:
    """Sample ``pid`` with py-spy (raw collapsed stacks, all threads) while the block runs."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.parent.mkdir(parents=True, exist_ok=True)
    sampler = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
         "--threads", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)  # py-spy needs a moment to attach
        yield
    finally:
        sampler.send_signal(signal.SIGINT)
        try:
            sampler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait()


def add_run_options(
    parser: argparse.ArgumentParser, *, timeout_s: float, timeout_help: str,
    extra_toml_help: str, profile_help: str,
) -> None:
    """The options both benchmarks take: runs, waits, panicd's config, log and profile."""
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    parser.add_argument("--timeout", type=float, default=timeout_s,
                        help=f"{timeout_help}, seconds (%(default)s)")
    parser.add_argument("--extra-toml", default="", help=extra_toml_help)
    parser.add_argument("--log-level", default="info",
                        help="panicd's PANICD_LOG_LEVEL (%(default)s, as deployed)")
    parser.add_argument("--keep-log", type=Path, default=None,
                        help="copy panicd's log of the (last) run here")
    parser.add_argument("--profile", type=Path, default=None, help=profile_help)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def cpu_model() -> str:
    """The CPU's model name, for the figures' context."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def repeated_runs(
    runs: int, prefix: str, one_run: Callable[[Path], Any]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Print the machine, run ``one_run`` in a fresh temp dir ``runs`` times (each run's
    figures to stderr); return the per-key median and every run's figures."""
    by_label = labelled_runs(runs, prefix, [""], lambda tmp, _label: one_run(tmp))
    return by_label[""]


def labelled_runs(
    runs: int, prefix: str, labels: Sequence[Label], one_run: Callable[[Path, Label], Any]
) -> dict[Label, tuple[dict[str, float], list[dict[str, Any]]]]:
    """Like :func:`repeated_runs` for each label (a store backend), the labels taking
    turns within each round so that the machine's background load falls on all alike;
    label → (per-key median, every run's figures)."""
    print(f"machine: {os.cpu_count()} cpu, {cpu_model()}, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results: dict[Label, list[dict[str, Any]]] = {label: [] for label in labels}
    for index in range(runs):
        for label in labels:
            with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
                figures = one_run(Path(tmp), label)
            results[label].append(asdict(figures))
            name = f"run {index + 1}" + (f" {label}" if label else "")
            print(f"{name}: {json.dumps(results[label][-1])} load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr)
    return {
        label: ({key: statistics.median(float(r[key]) for r in rows) for key in rows[0]}, rows)
        for label, rows in results.items()
    }


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """``--store-url`` and ``--both``: which store panicd runs on (bench.stores)."""
    parser.add_argument(
        "--store-url", default=None,
        help="sqlite:///FILE (must not exist) or postgresql://user@host/db (a fresh database "
             "is made on that server per run; password from $PANICD_STORE_PASSWORD); "
             "default: SQLite in the run's temp dir",
    )
    parser.add_argument(
        "--store", choices=("sqlite", "postgresql", "both"), default=None,
        help="the backend (default: --store-url's, else sqlite); postgresql without a "
             "postgresql:// --store-url is a private cluster; both: SQLite and PostgreSQL "
             "in turn in one run, side by side with the ratio PostgreSQL/SQLite",
    )
    parser.add_argument("--both", dest="store", action="store_const", const="both",
                        help="the same as --store both")


def chosen_backends(store: str | None, given: Backend | None) -> tuple[Backend, ...]:
    """The backends ``--store`` (or else ``--store-url``) asks for, in the order run."""
    if store == "both":
        return BACKENDS
    if store == "sqlite":
        return ("sqlite",)
    if store == "postgresql":
        return ("postgresql",)
    return (given or "sqlite",)


def side_by_side(
    medians: Mapping[str, Mapping[str, float]], keys: Sequence[str]
) -> dict[str, float | None]:
    """Print SQLite's and PostgreSQL's medians per key with the ratio PostgreSQL/SQLite
    (to stderr); return the ratios."""
    ratios: dict[str, float | None] = {}
    sqlite, pg = medians["sqlite"], medians["postgresql"]
    print(f"{'figure':<20} {'sqlite':>12} {'postgresql':>12} {'pg/sqlite':>10}", file=sys.stderr)
    for key in keys:
        # None (JSON null) where SQLite's figure is 0, e.g. the store server's CPU.
        ratio = round(pg[key] / sqlite[key], 3) if sqlite[key] else None
        ratios[key] = ratio
        shown = "-" if ratio is None else f"{ratio:.3f}"
        print(f"{key:<20} {sqlite[key]:>12.2f} {pg[key]:>12.2f} {shown:>10}", file=sys.stderr)
    return ratios
