"""The outbox worker: sends due messages through the channel and records what happened.

Up to ``concurrency`` sends run side by side, each freeing its slot as soon as the
provider answers (one slow request must not hold back the rows behind it). Outcomes are
written by one recorder task, many per transaction: one transaction per message used to
queue behind each other on the dispatch connection and delay the next level's paging.

Delivery is at least once: a row is 'sending' from its claim until its outcome is
recorded. Rows left 'sending' by a crash are re-queued at start; rows stuck 'sending'
for longer than any send can take (a failed record) are re-queued while running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from dispatch.channel import Channel, DeliveryResult, DeliveryStatus
from dispatch.loops import resilient, wait_until
from dispatch.policy import Medium
from dispatch.store import Delivery, DispatchStore, OutboxRow

log = structlog.get_logger("panicd.dispatch")

# Longer than the retry policy's deadline plus a request timeout (dispatch/retry.py).
STALE_SENDING_S = 300.0


@dataclass(frozen=True, slots=True)
class _Sent:
    row: OutboxRow
    result: DeliveryResult
    at: float


def _delivery(sent: _Sent) -> Delivery:
    row, result = sent.row, sent.result
    kind = "sms" if row.channel == Medium.SMS.value else "call"
    if result.ok:
        event, state = ("sms.sent" if kind == "sms" else "call.placed"), "sent"
    else:
        event, state = f"{kind}.failed", "failed"
    return Delivery(
        outbox_id=row.id, incident_id=row.incident_id, state=state, at=sent.at,
        sid=result.provider_sid, error_code=result.error_code, error=result.error_message,
        event=event, reason=row.purpose,
        detail={"to": row.person_id, "sid": result.provider_sid,
                "error_code": result.error_code, "attempts": result.attempts},
    )


class Outbox:
    """Claims due rows, sends them, records outcomes; run by the dispatcher's TaskGroup."""

    def __init__(
        self,
        store: DispatchStore,
        channel: Channel,
        *,
        base_url: str,
        concurrency: int,
        clock: Callable[[], float] = time.time,
        on_undeliverable: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._channel = channel
        self._base_url = base_url
        self._concurrency = concurrency
        self._clock = clock
        self._on_undeliverable = on_undeliverable
        self._wake = asyncio.Event()
        self._results: asyncio.Queue[_Sent] = asyncio.Queue()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._last_stale_check = 0.0
        self.messages_sent = 0

    def wake(self) -> None:
        """New rows may be due: look now."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Sends started and not yet recorded."""
        return self._in_flight

    async def run(self) -> None:
        """Send and record until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(resilient("outbox.recorder", self._record_once),
                              name="outbox.recorder")
            await resilient("outbox", lambda: self._claim_once(group))

    async def drain(self, deadline_s: float) -> bool:
        """Stop claiming and wait for started sends to be recorded; False on deadline."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(deadline_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("outbox.drain_timeout", in_flight=self._in_flight)
            return False
        return True

    async def _claim_once(self, group: asyncio.TaskGroup) -> None:
        self._wake.clear()
        if self._closing:
            await asyncio.Event().wait()  # park: drain() is waiting for in-flight sends
        now = self._clock()
        if now - self._last_stale_check >= 60.0:
            self._last_stale_check = now
            stale = await self._store.requeue_interrupted(now, older_than=now - STALE_SENDING_S)
            if stale:
                log.warning("outbox.requeued_stale", messages=stale)
        free = self._concurrency - self._in_flight
        if free <= 0:
            await self._wake.wait()  # a finished send sets it
            return
        rows = await self._store.claim_outbox(now, free)
        for row in rows:
            self._started()
            group.create_task(self._send_and_queue(row), name=f"outbox.send.{row.id}")
        if len(rows) == free:
            return  # more may be due: claim again as soon as a slot frees
        await wait_until(self._wake, await self._store.next_outbox_due(), self._clock)

    def _started(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _finished(self, count: int) -> None:
        self._in_flight -= count
        if self._in_flight == 0:
            self._idle.set()
        self._wake.set()

    async def _send_and_queue(self, row: OutboxRow) -> None:
        self._results.put_nowait(await self._send(row))

    async def send_due(self) -> int:
        """One pass: claim, send and record one batch of due rows; returns how many."""
        rows = await self._store.claim_outbox(self._clock(), self._concurrency)
        if not rows:
            return 0
        for _ in rows:
            self._started()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._send(row), name=f"outbox.send.{row.id}")
                     for row in rows]
        await self._record([task.result() for task in tasks])
        return len(rows)

    async def _deliver(self, row: OutboxRow) -> DeliveryResult:
        base = self._base_url
        if row.channel == Medium.SMS.value:
            return await self._channel.send_sms(
                row.phone, row.body, status_callback=f"{base}/twilio/status/sms/{row.id}"
            )
        return await self._channel.place_call(
            row.phone,
            twiml_url=f"{base}/twilio/voice/{row.id}",
            status_callback=f"{base}/twilio/status/call/{row.id}",
        )

    async def _send(self, row: OutboxRow) -> _Sent:
        try:
            result = await self._deliver(row)
        except Exception as exc:  # noqa: BLE001 -- a channel bug must not stall the outbox
            result = DeliveryResult(DeliveryStatus.FAILED_TRANSIENT, error_message=repr(exc))
        return _Sent(row, result, self._clock())

    async def _record_once(self) -> None:
        batch = [await self._results.get()]
        while not self._results.empty():
            batch.append(self._results.get_nowait())
        try:
            await self._record(batch)
        except BaseException:
            # Not recorded: keep them for the retry (the rows are still 'sending').
            for sent in batch:
                self._results.put_nowait(sent)
            raise

    async def _record(self, batch: Sequence[_Sent]) -> None:
        await self._store.record_deliveries([_delivery(sent) for sent in batch])
        self._finished(len(batch))
        for sent in batch:
            self._log(sent)
        failed = [sent.row.id for sent in batch if not sent.result.ok]
        if failed and self._on_undeliverable is not None:
            # DESIGN §2 Delivery: a level nobody can be reached at moves on now, rather
            # than after its wait (e.g. every number invalid, 21211).
            for incident_id in await self._store.undeliverable_levels(failed):
                await self._on_undeliverable(incident_id)

    def _log(self, sent: _Sent) -> None:
        row, result = sent.row, sent.result
        delivery = _delivery(sent)
        fields = {"incident": row.incident_id, "to": row.phone, "person": row.person_id,
                  "purpose": row.purpose, "sid": result.provider_sid,
                  "attempts": result.attempts}
        if result.ok:
            self.messages_sent += 1
            log.info(delivery.event, **fields)
        else:
            log.error(delivery.event, error_code=result.error_code, error=result.error_message,
                      permanent=result.status is DeliveryStatus.FAILED_PERMANENT, **fields)
