"""Both ingest stores behind one face, so store tests run the same assertions on each.

A test asks for the ``backend`` fixture (parametrised over ``sqlite`` and ``postgresql``):
it opens a fresh store on an empty database of its own and reads committed rows through
a second, independent connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest

from store.pg_ingest import PgIngestStore, PressConflictError
from store.sqlite import SqliteStore

AnyStore = SqliteStore | PgIngestStore


@dataclass(frozen=True, slots=True)
class SqliteBackend:
    """SQLite: a new file per test."""

    path: Path
    name: str = "sqlite"
    # What the store refuses a second signed press with, and a word of the message.
    duplicate_press: type[Exception] = sqlite3.IntegrityError
    duplicate_press_match: str = "UNIQUE"
    # Tables an empty database has once a newer panicd set its version (none: a pragma).
    version_tables: frozenset[str] = frozenset()
    # Tables of this backend alone (the instances' heartbeats: one box has no peers).
    own_tables: frozenset[str] = frozenset()

    def store(self) -> AnyStore:
        """A store on this database, not yet opened."""
        return SqliteStore(self.path)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Committed rows, read through a connection of the test's own."""
        async with aiosqlite.connect(self.path) as db:
            return [tuple(row) for row in await db.execute_fetchall(sql)]

    async def tables(self) -> set[str]:
        """The database's tables."""
        rows = await self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(row[0]) for row in rows}

    async def version(self) -> int:
        """The schema version the database records."""
        return int((await self.rows("PRAGMA user_version"))[0][0])

    async def set_version(self, version: int) -> None:
        """Record a schema version on the database as another panicd would."""
        async with aiosqlite.connect(self.path) as db:
            await db.execute(f"PRAGMA user_version = {version}")
            await db.commit()


@dataclass(frozen=True, slots=True)
class PgBackend:
    """PostgreSQL: a new database per test in the session's private cluster."""

    url: str
    name: str = "postgresql"
    duplicate_press: type[Exception] = PressConflictError
    duplicate_press_match: str = "already stored"
    version_tables: frozenset[str] = frozenset({"schema_version"})
    own_tables: frozenset[str] = frozenset({"instances"})

    def store(self) -> AnyStore:
        """A store on this database, not yet opened."""
        return PgIngestStore(self.url)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Committed rows, read through a connection of the test's own."""
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def tables(self) -> set[str]:
        """The database's tables."""
        rows = await self.rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        return {str(row[0]) for row in rows}

    async def version(self) -> int:
        """The schema version the database records."""
        return int((await self.rows("SELECT version FROM schema_version"))[0][0])

    async def set_version(self, version: int) -> None:
        """Record a schema version on the database as another panicd would."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (one BOOLEAN PRIMARY KEY"
                " DEFAULT TRUE CHECK (one), version BIGINT NOT NULL)"
            )
            await conn.execute(
                "INSERT INTO schema_version VALUES (TRUE, $1)"
                " ON CONFLICT (one) DO UPDATE SET version = EXCLUDED.version", version
            )
        finally:
            await conn.close()


Backend = SqliteBackend | PgBackend


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """An empty database on each backend (PostgreSQL's only started if a test needs it)."""
    if request.param == "sqlite":
        yield SqliteBackend(tmp_path / "panicd.sqlite3")
    else:
        yield PgBackend(str(request.getfixturevalue("pg_database")))
