"""Run a private Mosquitto with the project's own settings (config/mosquitto.conf).

The production file's listener, credentials and persistence paths are replaced with a
loopback listener on the given port and a scratch directory; every tuning line (queue
and in-flight limits, persistence) is kept, so tests and the demo run the broker as
deployed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

PROJECT_CONF = Path(__file__).resolve().parent.parent / "config" / "mosquitto.conf"
_REPLACED = ("listener", "allow_anonymous", "password_file", "acl_file", "persistence_location",
             "log_dest", "pid_file")


class BrokerError(RuntimeError):
    """Mosquitto could not be found or started."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    """The mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


def render_config(port: int, workdir: Path, *, persistence: bool = True) -> str:
    """The project's broker config, rewritten for a private loopback instance."""
    lines = [
        line for line in PROJECT_CONF.read_text(encoding="utf-8").splitlines()
        if not line.strip().startswith(_REPLACED)
        and not (line.strip().startswith("persistence ") and not persistence)
    ]
    lines += [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        f"persistence_location {workdir}/",
        f"log_dest file {workdir}/mosquitto.log",
    ]
    if not persistence:
        lines.append("persistence false")
    if os.geteuid() == 0:
        # Started as root, Mosquitto drops to the "mosquitto" user, which cannot write the
        # scratch directory: persistence and the log would fail silently and a restarted
        # broker would forget every session. Stay the user who owns the directory.
        lines.append("user root")
    return "\n".join(lines) + "\n"


class Mosquitto:
    """A Mosquitto process on 127.0.0.1:port; a context manager."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start and wait until the port accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(render_config(self.port, self.workdir), encoding="utf-8")
        self._process = subprocess.Popen(  # noqa: S603 -- fixed binary and our own config
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                log = self.workdir / "mosquitto.log"
                detail = log.read_text(encoding="utf-8") if log.exists() else ""
                raise BrokerError(f"mosquitto exited: {err.strip()} {detail.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} in {timeout_s}s")

    def stop(self) -> None:
        """Terminate the broker (and wait for it)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
