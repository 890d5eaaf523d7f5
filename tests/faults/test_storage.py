"""The disk holding the database fills up, or the database file turns read-only (issue 12
item 5, storage).

A real panicd (tests/daemon_proc.py) on a real Mosquitto, its SQLite database on a small
tmpfs mounted for the test. While a commit fails, the presses of that batch must stay
unacknowledged (no PUBACK: the broker keeps them), operations must hear of it, panicd must
keep running, and ingest must recover by itself once the fault is gone, storing every
press published meanwhile exactly once.

"Unacknowledged" is checked from the outside: panicd is SIGKILLed while the disk is full
and started again once there is space; the presses published during the outage can only
reach the database if the broker still held them, i.e. if panicd never acknowledged them.

These tests mount filesystems and set the immutable attribute, so they need root (CI runs
as root). Without it they are skipped, with the reason in the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from firmware_sim.fleet import SimDevice, write_fleet
from firmware_sim.storm import storm
from tests.daemon_proc import DaemonProcess, count_rows, wait_until

DEVICES = 20
DISK = "16m"


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``; the test is skipped (loudly) if mounting is denied."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"FAULT TEST NOT RUN: cannot mount a tmpfs (needs root): "
                    f"{mounted.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


class Filler:
    """Takes every free byte of a filesystem, and gives it back."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "filler"
        # Created now: on a disk the WAL has filled meanwhile, even a new file is ENOSPC.
        self.path.touch()

    def fill(self) -> int:
        """Write until ENOSPC, down to the last page; returns bytes taken."""
        taken = 0
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            for size in (1 << 16, 1 << 12):
                while True:
                    try:
                        taken += os.write(fd, b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return taken

    def free(self) -> None:
        """Give the space back."""
        os.truncate(self.path, 0)


def _publish(broker: Mosquitto, devices: list[SimDevice], count: int, base: int,
             rate: float = 400) -> set[tuple[str, int]]:
    """Publish ``count`` presses (QoS 1; done at the broker's PUBACK); the keys sent."""
    result = asyncio.run(storm(broker.host, broker.port, devices, count=count, rate=rate,
                               counter_base=base))
    assert len(result.sent) == count
    return set(result.sent)


def _publish_until_failing(broker: Mosquitto, devices: list[SimDevice], daemon: DaemonProcess,
                           base: int) -> set[tuple[str, int]]:
    """Publish batches until commits fail (a full disk still takes commits into WAL pages
    a checkpoint freed), then one batch more; the keys sent."""
    failures = len(daemon.events("store.commit_failed"))
    sent: set[tuple[str, int]] = set()
    for round_ in range(30):
        sent |= _publish(broker, devices, 100, base + 100 * round_)
        with contextlib.suppress(AssertionError):
            _wait_event(daemon, "store.commit_failed", failures + 1, 1.0)
            return sent | _publish(broker, devices, 100, base + 100 * (round_ + 1))
    pytest.fail(f"commits never failed on the full disk:\n{daemon.log()}")


def _stored(database: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT device_id, counter FROM presses"))
    finally:
        conn.close()




def _wait_event(daemon: DaemonProcess, name: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(daemon.events(name)) < count:
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        assert time.monotonic() < deadline, f"no {name} x{count} in {timeout_s} s:\n{daemon.log()}"
        time.sleep(0.1)  # a log file offers nothing to wait on


@pytest.mark.slow
def test_disk_full_holds_presses_unacked_alerts_and_recovers_by_itself(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    with _tmpfs(tmp_path / "disk", DISK) as disk:
        config, keys, devices = write_fleet(
            tmp_path / "cfg", devices=DEVICES, mqtt_port=mosquitto.port,
            client_id="panicd-faults-disk", database=disk / "panicd.sqlite3")
        database = disk / "panicd.sqlite3"
        daemon = DaemonProcess(config, keys, tmp_path / "run")
        filler = Filler(disk)
        with daemon:
            before = _publish(mosquitto, devices, 200, 1000)
            assert wait_until("SELECT COUNT(*) FROM presses", database, 200, 30) == 200

            # The disk fills up; a storm goes on meanwhile.
            filler.fill()
            during = _publish_until_failing(mosquitto, devices, daemon, 10_000)
            _wait_event(daemon, "store.unavailable", 1, 20)
            held = len(during - set(_stored(database)))
            assert held > 0, "the full disk never stopped a commit"
            time.sleep(2.0)  # retries keep failing, and panicd keeps running
            assert daemon.process is not None and daemon.process.poll() is None

            # Space returns: ingest recovers by itself, every press stored once.
            freed_at = time.monotonic()
            filler.free()
            total = len(before | during)
            assert wait_until("SELECT COUNT(*) FROM presses", database, total, 30) == total
            recovered_s = time.monotonic() - freed_at
            _wait_event(daemon, "store.recovered", 1, 10)
            assert len(daemon.events("store.unavailable")) == 1  # one alert per outage

            # Full again, and panicd dies while it is: what it held was never PUBACKed,
            # so the broker delivers it again to the restarted panicd.
            filler.fill()
            last = _publish_until_failing(mosquitto, devices, daemon, 20_000)
            unstored = last - set(_stored(database))
            assert unstored, "the full disk never stopped a commit"
            daemon.kill9()
            filler.free()
            daemon.start()
            total += len(last)
            assert wait_until("SELECT COUNT(*) FROM presses", database, total, 30) == total
            time.sleep(0.5)  # a (wrong) second copy would arrive now
            assert daemon.terminate() == 0

        stored = _stored(database)
        assert len(stored) == len(set(stored)) == total
        assert set(stored) == before | during | last
        assert count_rows(database, "SELECT COUNT(*) FROM dead_letters") == 0
    print(f"disk full: presses={total} held_while_full={held}+{len(unstored)} lost=0 "  # noqa: T201
          f"twice=0 recovered_in_s={recovered_s:.2f}")


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: not even root may open the file for writing (tmpfs supports it)."""
    done = _run("chattr", "+i", str(path))
    if done.returncode != 0:
        pytest.skip(f"FAULT TEST NOT RUN: cannot chattr +i the database: {done.stderr.strip()}")
    try:
        yield
    finally:
        _run("chattr", "-i", str(path))


@pytest.mark.slow
def test_a_read_only_database_holds_presses_unacked_and_recovers_when_writable(
    mosquitto: Mosquitto, tmp_path: Path,
) -> None:
    with _tmpfs(tmp_path / "disk", DISK) as disk:
        config, keys, devices = write_fleet(
            tmp_path / "cfg", devices=DEVICES, mqtt_port=mosquitto.port,
            client_id="panicd-faults-ro", database=disk / "panicd.sqlite3")
        database = disk / "panicd.sqlite3"
        daemon = DaemonProcess(config, keys, tmp_path / "run")
        with daemon:
            before = _publish(mosquitto, devices, 100, 1000)
            assert wait_until("SELECT COUNT(*) FROM presses", database, 100, 30) == 100
            # A restart finds the file read-only (a backup restored by root, a wrong
            # owner): SQLite opens it read-only and every write is refused.
            assert daemon.terminate() == 0
            with _immutable(database):
                daemon.start()
                during = _publish(mosquitto, devices, 200, 2000)
                _wait_event(daemon, "store.unavailable", 1, 20)
                time.sleep(1.0)
                assert set(_stored(database)) == before
                assert daemon.process is not None and daemon.process.poll() is None
                writable_at = time.monotonic()
            total = len(before | during)
            assert wait_until("SELECT COUNT(*) FROM presses", database, total, 30) == total
            recovered_s = time.monotonic() - writable_at
            _wait_event(daemon, "store.recovered", 1, 10)
            # The checkpointer's connection was opened read-only too: unless it is opened
            # again, no checkpoint ever succeeds and the WAL grows until the disk is full.
            _wait_event(daemon, "store.checkpoint_recovered", 1, 10)
            time.sleep(0.5)
            assert daemon.terminate() == 0
        wal = database.with_name(database.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, "the WAL was left behind"
        stored = _stored(database)
        assert len(stored) == len(set(stored)) == total
        assert set(stored) == before | during
    print(f"read-only: presses={total} held={len(during)} lost=0 twice=0 "  # noqa: T201
          f"recovered_in_s={recovered_s:.2f}")
