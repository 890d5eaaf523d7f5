"""Query plans of the statements panicd repeats, as SQLite 3.40 makes them without ANALYZE
(panicd never runs it): a statement on a recurring path must not read a whole table.

Every table but ``devices`` grows with history (incidents, messages, health rows are kept
until ``panicctl purge``), so a full read costs more each month. A partial index holds
only the rows its WHERE admits (the few pending messages, the open incidents), so
scanning one is bounded by those rows, not by the table.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

# "SCAN outbox", "SCAN o USING COVERING INDEX sqlite_autoindex_outbox_1": a walk over
# every row of the table or of the index named.
_SCAN = re.compile(r"SCAN (?P<target>\S+)(?: USING (?:COVERING )?INDEX (?P<index>\S+))?")


def plan(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[str]:
    """The detail column of ``EXPLAIN QUERY PLAN``, one string per step."""
    return [str(row[3]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def whole_reads(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[str]:
    """The steps of ``sql``'s plan that read a whole table or a whole non-partial index."""
    partial = {
        str(name)
        for (name,) in db.execute(
            "SELECT il.name FROM sqlite_master AS m, pragma_index_list(m.name) AS il"
            " WHERE m.type = 'table' AND il.partial"
        )
    }
    whole = []
    for step in plan(db, sql, params):
        match = _SCAN.fullmatch(step)
        if match is None or match["target"] == "CONSTANT":  # "SCAN CONSTANT ROW"
            continue
        if match["index"] is None or match["index"] not in partial:
            whole.append(step)
    return whole


@asynccontextmanager
async def traced(db: aiosqlite.Connection) -> AsyncIterator[list[str]]:
    """Every statement ``db`` runs inside the block, parameters bound (Python 3.11 passes
    the expanded SQL to the trace callback), so the test checks what the code ran."""
    statements: list[str] = []
    await db.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        await db.set_trace_callback(lambda _sql: None)
