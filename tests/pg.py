"""The private PostgreSQL for tests: a throw-away cluster on a free loopback port.

Use the session fixture ``postgres`` (a started ``firmware_sim.pgserver.PostgresServer``;
``postgres.dsn`` is e.g. ``postgresql://panicd@127.0.0.1:PORT/panicd_test``, the database
already created) by registering this module as a plugin: ``pytest_plugins = [...,
"tests.pg"]`` in ``tests/conftest.py``. Prerequisite: ``scripts/ensure-postgres.sh``
(installs Debian's ``postgresql``; its binaries live in /usr/lib/postgresql/<major>/bin).

The cluster is made by ``initdb`` and run by ``pg_ctl`` in a new temp directory, listening
on 127.0.0.1 only, with its unix socket in that directory, trust auth for the test role
and ``fsync`` / ``synchronous_commit`` on. It never uses or touches the machine's own
PostgreSQL on 5432. ``initdb`` refuses to run as root and tests and CI run as root: then
the server runs as the Debian package's unprivileged ``postgres`` user (``runuser -u
postgres --``) and the temp directory is chowned to it. At the end of the session it is
stopped with ``pg_ctl stop -m fast`` (killed if that hangs) and its directory removed.
Missing binaries fail the tests that ask for it, loudly: they are never skipped.

``pg_database`` gives one test a database of its own in that cluster: created empty
(``createdb``, from the template) under a unique name, dropped afterwards even if the test
left connections open (``dropdb --force``). Its value is the database's URL.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from firmware_sim.pgserver import PostgresNotInstalledError, PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster with the empty database ``panicd_test``."""
    server = PostgresServer()
    try:
        server.start()
    except PostgresNotInstalledError as exc:
        pytest.fail(f"{exc} -- the PostgreSQL tests need it, they are not skipped")
    try:
        yield server
    finally:
        server.stop()


def _client(server: PostgresServer, tool: str, *args: str) -> None:
    assert server.bin_dir is not None
    subprocess.run(
        [str(server.bin_dir / tool), "-h", server.host, "-p", str(server.port), "-U",
         server.user, *args],
        check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def database_url(server: PostgresServer, name: str) -> str:
    """The URL of database ``name`` in the private cluster."""
    return f"postgresql://{server.user}@{server.host}:{server.port}/{name}"


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database for this test alone (dropped after it)."""
    name = f"panicd_{uuid.uuid4().hex[:16]}"
    _client(postgres, "createdb", name)
    try:
        yield database_url(postgres, name)
    finally:
        _client(postgres, "dropdb", "--force", name)


def pg_rows(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows of one query on database ``url``, from synchronous test code; ``?``
    placeholders (SQLite's, so one test reads either backend) become ``$1, $2, …``.
    A table the daemon has not created yet reads as :class:`LookupError`."""
    numbered = iter(range(1, len(params) + 1))
    query = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)

    async def fetch() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [tuple(row) for row in await conn.fetch(query, *params)]
        except asyncpg.UndefinedTableError as exc:
            raise LookupError(str(exc)) from exc
        finally:
            await conn.close()

    return asyncio.run(fetch())
