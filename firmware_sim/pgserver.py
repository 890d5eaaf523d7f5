"""Run a private PostgreSQL cluster for tests and benchmarks (the twin of broker.py).

``initdb`` makes a throw-away cluster in a new temp directory, ``pg_ctl`` starts it on a
free port of 127.0.0.1 with its unix socket inside that directory, so it never meets the
machine's own PostgreSQL (Debian's cluster on 5432, if any): that one is neither used nor
stopped nor reconfigured. Durability stays as deployed (``fsync`` and
``synchronous_commit`` on), so what a test or a benchmark sees of a commit is what a
site gets. The cluster trusts its one superuser on loopback; it holds only test data.

Debian installs the server binaries in ``/usr/lib/postgresql/<major>/bin``, off PATH; the
newest major there is used (``scripts/ensure-postgres.sh`` installs the package).
``initdb`` and ``postgres`` refuse to run as root, and tests and CI run as root: then
both run as the unprivileged ``postgres`` system user that the Debian package creates
(through ``runuser -u postgres --``), and the temp directory is chowned to that user.
The directory is made with ``tempfile.mkdtemp`` rather than under pytest's tmp_path
because pytest's base directory is private to root and the server could not reach it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

DEBIAN_ROOT = Path("/usr/lib/postgresql")
INSTALL_HINT = "run scripts/ensure-postgres.sh (Debian package `postgresql`)"
# The system user the Debian package creates; the server runs as it when we are root.
SERVICE_USER = "postgres"
# The database role the private cluster is made with (its superuser) and the database.
ROLE = "panicd"
DATABASE = "panicd_test"
# Measured: initdb takes about 1.5 s and start about 0.2 s on this 2-core machine.
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15
# Settings that make the private cluster what the tests need; everything else is
# PostgreSQL's default.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",
    "max_connections": "100",
}


class PostgresError(RuntimeError):
    """The private PostgreSQL could not be found, made, started or stopped."""


class PostgresNotInstalledError(PostgresError):
    """The PostgreSQL server binaries are not on this machine."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (never 5432: the system's own)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 5432:
            return port


def _major(path: Path) -> tuple[int, ...]:
    # "15", "16", also old "9.6": compare numerically, so 16 beats 9.6.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_bin_dir(root: Path = DEBIAN_ROOT) -> Path:
    """The bin directory of the newest PostgreSQL major installed (Debian layout first,
    then an ``initdb`` on PATH)."""
    found = sorted(root.glob("*/bin/initdb"), key=lambda path: _major(path.parent))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresNotInstalledError(f"no PostgreSQL server binaries (initdb) found: {INSTALL_HINT}")


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1:port; a context manager.

    ``start`` makes the cluster and the database ``panicd_test``; ``dsn`` then names it.
    ``stop`` stops the server (``pg_ctl stop -m fast``, killed if that hangs) and removes
    the directory.

    With ``standby_of`` the cluster is instead a streaming standby of that (started)
    server: ``pg_basebackup -R`` copies it, and the standby connects as ``name``
    (``cluster_name``, which the walreceiver sends as its application name), the name
    :meth:`make_synchronous` gives the primary. :meth:`crash` and :meth:`promote` are a
    primary's loss and the standby's promotion (docs/HA.md).
    """

    def __init__(self, bin_dir: Path | None = None, *, port: int | None = None,
                 standby_of: PostgresServer | None = None, name: str = "primary") -> None:
        self.bin_dir: Path | None = bin_dir
        if bin_dir is None and standby_of is not None:
            self.bin_dir = standby_of.bin_dir
        self.standby_of = standby_of
        self.name = name
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = ROLE
        self.database = DATABASE
        self.workdir: Path | None = None
        self._run_as: list[str] = []
        self._owner: tuple[int, int] | None = None

    @property
    def dsn(self) -> str:
        """The libpq URL of the test database (trust auth: no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._workdir() / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the server puts its unix socket (inside the temp dir, not /run)."""
        return self._workdir() / "sock"

    @property
    def log_path(self) -> Path:
        """The server's log (pg_ctl -l)."""
        return self._workdir() / "postgres.log"

    def _workdir(self) -> Path:
        if self.workdir is None:
            raise PostgresError("the private PostgreSQL has not been started")
        return self.workdir

    def _tool(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _run(self, args: Sequence[str], *, timeout_s: float, as_server: bool = True) -> None:
        argv = [*self._run_as, *args] if as_server else list(args)
        try:
            result = subprocess.run(  # noqa: S603 -- our own tools, arguments not shell-parsed
                argv, cwd=self._workdir(), capture_output=True, timeout=timeout_s,
                check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"{args[0]} did not finish in {timeout_s} s") from exc
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise PostgresError(f"{Path(args[0]).name} failed ({result.returncode}): "
                                f"{detail}\n{log[-4000:]}")

    def _prepare_user(self, workdir: Path) -> None:
        if os.geteuid() != 0:
            return
        try:
            account = pwd.getpwnam(SERVICE_USER)
        except KeyError as exc:
            raise PostgresNotInstalledError(
                f"running as root and there is no {SERVICE_USER!r} user to run the server "
                f"as (initdb refuses root): {INSTALL_HINT}"
            ) from exc
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
        if runuser is None:
            raise PostgresError("running as root and runuser (util-linux) is missing")
        self._owner = (account.pw_uid, account.pw_gid)
        os.chown(workdir, *self._owner)
        self._run_as = [runuser, "-u", SERVICE_USER, "--"]

    def start(self) -> None:
        """Make the cluster, start it and create the test database."""
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir()
        self.workdir = Path(tempfile.mkdtemp(prefix="panicd-pg-"))
        try:
            self._prepare_user(self.workdir)
            primary = self.standby_of
            if primary is None:
                self._run([self._tool("initdb"), "-D", str(self.data_dir), "-U", self.user,
                           "--auth=trust", "-E", "UTF8", "--no-locale", "--no-instructions"],
                          timeout_s=START_TIMEOUT_S)
            else:
                # initdb's trust pg_hba.conf already admits replication from loopback.
                self._run([self._tool("pg_basebackup"), "-h", primary.host, "-p",
                           str(primary.port), "-U", primary.user, "-D", str(self.data_dir),
                           "-R", "-X", "stream", "-c", "fast"], timeout_s=START_TIMEOUT_S)
            self.socket_dir.mkdir(mode=0o700)
            if self._owner is not None:
                os.chown(self.socket_dir, *self._owner)
            settings = {**SETTINGS, "port": str(self.port),
                        "unix_socket_directories": f"'{self.socket_dir}'",
                        "cluster_name": f"'{self.name}'"}
            lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
            conf = self.data_dir / "postgresql.conf"
            # Later lines win in postgresql.conf; root may write the postgres user's file.
            with conf.open("a", encoding="utf-8") as handle:
                handle.write("\n# panicd private test cluster\n" + lines)
            self._run([self._tool("pg_ctl"), "start", "-D", str(self.data_dir), "-l",
                       str(self.log_path), "-w", "-t", str(START_TIMEOUT_S)],
                      timeout_s=START_TIMEOUT_S + 5)
            if primary is None:
                self._run([self._tool("createdb"), "-h", self.host, "-p", str(self.port),
                           "-U", self.user, self.database], timeout_s=30, as_server=False)
        except BaseException:
            self.stop()
            raise

    def query(self, statement: str) -> str:
        """One statement through ``psql``; its unaligned output (``psql -At``)."""
        try:
            result = subprocess.run(  # noqa: S603 -- our own tool, arguments not shell-parsed
                [self._tool("psql"), "-h", self.host, "-p", str(self.port), "-U", self.user,
                 "-d", self.database, "-At", "-v", "ON_ERROR_STOP=1", "-c", statement],
                capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"psql did not answer in 30 s: {statement}") from exc
        if result.returncode != 0:
            raise PostgresError(f"psql failed ({result.returncode}): "
                                f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode().strip()

    def make_synchronous(self, standby: PostgresServer, timeout_s: float = 30.0) -> None:
        """Make ``standby`` this primary's synchronous standby: a commit returns only once
        the standby has flushed it. Waits until the primary reports it ``sync``."""
        self.query(f"ALTER SYSTEM SET synchronous_standby_names = '{standby.name}'")
        self.query("SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.query("SELECT application_name, sync_state FROM pg_stat_replication")
            if f"{standby.name}|sync" in states.splitlines():
                return
            time.sleep(0.1)
        raise PostgresError(f"{standby.name} did not become a synchronous standby in "
                            f"{timeout_s} s")

    def crash(self) -> None:
        """Lose the server as a crash would (``pg_ctl stop -m immediate``: no checkpoint,
        clients cut off); its directory stays until :meth:`stop`."""
        self._run([self._tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m",
                   "immediate", "-w", "-t", str(STOP_TIMEOUT_S)], timeout_s=STOP_TIMEOUT_S + 5)

    def promote(self) -> None:
        """Promote this standby to primary (``pg_ctl promote``, waits until it writes)."""
        self._run([self._tool("pg_ctl"), "promote", "-D", str(self.data_dir), "-w", "-t",
                   str(START_TIMEOUT_S)], timeout_s=START_TIMEOUT_S + 5)

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def stop(self) -> None:
        """Stop the server (fast shutdown; SIGKILL if it hangs) and remove its directory."""
        if self.workdir is None:
            return
        if self._postmaster_pid() is not None:
            try:
                self._run([self._tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m",
                           "fast", "-w", "-t", str(STOP_TIMEOUT_S)], timeout_s=STOP_TIMEOUT_S + 5)
            except PostgresError:
                pid = self._postmaster_pid()
                if pid is not None:
                    # A hung fast shutdown: kill the postmaster; its backends exit when
                    # they see it gone. The data is thrown away anyway.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

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
