"""sd_notify(3) without libsystemd: readiness, status and watchdog pings to the service manager.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``). Outside systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Self

from gateway.logs import get_logger

log = get_logger(__name__)


class Notifier:
    """Sends state changes to systemd over ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given to this process."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; return whether it was delivered."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                # Non-blocking: a full receive queue must not stall the event loop, and a
                # lost WATCHDOG=1 is recovered by the next ping long before the deadline.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning(
                "sdnotify.failed",
                state=assignments[0].partition("=")[0],
                error=exc.strerror or str(exc),
                errno=exc.errno,
            )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that startup is complete (``READY=1``), optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that a graceful shutdown has begun (``STOPPING=1``)."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", _status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status panicd``."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """Ping the service watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for more start-up or shutdown time (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Return the watchdog timeout in seconds if it applies to this process, else None.

        Ping at half this interval, as sd_watchdog_enabled(3) recommends.
        """
        return self._watchdog_interval

    def close(self) -> None:
        """Close the notification socket; later calls reopen it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def watchdog_loop(notifier: Notifier, stop: asyncio.Event) -> None:
    """Ping the watchdog from the event loop at half the interval until ``stop`` is set.

    The pings come from the loop itself, so a blocked or wedged loop stops them and
    systemd restarts the service (``WatchdogSec=`` with ``Restart=on-failure``).
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    period = interval / 2
    log.debug("sdnotify.watchdog_started", interval_s=interval, period_s=period)
    while not stop.is_set():
        notifier.watchdog()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period):
                await stop.wait()


def _socket_address(value: str) -> str | None:
    # sd_notify(3): "@" names an abstract socket; the kernel spells that with a NUL byte.
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Empty, or a form this code does not speak (vsock: since systemd 254): stay silent.
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    # sd_watchdog_enabled(3): WATCHDOG_PID, when set, names the one process meant to ping.
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def _status(text: str) -> str:
    # A newline would start a new assignment and let free text forge READY=1 and friends.
    return "STATUS=" + " ".join(text.splitlines())
