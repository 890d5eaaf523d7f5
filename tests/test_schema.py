"""The migrations on real database files: a database in service moves to the current
schema and keeps its rows."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import aiosqlite

from store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, migrate


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


async def test_version_5_separates_a_network_counter_from_the_signed_one(tmp_path: Path) -> None:
    """A button locked out by a network frame's fCnt (issue 11 case 1) is healed on upgrade."""
    path = tmp_path / "panicd.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        for script in MIGRATIONS[:4]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 4")
        db.executemany(
            "INSERT INTO presses (id, device_id, counter, kind, format, trust, received_at,"
            " outcome) VALUES (?, ?, ?, 'panic', ?, ?, 1, 'opened')",
            [
                (1, "btn-locked", 7, "native", "signed"),
                (2, "btn-locked", 4294967295, "chirpstack", "network"),
                (3, "btn-fine", 12, "native", "signed"),
                (4, "zigbee-1", 40, "zigbee2mqtt", "network"),
            ],
        )
        db.executemany(
            "INSERT INTO devices (id, last_counter, last_seen_at) VALUES (?, ?, 1)",
            [("btn-locked", 4294967295), ("btn-fine", 12), ("zigbee-1", 40), ("idle", None)],
        )
        db.commit()
    async with aiosqlite.connect(path) as db:
        assert await migrate(db) == SCHEMA_VERSION
        stored = list(
            await db.execute_fetchall(
                "SELECT id, last_counter, replay_window, last_network_counter FROM devices"
                " ORDER BY id"
            )
        )
    assert [tuple(row) for row in stored] == [
        ("btn-fine", 12, 1, None),
        ("btn-locked", 7, 1, 4294967295),
        ("idle", None, 0, None),
        ("zigbee-1", None, 0, 40),
    ]
