"""Read-only views of the store for operators (panicctl, and later the command-centre page).

:class:`StoreReader` is the seam; :func:`open_reader` picks the backend from ``[store]
url``. Both run the same statements (``?`` placeholders, as store/sql.py): SQLite opens
the file read-only (WAL lets it read beside the daemon's writer); PostgreSQL
(store/pg_queries.py) opens one read-only connection of its own, never migrates, and
reads every view of one command from one snapshot.
"""

from __future__ import annotations

import abc
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from store.dispatch_observe import (
    OPEN_INCIDENTS_SQL,
    PENDING_OUTBOX_SQL,
    PENDING_STEPS_SQL,
    UNHEALTHY_SQL,
)
from store.url import StoreUrl


class NotFoundError(LookupError):
    """The asked-for row does not exist."""


class StoreAccessError(Exception):
    """The store cannot be used: no schema yet, the server away, or a statement refused;
    the message is one line naming the store, never its password."""


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    """What the store last heard from one device."""

    id: str
    last_seen_at: float | None
    battery: int | None
    last_kind: str | None
    last_path: str | None
    last_counter: int | None


class StoreReader(Protocol):
    """What panicctl reads, the same on either backend."""

    backend: str

    async def incidents(self, *, active_only: bool = False, kelurahan: str | None = None,
                        since: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Incidents, newest first."""
        ...

    async def incident(self, incident_id: int) -> dict[str, Any]:
        """One incident with its presses (and their paths) and its timeline; NotFoundError."""
        ...

    async def dead_letters(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The newest dead letters, with a printable preview of each payload."""
        ...

    async def press_count(self) -> int:
        """How many presses are stored."""
        ...

    async def devices(self) -> dict[str, DeviceSeen]:
        """Every device the store has heard, by id."""
        ...

    async def raised(self) -> dict[tuple[str, str], float]:
        """The health conditions raised and not cleared, by (subject, condition): when."""
        ...

    async def queue_depths(self) -> tuple[int, int]:
        """Outbox messages waiting or being sent, and pending escalation steps."""
        ...

    async def open_incidents(self) -> list[dict[str, Any]]:
        """Open and acknowledged incidents by id (``status``'s columns)."""
        ...

    async def first_ack(self, incident_id: int) -> dict[str, Any] | None:
        """Who acknowledged the incident first (actor, person_id, via, at), if anyone."""
        ...

    async def instances(self) -> list[dict[str, Any]] | None:
        """The panicd instances with their last heartbeat, newest first; None when the
        schema has no ``instances`` table."""
        ...


_INCIDENT_COLUMNS = (
    "id, status, test, urgent, device_id, opened_at, updated_at, closed_at, press_count,"
    " kelurahan_kode, kelurahan, kecamatan, kelurahan_match, location_source, lat, lon,"
    " address, landmark"
)
INSTANCES_SQL = (
    "SELECT instance_id, host, pid, started_at, heartbeat_at, is_leader FROM instances"
    " ORDER BY heartbeat_at DESC, instance_id"
)


class ReaderBase(abc.ABC):
    """The statements of :class:`StoreReader`; a backend runs them (:meth:`_fetch`)."""

    backend: str
    # SQLite walks incidents in rowid order for ``ORDER BY id`` unless told otherwise.
    _active_order: str = "id DESC"

    @abc.abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """The rows of one statement (``?`` placeholders) as dicts, columns in order."""

    @abc.abstractmethod
    def _same_text(self, column: str) -> str:
        """``column`` equals a parameter, ignoring ASCII case."""

    @abc.abstractmethod
    async def _has_table(self, name: str) -> bool:
        """Whether the schema has table ``name``."""

    async def incidents(self, *, active_only: bool = False, kelurahan: str | None = None,
                        since: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Incidents, newest first."""
        where = ["1 = 1"]
        params: list[Any] = []
        if active_only:
            where.append("status IN ('open', 'acknowledged')")
        if kelurahan:
            where.append(f"({self._same_text('kelurahan')} OR kelurahan_kode = ?)")
            params += [kelurahan, kelurahan]
        if since is not None:
            where.append("opened_at >= ?")
            params.append(since)
        params.append(limit)
        order = self._active_order if active_only else "id DESC"
        # Only the fixed clauses above are interpolated; values go through placeholders.
        sql = (f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE {' AND '.join(where)}"  # noqa: S608
               f" ORDER BY {order} LIMIT ?")
        return await self._fetch(sql, params)

    async def incident(self, incident_id: int) -> dict[str, Any]:
        """One incident with its presses (and their paths) and its timeline."""
        found = await self._fetch("SELECT * FROM incidents WHERE id = ?", (incident_id,))
        if not found:
            raise NotFoundError(f"no incident {incident_id}")
        out = found[0]
        presses = await self._fetch(
            "SELECT id, counter, kind, received_at, battery, lat, lon, outcome FROM presses"
            " WHERE incident_id = ? ORDER BY id",
            (incident_id,),
        )
        for press in presses:
            press["paths"] = await self._fetch(
                "SELECT path, first_heard_at, last_heard_at, heard, rssi, snr FROM press_paths"
                " WHERE press_id = ? ORDER BY first_heard_at",
                (press["id"],),
            )
        out["presses"] = presses
        timeline = await self._fetch(
            "SELECT at, event, reason, actor, press_id, detail FROM incident_events"
            " WHERE incident_id = ? ORDER BY id",
            (incident_id,),
        )
        for entry in timeline:
            entry["detail"] = json.loads(entry["detail"]) if entry["detail"] else None
        out["timeline"] = timeline
        return out

    async def dead_letters(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The newest dead letters, with a printable preview of each payload."""
        rows = await self._fetch(
            "SELECT id, received_at, source, path, format, device_ref, reason, detail, payload"
            " FROM dead_letters ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        for row in rows:
            payload: bytes = bytes(row.pop("payload"))
            row["payload_preview"] = payload[:200].decode("utf-8", errors="backslashreplace")
            row["payload_bytes"] = len(payload)
        return rows

    async def press_count(self) -> int:
        """How many presses are stored."""
        (row,) = await self._fetch("SELECT COUNT(*) AS n FROM presses")
        return int(row["n"])

    async def devices(self) -> dict[str, DeviceSeen]:
        """Every device the store has heard, by id."""
        rows = await self._fetch(
            "SELECT id, last_seen_at, battery, last_kind, last_path, last_counter FROM devices")
        return {r["id"]: DeviceSeen(**r) for r in rows}

    async def raised(self) -> dict[tuple[str, str], float]:
        """The health conditions raised and not cleared, by (subject, condition): when."""
        return {(r["subject"], r["condition"]): r["raised_at"]
                for r in await self._fetch(UNHEALTHY_SQL)}

    async def queue_depths(self) -> tuple[int, int]:
        """Outbox messages waiting or being sent, and pending escalation steps."""
        (outbox,) = (await self._fetch(PENDING_OUTBOX_SQL))[0].values()
        (steps,) = (await self._fetch(PENDING_STEPS_SQL))[0].values()
        return int(outbox), int(steps)

    async def open_incidents(self) -> list[dict[str, Any]]:
        """Open and acknowledged incidents by id (``status``'s columns)."""
        return await self._fetch(OPEN_INCIDENTS_SQL)

    async def first_ack(self, incident_id: int) -> dict[str, Any] | None:
        """Who acknowledged the incident first (actor, person_id, via, at), if anyone."""
        rows = await self._fetch(
            "SELECT actor, person_id, via, at FROM acks WHERE incident_id = ? AND first = 1"
            " ORDER BY id LIMIT 1",
            (incident_id,),
        )
        return rows[0] if rows else None

    async def instances(self) -> list[dict[str, Any]] | None:
        """The panicd instances with their last heartbeat; None without the table."""
        if not await self._has_table("instances"):
            return None
        return await self._fetch(INSTANCES_SQL)


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; raises FileNotFoundError when there is no database yet."""
    if not path.exists():
        raise FileNotFoundError(f"no database at {path} (has panicd run yet?)")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        yield conn
    finally:
        conn.close()


def _row(row: sqlite3.Row) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}  # noqa: SIM118 -- sqlite3.Row is not a dict


class SqliteReader(ReaderBase):
    """:class:`StoreReader` on a read-only SQLite connection (:func:`read_only`)."""

    backend = "sqlite"
    # Newest first by rowid stops after `limit` rows, unless few rows match: for the
    # active ones it walked every incident ever stored (7.0 ms on 50,000). +id lets SQLite
    # read the few from incidents_active and sort them instead (0.14 ms; SQLite 3.40, no
    # ANALYZE, query-plan audit's database).
    _active_order = "+id DESC"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        # A local file read in one statement: no thread hop is worth its cost here.
        return [_row(r) for r in self.conn.execute(sql, params)]

    def _same_text(self, column: str) -> str:
        return f"{column} = ? COLLATE NOCASE"

    async def _has_table(self, name: str) -> bool:
        return bool(await self._fetch(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))


@asynccontextmanager
async def open_reader(store: StoreUrl) -> AsyncIterator[StoreReader]:
    """A reader on the store ``[store] url`` names (FileNotFoundError: no SQLite file yet;
    StoreAccessError: a PostgreSQL database that cannot be read)."""
    if store.path is not None:
        with read_only(store.path) as conn:
            yield SqliteReader(conn)
        return
    # Imported here: a SQLite panicctl never loads the PostgreSQL driver.
    from store.pg_queries import open_pg_reader  # noqa: PLC0415

    async with open_pg_reader(store) as reader:
        yield reader

