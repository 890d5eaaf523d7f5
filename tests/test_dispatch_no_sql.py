"""dispatch/ holds no SQL and no database handle: every statement it needs is a named
method of the store (store/dispatch.py's DispatchStore), so a second backend implements
that interface and dispatch runs on it unchanged (issue 13 items 1 and 3)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

DISPATCH = Path(__file__).resolve().parent.parent / "dispatch"

# Statements as this code base writes them: keywords in capitals.
_SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(?:OR\s+[A-Z]+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b"
    r"|\bDELETE\s+FROM\b|\b(?:BEGIN|COMMIT|ROLLBACK|PRAGMA)\b(?:\s+[A-Z_]+)?\s*$"
)
# What only a store touches: driver modules, connections, cursors.
_DRIVERS = ("sqlite3", "aiosqlite", "asyncpg", "psycopg")
_HANDLES = ("db", "execute", "executemany", "execute_fetchall", "transaction", "rowcount",
            "lastrowid", "total_changes")


def _strings(tree: ast.AST) -> list[str]:
    # f-strings too: ast.walk reaches the constant parts of a JoinedStr.
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def sql_in(source: str) -> list[str]:
    """The string literals of ``source`` that are SQL statements or parts of one."""
    return [text for text in _strings(ast.parse(source)) if _SQL.search(text)]


def database_uses(source: str) -> list[str]:
    """Imports of a database driver and uses of a connection's or cursor's attributes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _DRIVERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _DRIVERS:
            found.append(node.module or "")
        elif isinstance(node, ast.Attribute) and node.attr in _HANDLES:
            found.append(f".{node.attr}")
    return found


def test_the_checks_find_sql_and_database_handles_where_there_are_some() -> None:
    source = '''
import aiosqlite
async def plan(store, key, table):
    async with store.transaction() as db:
        cursor = await db.execute(
            "INSERT OR IGNORE INTO escalation_steps (key) VALUES (?)", (key,))
        await store.db.execute_fetchall(f"SELECT COUNT(*) FROM {table}")
        await db.execute("UPDATE outbox SET state = 'cancelled' WHERE id = ?", (1,))
        await db.execute("COMMIT")
        return cursor.rowcount
'''
    assert len(sql_in(source)) == 4
    assert set(database_uses(source)) == {"aiosqlite", ".transaction", ".execute", ".db",
                                          ".execute_fetchall", ".rowcount"}
    # Words a message or a log line uses are not SQL.
    assert sql_in('"Pilih (select) lokasi dari daftar"; "update the roster"') == []


@pytest.mark.parametrize("module", sorted(DISPATCH.glob("*.py")), ids=lambda p: p.name)
def test_a_dispatch_module_holds_no_sql_and_no_database_handle(module: Path) -> None:
    source = module.read_text(encoding="utf-8")
    assert sql_in(source) == [], f"{module.name}: move the statement into store/"
    assert database_uses(source) == [], f"{module.name}: use a DispatchStore method"
