"""Open the store a config names: SQLite for one box, PostgreSQL for several instances.

The daemon asks this for its ingest store, its dispatch stores and whatever the backend
needs beside them, and never names a backend itself (docs/STORE.md):

* SQLite: one file and one process. Every connection of the process shares one
  :class:`~store.sqlite.Writers` (writers queue in asyncio, not in SQLite's busy handler)
  and a :class:`~store.checkpoint.WalCheckpointer` keeps the WAL short.
* PostgreSQL: each store is a small asyncpg pool; several instances share the database,
  which keeps them exact (advisory locks, SKIP LOCKED claims, unique indexes).

The PostgreSQL modules (and asyncpg) are imported only when the store is PostgreSQL.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from store.dispatch_base import DEFAULT_LEASE_S
from store.leader import PgLeader, SoleLeader
from store.sqlite import SqliteStore, Writers
from store.url import StoreUrl

if TYPE_CHECKING:
    from store.pg_dispatch import PgDispatchStore
    from store.pg_ingest import PgIngestStore
    from store.sqlite_dispatch import SqliteDispatchStore

# Connections each PostgreSQL store keeps at most. Ingest is one writer (one batch at a
# time, plus a spare for the odd read); dispatch sends with a few concurrent steps.
PG_INGEST_POOL = 2
PG_DISPATCH_POOL = 4
PG_HEALTH_POOL = 2


class Stores:
    """The stores of one panicd process on ``url``, made unopened (each is entered by
    whoever uses it)."""

    def __init__(self, url: StoreUrl, *, instance: str | None = None,
                 lease_s: float | None = None) -> None:
        self.url = url
        # Who claims on a shared store, the same across restarts: a restarted instance
        # takes back at once (in doubt) the pages its killed run left claimed, and a
        # peer takes those of one that stays dead when ``lease_s`` runs out.
        self.instance = instance
        self.lease_s = DEFAULT_LEASE_S if lease_s is None else lease_s
        # SQLite only: one write lock for every connection of this process (ingest,
        # dispatch, health), and the WAL checkpointed off the commit path.
        self.writers = Writers(background_checkpoints=True) if url.backend == "sqlite" else None

    @property
    def shared(self) -> bool:
        """Whether other instances may use the same database at the same time."""
        return self.url.backend == "postgresql"

    def checkpointer(self) -> AbstractAsyncContextManager[object]:
        """What runs beside the stores for as long as they are open (SQLite's WAL
        checkpoints; nothing for PostgreSQL, whose server checkpoints itself)."""
        if self.url.path is None:
            return contextlib.nullcontext()
        from store.checkpoint import WalCheckpointer  # noqa: PLC0415

        return WalCheckpointer(self.url.path)

    def ingest(self, *, batch_max: int) -> SqliteStore | PgIngestStore:
        """The ingest store; ``batch_max`` is the pipeline's largest batch."""
        if self.url.path is not None:
            return SqliteStore(self.url.path, writers=self.writers)
        from store.pg_ingest import PgIngestStore  # noqa: PLC0415  # see module doc

        return PgIngestStore(self._dsn(), password=self.url.password, batch_max=batch_max,
                             max_size=PG_INGEST_POOL)

    def dispatch(self, *, pool: int = PG_DISPATCH_POOL,
                 listen: bool = True) -> SqliteDispatchStore | PgDispatchStore:
        """A dispatch store (the dispatcher's, or device health's own connection);
        ``listen=False`` when its user never waits on a peer's commit (on PostgreSQL: no
        LISTEN connection of its own)."""
        if self.url.path is not None:
            from store.sqlite_dispatch import SqliteDispatchStore  # noqa: PLC0415

            return SqliteDispatchStore(self.url.path, writers=self.writers)
        from store.pg_dispatch import PgDispatchStore  # noqa: PLC0415  # see module doc

        return PgDispatchStore(self._dsn(), password=self.url.password, max_size=pool,
                               instance=self.instance, lease_s=self.lease_s, listen=listen)

    def leader(self) -> SoleLeader | PgLeader:
        """Who runs the cluster's once-only work (device health): this process on
        SQLite; on PostgreSQL the instance holding an advisory lock (store/leader.py)."""
        if self.url.path is not None:
            return SoleLeader()
        return PgLeader(self._dsn(), password=self.url.password,
                        instance=self.instance or "panicd")

    def _dsn(self) -> str:
        dsn = self.url.dsn
        if dsn is None:  # pragma: no cover -- a StoreUrl is either a path or a DSN
            raise ValueError(f"{self.url}: neither a SQLite path nor a PostgreSQL URL")
        return dsn

    def __str__(self) -> str:
        return str(self.url)
