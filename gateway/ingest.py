"""The ingest pipeline's single writer: verify → dedup → locate → commit → acknowledge.

Sources hand over :class:`Inbound` items and get their outcome through a callback that
runs only after the batch holding the item is committed. That callback is where a source
sends its MQTT PUBACK or LoRa ACK: nothing is acknowledged before it is durable.

The decisions themselves are pure (:mod:`gateway.batch` over :mod:`gateway.verify`,
:mod:`gateway.dedup` and :mod:`gateway.locate`); this module owns the queue, the group
commit, the retries and the acknowledgements.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Self

import structlog

from gateway.batch import (
    BatchProcessor,
    BatchResult,
    DeadLettered,
    IdAllocator,
    Inbound,
    IncidentEvent,
    Outcome,
    Registry,
    Repeated,
    Stored,
    batch_keys,
    outcome_label,
)
from gateway.dedup import DedupPolicy
from gateway.locate import Locator
from store.errors import is_conflict, is_data_error
from store.ingest import BatchWrites, DeadLetterRow, IngestStore

# Sources and dispatch import these names from here.
__all__ = [
    "BatchResult", "DeadLettered", "IdAllocator", "Inbound", "IncidentEvent", "IncidentListener",
    "Ingestor", "Outcome", "Registry", "Repeated", "Stored",
]

log = structlog.get_logger("panicd.ingest")

# In a burst every press attaches to the open incident, and its press.accepted line
# (outcome=attached, incident=…) already is the one canonical line for it. A second info
# line per press doubled the journal volume of a storm and cost about a tenth of the drain
# throughput (docs/PERFORMANCE.md); the attach stays in the incident's timeline.
_DEBUG_EVENTS = frozenset({"incident.press_attached"})


IncidentListener = Callable[[IncidentEvent], None]

# The dead-letter reason of a press the database could not store (see _commit_isolating).
UNSTORABLE = "unstorable"
# How many times in a row a batch is decided again because a peer instance stored the
# same press or burst first (store.errors.is_conflict). Each retry reads what the peer
# committed, so a second conflict on the same batch is already rare; past this it is
# treated as any other store failure (retried with backoff, and logged as an outage).
CONFLICT_RETRIES = 8


class _PoisonedBatch(Exception):  # noqa: N818 -- a signal inside the writer, not an error
    """The batch failed on its own data; carries the error."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class Ingestor:
    """Owns the ingest queue and the one task that writes presses to the store."""

    def __init__(
        self,
        store: IngestStore,
        registry: Registry,
        locator: Locator,
        *,
        policy: DedupPolicy,
        batch_max: int = 256,
        batch_window_s: float = 0.0,
        queue_max: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._registry = registry
        self._processor = BatchProcessor(registry, locator, policy, store)
        self._batch_max = batch_max
        self._batch_window_s = batch_window_s
        self._clock = clock
        self._queue: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=queue_max)
        self._listeners: list[IncidentListener] = []
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._task_group: asyncio.TaskGroup | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # Since when (wall clock) commits have been failing; None while they succeed.
        self._failing_since: float | None = None
        self._failing_from = 0.0  # the same instant on the loop's monotonic clock
        self.committed_batches = 0
        self.committed_items = 0
        # Committed items by (source, outcome), for the metrics endpoint.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def add_listener(self, listener: IncidentListener) -> None:
        """Call ``listener`` for every committed incident transition."""
        self._listeners.append(listener)

    @property
    def depth(self) -> int:
        """Items submitted but not yet committed."""
        return self._pending

    @property
    def store_failing_since(self) -> float | None:
        """Since when commits have been failing (Unix time), or None while they succeed."""
        return self._failing_since

    async def __aenter__(self) -> Self:
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        self._writer = self._task_group.create_task(self._run(), name="ingest.writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        self._closing = True
        # Callers drain() first; whatever is still queued now was never acknowledged, so
        # its sender delivers it again after the restart.
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task_group.__aexit__(exc_type, exc, tb)

    def device_key(self, device_id: str) -> bytes | None:
        """The registered key of ``device_id`` (None: unknown or keyless)."""
        device = self._registry.devices.get(device_id)
        return None if device is None else device.key

    async def submit(self, item: Inbound) -> None:
        """Queue an item; waits when the queue is full (back-pressure to the source)."""
        if self._closing:
            # Not acknowledged, so the sender (broker, button) will deliver it again.
            raise RuntimeError("ingest is shutting down")
        self._pending += 1
        self._idle.clear()
        await self._queue.put(item)

    async def drain(self, deadline_s: float) -> bool:
        """Wait until every submitted item is committed; False if the deadline passed."""
        try:
            async with asyncio.timeout(deadline_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._batch_window_s > 0:
                # Optional: wait for more presses. The default (0) needs no wait to group
                # commits: what arrives while one COMMIT is in flight is the next batch.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self._batch_window_s
                while len(batch) < self._batch_max:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            batch.append(await self._queue.get())
                    except TimeoutError:
                        break
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            outcomes, logs, events = await self._commit_isolating(batch)
            self.committed_batches += 1
            self.committed_items += len(batch)
            self._pending -= len(batch)
            if self._pending == 0:
                self._idle.set()
            for item, outcome in zip(batch, outcomes, strict=True):
                self.outcomes[item.reception.source, outcome_label(outcome)] += 1
                item.on_done(outcome)
            for event, fields in logs:
                # Rejections are what an operator must see with `journalctl -p warning`.
                if event == "press.rejected":
                    log.warning(event, **fields)
                elif event in _DEBUG_EVENTS:
                    log.debug(event, **fields)
                else:
                    log.info(event, **fields)
            for incident_event in events:
                for listener in self._listeners:
                    listener(incident_event)

    async def _commit_isolating(
        self, batch: list[Inbound]
    ) -> tuple[list[Outcome], list[tuple[str, dict[str, object]]], list[IncidentEvent]]:
        """Commit the batch; a press the database cannot store is isolated, not retried.

        A database that is failing (disk full, read-only, locked) fails every batch alike
        and is retried until it recovers. A batch that fails on its own data (a value
        SQLite cannot take, a constraint) would fail forever and stall every press behind
        it: it is split in halves until the one press that cannot be stored is found, and
        that press becomes a dead letter ``unstorable`` with its raw payload. The dead
        letter is written only if the database then works, so a database outage that
        happens to raise such an error is still retried, never dead-lettered.
        """
        try:
            outcomes, work = await self._commit_with_retry(batch, isolate=True)
        except _PoisonedBatch as poisoned:
            if len(batch) == 1:
                return await self._dead_letter_unstorable(batch[0], poisoned.error)
            middle = len(batch) // 2
            first = await self._commit_isolating(batch[:middle])
            second = await self._commit_isolating(batch[middle:])
            return first[0] + second[0], first[1] + second[1], first[2] + second[2]
        return outcomes, work.logs, work.events

    async def _dead_letter_unstorable(
        self, item: Inbound, error: Exception
    ) -> tuple[list[Outcome], list[tuple[str, dict[str, object]]], list[IncidentEvent]]:
        reception = item.reception
        detail = ascii(error)[:500]
        row = DeadLetterRow(
            received_at=reception.received_at, source=reception.source, path=reception.path,
            format=item.format, device_ref=None, reason=UNSTORABLE, detail=detail,
            payload=item.payload[:4096],
        )
        while True:
            try:
                # The press itself once more first: if it is stored now, the failure was
                # the database's after all. Then its dead letter, in its own commit.
                try:
                    outcomes, work = await self._commit_deciding_again([item])
                except Exception as exc:
                    if not is_data_error(exc):
                        raise
                    with contextlib.suppress(Exception):
                        await self._store.rollback()
                else:
                    return outcomes, work.logs, work.events
                await self._store.begin()
                await self._store.write(BatchWrites(dead_letters=[row]))
                await self._store.commit()
            except Exception as exc:  # noqa: BLE001 -- the database itself: retry both
                with contextlib.suppress(Exception):
                    await self._store.rollback()
                log.error(  # noqa: TRY400 -- one journal line, the error says enough
                    "store.commit_failed", error=repr(exc), batch=1, retry_in_s=1.0
                )
                await asyncio.sleep(1.0)
                continue
            fields: dict[str, object] = {
                "reason": UNSTORABLE, "detail": detail[:200], "device": None,
                "source": reception.source, "path": reception.path,
            }
            return [DeadLettered(UNSTORABLE)], [("press.rejected", fields)], []

    async def _commit_with_retry(
        self, batch: list[Inbound], *, isolate: bool = False
    ) -> tuple[list[Outcome], BatchResult]:
        """Commit the batch, retrying forever: an un-committed press must not be acked.

        The first failure of an outage is one critical line (``store.unavailable``) for
        operations, and the first commit after it one ``store.recovered``: the journal
        is the one alert path that needs no database (an operations SMS is an outbox row,
        and the outbox is in the database that is failing).
        """
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                result = await self._commit_deciding_again(batch)
            except Exception as exc:
                if is_data_error(exc):
                    if not isolate:
                        raise
                    with contextlib.suppress(Exception):
                        await self._store.rollback()
                    raise _PoisonedBatch(exc) from exc
                attempt += 1
                with contextlib.suppress(Exception):
                    await self._store.rollback()
                if self._failing_since is None:
                    self._failing_since = self._clock()
                    self._failing_from = loop.time()
                    log.critical("store.unavailable", error=repr(exc), batch=len(batch),
                                 pending=self._pending)
                delay = min(5.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311
                # One journal line per failure, not a traceback: the error says enough.
                log.error(  # noqa: TRY400
                    "store.commit_failed",
                    error=repr(exc),
                    attempt=attempt,
                    batch=len(batch),
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            if self._failing_since is not None:
                log.warning("store.recovered", down_s=round(loop.time() - self._failing_from, 3),
                            attempts=attempt, pending=self._pending)
                self._failing_since = None
            return result

    async def _commit_deciding_again(
        self, batch: list[Inbound]
    ) -> tuple[list[Outcome], BatchResult]:
        """:meth:`_commit`, decided again at once when a peer instance stored the same
        press or burst first: that is the shared store working, not an outage."""
        conflicts = 0
        while True:
            try:
                return await self._commit(batch)
            except Exception as exc:
                if conflicts == CONFLICT_RETRIES or not is_conflict(exc):
                    raise
                conflicts += 1
                with contextlib.suppress(Exception):
                    await self._store.rollback()
                log.info("store.decided_again", reason="stored by a peer first",
                         error=str(exc)[:200], batch=len(batch), attempt=conflicts)

    async def _commit(self, batch: list[Inbound]) -> tuple[list[Outcome], BatchResult]:
        store = self._store
        await store.begin()
        state = await store.batch_state(*batch_keys(batch, self._registry))
        outcomes, work = self._processor.process(batch, state)
        await store.write(work.writes)
        await store.commit()
        return outcomes, work
