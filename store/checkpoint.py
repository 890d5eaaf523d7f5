"""Copy SQLite's write-ahead log back into the database in the background.

In WAL mode every commit appends pages to the WAL, and by default the commit that takes it
past 1,000 pages also runs a checkpoint: it writes those pages into the database file and
fsyncs it before returning. On an empty database that is a few milliseconds; on one with
a million stored presses the pages a batch touches are scattered through big indexes, and
such a commit took up to 262 ms — a panic press (or a page going out) waiting on
housekeeping. panicd's connections therefore switch the automatic checkpoint off
(:class:`store.sqlite.Writers`) and this component, on a connection and thread of its
own, runs a PASSIVE checkpoint every ``every_s``: it copies what it can without waiting
for, or blocking, any reader or writer (https://www.sqlite.org/c3ref/wal_checkpoint_v2.html).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import aiosqlite
import structlog

log = structlog.get_logger("panicd.store")

#: WAL pages (4 KiB each) left after a checkpoint before it is worth a warning: a reader
#: that never finishes keeps the WAL from being copied, and it grows until the disk is full.
BACKLOG_WARN_PAGES = 250_000


class WalCheckpointer:
    """Runs the database's checkpoints off every commit path; an async context manager."""

    def __init__(
        self, path: Path, *, every_s: float = 1.0, warn_pages: int = BACKLOG_WARN_PAGES
    ) -> None:
        self._path = path
        self._every_s = every_s
        self._warn_pages = warn_pages
        self._db: aiosqlite.Connection | None = None
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        #: Checkpoints failed in a row; the first is warned about, the others are debug.
        self.failures = 0
        #: (busy, WAL pages, pages copied) of the last checkpoint, as SQLite reports them.
        self.last: tuple[int, int, int] | None = None
        self._done = asyncio.Condition()

    async def __aenter__(self) -> Self:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path, isolation_level=None)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._task = self._group.create_task(self._run(), name="store.checkpoint")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._group is not None
        if self._task is not None:
            self._task.cancel()
        try:
            # Not handed the caller's exception: a TaskGroup would wrap it in an
            # ExceptionGroup, and e.g. a StoreError at start would escape its handler.
            await self._group.__aexit__(None, None, None)
            # Everyone else has closed by now (this is entered first): leave no WAL behind.
            await self.checkpoint("TRUNCATE")
        finally:
            # Also on failure: aiosqlite's thread would otherwise keep the process alive.
            if self._db is not None:
                await self._db.close()
            self._db = None

    async def checkpoint(
        self, mode: Literal["PASSIVE", "TRUNCATE"] = "PASSIVE"
    ) -> tuple[int, int, int] | None:
        """Run one checkpoint now; its (busy, WAL pages, pages copied), None if it failed."""
        try:
            if self.failures or self._db is None:
                # A connection SQLite opened read-only (the file was not writable then)
                # fails every checkpoint for ever, even once the file is writable again.
                await self._reconnect()
            assert self._db is not None
            rows = list(await self._db.execute_fetchall(f"PRAGMA wal_checkpoint({mode})"))
        except (sqlite3.Error, ValueError) as exc:  # ValueError: aiosqlite's "closed"
            # A failed checkpoint loses nothing (the WAL still holds every commit); the next
            # one tries again, and the growing WAL is warned about below. Letting the task
            # die instead would stop checkpoints silently with autocheckpoint off. One
            # warning per outage: a full disk would otherwise log one every second.
            self.failures += 1
            if self.failures == 1:
                log.warning("store.checkpoint_failed", mode=mode, error=str(exc))
            else:
                log.debug("store.checkpoint_failed", mode=mode, error=str(exc),
                          failures=self.failures)
            return None
        if self.failures:
            log.info("store.checkpoint_recovered", mode=mode, failures=self.failures)
            self.failures = 0
        busy, pages, copied = (int(value) for value in rows[0])
        self.last = (busy, pages, copied)
        left = pages - copied
        if left >= self._warn_pages and not self._warned:
            log.warning("store.wal_growing", wal_pages=pages, not_copied=left)
            self._warned = True
        elif left < self._warn_pages:
            self._warned = False
        return self.last

    async def _reconnect(self) -> None:
        old, self._db = self._db, None
        if old is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await old.close()
        self._db = await aiosqlite.connect(self._path, isolation_level=None)

    async def next_checkpoint(self) -> tuple[int, int, int] | None:
        """Wait for the next background checkpoint and return its result."""
        async with self._done:
            await self._done.wait()
        return self.last

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self.checkpoint()
            async with self._done:
                self._done.notify_all()
