"""The Twilio test peer: Stoplight Prism serving Twilio's own API 2010-04-01 spec (DESIGN §4).

Use the session fixture ``prism`` (its value is the base URL, e.g. ``http://127.0.0.1:PORT``)
by registering this module as a plugin: ``pytest_plugins = ["tests.prism"]`` in
``tests/conftest.py``. Prerequisite: ``scripts/ensure-peers.sh`` (installs Prism).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.prepare_twilio_spec import PEERS_DIR, PRISM_BIN, SPEC_PATH, write_patched_spec

# Measured: Prism 5.14.2 loads the 1.2 MB spec and listens in about 1.1 s on a dev machine.
STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"prism exited with {proc.returncode} before listening; log:\n"
                + log.read_text(encoding="utf-8", errors="replace")
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            # Not listening yet; a connect attempt is the readiness handshake Prism offers.
            time.sleep(0.05)
    raise RuntimeError(f"prism did not listen on {port} within {STARTUP_TIMEOUT_S} s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # Prism's bin is a node script that may fork; it runs in its own process group.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run Prism on a free port against the patched Twilio spec and yield its base URL."""
    if not PRISM_BIN.exists() or not SPEC_PATH.exists():
        pytest.fail(f"Twilio peer not installed under {PEERS_DIR}: run scripts/ensure-peers.sh")
    workdir = tmp_path_factory.mktemp("prism")
    spec = write_patched_spec(workdir / "twilio_api_v2010.patched.json")
    log = workdir / "prism.log"
    port = free_port()
    with log.open("wb") as log_file:
        # --errors: a request or response that violates the spec is answered as an error
        # (422 for requests), never silently mocked as a success.
        proc = subprocess.Popen(
            [str(PRISM_BIN), "mock", "--errors", "-h", "127.0.0.1", "-p", str(port), str(spec)],
            cwd=PEERS_DIR,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(proc, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
