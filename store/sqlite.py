"""The SQLite store: aiosqlite, WAL, one writer per process, versioned schema.

All writes of a batch happen in one ``BEGIN IMMEDIATE`` transaction; the batch's presses
are acknowledged to their senders only after ``COMMIT`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from gateway.dedup import ActiveIncident
from gateway.model import PressKind, Trust
from gateway.verify import DeviceState, KnownPress
from store.errors import StoreError
from store.ingest import BatchState, BatchWrites, window_from_sql, window_to_sql
from store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, migrate

# Re-exported: the store is where callers look for these.
__all__ = [
    "MIGRATIONS", "SCHEMA_VERSION", "StoreError", "migrate",
]


def _chunks(items: Sequence[Any], size: int = 400) -> Iterable[Sequence[Any]]:
    # SQLite caps host parameters per statement (32766 since 3.32, 999 before).
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True, slots=True)
class Writers:
    """What the database connections of one panicd process share.

    ``lock`` is held around every write transaction: left to SQLite, a second writer gets
    SQLITE_BUSY and its busy handler sleeps in steps of up to 100 ms, which showed as
    latency spikes in bench/dispatch.py. With ``background_checkpoints``, the process runs
    a :class:`store.checkpoint.WalCheckpointer` and no connection checkpoints the WAL
    inside one of its own commits.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background_checkpoints: bool = False


class SqliteDatabase:
    """One aiosqlite connection to panicd's database, migrated on open; an async context
    manager. Each component (ingest, dispatch) owns one, so they never share a transaction.
    """

    def __init__(self, path: Path, *, writers: Writers | None = None) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self.writers = writers or Writers()

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await self._connect()
        try:
            await self._opened()
        except BaseException:
            await self._db.close()
            raise
        return self

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves, so a batch is
        # exactly one transaction and the write lock is taken before the first read.
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            if self.writers.background_checkpoints:
                # SQLite's automatic checkpoint runs inside whichever commit crosses 1,000
                # WAL pages; on a database with a million presses that commit took up to
                # 262 ms. The process's WalCheckpointer does it off every commit path.
                await db.execute("PRAGMA wal_autocheckpoint = 0")
            await migrate(db)
        except BaseException:
            await db.close()
            raise
        return db

    async def reconnect(self) -> None:
        """Close the connection and open a fresh one.

        SQLite opens a file it may not write (immutable, wrong owner, a read-only mount)
        read-only, and the connection stays read-only after the file is writable again:
        only a new connection can take writes then.
        """
        old, self._db = self._db, None
        if old is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):  # ValueError: closed
                await old.close()
        self._db = await self._connect()
        await self._opened()

    async def _opened(self) -> None:
        """Called once the schema is current (subclasses load what they cache)."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def write_lock(self) -> asyncio.Lock:
        """The process's write lock, held around each write transaction."""
        return self.writers.lock

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection."""
        if self._db is None:
            raise StoreError(f"{type(self).__name__} is not open")
        return self._db


class SqliteStore(SqliteDatabase):
    """SQLite implementation of :class:`IngestStore`; an async context manager."""

    def __init__(self, path: Path, *, writers: Writers | None = None) -> None:
        super().__init__(path, writers=writers)
        self._holding = False
        # Set by a rollback: the next batch starts on a fresh connection (reconnect()).
        self._reconnect_first = False
        self._next_press = 1
        self._next_incident = 1
        self._base_press = 1
        self._base_incident = 1

    async def _opened(self) -> None:
        await self._load_ids()

    async def _load_ids(self) -> None:
        rows = await self.db.execute_fetchall(
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM presses),"
            " (SELECT COALESCE(MAX(id), 0) FROM incidents)"
        )
        (max_press, max_incident), *_ = list(rows)
        self._next_press = self._base_press = int(max_press) + 1
        self._next_incident = self._base_incident = int(max_incident) + 1

    def allocate_press_id(self) -> int:
        """A fresh press id, valid within the current transaction."""
        value = self._next_press
        self._next_press += 1
        return value

    def allocate_incident_id(self) -> int:
        """A fresh incident id, valid within the current transaction."""
        value = self._next_incident
        self._next_incident += 1
        return value

    async def begin(self) -> None:
        """Start the batch's write transaction (holding the process's write lock)."""
        await self.write_lock.acquire()
        self._holding = True
        try:
            if self._reconnect_first:
                # After a failed batch, whatever state the old connection was left in (a
                # read-only open above all) must not fail every retry for ever.
                await self.reconnect()
                self._reconnect_first = False
            await self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        # Only ever release what this store acquired: the lock is shared.
        if self._holding:
            self._holding = False
            self.write_lock.release()

    async def commit(self) -> None:
        """Make the batch durable."""
        await self.db.execute("COMMIT")
        self._base_press = self._next_press
        self._base_incident = self._next_incident
        self._release()

    async def rollback(self) -> None:
        """Abandon the batch (ids handed out since begin are forgotten); the next batch
        begins on a fresh connection."""
        self._reconnect_first = True
        try:
            if self.db.in_transaction:
                await self.db.execute("ROLLBACK")
        finally:
            self._next_press = self._base_press
            self._next_incident = self._base_incident
            self._release()

    async def batch_state(
        self, device_ids: Iterable[str], keys: Iterable[tuple[str, int]]
    ) -> BatchState:
        """Device state, active incidents and already stored presses for a batch."""
        ids = sorted(set(device_ids))
        devices: dict[str, DeviceState] = {}
        active: dict[str, ActiveIncident] = {}
        active_test: dict[str, ActiveIncident] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            # Only "?" placeholders are interpolated into these statements.
            sql = (
                "SELECT id, last_counter, last_seen_at, battery, replay_window,"  # noqa: S608
                f" last_network_counter FROM devices WHERE id IN ({marks})"
            )
            rows = await self.db.execute_fetchall(sql, chunk)
            for row in rows:
                devices[row[0]] = DeviceState(
                    row[0], row[1], row[2], row[3], window_from_sql(row[4]), row[5]
                )
            sql = f"SELECT id, device_id, test, opened_at, press_count, urgent FROM incidents WHERE device_id IN ({marks}) AND status IN ('open', 'acknowledged') ORDER BY id"  # noqa: S608, E501
            rows = await self.db.execute_fetchall(sql, chunk)
            for row in rows:
                incident = ActiveIncident(
                    id=row[0],
                    device_id=row[1],
                    test=bool(row[2]),
                    opened_at=row[3],
                    press_count=row[4],
                    urgent=bool(row[5]),
                )
                # ORDER BY id: if several are active (an operator reopened one), the
                # newest wins, deterministically.
                (active_test if incident.test else active)[incident.device_id] = incident
        known: dict[tuple[str, int], KnownPress] = {}
        key_list = sorted(set(keys))
        for chunk in _chunks(key_list, 200):
            values = ",".join("(?, ?)" for _ in chunk)
            params = [part for key in chunk for part in key]
            # A join from the keys, so each is one index search: `(device_id, counter) IN
            # (VALUES …)` made SQLite 3.40 scan every press ever stored, once per batch.
            sql = (
                f"WITH k (device_id, counter) AS (VALUES {values})"  # noqa: S608
                " SELECT p.device_id, p.counter, p.id, p.kind, p.received_at, p.trust,"
                " p.answered_at"
                " FROM k JOIN presses AS p ON p.device_id = k.device_id AND p.counter = k.counter"
                " ORDER BY p.id"
            )
            rows = await self.db.execute_fetchall(sql, params)
            for row in rows:
                known[row[0], row[1]] = KnownPress(
                    row[2], PressKind(row[3]), row[4], Trust(row[5]), row[6]
                )
        return BatchState(devices, active, active_test, known)

    async def write(self, writes: BatchWrites) -> None:
        """Apply a batch's writes inside the open transaction."""
        db = self.db
        if writes.incidents:
            await db.executemany(
                "INSERT INTO incidents (id, device_id, status, test, opened_at, updated_at,"
                " press_count, last_press_at, lat, lon, location_source, kelurahan_kode,"
                " kelurahan, kecamatan, kelurahan_match, address, landmark)"
                " VALUES (?, ?, 'open', ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        i.id,
                        i.device_id,
                        int(i.test),
                        i.opened_at,
                        i.opened_at,
                        i.opened_at,
                        i.lat,
                        i.lon,
                        i.location_source,
                        i.kelurahan_kode,
                        i.kelurahan,
                        i.kecamatan,
                        i.kelurahan_match,
                        i.address,
                        i.landmark,
                    )
                    for i in writes.incidents
                ],
            )
        if writes.presses:
            await db.executemany(
                "INSERT INTO presses (id, device_id, counter, kind, format, trust,"
                " received_at, device_time, battery, lat, lon, accuracy_m, incident_id,"
                " outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        p.id,
                        p.device_id,
                        p.counter,
                        p.kind,
                        p.format,
                        p.trust,
                        p.received_at,
                        p.device_time,
                        p.battery,
                        p.lat,
                        p.lon,
                        p.accuracy_m,
                        p.incident_id,
                        p.outcome,
                    )
                    for p in writes.presses
                ],
            )
        if writes.paths:
            await db.executemany(
                "INSERT INTO press_paths (press_id, path, first_heard_at, last_heard_at,"
                " heard, rssi, snr) VALUES (?, ?, ?, ?, 1, ?, ?)"
                " ON CONFLICT (press_id, path) DO UPDATE SET heard = heard + 1,"
                " last_heard_at = MAX(last_heard_at, excluded.last_heard_at)",
                [(p.press_id, p.path, p.heard_at, p.heard_at, p.rssi, p.snr) for p in writes.paths],
            )
        if writes.answered:
            await db.executemany(
                "UPDATE presses SET answered_at = MAX(COALESCE(answered_at, 0), ?)"
                " WHERE id = ?",
                [(at, press_id) for press_id, at in writes.answered],
            )
        if writes.incident_changes:
            await db.executemany(
                "UPDATE incidents SET"
                " press_count = press_count + ?,"
                " last_press_at = CASE WHEN ? > 0 THEN MAX(last_press_at, ?)"
                "   ELSE last_press_at END,"
                " updated_at = MAX(updated_at, ?),"
                " status = COALESCE(?, status),"
                " closed_at = CASE WHEN ? IN ('resolved', 'cancelled') THEN ? ELSE closed_at END,"
                " urgent = COALESCE(?, urgent),"
                " lat = COALESCE(?, lat), lon = COALESCE(?, lon),"
                " location_source = COALESCE(?, location_source)"
                " WHERE id = ?",
                [
                    (
                        c.add_presses,
                        c.add_presses,
                        c.at,
                        c.at,
                        c.status,
                        c.status,
                        c.at,
                        None if c.urgent is None else int(c.urgent),
                        c.lat,
                        c.lon,
                        c.location_source,
                        c.id,
                    )
                    for c in writes.incident_changes
                ],
            )
        if writes.timeline:
            await db.executemany(
                "INSERT INTO incident_events (incident_id, at, event, reason, actor, press_id,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        t.incident_id,
                        t.at,
                        t.event,
                        t.reason,
                        t.actor,
                        t.press_id,
                        None if t.detail is None else json.dumps(t.detail, sort_keys=True),
                    )
                    for t in writes.timeline
                ],
            )
        if writes.devices:
            await db.executemany(
                "INSERT INTO devices (id, last_counter, last_seen_at, last_kind, last_path,"
                " battery, replay_window, last_network_counter) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET"
                " last_counter = COALESCE(excluded.last_counter, last_counter),"
                " last_seen_at = MAX(COALESCE(last_seen_at, 0), excluded.last_seen_at),"
                " last_kind = excluded.last_kind, last_path = excluded.last_path,"
                " battery = COALESCE(excluded.battery, battery),"
                " replay_window = excluded.replay_window,"
                " last_network_counter = COALESCE(excluded.last_network_counter,"
                " last_network_counter)",
                [
                    (
                        d.state.device_id,
                        d.state.last_counter,
                        d.state.last_seen_at,
                        d.kind,
                        d.path,
                        d.state.battery,
                        window_to_sql(d.state.window),
                        d.state.last_network_counter,
                    )
                    for d in writes.devices.values()
                ],
            )
        if writes.dead_letters:
            await db.executemany(
                "INSERT INTO dead_letters (received_at, source, path, format, device_ref,"
                " reason, detail, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        d.received_at,
                        d.source,
                        d.path,
                        d.format,
                        d.device_ref,
                        d.reason,
                        d.detail,
                        d.payload,
                    )
                    for d in writes.dead_letters
                ],
            )
