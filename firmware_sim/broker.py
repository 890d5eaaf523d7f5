"""Run a private Mosquitto with the project's own settings (config/mosquitto.conf).

The production file's listener and persistence paths are replaced with a loopback
listener on the given port and a scratch directory; every tuning line (queue and
in-flight limits, persistence) is kept, so tests and the demo run the broker as deployed.

Two modes. The default is open (anonymous clients, any client id, no ACL), for tests of
the data path. Given ``accounts``, the shipped security is in force: the shipped ACL file
(config/mosquitto.acl), a password file with those accounts (``mosquitto_passwd``),
``allow_anonymous false`` and the listener's client-id binding, as a site runs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

PROJECT_CONF = Path(__file__).resolve().parent.parent / "config" / "mosquitto.conf"
PROJECT_ACL = PROJECT_CONF.with_name("mosquitto.acl")
_REPLACED = ("listener", "allow_anonymous", "password_file", "acl_file", "persistence_location",
             "log_dest", "pid_file",
             # TLS files of the production listener: the private one is plain loopback.
             "certfile", "keyfile", "cafile", "capath", "require_certificate")
# Security lines of the shipped listener, kept only when the shipped security is in force.
_SECURITY = ("use_username_as_clientid",)


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


def find_mosquitto_passwd() -> str:
    """The mosquitto_passwd tool (Debian package mosquitto, /usr/bin)."""
    found = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin")
    if not found:
        raise BrokerError("mosquitto_passwd is not installed (Debian: apt-get install mosquitto)")
    return found


def write_password_file(path: Path, accounts: Mapping[str, str]) -> None:
    """A Mosquitto password file holding ``accounts`` (username -> password)."""
    tool = find_mosquitto_passwd()
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)  # no accounts at all: a valid, empty file
    for index, (username, password) in enumerate(accounts.items()):
        create = ["-c"] if index == 0 else []
        result = subprocess.run(  # noqa: S603 -- fixed tool, arguments are not shell-parsed
            [tool, *create, "-b", str(path), username, password],
            capture_output=True, check=False,
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise BrokerError(f"mosquitto_passwd failed for {username}: {detail}")


def render_config(
    port: int, workdir: Path, *, persistence: bool = True, password_file: Path | None = None
) -> str:
    """The project's broker config, rewritten for a private loopback instance.

    With ``password_file``, the shipped security stays in force (the shipped ACL file,
    no anonymous clients, the listener's security lines); without it the broker is open.
    """
    shipped = PROJECT_CONF.read_text(encoding="utf-8").splitlines()
    # Listener options (use_username_as_clientid) must follow the listener they belong
    # to: above any listener line Mosquitto would open a default listener on 1883.
    first = next((i for i, line in enumerate(shipped) if line.strip().startswith("listener")),
                 len(shipped))
    secure = password_file is not None

    def keep(line: str) -> bool:
        stripped = line.strip()
        if stripped.startswith(_REPLACED):
            return False
        if stripped.startswith(_SECURITY) and not secure:
            return False
        return not (stripped.startswith("persistence ") and not persistence)

    lines = [line for line in shipped[:first] if keep(line)]
    lines.append(f"listener {port} 127.0.0.1")
    lines += [line for line in shipped[first:] if keep(line)]
    if password_file is not None:
        lines += [
            "allow_anonymous false",
            f"password_file {password_file}",
            f"acl_file {PROJECT_ACL}",
        ]
    else:
        lines.append("allow_anonymous true")
    lines += [
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
    """A Mosquitto process on 127.0.0.1:port; a context manager.

    ``accounts`` (username -> password) puts the shipped ACL and client-id binding in
    force with exactly those accounts; without it the broker is open to anyone.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, *, accounts: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.accounts = dict(accounts) if accounts is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start and wait until the port accepts connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        password_file = None
        if self.accounts is not None:
            password_file = self.workdir / "passwd"
            write_password_file(password_file, self.accounts)
        conf.write_text(render_config(self.port, self.workdir, password_file=password_file),
                        encoding="utf-8")
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
