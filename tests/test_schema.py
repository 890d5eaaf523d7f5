"""The migrations on real database files: a database in service moves to the current
schema and keeps its rows."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import aiosqlite

from gateway.schema import MIGRATIONS, SCHEMA_VERSION, migrate


async def test_a_version_3_database_gains_the_partial_indexes_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        for script in MIGRATIONS[:3]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 3")
        db.execute(
            "INSERT INTO outbox (key, person_id, phone, channel, purpose, body, state,"
            " created_at, due_at, updated_at) VALUES"
            " ('ops:health:1:ani', 'ani', '+62', 'sms', 'ops', 'b', 'sending', 1, 1, 1)"
        )
        db.commit()
    async with aiosqlite.connect(path) as db:
        assert await migrate(db) == SCHEMA_VERSION
        indexes = {
            str(row[0])
            for row in await db.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'index'"
            )
        }
        assert {"outbox_sending", "incidents_closed", "outbox_final"} <= indexes
        stored = list(await db.execute_fetchall("SELECT key, state FROM outbox"))
    assert [tuple(row) for row in stored] == [("ops:health:1:ani", "sending")]
