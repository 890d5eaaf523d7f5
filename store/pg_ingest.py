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

A batch is four round trips (docs/PERFORMANCE.md measured each statement's cost under
load): BEGIN with the device locks (one simple-protocol message), one statement reading
the batch's state, one statement writing everything (data-modifying CTEs), COMMIT.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from asyncpg.pool import PoolConnectionProxy

from gateway.dedup import ActiveIncident
from gateway.model import PressKind, Trust
from gateway.verify import DeviceState, KnownPress
from store import locks
from store.errors import StoreError
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

# The first key of the two-int4 advisory locks ingest takes per device (the two-key
# space is apart from the single-bigint one migrations use).
DEVICE_LOCK_CLASS = locks.DEVICE_CLASS

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
# locks in one global order, so two never wait for each other in a cycle. Sent with BEGIN
# as one simple-protocol message (the keys are ints, formatted by int()), so the lock
# costs no round trip of its own.
_BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"
_LOCK_DEVICES_LITERAL = (
    "SELECT pg_advisory_xact_lock({cls}, key) FROM unnest('{{{keys}}}'::int4[]) AS key"
)
_LOCK_DEVICES = "SELECT pg_advisory_xact_lock($1, key) FROM unnest($2::int4[]) AS key"
# Device state, active incidents and stored presses in one statement (one snapshot, one
# round trip), told apart by ``part``: 0 devices, 1 active incidents (by id: the newest
# wins, as before), 2 stored presses (by id).
_STATE = (
    "SELECT 0 AS part, id AS device_id, NULL::bigint AS id, last_counter AS n1,"
    " battery AS n2, replay_window AS n3, last_network_counter AS n4, last_seen_at AS f,"
    " NULL::text AS t1, NULL::text AS t2, NULL::float8 AS f2"
    " FROM devices WHERE id = ANY($1::text[])"
    " UNION ALL"
    " SELECT 1, device_id, id, test, press_count, urgent, NULL, opened_at, NULL, NULL, NULL"
    " FROM incidents WHERE device_id = ANY($1::text[]) AND status IN ('open', 'acknowledged')"
    " UNION ALL"
    " SELECT 2, p.device_id, p.id, p.counter, NULL, NULL, NULL, p.received_at, p.kind, p.trust,"
    " p.answered_at"
    " FROM unnest($2::text[], $3::bigint[]) AS k (device_id, counter)"
    " JOIN presses AS p ON p.device_id = k.device_id AND p.counter = k.counter"
    " ORDER BY part, id"
)
# The parts of the one write statement, each a data-modifying CTE over unnest()ed column
# arrays ({} is the unnest's argument list). They share one snapshot and cannot see each
# other's rows; what they must agree on is arranged in write().
_UPDATE_INCIDENTS = (
    "UPDATE incidents AS i SET"
    " press_count = i.press_count + c.add_presses,"
    " last_press_at = CASE WHEN c.pressed_at IS NULL THEN i.last_press_at"
    " ELSE GREATEST(i.last_press_at, c.pressed_at) END,"
    " updated_at = GREATEST(i.updated_at, c.at),"
    " status = COALESCE(c.status, i.status),"
    " closed_at = COALESCE(c.closed_at, i.closed_at),"
    " urgent = COALESCE(c.urgent, i.urgent),"
    " lat = COALESCE(c.lat, i.lat), lon = COALESCE(c.lon, i.lon),"
    " location_source = COALESCE(c.location_source, i.location_source)"
    " FROM unnest({}) AS c (id, add_presses, pressed_at, at, status, closed_at, urgent, lat,"
    " lon, location_source)"
    " WHERE i.id = c.id"
)
_UPDATE_TYPES = ("bigint", "bigint", "float8", "float8", "text", "float8", "bigint", "float8",
                 "float8", "text")
_INSERT_INCIDENTS = (
    "INSERT INTO incidents (id, device_id, status, test, urgent, opened_at, updated_at,"
    " closed_at, press_count, last_press_at, lat, lon, location_source, kelurahan_kode,"
    " kelurahan, kecamatan, kelurahan_match, address, landmark)"
    " SELECT * FROM unnest({})"
)
_INCIDENT_TYPES = ("bigint", "text", "text", "bigint", "bigint", "float8", "float8", "float8",
                   "bigint", "float8", "float8", "float8", "text", "text", "text", "text",
                   "text", "text", "text")
# A signed press already stored is skipped, not an error that aborts the transaction;
# RETURNING tells which rows went in.
_INSERT_PRESSES = (
    "INSERT INTO presses (id, device_id, counter, kind, format, trust, received_at,"
    " device_time, battery, lat, lon, accuracy_m, incident_id, outcome)"
    " SELECT * FROM unnest({})"
    " ON CONFLICT (device_id, counter) WHERE trust = 'signed' DO NOTHING"
    " RETURNING id"
)
_PRESS_TYPES = ("bigint", "text", "bigint", "text", "text", "text", "float8", "bigint",
                "bigint", "float8", "float8", "float8", "bigint", "text")
# A path of a press this batch inserts goes in only if the press did (``presses_in``):
# one skipped as a peer's must fail as PressConflictError, not as a foreign key.
_UPSERT_PATHS = (
    "INSERT INTO press_paths (press_id, path, first_heard_at, last_heard_at, heard, rssi, snr)"
    " SELECT x.press_id, x.path, x.first_heard_at, x.last_heard_at, x.heard, x.rssi, x.snr"
    " FROM unnest({}) AS x (press_id, path, first_heard_at, last_heard_at, heard, rssi, snr,"
    " new_press)"
    " WHERE NOT x.new_press OR x.press_id IN (SELECT id FROM presses_in)"
    " ON CONFLICT (press_id, path) DO UPDATE SET heard = press_paths.heard + EXCLUDED.heard,"
    " last_heard_at = GREATEST(press_paths.last_heard_at, EXCLUDED.last_heard_at)"
)
_PATH_TYPES = ("bigint", "text", "float8", "float8", "bigint", "float8", "float8", "bool")
# In the batch's order (ids, and so the timeline's order, follow it).
_INSERT_EVENTS = (
    "INSERT INTO incident_events (incident_id, at, event, reason, actor, press_id, detail)"
    " SELECT incident_id, at, event, reason, actor, press_id, detail"
    " FROM unnest({}) WITH ORDINALITY"
    " AS t (incident_id, at, event, reason, actor, press_id, detail, n) ORDER BY n"
)
_EVENT_TYPES = ("bigint", "float8", "text", "text", "text", "bigint", "text")
_UPSERT_DEVICES = (
    "INSERT INTO devices (id, last_counter, last_seen_at, last_kind, last_path, battery,"
    " replay_window, last_network_counter)"
    " SELECT * FROM unnest({})"
    " ON CONFLICT (id) DO UPDATE SET"
    " last_counter = COALESCE(EXCLUDED.last_counter, devices.last_counter),"
    " last_seen_at = GREATEST(COALESCE(devices.last_seen_at, 0), EXCLUDED.last_seen_at),"
    " last_kind = EXCLUDED.last_kind, last_path = EXCLUDED.last_path,"
    " battery = COALESCE(EXCLUDED.battery, devices.battery),"
    " replay_window = EXCLUDED.replay_window,"
    " last_network_counter = COALESCE(EXCLUDED.last_network_counter,"
    " devices.last_network_counter)"
)
# A copy of a stored press answered "received" (gateway/batch.py _claim_answer).
_ANSWERED = (
    "UPDATE presses AS p SET answered_at = GREATEST(COALESCE(p.answered_at, 0), a.at)"
    " FROM unnest({}) AS a (id, at) WHERE p.id = a.id"
)
_ANSWERED_TYPES = ("bigint", "float8")
_DEVICE_TYPES = ("text", "bigint", "float8", "text", "text", "bigint", "bigint", "bigint")
_INSERT_DEAD_LETTERS = (
    "INSERT INTO dead_letters (received_at, source, path, format, device_ref, reason,"
    " detail, payload)"
    " SELECT received_at, source, path, format, device_ref, reason, detail, payload"
    " FROM unnest({}) WITH ORDINALITY"
    " AS d (received_at, source, path, format, device_ref, reason, detail, payload, n)"
    " ORDER BY n"
)
_DEAD_LETTER_TYPES = ("float8", "text", "text", "text", "text", "text", "text", "bytea")


class _Statement:
    """One write statement being put together: its CTEs and their array arguments."""

    def __init__(self) -> None:
        self.ctes: list[str] = []
        self.args: list[list[Any]] = []

    def add(self, name: str, template: str, types: Sequence[str],
            rows: Sequence[Sequence[Any]]) -> None:
        """The CTE ``name``: ``template`` over ``rows`` as one array per column."""
        first = len(self.args) + 1
        arrays = ", ".join(f"${first + index}::{kind}[]" for index, kind in enumerate(types))
        self.ctes.append(f"{name} AS ({template.format(arrays)})")
        self.args.extend(_columns(rows, len(types)))

    def sql(self, returning: str | None) -> str:
        """The statement; its rows are ``returning``'s ids (none without it)."""
        # ``returning`` is one of this module's CTE names, never outside text.
        main = (f"SELECT id FROM {returning}" if returning  # noqa: S608
                else "SELECT NULL::bigint AS id WHERE false")
        return f"WITH {', '.join(self.ctes)} {main}"


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


def _folded_change(changes: Sequence[IncidentChange]) -> tuple[Any, ...]:
    """An existing incident's changes in this batch, in their order, as one update row.

    One statement cannot update a row twice, so the changes are folded here into what
    applying them one by one leaves (``_UPDATE_INCIDENTS``'s columns): the presses
    summed, the latest time of a change that added presses and of any change, the last
    status given and the time of the last change to a closed one, and the last value
    given of each other field.
    """
    add_presses = 0
    pressed_at: float | None = None
    at = changes[0].at
    status: str | None = None
    closed_at: float | None = None
    urgent: int | None = None
    lat: float | None = None
    lon: float | None = None
    source: str | None = None
    for change in changes:
        add_presses += change.add_presses
        if change.add_presses > 0:
            pressed_at = change.at if pressed_at is None else max(pressed_at, change.at)
        at = max(at, change.at)
        status = status if change.status is None else change.status
        closed_at = change.at if change.status in _CLOSED else closed_at
        urgent = urgent if change.urgent is None else int(change.urgent)
        lat = lat if change.lat is None else change.lat
        lon = lon if change.lon is None else change.lon
        source = source if change.location_source is None else change.location_source
    return (changes[0].id, add_presses, pressed_at, at, status, closed_at, urgent, lat, lon,
            source)


def _path_rows(paths: Iterable[PathRow], new_presses: set[int]) -> list[tuple[Any, ...]]:
    """One row per (press, path): the first hearing's values, the count, the last time,
    and whether the press is one this batch inserts.

    One statement cannot touch a row twice, so hearings of one path in one batch are
    merged here, to the row the SQLite store's one-by-one upserts leave.
    """
    merged: dict[tuple[int, str], list[Any]] = {}
    for path in paths:
        key = (path.press_id, path.path)
        row = merged.get(key)
        if row is None:
            merged[key] = [path.press_id, path.path, path.heard_at, path.heard_at, 1,
                           path.rssi, path.snr, path.press_id in new_presses]
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
        # BEGIN has been sent on _conn (begin() only takes the connection).
        self._begun = False
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
        if self._conn is None:
            raise StoreError(f"{type(self).__name__} has no open transaction")
        return self._conn

    async def begin(self) -> None:
        """Start the batch on a pooled connection; BEGIN itself (READ COMMITTED) goes
        with the batch's device locks in batch_state, or before the first write."""
        conn = await self.pool.acquire()
        try:
            await self._refill(conn)
        except BaseException:
            await self.pool.release(conn)
            raise
        self._conn, self._begun, self._commit_sent = conn, False, False

    async def _begin_locked(self, conn: PoolConnectionProxy, keys: Sequence[int]) -> None:
        """Send BEGIN, and take the advisory locks ``keys`` (sorted) in the same message."""
        if self._begun:
            if keys:
                await conn.execute(_LOCK_DEVICES, DEVICE_LOCK_CLASS, list(keys))
            return
        statements = [_BEGIN]
        if keys:
            statements.append(_LOCK_DEVICES_LITERAL.format(
                cls=int(DEVICE_LOCK_CLASS), keys=",".join(str(int(key)) for key in keys)))
        # No arguments: asyncpg sends it as one simple query, both statements at once.
        self._begun = True
        await conn.execute("; ".join(statements))

    async def commit(self) -> None:
        """Make the batch durable."""
        conn = self.conn
        if self._begun:
            self._commit_sent = True
            await conn.execute("COMMIT")
        self._presses.keep()
        self._incidents.keep()
        await self._release()

    async def rollback(self) -> None:
        """Abandon the batch (ids handed out since begin are forgotten)."""
        conn = self._conn
        try:
            if conn is not None and self._begun and not self._commit_sent \
                    and not conn.is_closed():
                await conn.execute("ROLLBACK")
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
        conn, self._conn = self._conn, None
        self._begun = self._commit_sent = False
        if conn is not None:
            # A broken connection is terminated by the pool here, not reused; one left in
            # a transaction is rolled back by it.
            await self.pool.release(conn)

    async def batch_state(
        self, device_ids: Iterable[str], keys: Iterable[tuple[str, int]]
    ) -> BatchState:
        """Device state, active incidents and already stored presses for a batch, read
        under the batch's devices' locks (outside a batch: a plain read)."""
        ids = sorted(set(device_ids))
        key_list = sorted(set(keys))
        if self._conn is not None:
            locked = {device_lock_key(device) for device in {*ids, *(k[0] for k in key_list)}}
            # Its own statement before the reads: a statement's snapshot is taken before
            # it runs, so reads in the lock's statement would not see what it waited for.
            await self._begin_locked(self._conn, sorted(locked))
            return await self._batch_state(self._conn, ids, key_list)
        async with self.pool.acquire() as conn:
            return await self._batch_state(conn, ids, key_list)

    @staticmethod
    async def _batch_state(
        conn: PoolConnectionProxy, ids: list[str], key_list: list[tuple[str, int]]
    ) -> BatchState:
        devices: dict[str, DeviceState] = {}
        active: dict[str, ActiveIncident] = {}
        active_test: dict[str, ActiveIncident] = {}
        known: dict[tuple[str, int], KnownPress] = {}
        if not ids and not key_list:
            return BatchState(devices, active, active_test, known)
        rows = await conn.fetch(_STATE, ids, [k[0] for k in key_list], [k[1] for k in key_list])
        for part, device, row_id, n1, n2, n3, n4, f, t1, t2, f2 in rows:
            if part == 0:
                devices[device] = DeviceState(device, n1, f, n2, window_from_sql(n3), n4)
            elif part == 1:
                incident = ActiveIncident(id=row_id, device_id=device, test=bool(n1),
                                          opened_at=f, press_count=n2, urgent=bool(n3))
                (active_test if incident.test else active)[device] = incident
            else:
                known[device, n1] = KnownPress(row_id, PressKind(t1), f, Trust(t2), f2)
        return BatchState(devices, active, active_test, known)

    async def write(self, writes: BatchWrites) -> None:
        """Apply a batch's writes inside the open transaction: one statement, two when
        the batch both changes stored incidents and opens new ones."""
        conn = self.conn
        await self._begin_locked(conn, ())
        new_ids = {incident.id for incident in writes.incidents}
        by_incident: dict[int, list[IncidentChange]] = {}
        for change in writes.incident_changes:
            by_incident.setdefault(change.id, []).append(change)
        old = [_folded_change(changes) for incident_id, changes in by_incident.items()
               if incident_id not in new_ids]
        statement = _Statement()
        if old:
            if writes.incidents:
                # Before the inserts, in a statement of its own: a change may close an
                # incident that a new one of this batch replaces (a test press after the
                # test window), and the unique index checks each row as it goes in, while
                # the CTEs of one statement run in no promised order.
                first = _Statement()
                first.add("changed", _UPDATE_INCIDENTS, _UPDATE_TYPES, old)
                await conn.execute(first.sql(None), *first.args)
            else:
                statement.add("changed", _UPDATE_INCIDENTS, _UPDATE_TYPES, old)
        if writes.incidents:
            statement.add("opened", _INSERT_INCIDENTS, _INCIDENT_TYPES, [
                _new_incident_row(i, by_incident.get(i.id, ())) for i in writes.incidents
            ])
        if writes.presses:
            statement.add("presses_in", _INSERT_PRESSES, _PRESS_TYPES, [
                (p.id, p.device_id, p.counter, p.kind, p.format, p.trust, p.received_at,
                 p.device_time, p.battery, p.lat, p.lon, p.accuracy_m, p.incident_id,
                 p.outcome)
                for p in writes.presses
            ])
        if writes.paths:
            if not writes.presses:
                statement.add("presses_in", "SELECT NULL::bigint AS id WHERE false{}", (), [])
            new_presses = {p.id for p in writes.presses}
            statement.add("paths", _UPSERT_PATHS, _PATH_TYPES,
                          _path_rows(writes.paths, new_presses))
        if writes.timeline:
            statement.add("events", _INSERT_EVENTS, _EVENT_TYPES, [
                (t.incident_id, t.at, t.event, t.reason, t.actor, t.press_id,
                 None if t.detail is None else json.dumps(t.detail, sort_keys=True))
                for t in writes.timeline
            ])
        if writes.answered:
            statement.add("answered", _ANSWERED, _ANSWERED_TYPES, writes.answered)
        if writes.devices:
            statement.add("devices_seen", _UPSERT_DEVICES, _DEVICE_TYPES, [
                (d.state.device_id, d.state.last_counter, d.state.last_seen_at, d.kind,
                 d.path, d.state.battery, window_to_sql(d.state.window),
                 d.state.last_network_counter)
                for d in writes.devices.values()
            ])
        if writes.dead_letters:
            statement.add("dead", _INSERT_DEAD_LETTERS, _DEAD_LETTER_TYPES, [
                (d.received_at, d.source, d.path, d.format, d.device_ref, d.reason, d.detail,
                 d.payload)
                for d in writes.dead_letters
            ])
        if not statement.ctes:
            return
        if not writes.presses:
            await conn.execute(statement.sql(None), *statement.args)
            return
        stored = {record[0] for record in
                  await conn.fetch(statement.sql("presses_in"), *statement.args)}
        skipped = [p for p in writes.presses if p.id not in stored]
        if skipped:
            # The rest of the statement is undone by the caller's rollback.
            shown = ", ".join(f"{p.device_id}#{p.counter}" for p in skipped[:5])
            raise PressConflictError(
                f"{len(skipped)} signed press(es) already stored by another writer: {shown}"
            )
