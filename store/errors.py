"""What a store failure means, on either backend (docs/STORE.md).

The ingest writer must tell three kinds of failure apart, whichever database it runs on:

* a press the database refuses for its own values (a data error): retrying cannot help,
  so the batch is split until that press is found and dead-lettered;
* a peer instance committed the same press or burst first (a conflict): the batch is
  decided again at once, on what is stored now, and is no outage;
* anything else (the database away, full, read-only): retried until it recovers.

Only :mod:`sqlite3` is imported here; asyncpg's classes are looked at by module name first,
so a SQLite panicd never imports the PostgreSQL driver.
"""

from __future__ import annotations

import sqlite3

__all__ = ["ConflictError", "StoreError", "StoreUnreachableError", "is_conflict",
           "is_data_error", "refuse_newer_schema"]


class StoreError(Exception):
    """The database refused an operation (corrupt file, newer schema, disk full...)."""


def refuse_newer_schema(found: int, known: int) -> None:
    """Raise the one-line StoreError for a database from a newer panicd (both backends)."""
    if found > known:
        raise StoreError(f"database schema version {found} is newer than this panicd ({known})")


class StoreUnreachableError(StoreError):
    """The database server cannot be reached or refuses the login (exit 1: try again);
    the message names the server, never the password."""


class ConflictError(StoreError):
    """What the batch took for new was already stored by another writer: decide it again."""


# sqlite3 refuses a value (an integer past 64 bits, a lone surrogate, a wrong type) or a
# constraint. OperationalError (disk full, read-only, locked) is none of these.
_SQLITE_DATA = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
                sqlite3.ProgrammingError)
# Python refusing a value before any driver sees it.
_VALUE_ERRORS = (OverflowError, UnicodeError, TypeError)


def _from_asyncpg(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("asyncpg")


def is_conflict(exc: BaseException) -> bool:
    """A peer stored it first: a unique index refused a second press or active incident."""
    if isinstance(exc, ConflictError):
        return True
    if type(exc).__module__ == "store.pg_ingest":
        from store.pg_ingest import PressConflictError  # noqa: PLC0415  # see module doc

        return isinstance(exc, PressConflictError)
    if _from_asyncpg(exc):
        from asyncpg.exceptions import UniqueViolationError  # noqa: PLC0415  # see module doc

        return isinstance(exc, UniqueViolationError)
    return False


def is_data_error(exc: BaseException) -> bool:
    """The batch's own values cannot be stored (never a conflict, never an outage)."""
    if isinstance(exc, _VALUE_ERRORS + _SQLITE_DATA):
        return True
    if not _from_asyncpg(exc) or is_conflict(exc):
        return False
    from asyncpg.exceptions import (  # noqa: PLC0415  # see module doc
        CheckViolationError,
        DataError,
        NotNullViolationError,
    )

    # The client's own encoding error (a value out of int64 range, a lone surrogate):
    # asyncpg raises it before anything is sent. Only reachable via its _base module.
    from asyncpg.exceptions._base import DataError as ClientDataError  # noqa: PLC0415

    return isinstance(exc, DataError | ClientDataError | NotNullViolationError
                      | CheckViolationError)
