"""The PostgreSQL ingest store: :class:`store.ingest.IngestStore` for several instances.

Every instance receives every press (issue 13 item 2), so two of them often hold the same
press at once. Exactness comes from the database, not from timing:

* ``batch_state`` first takes a transaction-scoped advisory lock per device, in one
  global order, so of two instances holding presses of one device the second reads
  device state, active incidents and stored presses only after the first has committed
  (READ COMMITTED: each statement sees what was committed before it started). It then
  finds the press known and opens no second incident.
* Behind that, the database refuses what must not exist twice: a unique partial index
  allows one active incident per device and test flag, and the press insert skips a
  signed (device, counter) that is already stored. A batch that would have stored such
  a press raises :class:`PressConflictError` so that it is decided again, not half
  applied.

Ids are handed out synchronously by the pipeline, so they are reserved ahead from the
tables' identity sequences; several instances never get the same id, gaps are expected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from gateway.dedup import ActiveIncident
from gateway.model import PressKind, Trust
from gateway.verify import DeviceState, KnownPress
from store.ingest import (
    BatchState,
    BatchWrites,
    IncidentChange,
    IncidentRow,
    PathRow,
    window_from_sql,
    window_to_sql,
)
from store.pg import PgDatabase
from store.sqlite_schema import StoreError

# The first key of the two-int4 advisory locks ingest takes per device (the two-key
# space is apart from the single-bigint one migrations use).
DEVICE_LOCK_CLASS = 0x70616E69  # "pani"

_CLOSED = ("resolved", "cancelled")


class PressConflictError(StoreError):
    """A press the batch took for new was already stored (by a peer): decide it again."""


def device_lock_key(device_id: str) -> int:
    """The device's advisory lock key: a stable signed 32-bit hash of its id."""
    digest = hashlib.blake2b(device_id.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(slots=True)
class _Ids:
    """Ids reserved from one sequence; those handed out since begin are ``ids[:used]``."""

    table: str
    ids: list[int] = field(default_factory=list)
    used: int = 0

    def take(self) -> int:
        if self.used >= len(self.ids):
            raise StoreError(f"{self.table}: the batch needs more ids than were reserved")
        value = self.ids[self.used]
        self.used += 1
        return value

    @property
    def left(self) -> int:
        return len(self.ids) - self.used

    def keep(self) -> None:
        """The ids handed out are used up (committed, or possibly committed)."""
        del self.ids[: self.used]
        self.used = 0

    def rewind(self) -> None:
        """The ids handed out were never committed: hand them out again."""
        self.used = 0


# The identity columns' sequences, by the names CREATE TABLE gives them (looking them up
# per row with pg_get_serial_sequence made a refill of 512 ids cost 5 ms).
_RESERVE = (
    "SELECT ARRAY(SELECT nextval('presses_id_seq') FROM generate_series(1, $1)),"
    " ARRAY(SELECT nextval('incidents_id_seq') FROM generate_series(1, $2))"
)
# Evaluated row by row in the array's order, which is sorted: every instance takes its
# locks in one global order, so two never wait for each other in a cycle.
_LOCK_DEVICES = "SELECT pg_advisory_xact_lock($1, key) FROM unnest($2::int4[]) AS key"
_DEVICES = (
    "SELECT id, last_counter, last_seen_at, battery, replay_window, last_network_counter"
    " FROM devices WHERE id = ANY($1::text[])"
)
_ACTIVE = (
    "SELECT id, device_id, test, opened_at, press_count, urgent FROM incidents"
    " WHERE device_id = ANY($1::text[]) AND status IN ('open', 'acknowledged') ORDER BY id"
)
_KNOWN = (
    "SELECT p.device_id, p.counter, p.id, p.kind, p.received_at, p.trust"
    " FROM unnest($1::text[], $2::bigint[]) AS k (device_id, counter)"
    " JOIN presses AS p ON p.device_id = k.device_id AND p.counter = k.counter"
    " ORDER BY p.id"
)
_INSERT_INCIDENT = (
    "INSERT INTO incidents (id, device_id, status, test, urgent, opened_at, updated_at,"
    " closed_at, press_count, last_press_at, lat, lon, location_source, kelurahan_kode,"
    " kelurahan, kecamatan, kelurahan_match, address, landmark)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,"
    " $18, $19)"
)
_UPDATE_INCIDENT = (
    "UPDATE incidents SET"
    " press_count = press_count + $1,"
    " last_press_at = CASE WHEN $1 > 0 THEN GREATEST(last_press_at, $2) ELSE last_press_at END,"
    " updated_at = GREATEST(updated_at, $2),"
    " status = COALESCE($3, status),"
    " closed_at = CASE WHEN $3 IN ('resolved', 'cancelled') THEN $2 ELSE closed_at END,"
    " urgent = COALESCE($4, urgent),"
    " lat = COALESCE($5, lat), lon = COALESCE($6, lon),"
    " location_source = COALESCE($7, location_source)"
    " WHERE id = $8"
)
# A signed press already stored is skipped, not an error that aborts the transaction;
# RETURNING tells which rows went in.
_INSERT_PRESSES = (
    "INSERT INTO presses (id, device_id, counter, kind, format, trust, received_at,"
    " device_time, battery, lat, lon, accuracy_m, incident_id, outcome)"
    " SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[],"
    " $6::text[], $7::float8[], $8::bigint[], $9::bigint[], $10::float8[], $11::float8[],"
    " $12::float8[], $13::bigint[], $14::text[])"
    " ON CONFLICT (device_id, counter) WHERE trust = 'signed' DO NOTHING"
    " RETURNING id"
)
_UPSERT_PATHS = (
    "INSERT INTO press_paths (press_id, path, first_heard_at, last_heard_at, heard, rssi, snr)"
    " SELECT * FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::float8[],"
    " $5::bigint[], $6::float8[], $7::float8[])"
    " ON CONFLICT (press_id, path) DO UPDATE SET heard = press_paths.heard + EXCLUDED.heard,"
    " last_heard_at = GREATEST(press_paths.last_heard_at, EXCLUDED.last_heard_at)"
)
_INSERT_EVENT = (
    "INSERT INTO incident_events (incident_id, at, event, reason, actor, press_id, detail)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_UPSERT_DEVICES = (
    "INSERT INTO devices (id, last_counter, last_seen_at, last_kind, last_path, battery,"
    " replay_window, last_network_counter)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::float8[], $4::text[], $5::text[],"
    " $6::bigint[], $7::bigint[], $8::bigint[])"
    " ON CONFLICT (id) DO UPDATE SET"
    " last_counter = COALESCE(EXCLUDED.last_counter, devices.last_counter),"
    " last_seen_at = GREATEST(COALESCE(devices.last_seen_at, 0), EXCLUDED.last_seen_at),"
    " last_kind = EXCLUDED.last_kind, last_path = EXCLUDED.last_path,"
    " battery = COALESCE(EXCLUDED.battery, devices.battery),"
    " replay_window = EXCLUDED.replay_window,"
    " last_network_counter = COALESCE(EXCLUDED.last_network_counter,"
    " devices.last_network_counter)"
)
_INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (received_at, source, path, format, device_ref, reason,"
    " detail, payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as per-column lists, the arguments of an ``unnest`` insert."""
    return [[row[index] for row in rows] for index in range(width)]


def _new_incident_row(row: IncidentRow, changes: Iterable[IncidentChange]) -> tuple[Any, ...]:
    """A new incident as it stands after the batch's changes to it, in their order.

    Folding them in here rather than inserting it 'open' and updating it lets the unique
    index see only the batch's outcome: a batch may open, cancel and open again for one
    device, and the first incident must never be active beside the second.
    """
    press_count, last_press_at, updated_at = 0, row.opened_at, row.opened_at
    status, closed_at, urgent = "open", None, 0
    lat, lon, source = row.lat, row.lon, row.location_source
    for change in changes:
        # Each field as _UPDATE_INCIDENT computes it from the row before the change.
        press_count += change.add_presses
        if change.add_presses > 0:
            last_press_at = max(last_press_at, change.at)
        updated_at = max(updated_at, change.at)
        if change.status is not None:
            status = change.status
        closed_at = change.at if change.status in _CLOSED else closed_at
        urgent = urgent if change.urgent is None else int(change.urgent)
        lat = lat if change.lat is None else change.lat
        lon = lon if change.lon is None else change.lon
        source = source if change.location_source is None else change.location_source
    return (
        row.id, row.device_id, status, int(row.test), urgent, row.opened_at, updated_at,
        closed_at, press_count, last_press_at, lat, lon, source, row.kelurahan_kode,
        row.kelurahan, row.kecamatan, row.kelurahan_match, row.address, row.landmark,
    )


def _path_rows(paths: Iterable[PathRow]) -> list[tuple[Any, ...]]:
    """One row per (press, path): the first hearing's values, the count, the last time.

    One statement cannot touch a row twice, so hearings of one path in one batch are
    merged here, to the row the SQLite store's one-by-one upserts leave.
    """
    merged: dict[tuple[int, str], list[Any]] = {}
    for path in paths:
        key = (path.press_id, path.path)
        row = merged.get(key)
        if row is None:
            merged[key] = [path.press_id, path.path, path.heard_at, path.heard_at, 1,
                           path.rssi, path.snr]
        else:
            row[3] = max(row[3], path.heard_at)
            row[4] += 1
    return [tuple(row) for row in merged.values()]


class PgIngestStore(PgDatabase):
    """PostgreSQL implementation of :class:`IngestStore`; an async context manager.

    ``batch_max`` is the most ids of each kind one batch may take (the pipeline's batch
    size); begin() keeps at least that many reserved.
    """

    def __init__(self, url: str, *, password: str | None = None, batch_max: int = 256,
                 min_size: int = 1, max_size: int = 2) -> None:
        super().__init__(url, password=password, min_size=min_size, max_size=max_size)
        self._reserve = batch_max
        self._presses = _Ids("presses")
        self._incidents = _Ids("incidents")
        self._conn: PoolConnectionProxy | None = None
        self._tx: Transaction | None = None
        # Set once COMMIT has been sent: a failure after it leaves the batch in doubt, so
        # its ids may be stored and must not be handed out again.
        self._commit_sent = False

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._conn is not None:
                # A batch still open (its caller failed): closing the pool would wait for
                # its connection for ever.
                await self.rollback()
        finally:
            await super().__aexit__(exc_type, exc, tb)

    async def _opened(self) -> None:
        # The pipeline may ask for ids before its first begin().
        async with self.pool.acquire() as conn:
            await self._refill(conn)

    async def _refill(self, conn: PoolConnectionProxy) -> None:
        # Four batches' worth at a time: a refill is one round trip, the ids unused when
        # the instance stops are a gap, nothing more.
        want_presses = 4 * self._reserve if self._presses.left < self._reserve else 0
        want_incidents = 4 * self._reserve if self._incidents.left < self._reserve else 0
        if not (want_presses or want_incidents):
            return
        row = await conn.fetchrow(_RESERVE, want_presses, want_incidents)
        if row is None:  # a SELECT without FROM returns one row; never None
            raise StoreError("no ids reserved")
        self._presses.ids.extend(sorted(row[0]))
        self._incidents.ids.extend(sorted(row[1]))

    def allocate_press_id(self) -> int:
        """A fresh press id, valid within the current transaction."""
        return self._take(self._presses)

    def allocate_incident_id(self) -> int:
        """A fresh incident id, valid within the current transaction."""
        return self._take(self._incidents)

    def _take(self, ids: _Ids) -> int:
        try:
            return ids.take()
        except StoreError:
            # The batch is bigger than batch_max said: it fails, and its retry's begin()
            # reserves enough.
            self._reserve *= 2
            raise

    @property
    def conn(self) -> PoolConnectionProxy:
        """The connection of the open transaction."""
        if self._conn is None or self._tx is None:
            raise StoreError(f"{type(self).__name__} has no open transaction")
        return self._conn

    async def begin(self) -> None:
        """Start the batch's transaction on a pooled connection (READ COMMITTED)."""
        conn = await self.pool.acquire()
        try:
            await self._refill(conn)
            tx = conn.transaction()
            await tx.start()
        except BaseException:
            await self.pool.release(conn)
            raise
        self._conn, self._tx, self._commit_sent = conn, tx, False

    async def commit(self) -> None:
        """Make the batch durable."""
        if self._tx is None:
            raise StoreError(f"{type(self).__name__} has no open transaction")
        self._commit_sent = True
        await self._tx.commit()
        self._presses.keep()
        self._incidents.keep()
        await self._release()

    async def rollback(self) -> None:
        """Abandon the batch (ids handed out since begin are forgotten)."""
        tx = self._tx
        try:
            if tx is not None and not self._commit_sent:
                await tx.rollback()
        finally:
            if self._commit_sent:
                # The COMMIT may have reached the server: never reuse these ids.
                self._presses.keep()
                self._incidents.keep()
            else:
                self._presses.rewind()
                self._incidents.rewind()
            await self._release()

    async def _release(self) -> None:
        conn, self._conn, self._tx = self._conn, None, None
        self._commit_sent = False
        if conn is not None:
            # A broken connection is terminated by the pool here, not reused.
            await self.pool.release(conn)

    async def batch_state(
        self, device_ids: Iterable[str], keys: Iterable[tuple[str, int]]
    ) -> BatchState:
        """Device state, active incidents and already stored presses for a batch, read
        under the batch's devices' locks (outside a batch: a plain read)."""
        if self._conn is not None:
            return await self._batch_state(self._conn, device_ids, keys)
        async with self.pool.acquire() as conn:
            return await self._batch_state(conn, device_ids, keys)

    @staticmethod
    async def _batch_state(
        conn: PoolConnectionProxy, device_ids: Iterable[str], keys: Iterable[tuple[str, int]]
    ) -> BatchState:
        ids = sorted(set(device_ids))
        key_list = sorted(set(keys))
        locked = {device_lock_key(device) for device in {*ids, *(k[0] for k in key_list)}}
        if locked and conn.is_in_transaction():
            # Its own statement: a statement's snapshot is taken before it runs, so reads
            # in the same statement would not see what the lock waited for.
            await conn.execute(_LOCK_DEVICES, DEVICE_LOCK_CLASS, sorted(locked))
        devices: dict[str, DeviceState] = {}
        active: dict[str, ActiveIncident] = {}
        active_test: dict[str, ActiveIncident] = {}
        if ids:
            for row in await conn.fetch(_DEVICES, ids):
                devices[row[0]] = DeviceState(
                    row[0], row[1], row[2], row[3], window_from_sql(row[4]), row[5]
                )
            for row in await conn.fetch(_ACTIVE, ids):
                incident = ActiveIncident(
                    id=row[0], device_id=row[1], test=bool(row[2]), opened_at=row[3],
                    press_count=row[4], urgent=bool(row[5]),
                )
                (active_test if incident.test else active)[incident.device_id] = incident
        known: dict[tuple[str, int], KnownPress] = {}
        if key_list:
            rows = await conn.fetch(_KNOWN, [k[0] for k in key_list], [k[1] for k in key_list])
            for row in rows:
                known[row[0], row[1]] = KnownPress(
                    row[2], PressKind(row[3]), row[4], Trust(row[5])
                )
        return BatchState(devices, active, active_test, known)

    async def write(self, writes: BatchWrites) -> None:
        """Apply a batch's writes inside the open transaction."""
        conn = self.conn
        new_ids = {incident.id for incident in writes.incidents}
        # Changes to incidents stored before go first: one may close an incident that a
        # new one of this batch replaces (a test press after the test window).
        old_changes = [c for c in writes.incident_changes if c.id not in new_ids]
        if old_changes:
            await conn.executemany(_UPDATE_INCIDENT, [
                (c.add_presses, c.at, c.status, None if c.urgent is None else int(c.urgent),
                 c.lat, c.lon, c.location_source, c.id)
                for c in old_changes
            ])
        if writes.incidents:
            await conn.executemany(_INSERT_INCIDENT, [
                _new_incident_row(i, [c for c in writes.incident_changes if c.id == i.id])
                for i in writes.incidents
            ])
        if writes.presses:
            await self._insert_presses(conn, writes)
        if writes.paths:
            await conn.execute(_UPSERT_PATHS, *_columns(_path_rows(writes.paths), 7))
        if writes.timeline:
            await conn.executemany(_INSERT_EVENT, [
                (t.incident_id, t.at, t.event, t.reason, t.actor, t.press_id,
                 None if t.detail is None else json.dumps(t.detail, sort_keys=True))
                for t in writes.timeline
            ])
        if writes.devices:
            rows = [
                (d.state.device_id, d.state.last_counter, d.state.last_seen_at, d.kind,
                 d.path, d.state.battery, window_to_sql(d.state.window),
                 d.state.last_network_counter)
                for d in writes.devices.values()
            ]
            await conn.execute(_UPSERT_DEVICES, *_columns(rows, 8))
        if writes.dead_letters:
            await conn.executemany(_INSERT_DEAD_LETTER, [
                (d.received_at, d.source, d.path, d.format, d.device_ref, d.reason, d.detail,
                 d.payload)
                for d in writes.dead_letters
            ])

    @staticmethod
    async def _insert_presses(conn: PoolConnectionProxy, writes: BatchWrites) -> None:
        rows = [
            (p.id, p.device_id, p.counter, p.kind, p.format, p.trust, p.received_at,
             p.device_time, p.battery, p.lat, p.lon, p.accuracy_m, p.incident_id, p.outcome)
            for p in writes.presses
        ]
        stored = {record[0] for record in await conn.fetch(_INSERT_PRESSES, *_columns(rows, 14))}
        skipped = [p for p in writes.presses if p.id not in stored]
        if skipped:
            shown = ", ".join(f"{p.device_id}#{p.counter}" for p in skipped[:5])
            raise PressConflictError(
                f"{len(skipped)} signed press(es) already stored by another writer: {shown}"
            )
