"""panicctl's views of a PostgreSQL store: :class:`store.queries.StoreReader` over one
asyncpg connection of panicctl's own, and the retention purge.

A reader's connection is read-only (``default_transaction_read_only``), never migrates,
and reads inside one REPEATABLE READ transaction: ``show`` and ``status`` see one
snapshot while instances commit beside them. An empty database (schema 0) reads as "no
panicd schema", as a missing SQLite file does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from store.pg import CONNECT_TIMEOUT_S
from store.pg_schema import SCHEMA_VERSION, schema_version
from store.queries import ReaderBase, StoreAccessError
from store.sql import pg_placeholders
from store.url import StoreUrl

__all__ = ["PgReader", "connect", "open_pg_reader", "purge", "require_current_schema"]

# What asyncpg raises for a server away, a login refused or a statement refused.
_DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def connect(store: StoreUrl, *, read_only: bool) -> asyncpg.Connection:
    """One connection to the store (StoreAccessError naming the server when it fails)."""
    settings = {"default_transaction_read_only": "on"} if read_only else {}
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            store.dsn, password=store.password, timeout=CONNECT_TIMEOUT_S,
            server_settings=settings)
    except _DRIVER_ERRORS as exc:
        # The URL holds no password (store/url.py), so naming it leaks nothing.
        raise StoreAccessError(f"cannot connect to {store}: {exc}") from None
    return conn


async def require_current_schema(store: StoreUrl) -> None:
    """StoreAccessError unless the store's schema is the one this panicd knows."""
    conn = await connect(store, read_only=True)
    try:
        version = await schema_version(conn)
    except _DRIVER_ERRORS as exc:
        raise StoreAccessError(f"{store}: {exc}") from None
    finally:
        await conn.close()
    if version < SCHEMA_VERSION:
        raise StoreAccessError(f"{store} has schema {version}, this panicctl writes "
                               f"{SCHEMA_VERSION}: run panicctl migrate first")
    if version > SCHEMA_VERSION:
        raise StoreAccessError(f"{store} has schema {version}, newer than this panicctl's "
                               f"{SCHEMA_VERSION}: use the newer panicd's panicctl")


class PgReader(ReaderBase):
    """:class:`store.queries.StoreReader` on one connection inside one snapshot."""

    backend = "postgresql"

    def __init__(self, conn: asyncpg.Connection, store: StoreUrl) -> None:
        self.conn = conn
        self._store = store

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            records = await self.conn.fetch(pg_placeholders(sql), *params)
        except _DRIVER_ERRORS as exc:
            raise StoreAccessError(f"{self._store}: {exc}") from None
        return [dict(r) for r in records]

    def _same_text(self, column: str) -> str:
        # NOCASE folds ASCII only, as lower() does for the kelurahan names' letters.
        return f"lower({column}) = lower(CAST(? AS TEXT))"

    async def _has_table(self, name: str) -> bool:
        (row,) = await self._fetch(
            "SELECT to_regclass(CAST(? AS TEXT)) IS NOT NULL AS present", (name,))
        return bool(row["present"])


@asynccontextmanager
async def open_pg_reader(store: StoreUrl) -> AsyncIterator[PgReader]:
    """A reader on ``store``; StoreAccessError if it is unreachable or holds no schema."""
    conn = await connect(store, read_only=True)
    try:
        try:
            version = await schema_version(conn)
        except _DRIVER_ERRORS as exc:
            raise StoreAccessError(f"{store}: {exc}") from None
        if version == 0:
            raise StoreAccessError(f"no panicd schema in {store} (has panicd run yet?)")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            yield PgReader(conn, store)
    finally:
        await conn.close()


async def purge(store: StoreUrl, statements: Sequence[tuple[str, str]],
                params: Mapping[str, Any], *, dry_run: bool) -> dict[str, int]:
    """Run the purge's DELETEs (``:name`` parameters) in one transaction, rolled back with
    ``dry_run``; returns the rows each deleted."""
    names = list(params)

    def numbered(sql: str) -> str:
        for number, name in enumerate(names, 1):
            sql = sql.replace(f":{name}", f"${number}")
        return sql

    counts: dict[str, int] = {}
    conn = await connect(store, read_only=False)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            for table, sql in statements:
                status = await conn.execute(numbered(sql), *params.values())
                counts[table] = int(status.rsplit(" ", 1)[-1])
        except BaseException:
            await transaction.rollback()
            raise
        await (transaction.rollback() if dry_run else transaction.commit())
    except _DRIVER_ERRORS as exc:
        # E.g. a row a peer added meanwhile for a purged incident (a foreign key): the
        # transaction rolled back whole, and a second run sees the rows as they are then.
        raise StoreAccessError(f"{store}: purge: {exc}") from None
    finally:
        await conn.close()
    return counts
