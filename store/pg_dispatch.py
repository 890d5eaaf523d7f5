"""The PostgreSQL implementation of :class:`store.dispatch.DispatchStore`: the same
dispatch statements as SQLite's (store/dispatch_*.py) over a pool of asyncpg connections
(:class:`store.pg.PgDatabase`, migrated on open).

A transaction is one connection acquired from the pool from BEGIN to COMMIT; a read outside
one borrows a connection for that statement. Unlike the SQLite store's one connection,
several transactions of one instance may run at once, and several instances share the
database: every state change is conditional (``… WHERE state = 'pending'``), and the
outbox's claim passes over rows a peer is claiming (``FOR UPDATE SKIP LOCKED``), so each
step fires once and each row is claimed once.

A step is claimed and fired in one transaction, so the claim's lease is that transaction:
a peer that dies mid-firing loses its connection and the server rolls it back; one that
hangs or is cut off holds it at most ``tx_idle_limit_s`` (the session's
``idle_in_transaction_session_timeout``), and a peer waiting on the step's row then
fires it, once. Outbox rows outlive a transaction (the provider is called between claim
and record) and carry a lease of their own (``claimed_by``, ``lease_until``).

Peers are woken by LISTEN/NOTIFY (schema version 8's triggers): one connection outside
the pool listens on :data:`store.pg_schema.WAKE_CHANNEL` and runs the callbacks
registered with :meth:`PgDispatchBase.on_wake`; when it drops it reconnects with backoff
and then runs every callback, since a notification sent meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import asyncpg
import structlog

from store.dispatch import WAKE_KINDS, WakeKind
from store.dispatch_base import DEFAULT_LEASE_S, DispatchBase
from store.dispatch_health import Health
from store.dispatch_observe import Observe
from store.dispatch_outbox import Outbox
from store.dispatch_responses import Responses
from store.dispatch_steps import Steps
from store.errors import StoreError
from store.pg import CONNECT_TIMEOUT_S, PgDatabase
from store.pg_schema import WAKE_CHANNEL
from store.sql import PG, PgTx, Tx

__all__ = ["PgDispatchBase", "PgDispatchStore"]

log = structlog.get_logger("panicd.store")

# How long a transaction of the dispatch store may sit idle before the server ends it: a
# step claimed by an instance that hung or was cut off mid-firing is a peer's again after
# it. Nothing of panicd's waits inside a transaction, whose statements follow each other
# within milliseconds, so the limit only ever ends a stalled one.
DEFAULT_TX_IDLE_LIMIT_S = 30.0

# The listening connection's reconnect backoff, doubling from the first to the last.
WAKE_RECONNECT_S = (0.2, 10.0)
# How often the listening connection is asked a question: a peer or network gone silent
# sends no FIN, and an idle connection would not notice it lost the server for hours.
WAKE_PROBE_S = 10.0


class PgDispatchBase(PgDatabase, DispatchBase):
    """Dispatch's PostgreSQL pool; an async context manager."""

    dialect = PG

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        instance: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        tx_idle_limit_s: float = DEFAULT_TX_IDLE_LIMIT_S,
        max_size: int = 4,
        listen: bool = True,
    ) -> None:
        """``listen=False`` for a user that never waits on a peer's commit (device
        health, panicctl): no listening connection, and :meth:`on_wake` refuses."""
        super().__init__(url, password=password, max_size=max_size)
        self.listens = listen
        # Unique per process by default: a restarted instance is a new claimant, and what
        # its previous run left 'sending' is taken back when the lease runs out, by it or
        # by a peer, in doubt.
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = lease_s
        # BEGIN and the limit in one round trip (a simple query), as BEGIN alone was.
        self._begin = (
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout ="
            f" {max(1, round(tx_idle_limit_s * 1000))}"
        )
        self._wake: dict[str, list[Callable[[], None]]] = {k: [] for k in WAKE_KINDS}
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._listening: asyncio.Task[None] | None = None
        # How often the listening connection came back (panicctl status, tests).
        self.wake_reconnects = 0

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        if not self.listens:
            return self
        try:
            # The first LISTEN is in place before the store is handed out: whatever its
            # owner reads at start, a change committed after that read notifies it.
            await self._listen()
            group = asyncio.TaskGroup()
            await group.__aenter__()
            self._group = group
            self._listening = group.create_task(self._keep_listening(),
                                                name="store.wake_listener")
        except BaseException:
            await self._close_listener()
            await super().__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        try:
            if group is not None and self._listening is not None:
                self._listening.cancel()
                await group.__aexit__(None, None, None)
        finally:
            await self._close_listener()
            await super().__aexit__(exc_type, exc, tb)

    def on_wake(self, kind: WakeKind, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a commit, by any instance, changes work of ``kind``;
        and after the listening connection was lost, since a notification may be too."""
        if not self.listens:
            raise StoreError("this dispatch store was opened without wake-ups (listen=False)")
        self._wake[kind].append(callback)

    shared_clock = True

    async def database_time(self) -> float | None:
        """The server's clock now (clock_timestamp, not the transaction's start)."""
        async with self.pool.acquire() as conn:
            return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))

    def _wake_all(self) -> None:
        for callbacks in self._wake.values():
            for callback in callbacks:
                callback()

    def _on_notification(
        self, _conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, _pid: int,
        _channel: str, payload: object,
    ) -> None:
        for callback in self._wake.get(str(payload), ()):
            callback()

    async def _listen(self) -> None:
        """Open the listening connection (outside the pool) and LISTEN."""
        conn = await asyncpg.connect(
            self.url, password=self._password, timeout=CONNECT_TIMEOUT_S,
            # So that an operator (and a test) can tell it in pg_stat_activity.
            server_settings={"application_name": f"panicd-wake {self.instance}"[:63]},
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(WAKE_CHANNEL, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._listener, self._listener_lost = conn, lost

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), CONNECT_TIMEOUT_S)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

    async def _keep_listening(self) -> None:
        """Reconnect the listening connection whenever it is lost, then wake everything."""
        while True:
            await self._until_lost()
            log.warning("store.wake_listener_lost", instance=self.instance)
            await self._close_listener()
            delay, longest = WAKE_RECONNECT_S
            while True:
                try:
                    await self._listen()
                    break
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                        TimeoutError) as exc:
                    log.warning("store.wake_listener_retry", instance=self.instance,
                                error=repr(exc), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
            self.wake_reconnects += 1
            log.info("store.wake_listener_restored", instance=self.instance)
            # Whatever was notified while no one listened: every owner looks again.
            self._wake_all()

    async def _until_lost(self) -> None:
        """Return once the listening connection is closed or stops answering."""
        conn, lost = self._listener, self._listener_lost
        while conn is not None and not conn.is_closed():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAKE_PROBE_S):
                    await lost.wait()
            if lost.is_set():
                return
            try:
                await conn.fetchval("SELECT 1", timeout=WAKE_PROBE_S)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One pooled connection inside BEGIN … COMMIT, ended by the server if it sits
        idle past the limit; rolled back on any exception (the pool's release rolls back
        a transaction left open)."""
        async with self.pool.acquire() as conn:
            await conn.execute(self._begin)
            yield PgTx(conn)
            await conn.execute("COMMIT")

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self.pool.acquire() as conn:
            return await PgTx(conn).rows(sql, params)


class PgDispatchStore(Steps, Responses, Outbox, Health, Observe, PgDispatchBase):
    """Dispatch's PostgreSQL pool; an async context manager."""
