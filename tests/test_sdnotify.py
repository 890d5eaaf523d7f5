"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.sdnotify import Notifier, watchdog_loop

_STOP = b"test.stop"


class FakeManager:
    """Receives notifications on its own thread and stamps each with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.received: list[tuple[float, bytes]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address)
        # A thread, not the event loop under test: it must keep receiving while that loop
        # is deliberately blocked.
        self._thread = threading.Thread(target=self._receive, name="fake-systemd", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while (data := self._sock.recv(4096)) != _STOP:
            self.received.append((time.monotonic(), data))

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(_STOP, self.address)
        self._thread.join(timeout=5)
        self._sock.close()

    def messages(self) -> list[bytes]:
        self.close()
        return [data for _, data in self.received]


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    path = str(tmp_path / "notify.sock")
    fake = FakeManager(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    if fake._thread.is_alive():
        fake.close()


def test_lifecycle_states_reach_the_manager(manager: FakeManager) -> None:
    with Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.status("3 sources connected, 0 incidents open")
        assert notifier.watchdog()
        assert notifier.stopping("draining outbox")
    assert manager.messages() == [
        b"READY=1",
        b"STATUS=3 sources connected, 0 incidents open",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=draining outbox",
    ]


def test_status_text_cannot_forge_other_assignments(manager: FakeManager) -> None:
    with Notifier() as notifier:
        notifier.status("ok\nREADY=1")
    assert manager.messages() == [b"STATUS=ok READY=1"]


def test_abstract_socket_name_is_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"panicd-test-{uuid.uuid4().hex}"
    fake = FakeManager("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    with Notifier() as notifier:
        assert notifier.ready("siap")
    assert fake.messages() == [b"READY=1\nSTATUS=siap"]


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with capture_logs() as logs, Notifier() as notifier:
        assert not notifier.enabled
        assert not notifier.ready()
        assert not notifier.watchdog()
    assert logs == []


def test_send_failure_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with capture_logs() as logs, Notifier() as notifier:
        assert not notifier.ready()
    assert [(e["event"], e["log_level"], e["state"]) for e in logs] == [
        ("sdnotify.failed", "warning", "READY")
    ]


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),  # meant for another process
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    usec: str | None, pid: str | None, expected: float | None
) -> None:
    environ: dict[str, str] = {}
    if usec is not None:
        environ["WATCHDOG_USEC"] = usec
    if pid is not None:
        environ["WATCHDOG_PID"] = str(os.getpid()) if pid == "self" else pid
    assert Notifier(environ).watchdog_interval() == expected


async def test_watchdog_loop_returns_at_once_without_a_watchdog(manager: FakeManager) -> None:
    async with asyncio.timeout(1):
        await watchdog_loop(Notifier(), asyncio.Event())
    assert manager.messages() == []


async def test_watchdog_pings_while_the_loop_runs_and_stops_when_it_is_blocked(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    stop = asyncio.Event()
    notifier = Notifier()
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        tg.create_task(watchdog_loop(notifier, stop), name="watchdog")
        await asyncio.sleep(1.0)
        blocked_from = time.monotonic()
        time.sleep(1.5)  # noqa: ASYNC251 - the point: a wedged loop must stop pinging
        blocked_until = time.monotonic()
        await asyncio.sleep(1.0)
        stop.set()
    notifier.close()
    manager.close()

    pings = [t for t, data in manager.received if data == b"WATCHDOG=1"]
    assert len(pings) == len(manager.received)
    before = [t for t in pings if t < blocked_from]
    # A ping sent just before the block may be stamped a little late by the receiver.
    during = [t for t in pings if blocked_from + 0.25 <= t < blocked_until]
    after = [t for t in pings if t >= blocked_until]
    assert len(before) >= 3
    assert during == []
    assert len(after) >= 3
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert gaps[-1] >= 1.3  # the blocked stretch
    assert gaps[-2] < 1.0  # every other gap is near the 0.2 s period


async def test_watchdog_loop_ends_promptly_when_stopped(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")  # a 30 s period it must not wait out
    stop = asyncio.Event()
    async with asyncio.timeout(2), asyncio.TaskGroup() as tg:
        tg.create_task(watchdog_loop(Notifier(), stop), name="watchdog")
        await asyncio.sleep(0.05)
        stop.set()
    assert manager.messages() == [b"WATCHDOG=1"]
