"""The PostgreSQL connection pool: asyncpg, migrated on open (docs/STORE.md).

The URL names the server, database and role only; the password is passed separately,
read by the caller from the environment or a systemd credential, and a URL that carries
one is refused so that it never sits in a config file.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

import asyncpg

from store.errors import StoreError, StoreUnreachableError
from store.pg_schema import migrate
from store.url import parse_store_url

# How long one connection attempt may take (asyncpg's default is 60 s): a server that
# does not answer within it is reported, and systemd's restart tries again.
CONNECT_TIMEOUT_S = 10.0


def check_url(url: str) -> None:
    """Refuse a URL that is not PostgreSQL's or that carries a password.

    The same rules as ``[store] url`` in the config (:func:`store.url.parse_store_url`),
    so a URL given here in code is held to what an operator's config is.
    """
    try:
        parsed = parse_store_url(url, Path())
    except ValueError as exc:
        raise StoreError(f"PostgreSQL URL: {exc}") from None
    if parsed.backend != "postgresql":
        raise StoreError("not a PostgreSQL URL (postgresql://user@host/db)")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Return a pooled connection as it is.

    asyncpg's default reset runs UNLISTEN *, RESET ALL and advisory unlocks on every
    release: one more round trip per batch (docs/STORE.md measured it). The store's
    pooled connections never change session state, LISTEN has a connection of its own,
    the advisory locks taken are transaction-scoped, and asyncpg still rolls back a
    transaction left open before calling this.
    """


class PgDatabase:
    """A pool of connections to panicd's PostgreSQL database, migrated on open; an async
    context manager."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        min_size: int = 1,
        max_size: int = 4,
        command_timeout_s: float | None = 30.0,
    ) -> None:
        check_url(url)
        self.url = url
        self._password = password
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> Self:
        try:
            pool = await asyncpg.create_pool(
                self.url,
                password=self._password,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=self._command_timeout_s,
                reset=_keep_session,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Refused, unreachable, unknown database, wrong password: one line for the
            # journal naming the server (the URL holds no password), then exit 1.
            raise StoreUnreachableError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            self._pool = pool
            await self._opened()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        return self

    async def _opened(self) -> None:
        """Called once the schema is current (subclasses load what they cache)."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        if self._pool is None:
            raise StoreError(f"{type(self).__name__} is not open")
        return self._pool
