"""DispatchStore on a real SQLite file: an interrupted transaction never wedges the
connection that the scheduler, the outbox senders and the webhooks share, and the
statements it repeats reach their rows through indexes (tests/query_plans.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

from dispatch.store import DispatchStore
from tests.query_plans import traced, whole_reads

T0 = 1_780_000_000.0


async def test_a_transaction_cancelled_while_beginning_leaves_the_connection_usable(
    tmp_path: Path,
) -> None:
    async with DispatchStore(tmp_path / "panicd.sqlite3") as store:
        entered = asyncio.Event()

        async def claim() -> None:
            async with store.transaction():
                entered.set()

        task = asyncio.create_task(claim())
        await asyncio.sleep(0)  # the task is now awaiting BEGIN IMMEDIATE on the thread
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not entered.is_set()

        async with store.transaction() as db:
            await db.execute("CREATE TABLE probe (x INTEGER)")
        assert not store.db.in_transaction


async def test_a_failing_statement_rolls_back_and_the_next_transaction_commits(
    tmp_path: Path,
) -> None:
    async with DispatchStore(tmp_path / "panicd.sqlite3") as store:
        try:
            async with store.transaction() as db:
                await db.execute("CREATE TABLE probe (x INTEGER UNIQUE)")
                await db.execute("INSERT INTO probe VALUES (1)")
                await db.execute("INSERT INTO probe VALUES (1)")
        except Exception as exc:  # noqa: BLE001 -- the IntegrityError is the point
            assert "UNIQUE" in str(exc)
        async with store.transaction() as db:
            await db.execute("CREATE TABLE probe (x INTEGER UNIQUE)")
            await db.execute("INSERT INTO probe VALUES (1)")
        rows = list(await store.db.execute_fetchall("SELECT x FROM probe"))
        assert rows == [(1,)]


async def test_requeuing_stale_sends_reads_only_the_rows_left_sending(tmp_path: Path) -> None:
    # The outbox loop runs this every 60 s inside the write lock press ingest shares, so a
    # scan of the whole outbox delays presses: 11.7 ms on 100,000 messages (audit).
    path = tmp_path / "panicd.sqlite3"
    async with DispatchStore(path) as store, traced(store.db) as statements:
        await store.requeue_interrupted(T0, older_than=T0 - 300)
    (update,) = [sql for sql in statements if sql.startswith("UPDATE outbox")]
    with closing(sqlite3.connect(path)) as db:
        assert whole_reads(db, update) == []
