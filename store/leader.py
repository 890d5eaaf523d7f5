"""Which instance runs the work done once for the whole cluster (device health, the daily
summary): the holder of a PostgreSQL advisory lock (docs/HA.md).

On SQLite there is one process, which always leads (:class:`SoleLeader`). On PostgreSQL
each instance keeps one dedicated connection and tries a session-level advisory lock on
it (:class:`PgLeader`); the holder leads. The lock lives exactly as long as that
connection: an instance that is killed, hangs up or loses the network loses its
backend, the server releases the lock, and a peer's next try (every ``retry_s``) takes
it. A leader checks its connection as often, and stops leading the moment the check
fails, so two instances lead at once for at most one check interval, and only when the
old leader's connection is silently cut; the work led here is idempotent in the store
(a condition's row and its SMS keys are unique), so that overlap sends nothing twice.

The same round trip is the instance's heartbeat: its row in ``instances`` (host, pid,
start, the database's clock at the last check, whether it leads), which ``panicctl
status`` lists, so an operator sees which instances run and which one leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import structlog

from store import locks

if TYPE_CHECKING:
    import asyncpg

log = structlog.get_logger("panicd.store")

# The advisory lock key (the single-bigint key space, beside the migration lock).
HEALTH_LEADER_LOCK = locks.HEALTH_LEADER
RETRY_S = 2.0
CONNECT_TIMEOUT_S = 10.0

# The instance's row, stamped with the database's clock (instances whose clocks differ
# still compare), its lock as the server sees it: the row says what the lock says.
_HEARTBEAT = (
    "INSERT INTO instances (instance_id, host, pid, started_at, heartbeat_at, is_leader)"
    " VALUES ($1, $2, $3, $4, extract(epoch FROM clock_timestamp()), $5)"
    " ON CONFLICT (instance_id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,"
    " started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at,"
    " is_leader = EXCLUDED.is_leader"
)


# The earliest start among the instances alive when this one took the lead: since then
# the cluster has received every press without a gap (each instance receives them all).
# "Alive": heartbeat within this many retry intervals (the last leader's included).
_WATCHING_SINCE = (
    "SELECT min(started_at) FROM instances"
    " WHERE heartbeat_at > extract(epoch FROM clock_timestamp()) - $1"
)
ALIVE_RETRIES = 3


class Leader(Protocol):
    """Whether this instance does the cluster's once-only work now."""

    def leading(self) -> bool:
        """True while this instance leads."""
        ...

    def watching_since(self) -> float | None:
        """Since when (Unix time) the presses have been watched without a gap, as far
        as the leader knows when it took the lead; None: since this process started."""
        ...


class SoleLeader:
    """One process on one store: always the leader; an async context manager (as
    :class:`PgLeader`) that holds nothing."""

    def leading(self) -> bool:
        """Always True."""
        return True

    def watching_since(self) -> float | None:
        """None: one process watches, since it started."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class PgLeader:
    """The holder of an advisory lock on a connection of its own; an async context
    manager whose task keeps trying to lead (and keeps checking it still does)."""

    def __init__(self, dsn: str, *, password: str | None, instance: str,
                 key: int = HEALTH_LEADER_LOCK, retry_s: float = RETRY_S,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._dsn = dsn
        self._password = password
        self._instance = instance
        self._key = key
        self._retry_s = retry_s
        self._on_change = on_change
        self._leading = False
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._started_at = time.time()
        self._host = socket.gethostname()
        self._watching_since: float | None = None

    def leading(self) -> bool:
        """True while this instance holds the lock (as last checked)."""
        return self._leading

    def watching_since(self) -> float | None:
        """The earliest start among the instances alive when this one last took the
        lead (its own included): a peer that has run for days has received every press
        as this one would have, so device health need not wait out a fresh grace
        period after a takeover. None until this instance leads."""
        return self._watching_since

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="store.leader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set(leading=False)
        await self._close()  # the server releases the lock with the session

    async def _run(self) -> None:
        while True:
            try:
                await self._once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- any failure: not leading, try again
                if self._leading:
                    log.warning("store.leader_lost", instance=self._instance, error=str(exc))
                self._set(leading=False)
                await self._close()
            await asyncio.sleep(self._retry_s)

    async def _once(self) -> None:
        """Connect if needed; take the lock if free; check it is still held."""
        import asyncpg  # noqa: PLC0415 -- only a PostgreSQL store gets here

        if self._conn is None or self._conn.is_closed():
            if self._leading:  # the lock went with the old session
                log.warning("store.leader_lost", instance=self._instance,
                            error="the session holding the lock ended")
                self._set(leading=False)
            self._conn = await asyncpg.connect(self._dsn, password=self._password,
                                               timeout=CONNECT_TIMEOUT_S)
        conn = self._conn
        # Held on this session: the heartbeat's round trip proves the session (and so
        # the lock) while leading.
        if not self._leading and await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", self._key, timeout=self._retry_s * 2):
            peers = await conn.fetchval(_WATCHING_SINCE, ALIVE_RETRIES * self._retry_s,
                                        timeout=self._retry_s * 2)
            self._watching_since = (self._started_at if peers is None
                                    else min(self._started_at, float(peers)))
            self._set(leading=True)
            log.info("store.leading", instance=self._instance, work="device health",
                     watching_since=round(self._watching_since, 3))
        await conn.execute(_HEARTBEAT, self._instance, self._host, os.getpid(),
                           self._started_at, self._leading, timeout=self._retry_s * 2)

    def _set(self, *, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            if self._on_change is not None:
                self._on_change(leading)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)
            if not conn.is_closed():
                conn.terminate()
