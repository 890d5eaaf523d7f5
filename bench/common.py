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
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent


class Panicd:
    """``python -m gateway.daemon`` as a subprocess, with the sd_notify READY handshake."""

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
        self.launcher: list[str] = ["-m", "gateway.daemon"]

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
    print(f"machine: {os.cpu_count()} cpu, {cpu_model()}, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results = []
    for index in range(runs):
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            figures = one_run(Path(tmp))
        results.append(asdict(figures))
        print(f"run {index + 1}: {json.dumps(results[-1])} load {os.getloadavg()[0]:.2f}",
              file=sys.stderr)
    median = {key: statistics.median(float(r[key]) for r in results) for key in results[0]}
    return median, results
