"""A broker the fault tests may kill: SIGKILL, then a restart on the same port and files."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto


class KillableMosquitto(Mosquitto):
    """A private Mosquitto that can die as a crashed broker does, and come back."""

    def kill9(self) -> None:
        """SIGKILL: no persistence save, no goodbye to any client."""
        process = self._process
        assert process is not None, "the broker is not running"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self._process = None

    def restart(self, timeout_s: float = 10.0) -> float:
        """Start again on the same port with the same persistence directory; seconds taken."""
        started = time.monotonic()
        self.start(timeout_s)
        return time.monotonic() - started


@pytest.fixture
def killable_broker(tmp_path: Path) -> Iterator[KillableMosquitto]:
    """A private broker with config/mosquitto.conf's settings (persistence as shipped)."""
    broker = KillableMosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


_REPORT = pytest.StashKey[list[str]]()


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add a line to the fault report printed at the end of the run (even without -s)."""
    lines = request.config.stash.setdefault(_REPORT, [])
    return lines.append


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Print what the fault tests measured, so every run shows the figures."""
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("fault figures")
        for line in lines:
            terminalreporter.write_line(line)
