"""Run the real ``panicd`` as a subprocess, with the systemd readiness handshake."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class DaemonProcess:
    """``python -m panicd.daemon`` with its own NOTIFY_SOCKET; a context manager."""

    def __init__(self, config: Path, keys: Path, workdir: Path) -> None:
        self.config = config
        self.keys = keys
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.notify_path = workdir / f"notify-{os.getpid()}-{time.monotonic_ns()}"
        self._sock: socket.socket | None = None
        self.messages: list[bytes] = []
        self.log_path = workdir / "panicd.log"

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30.0) -> None:
        """Start the daemon and (by default) wait for READY=1."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(str(self.notify_path))
        env = dict(os.environ)
        env.update(
            PANICD_DEVICE_KEYS_FILE=str(self.keys),
            NOTIFY_SOCKET=str(self.notify_path),
        )
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "panicd.daemon", "--config", str(self.config),
             "--log-format", "json"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_ready:
            self.wait_for(b"READY=1", timeout_s)

    def wait_for(self, message: bytes, timeout_s: float) -> None:
        """Wait for a notify datagram containing ``message``."""
        assert self._sock is not None and self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(message in m.split(b"\n") for m in self.messages):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"panicd exited with {self.process.returncode}:\n{self.log()}")
            self._sock.settimeout(0.1)
            try:
                self.messages.append(self._sock.recv(65536))
            except TimeoutError:
                continue
        raise AssertionError(f"panicd never sent {message!r}:\n{self.log()}")

    def log(self) -> str:
        """The daemon's output so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines so far (``--log-format json``), only ``name``'s if given."""
        found = []
        for line in self.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                found.append(entry)
        return found

    def kill9(self) -> None:
        """SIGKILL: no chance to flush, drain or say goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def stored_presses(database: Path) -> dict[tuple[str, int], int]:
    """Rows in ``presses`` per (device, counter), read beside a running daemon."""
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {
            (str(device), int(counter)): int(rows)
            for device, counter, rows in conn.execute(
                "SELECT device_id, counter, COUNT(*) FROM presses GROUP BY device_id, counter"
            )
        }
    finally:
        conn.close()


def store_rows(database: Path | str, sql: str,
               params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows from the daemon's store beside the running daemon: a SQLite file (read-only)
    or a PostgreSQL URL (``?`` placeholders, as SQLite writes them)."""
    if isinstance(database, str):
        from tests.pg import pg_rows  # noqa: PLC0415 -- asyncpg only for PostgreSQL tests

        return pg_rows(database, sql, params)
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def count_rows(database: Path | str, sql: str, params: tuple[object, ...] = ()) -> int:
    """One integer from the store (read-only, beside a running daemon)."""
    return int(str(store_rows(database, sql, params)[0][0]))


def wait_until(predicate_sql: str, database: Path | str, expected: int,
               timeout_s: float) -> int:
    """Poll a count until it reaches ``expected`` (a database written by another process
    offers no event to wait on); returns the last value."""
    deadline = time.monotonic() + timeout_s
    value = -1
    while time.monotonic() < deadline:
        if isinstance(database, str) or database.exists():
            try:
                value = count_rows(database, predicate_sql)
            except (sqlite3.OperationalError, LookupError):
                value = -1
            if value >= expected:
                return value
        time.sleep(0.1)
    return value
