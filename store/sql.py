"""The seam between the store's statements and a database driver: a :class:`Tx` runs SQL
written once with ``?`` placeholders, and a :class:`Dialect` spells the few things SQLite
and PostgreSQL write differently.

:class:`SqliteTx` runs on an aiosqlite connection as is; :class:`PgTx` runs on an asyncpg
connection, translating ``?`` to ``$1 … $n`` once per statement text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import aiosqlite

if TYPE_CHECKING:  # asyncpg is imported only where PostgreSQL is used (store/pg.py)
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    # A connection of its own or one borrowed from a pool: both take the same calls.
    PgConnection = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

__all__ = ["PG", "SQLITE", "Dialect", "PgTx", "SqliteTx", "Tx", "pg_placeholders"]


class Tx(Protocol):
    """Runs statements on one connection (inside a transaction, or autocommit for reads)."""

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Every row the statement returns."""
        ...

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        """The first row the statement returns, or None."""
        ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement that returns no rows; how many rows it changed."""
        ...

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter row."""
        ...


class Dialect(Protocol):
    """What the two databases spell differently, as SQL fragments."""

    name: str

    def json_int(self, column: str, key: str) -> str:
        """An expression reading the integer ``key`` of the JSON text in ``column``."""
        ...

    def is_distinct(self, left: str, right: str) -> str:
        """``left`` differs from ``right``, NULL being a value like any other."""
        ...

    def skip_locked(self) -> str:
        """The clause a claiming SELECT ends with: rows a peer is claiming are passed over."""
        ...

    def lock_rows(self, alias: str) -> str:
        """The clause a SELECT ends with to hold the rows of ``alias`` it read until the
        transaction ends, so a concurrent writer of them waits and then reads them anew."""
        ...

    def serialise(self, key: int) -> str | None:
        """A statement that makes the transactions running it under ``key`` take turns
        until they end; None where transactions take turns anyway."""
        ...


class _Sqlite:
    name = "sqlite"

    def json_int(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def is_distinct(self, left: str, right: str) -> str:
        return f"{left} IS NOT {right}"

    def skip_locked(self) -> str:
        # SQLite has one writer at a time (BEGIN IMMEDIATE): nothing to pass over.
        return ""

    def lock_rows(self, alias: str) -> str:  # noqa: ARG002 -- the Protocol's
        return ""  # BEGIN IMMEDIATE holds the whole database already

    def serialise(self, key: int) -> str | None:  # noqa: ARG002 -- the Protocol's
        return None  # BEGIN IMMEDIATE: one write transaction at a time already


class _Pg:
    name = "postgresql"

    def json_int(self, column: str, key: str) -> str:
        # detail is TEXT on both backends (written by json.dumps), so it is cast to read it.
        return f"({column}::jsonb ->> '{key}')::bigint"

    def is_distinct(self, left: str, right: str) -> str:
        return f"{left} IS DISTINCT FROM {right}"

    def skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def lock_rows(self, alias: str) -> str:
        return f" FOR UPDATE OF {alias}"

    def serialise(self, key: int) -> str | None:
        return f"SELECT pg_advisory_xact_lock({int(key)})"


SQLITE: Dialect = _Sqlite()
PG: Dialect = _Pg()


class SqliteTx:
    """:class:`Tx` on an aiosqlite connection."""

    __slots__ = ("db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.db.execute_fetchall(sql, params))

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        rows = await self.rows(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self.db.execute(sql, params)
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        await self.db.executemany(sql, params)


@functools.lru_cache(maxsize=512)
def pg_placeholders(sql: str) -> str:
    """``sql`` with each ``?`` outside a quoted literal or identifier numbered ``$1 … $n``.

    Cached: the store runs a few dozen distinct statement texts (the ``IN (?, …)`` lists
    add one per length), so each is translated once.
    """
    out: list[str] = []
    number = 0
    quote: str | None = None
    for char in sql:
        if quote is not None:
            if char == quote:
                quote = None  # a doubled quote closes and reopens: the same result
        elif char in ("'", '"'):
            quote = char
        elif char == "?":
            number += 1
            out.append(f"${number}")
            continue
        out.append(char)
    return "".join(out)


def _affected(status: str) -> int:
    """The row count of an asyncpg status string: "UPDATE 3", "INSERT 0 1", "DELETE 0"."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PgTx:
    """:class:`Tx` on an asyncpg connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self.conn.fetch(pg_placeholders(sql), *params))

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await self.conn.fetchrow(pg_placeholders(sql), *params)
        return row

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return _affected(await self.conn.execute(pg_placeholders(sql), *params))

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(p) for p in params]
        if batch:  # asyncpg prepares the statement even for no rows: one round trip saved
            await self.conn.executemany(pg_placeholders(sql), batch)
