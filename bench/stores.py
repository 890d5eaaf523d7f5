"""The store a benchmark runs panicd on, fresh for every run, and a reader of it.

``--store-url`` picks the backend (issue 13 item 7):

* ``sqlite:///PATH``: that file, which must not exist yet; it is made by panicd and
  removed (with its ``-wal``/``-shm``) after the run. Without a URL the SQLite store is
  ``panicd.sqlite3`` in the run's temp dir, as before.
* ``postgresql://user@host[:port]/db``: a database of the run's own is created on that
  server (``CREATE DATABASE`` over a connection to ``db``) and dropped after the run, so
  every run starts empty. The password, if any, comes from ``$PANICD_STORE_PASSWORD``, as
  it does for panicd, which inherits the environment.
* PostgreSQL without a URL: a private cluster (``firmware_sim.pgserver``, the one
  ``tests/pg.py`` starts: initdb on a free loopback port, fsync and synchronous_commit
  on) for the whole benchmark, never the machine's own on 5432.

:class:`Reader` runs the benchmark's read-only queries on either backend, with SQLite's
``?`` placeholders (so one query serves both); a table panicd has not created yet reads
as :class:`LookupError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import psycopg
from psycopg import sql

from firmware_sim.pgserver import PostgresServer
from store.url import PASSWORD_ENV, StoreUrl, parse_store_url

Backend = Literal["sqlite", "postgresql"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "postgresql")


@dataclass(frozen=True, slots=True)
class BenchStore:
    """One run's store: the backend, panicd's ``[store] url`` and, for SQLite, its file."""

    backend: Backend
    url: str
    sqlite_path: Path | None = None

    def reader(self, timeout_s: float) -> Reader:
        """A read-only connection to it (waits up to ``timeout_s`` for SQLite's file)."""
        return Reader(self, timeout_s)


class Reader:
    """Read-only queries on a run's store; a context manager."""

    def __init__(self, store: BenchStore, timeout_s: float) -> None:
        self._store = store
        self._timeout_s = timeout_s
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[tuple[Any, ...]] | None = None

    def __enter__(self) -> Self:
        path = self._store.sqlite_path
        if path is None:
            self._pg = psycopg.connect(self._store.url, autocommit=True,
                                       password=os.environ.get(PASSWORD_ENV))
            return self
        deadline = time.monotonic() + self._timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("panicd never created its database")
            time.sleep(0.005)
        self._sqlite = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        return self

    def rows(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """The rows of ``query`` (``?`` placeholders)."""
        if self._sqlite is not None:
            try:
                return self._sqlite.execute(query, tuple(params)).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise LookupError(str(exc)) from exc
                raise
        if self._pg is None:
            raise RuntimeError("the reader is not open")
        try:
            return self._pg.execute(re.sub(r"\?", "%s", query).encode(), tuple(params)).fetchall()
        except psycopg.errors.UndefinedTable as exc:
            raise LookupError(str(exc)) from exc

    def scalar(self, query: str, params: Sequence[object] = ()) -> Any:
        """The first column of the first row."""
        return self.rows(query, params)[0][0]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            self._pg.close()


class Stores:
    """Makes each run's fresh store; owns the private PostgreSQL (started when first
    needed, stopped on exit). A context manager."""

    def __init__(self, store_url: str | None) -> None:
        self._sqlite_file: Path | None = None
        self._pg_url: StoreUrl | None = None
        if store_url is not None:
            parsed = parse_store_url(store_url, Path.cwd())
            if parsed.backend == "sqlite":
                self._sqlite_file = parsed.path
            else:
                self._pg_url = parsed
        self._server: PostgresServer | None = None

    @property
    def given(self) -> Backend | None:
        """The backend ``--store-url`` named, if it named one."""
        if self._sqlite_file is not None:
            return "sqlite"
        return "postgresql" if self._pg_url is not None else None

    @property
    def server(self) -> PostgresServer | None:
        """The private PostgreSQL, if one was started."""
        return self._server

    def __enter__(self) -> Self:
        return self

    @contextlib.contextmanager
    def fresh(self, backend: Backend, workdir: Path) -> Iterator[BenchStore]:
        """An empty store of ``backend`` for one run, removed after it."""
        if backend == "sqlite":
            with self._fresh_sqlite(workdir) as store:
                yield store
            return
        base = self._pg_url
        if base is None:
            if self._server is None:
                self._server = PostgresServer()
                self._server.start()
                print(f"private PostgreSQL at {self._server.dsn} ({self._server.bin_dir})",
                      file=sys.stderr)
            base = parse_store_url(self._server.dsn, workdir)
        with _fresh_database(base) as url:
            yield BenchStore("postgresql", url)

    @contextlib.contextmanager
    def _fresh_sqlite(self, workdir: Path) -> Iterator[BenchStore]:
        path = self._sqlite_file or workdir / "cfg" / "panicd.sqlite3"
        if self._sqlite_file is not None and path.exists():
            raise RuntimeError(f"{path} exists: the benchmark needs a database of its own")
        try:
            yield BenchStore("sqlite", f"sqlite:///{path}", path)
        finally:
            if self._sqlite_file is not None:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@contextlib.contextmanager
def _fresh_database(base: StoreUrl) -> Iterator[str]:
    """A new database on ``base``'s server for one run; its URL; dropped afterwards."""
    name = f"panicd_bench_{uuid.uuid4().hex[:12]}"
    admin = base.dsn
    if admin is None:  # pragma: no cover -- a PostgreSQL StoreUrl always has a DSN
        raise ValueError("not a PostgreSQL URL")
    password = os.environ.get(PASSWORD_ENV)
    with psycopg.connect(admin, autocommit=True, password=password) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fresh = dataclasses.replace(base, database=name).dsn
    assert fresh is not None
    try:
        yield fresh
    finally:
        with psycopg.connect(admin, autocommit=True, password=password) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def server_cpu_s(server: PostgresServer | None) -> float:
    """CPU seconds the private PostgreSQL's processes (postmaster and its children) have
    used so far; 0 when there is none (SQLite runs inside panicd)."""
    if server is None or server.workdir is None:
        return 0.0
    pid_file = server.data_dir / "postmaster.pid"
    try:
        postmaster = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return 0.0
    total = 0.0
    clock = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            # proc(5), counted after comm's ")": ppid is field 4, utime/stime 14/15,
            # cutime/cstime 16/17 (the backends that have exited, reaped by the
            # postmaster, count there).
            if int(entry.name) == postmaster:
                total += sum(int(value) for value in fields[11:15]) / clock
            elif int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / clock
    return total
