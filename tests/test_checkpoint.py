"""WAL checkpoints off the commit path: real SQLite files, the real store and checkpointer."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from store.checkpoint import WalCheckpointer
from store.errors import StoreError
from store.ingest import BatchWrites, DeadLetterRow
from store.sqlite import SqliteStore, Writers

T0 = 1_700_000_000.0


async def _autocheckpoint(store: SqliteStore) -> int:
    rows = list(await store.db.execute_fetchall("PRAGMA wal_autocheckpoint"))
    return int(rows[0][0])


async def _write_pages(store: SqliteStore, rows: int) -> None:
    """Commit ``rows`` dead letters of 4 KiB each: about one WAL page a row."""
    await store.begin()
    await store.write(BatchWrites(dead_letters=[
        DeadLetterRow(T0 + n, "local", "mqtt:local:x", "native", None, "bad_json", "", b"x" * 4096)
        for n in range(rows)
    ]))
    await store.commit()


async def _until(
    checkpointer: WalCheckpointer, predicate: Callable[[tuple[int, int, int]], bool]
) -> None:
    """Wait (5 s at most) for a background checkpoint whose result satisfies ``predicate``."""
    async with asyncio.timeout(5.0):
        while True:
            result = await checkpointer.next_checkpoint()
            if result is not None and predicate(result):
                return


async def test_a_process_with_a_checkpointer_never_checkpoints_inside_a_commit(
    tmp_path: Path,
) -> None:
    async with (
        SqliteStore(tmp_path / "db", writers=Writers(background_checkpoints=True)) as quiet,
        SqliteStore(tmp_path / "db") as default,
    ):
        assert await _autocheckpoint(quiet) == 0
        assert await _autocheckpoint(default) == 1000


async def test_the_checkpointer_copies_committed_pages_into_the_database(tmp_path: Path) -> None:
    writers = Writers(background_checkpoints=True)
    async with (
        WalCheckpointer(tmp_path / "db", every_s=0.02) as checkpointer,
        SqliteStore(tmp_path / "db", writers=writers) as store,
    ):
        await _write_pages(store, 200)
        await _until(checkpointer, lambda result: result[1] >= 200 and result[2] == result[1])


async def test_a_wal_that_cannot_be_copied_is_warned_about_once(tmp_path: Path) -> None:
    writers = Writers(background_checkpoints=True)
    async with SqliteStore(tmp_path / "db", writers=writers) as store:
        await _write_pages(store, 1)
        # A reader in the middle of a transaction pins its snapshot: a checkpoint cannot
        # copy pages committed after it, so the WAL only grows.
        reader = sqlite3.connect(tmp_path / "db", isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM dead_letters").fetchall()
            with structlog.testing.capture_logs() as logs:
                async with WalCheckpointer(tmp_path / "db", every_s=0.02,
                                           warn_pages=50) as checkpointer:
                    await _write_pages(store, 100)
                    await _until(checkpointer, lambda result: result[1] >= 100)
                    await _write_pages(store, 10)
                    await _until(checkpointer, lambda result: result[1] >= 110)
                    reader.execute("COMMIT")
        finally:
            reader.close()
    warnings = [e for e in logs if e["event"] == "store.wal_growing"]
    assert len(warnings) == 1
    assert warnings[0]["not_copied"] >= 50


async def test_an_error_while_starting_up_escapes_the_checkpointer_as_itself(
    tmp_path: Path,
) -> None:
    # panicd enters the checkpointer first; a database from a newer panicd must still
    # reach the daemon's `except StoreError` (exit 1), not an ExceptionGroup.
    with pytest.raises(StoreError, match="newer"):
        async with WalCheckpointer(tmp_path / "db", every_s=0.02):
            raise StoreError("database schema version 99 is newer than this panicd")


async def test_a_failing_checkpoint_is_logged_and_tried_again(tmp_path: Path) -> None:
    (tmp_path / "db").write_bytes(b"not a database at all " * 300)
    with structlog.testing.capture_logs() as logs:
        async with WalCheckpointer(tmp_path / "db", every_s=0.02) as checkpointer:
            assert await checkpointer.next_checkpoint() is None
            assert await checkpointer.next_checkpoint() is None
    failures = [e for e in logs if e["event"] == "store.checkpoint_failed"]
    # Two in the loop, which kept going, and the final one at close.
    assert len(failures) >= 3
    assert "not a database" in failures[0]["error"]
