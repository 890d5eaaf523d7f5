"""The migrations on real databases, SQLite and PostgreSQL alike: a database in service
moves to the current schema and keeps its rows; a newer one is refused in the same words."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest

from store import pg_schema, sqlite_schema
from store.errors import StoreError
from store.pg import PgDatabase, check_url


@dataclass(frozen=True, slots=True)
class OldDatabase:
    """A database left at an older schema version, on either backend."""

    kind: str
    target: str  # the SQLite file, or the PostgreSQL URL

    def _pg(self) -> bool:
        return self.kind == "postgresql"

    def _sql(self, sql: str) -> str:
        # The tests write SQLite's "?"; PostgreSQL numbers its placeholders.
        if not self._pg():
            return sql
        count = iter(range(1, sql.count("?") + 1))
        return re.sub(r"\?", lambda _match: f"${next(count)}", sql)

    async def at_version(self, version: int) -> None:
        """Apply the first ``version`` migrations as an older panicd did."""
        if self._pg():
            conn = await asyncpg.connect(self.target)
            try:
                for script in pg_schema.MIGRATIONS[:version]:
                    await conn.execute(script)
                await conn.execute(
                    "CREATE TABLE schema_version (one BOOLEAN PRIMARY KEY DEFAULT TRUE"
                    " CHECK (one), version BIGINT NOT NULL)"
                )
                await conn.execute("INSERT INTO schema_version VALUES (TRUE, $1)", version)
            finally:
                await conn.close()
            return
        with closing(sqlite3.connect(self.target)) as db:
            for script in sqlite_schema.MIGRATIONS[:version]:
                db.executescript(script)
            db.execute(f"PRAGMA user_version = {version}")
            db.commit()

    async def execute(self, sql: str, rows: Sequence[Sequence[Any]] = ((),)) -> None:
        """Run a statement once per row of parameters."""
        if self._pg():
            conn = await asyncpg.connect(self.target)
            try:
                for params in rows:
                    await conn.execute(self._sql(sql), *params)
            finally:
                await conn.close()
            return
        with closing(sqlite3.connect(self.target)) as db:
            for params in rows:
                db.execute(sql, params)
            db.commit()

    async def migrate(self) -> int:
        """Run the backend's migrate()."""
        if self._pg():
            conn = await asyncpg.connect(self.target)
            try:
                return await pg_schema.migrate(conn)
            finally:
                await conn.close()
        async with aiosqlite.connect(self.target) as db:
            return await sqlite_schema.migrate(db)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of a query."""
        if self._pg():
            conn = await asyncpg.connect(self.target)
            try:
                return [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()
        async with aiosqlite.connect(self.target) as db:
            return [tuple(row) for row in await db.execute_fetchall(sql)]

    async def indexes(self) -> set[str]:
        """The names of the database's indexes."""
        sql = (
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'" if self._pg()
            else "SELECT name FROM sqlite_master WHERE type = 'index'"
        )
        return {str(row[0]) for row in await self.rows(sql)}


@pytest.fixture(params=["sqlite", "postgresql"])
def old(request: pytest.FixtureRequest, tmp_path: Path) -> OldDatabase:
    if request.param == "sqlite":
        return OldDatabase("sqlite", str(tmp_path / "panicd.sqlite3"))
    return OldDatabase("postgresql", str(request.getfixturevalue("pg_database")))


def test_both_backends_are_at_the_same_schema_version() -> None:
    # Version N means the same schema on both; a migration is added to both lists.
    assert pg_schema.SCHEMA_VERSION == sqlite_schema.SCHEMA_VERSION


async def test_a_version_3_database_gains_the_partial_indexes_and_keeps_its_rows(
    old: OldDatabase,
) -> None:
    await old.at_version(3)
    await old.execute(
        "INSERT INTO outbox (key, person_id, phone, channel, purpose, body, state,"
        " created_at, due_at, updated_at) VALUES"
        " ('ops:health:1:ani', 'ani', '+62', 'sms', 'ops', 'b', 'sending', 1, 1, 1)"
    )
    assert await old.migrate() == sqlite_schema.SCHEMA_VERSION
    assert {"outbox_sending", "incidents_closed", "outbox_final"} <= await old.indexes()
    assert await old.rows("SELECT key, state, in_doubt_since FROM outbox") == [
        ("ops:health:1:ani", "sending", 1.0)
    ]


async def test_version_5_separates_a_network_counter_from_the_signed_one(
    old: OldDatabase,
) -> None:
    """A button locked out by a network frame's fCnt (issue 11 case 1) is healed on upgrade."""
    await old.at_version(4)
    await old.execute(
        "INSERT INTO presses (id, device_id, counter, kind, format, trust, received_at,"
        " outcome) VALUES (?, ?, ?, 'panic', ?, ?, 1, 'opened')",
        [
            (1, "btn-locked", 7, "native", "signed"),
            (2, "btn-locked", 4294967295, "chirpstack", "network"),
            (3, "btn-fine", 12, "native", "signed"),
            (4, "zigbee-1", 40, "zigbee2mqtt", "network"),
        ],
    )
    await old.execute(
        "INSERT INTO devices (id, last_counter, last_seen_at) VALUES (?, ?, 1)",
        [("btn-locked", 4294967295), ("btn-fine", 12), ("zigbee-1", 40), ("idle", None)],
    )
    assert await old.migrate() == sqlite_schema.SCHEMA_VERSION
    assert await old.rows(
        "SELECT id, last_counter, replay_window, last_network_counter FROM devices ORDER BY id"
    ) == [
        ("btn-fine", 12, 1, None),
        ("btn-locked", 7, 1, 4294967295),
        ("idle", None, 0, None),
        ("zigbee-1", None, 0, 40),
    ]


async def test_a_newer_schema_is_refused_in_the_same_words_on_both(old: OldDatabase) -> None:
    await old.at_version(sqlite_schema.SCHEMA_VERSION)
    newer = sqlite_schema.SCHEMA_VERSION + 1
    if old.kind == "postgresql":
        await old.execute("UPDATE schema_version SET version = ?", [(newer,)])
    else:
        await old.execute(f"PRAGMA user_version = {newer}")
    expected = (
        f"database schema version {newer} is newer than this panicd"
        f" ({sqlite_schema.SCHEMA_VERSION})"
    )
    with pytest.raises(StoreError) as refused:
        await old.migrate()
    assert str(refused.value) == expected


async def test_postgresql_instances_starting_at_once_migrate_once(pg_database: str) -> None:
    # Four panicd instances open one empty database together: each migration step runs
    # once, under the advisory lock, and all of them find the schema current.
    async def open_one() -> None:
        async with PgDatabase(pg_database):
            pass

    await asyncio.gather(*(open_one() for _ in range(4)))
    conn = await asyncpg.connect(pg_database)
    try:
        assert await pg_schema.schema_version(conn) == pg_schema.SCHEMA_VERSION
        assert await conn.fetchval("SELECT count(*) FROM schema_version") == 1
    finally:
        await conn.close()


async def test_postgresql_migration_step_is_all_or_nothing(pg_database: str) -> None:
    # A step that fails (here: a table in its way) leaves the version and schema as they
    # were, so the next start retries the whole step.
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("CREATE TABLE device_health (x INT)")
        with pytest.raises(asyncpg.DuplicateTableError):
            await pg_schema.migrate(conn)
        assert await pg_schema.schema_version(conn) == 2
        tables = {row[0] for row in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )}
        assert "outbox" in tables
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://panicd:secret@db.example/panicd",
        "postgresql://panicd@db.example/panicd?password=secret",
        "mysql://panicd@db.example/panicd",
    ],
)
def test_a_url_with_a_password_or_of_another_database_is_refused(url: str) -> None:
    with pytest.raises(StoreError):
        check_url(url)
