"""The SQLite implementation of :class:`store.dispatch.DispatchStore`, one connection of
its own, composed from one part per concern (each a module of its own):
store/sqlite_steps.py, sqlite_responses.py, sqlite_outbox.py, sqlite_health.py and
sqlite_observe.py over store/sqlite_dispatch_base.py."""

from __future__ import annotations

from store.sqlite_health import SqliteHealth
from store.sqlite_observe import SqliteObserve
from store.sqlite_outbox import SqliteOutbox
from store.sqlite_responses import SqliteResponses
from store.sqlite_steps import SqliteSteps

__all__ = ["SqliteDispatchStore"]


class SqliteDispatchStore(SqliteSteps, SqliteResponses, SqliteOutbox, SqliteHealth, SqliteObserve):
    """Dispatch's SQLite connection; an async context manager."""
