"""A database with history: what panicd's store looks like after months in service.

An empty database hides every cost that grows with the tables. ``fill_history`` creates
panicd's schema (the real migrations) and stores ``presses`` past presses, as bursts of
``PRESSES_PER_INCIDENT`` on resolved incidents of ``HISTORIC_DEVICES`` buttons that are
not in the benchmark's fleet, each with its path and the incident's timeline, so the
benchmark's own presses land on top of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiosqlite

from store.sqlite_schema import migrate

HISTORIC_DEVICES = 1_000
PRESSES_PER_INCIDENT = 20
_CHUNK = 50_000
_DAY_S = 86_400.0


async def _fill(database: Path, presses: int) -> None:
    async with aiosqlite.connect(database, isolation_level=None) as db:
        await migrate(db)
        await db.execute("BEGIN")
        incidents = (presses + PRESSES_PER_INCIDENT - 1) // PRESSES_PER_INCIDENT
        start = time.time() - 180 * _DAY_S
        await db.executemany(
            "INSERT INTO devices (id, last_counter, last_seen_at, last_kind, last_path, battery)"
            " VALUES (?, ?, ?, 'panic', 'mqtt:history', 90)",
            [(f"hist-{n:05d}", presses, start) for n in range(HISTORIC_DEVICES)],
        )
        for first in range(0, incidents, _CHUNK):
            rows = [_incident(n, start) for n in range(first, min(incidents, first + _CHUNK))]
            await db.executemany(
                "INSERT INTO incidents (id, device_id, status, test, opened_at, updated_at,"
                " closed_at, press_count, last_press_at, location_source, kelurahan_match,"
                " address, landmark) VALUES (?, ?, 'resolved', 0, ?, ?, ?, ?, ?, 'registered',"
                " 'inside', '', '')",
                rows,
            )
            await db.executemany(
                "INSERT INTO incident_events (incident_id, at, event, reason, actor)"
                " VALUES (?, ?, ?, ?, 'history')",
                [event for row in rows for event in _events(row)],
            )
        for first in range(0, presses, _CHUNK):
            chunk = list(_presses(first, min(presses, first + _CHUNK), start))
            await db.executemany(
                "INSERT INTO presses (id, device_id, counter, kind, format, trust, received_at,"
                " battery, incident_id, outcome) VALUES (?, ?, ?, 'panic', 'native', 'signed',"
                " ?, 90, ?, ?)",
                chunk,
            )
            await db.executemany(
                "INSERT INTO press_paths (press_id, path, first_heard_at, last_heard_at)"
                " VALUES (?, 'mqtt:history', ?, ?)",
                [(row[0], row[3], row[3]) for row in chunk],
            )
        await db.execute("COMMIT")


def _incident(n: int, start: float) -> tuple[int, str, float, float, float, int, float]:
    opened = start + n * 60.0
    closed = opened + 600.0
    device = f"hist-{n % HISTORIC_DEVICES:05d}"
    return (n + 1, device, opened, closed, closed, PRESSES_PER_INCIDENT, opened + 30.0)


def _events(row: tuple[int, str, float, float, float, int, float]) -> list[tuple[object, ...]]:
    incident, _device, opened, _updated, closed, _count, _last = row
    return [(incident, opened, "incident.opened", "panic_press"),
            (incident, closed, "incident.resolved", "operator")]


def _presses(first: int, end: int, start: float) -> Iterator[tuple[object, ...]]:
    for n in range(first, end):
        incident = n // PRESSES_PER_INCIDENT
        device = f"hist-{incident % HISTORIC_DEVICES:05d}"
        # Counters only grow per device: incident k of a device comes after incident k-1.
        counter = (incident // HISTORIC_DEVICES) * PRESSES_PER_INCIDENT + n % PRESSES_PER_INCIDENT
        outcome = "opened" if n % PRESSES_PER_INCIDENT == 0 else "attached"
        yield (n + 1, device, counter, start + incident * 60.0 + n % PRESSES_PER_INCIDENT,
               incident + 1, outcome)


def fill_history(database: Path, presses: int) -> float:
    """Create ``database`` with ``presses`` historic presses; seconds it took."""
    started = time.monotonic()
    asyncio.run(_fill(database, presses))
    return time.monotonic() - started
