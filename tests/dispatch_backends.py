"""The dispatch store on both backends, for tests that run each assertion on both: a
fresh SQLite file or a fresh database on the private PostgreSQL (tests/pg.py's
``pg_database``), and a few statements through the store's own :class:`store.sql.Tx`
(``?`` placeholders on both)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from store.pg_dispatch import PgDispatchStore
from store.sqlite_dispatch import SqliteDispatchStore

T0 = 1_780_000_000.0
BACKENDS = ["sqlite", "postgresql"]

Store = SqliteDispatchStore | PgDispatchStore


@asynccontextmanager
async def store_factory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Store]]:
    """Makes (not yet opened) dispatch stores on one fresh database of ``backend``."""
    if backend == "sqlite":
        yield lambda: SqliteDispatchStore(tmp_path / "panicd.sqlite3")
        return
    url: str = request.getfixturevalue("pg_database")  # tests/pg.py: dropped after the test
    yield lambda: PgDispatchStore(url)


async def run(store: Store, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
    """One statement in a transaction of its own, through the store's Tx; its rows."""
    async with store.transaction() as tx:
        return await tx.rows(sql, params)


async def store_incidents(store: Store, statuses: list[str], *, planned: set[int]) -> None:
    """Incidents 1, 2, ... with these statuses; those in ``planned`` get a plan row."""
    async with store.transaction() as tx:
        await tx.executemany(
            "INSERT INTO incidents (id, device_id, status, test, opened_at, updated_at,"
            " press_count, last_press_at, location_source, kelurahan_match, address,"
            " landmark) VALUES (?, ?, ?, 0, ?, ?, 1, ?, 'registered', 'inside', '', '')",
            # One device each: PostgreSQL allows one active incident per device.
            [(incident_id, f"BTN-{incident_id}", status, T0, T0, T0)
             for incident_id, status in enumerate(statuses, 1)],
        )
        await tx.executemany(
            "INSERT INTO incident_dispatch (incident_id, policy_id, route, planned_at)"
            " VALUES (?, 'city', 'city', ?)",
            [(incident_id, T0) for incident_id in sorted(planned)],
        )
