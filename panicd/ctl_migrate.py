"""``panicctl migrate [--check]``: bring the store's schema to this panicd's version.

One function per backend (:data:`_BACKENDS`): each reports the schema version it found
and the one it reached. The daemon migrates at start anyway; this lets an operator do it
(or check for it) before a start, e.g. ahead of rolling out several instances. Exit 0
up to date (or migrated), 1 with ``--check`` when migrations are pending, 2 for a
database from a newer panicd (or a bad configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiosqlite

from gateway.config import Config, load_config
from panicd.ctl_format import err, out, print_json
from store.errors import StoreError, StoreUnreachableError, refuse_newer_schema
from store.sqlite_schema import SCHEMA_VERSION, migrate


@dataclass(frozen=True, slots=True)
class Migration:
    """What one ``migrate`` run found and did."""

    found: int  # the schema version before
    target: int  # this panicd's version
    applied: int  # migrations run (0 with --check)

    @property
    def pending(self) -> int:
        """Migrations still to run after this one."""
        return self.target - self.found - self.applied

    def line(self) -> str:
        """``schema 4 -> 6 (2 applied)``, ``(2 pending)`` or ``(up to date)``."""
        if self.applied:
            state = f"{self.applied} applied"
        elif self.pending:
            state = f"{self.pending} pending"
        else:
            state = "up to date"
        return f"schema {self.found} -> {self.target} ({state})"


async def _sqlite_version(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def _migrate_sqlite(config: Config, check: bool) -> Migration:
    path = config.database
    if check:
        if not path.exists():
            # No file is schema 0; checking must not create one.
            return Migration(0, SCHEMA_VERSION, 0)
        async with aiosqlite.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            found = await _sqlite_version(db)
        refuse_newer_schema(found, SCHEMA_VERSION)
        return Migration(found, SCHEMA_VERSION, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(path, isolation_level=None) as db:
        found = await _sqlite_version(db)
        # The store's own migrate: the same transactions and the same refusal of a newer
        # schema as the daemon's start.
        reached = await migrate(db)
    return Migration(found, reached, reached - found)


async def _migrate_postgresql(config: Config, check: bool) -> Migration:
    # Imported here: a SQLite panicctl never loads the PostgreSQL driver.
    import asyncpg  # noqa: PLC0415

    from store import pg_schema  # noqa: PLC0415
    from store.pg import CONNECT_TIMEOUT_S  # noqa: PLC0415

    store = config.store
    try:
        conn = await asyncpg.connect(store.dsn, password=store.password,
                                     timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreUnreachableError(f"cannot connect to {store}: {exc}") from None
    try:
        found = await pg_schema.schema_version(conn)
        refuse_newer_schema(found, pg_schema.SCHEMA_VERSION)
        if check:
            return Migration(found, pg_schema.SCHEMA_VERSION, 0)
        # The store's own migrate: each migration in its transaction under the advisory
        # lock, so a panicd starting meanwhile (or a second migrate) waits, never doubles.
        reached = await pg_schema.migrate(conn)
    finally:
        await conn.close()
    return Migration(found, reached, reached - found)


_BACKENDS: dict[str, Callable[[Config, bool], Coroutine[Any, Any, Migration]]] = {
    "sqlite": _migrate_sqlite,
    "postgresql": _migrate_postgresql,
}


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations (or, with ``--check``, only say whether any are pending)."""
    config = load_config(args.config)
    try:
        done = asyncio.run(_BACKENDS[config.store.backend](config, args.check))
    except StoreUnreachableError as exc:  # the server away: not the schema's fault
        err(exc)
        return 1
    except StoreError as exc:
        err(exc)
        return 2
    except sqlite3.DatabaseError as exc:
        err(f"database error: {exc}")
        return 1
    if args.json:
        print_json({"store": str(config.store), "from": done.found, "to": done.target,
                    "applied": done.applied, "pending": done.pending})
    else:
        out(done.line())
    return 1 if done.pending else 0


def register(add: Any) -> None:
    """Add ``migrate`` to panicctl's subcommands (``add`` as in panicd.cli)."""
    p = add("migrate", cmd_migrate, "apply the store's schema migrations")
    p.add_argument("--check", action="store_true",
                   help="apply nothing; exit 1 when migrations are pending")
