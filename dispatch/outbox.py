"""The outbox worker: sends due messages through the channel and records what happened.

Up to ``concurrency`` sends run side by side, each freeing its slot as soon as the
provider answers (one slow request must not hold back the rows behind it). Outcomes are
written by one recorder task, many per transaction: one transaction per message used to
queue behind each other on the dispatch connection and delay the next level's paging.

Delivery is at least once: a row is 'sending' from its claim until its outcome is
recorded. Rows left 'sending' by a crash are re-queued at start; rows stuck 'sending'
for longer than any send can take (a failed record) are re-queued while running.

A transient error never ends a page (issue 12 item 2): a send that failed for a passing
reason goes back to 'pending', due again after :class:`dispatch.retry.RequeuePolicy`'s
backoff, as often as it takes, until the provider accepts it or its incident is closed
(then it is cancelled). Only a permanent refusal marks it 'failed' and may move the
escalation on early ("level_undeliverable"); a page still retrying keeps its level
waiting its normal time, and the next level fires at its own due time regardless.
When sends have failed transiently for ``provider_alert_after_s`` with no answer from
the provider, the outage is raised once as a health condition (the health monitor
tells operations) and logged as ``provider.outage``; the first answer clears it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from dispatch.channel import Channel, DeliveryResult, DeliveryStatus
from dispatch.loops import resilient, wait_until
from dispatch.policy import Medium
from dispatch.retry import Outcome, ProviderChange, ProviderWatch, RequeuePolicy
from dispatch.store import Delivery, DispatchStore, OutboxRow

log = structlog.get_logger("panicd.dispatch")

# Longer than the retry policy's deadline plus a request timeout (dispatch/retry.py).
STALE_SENDING_S = 300.0
# The health condition an outage of the provider raises (dispatch/health.py).
PROVIDER_SUBJECT = "provider:twilio"
PROVIDER_DOWN = "provider_down"


@dataclass(frozen=True, slots=True)
class _Sent:
    row: OutboxRow
    result: DeliveryResult
    at: float
    # A transient failure: when to send again (set when it is recorded).
    retry_at: float | None = None


def _delivery(sent: _Sent) -> Delivery:
    row, result = sent.row, sent.result
    kind = "sms" if row.channel == Medium.SMS.value else "call"
    detail: dict[str, object] = {"to": row.person_id, "sid": result.provider_sid,
                                 "error_code": result.error_code, "attempts": result.attempts}
    if result.ok:
        event, state = ("sms.sent" if kind == "sms" else "call.placed"), "sent"
    elif result.status is DeliveryStatus.FAILED_PERMANENT:
        event, state = f"{kind}.failed", "failed"
    else:
        event, state = f"{kind}.retrying", "pending"
        detail.update(error=result.error_message, sends=row.attempts + 1,
                      retry_in_s=None if sent.retry_at is None
                      else round(sent.retry_at - sent.at, 3))
    return Delivery(
        outbox_id=row.id, incident_id=row.incident_id, state=state, at=sent.at,
        sid=result.provider_sid, error_code=result.error_code, error=result.error_message,
        event=event, reason=row.purpose, detail=detail,
        retry_at=sent.retry_at if state == "pending" else None,
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
        requeue: RequeuePolicy | None = None,
        provider_alert_after_s: float = 60.0,
        rand: Callable[[], float] = random.random,
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
        self._requeue = requeue or RequeuePolicy()
        self._rand = rand
        self.provider = ProviderWatch(provider_alert_after_s)
        self._provider_resumed = False
        self.messages_sent = 0
        self.retries_scheduled = 0

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
            # Retried like any transient failure: a bug that passes (or a local OSError a
            # channel let through) must not end the page.
            result = DeliveryResult(DeliveryStatus.FAILED_TRANSIENT, error_message=repr(exc))
        now = self._clock()
        retry_at = None
        if result.status is DeliveryStatus.FAILED_TRANSIENT:
            # row.attempts is the count before this claim added one.
            retry_at = now + self._requeue.delay_s(row.attempts + 1, result.retry_after_s,
                                                   self._rand())
        return _Sent(row, result, now, retry_at)

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
        cancelled = set(await self._store.record_deliveries([_delivery(s) for s in batch]))
        self._finished(len(batch))
        for sent in batch:
            self._log(sent, cancelled=sent.row.id in cancelled)
        await self._watch_provider(batch)
        failed = [sent.row.id for sent in batch
                  if sent.result.status is DeliveryStatus.FAILED_PERMANENT]
        if failed and self._on_undeliverable is not None:
            # DESIGN §2 Delivery: a level nobody can be reached at moves on now, rather
            # than after its wait (e.g. every number invalid, 21211). Only a permanent
            # refusal counts: a page still retrying is not "undeliverable" (in issue 11
            # case 4, EMFILE on every send hastened the escalation through every level).
            for incident_id in await self._store.undeliverable_levels(failed):
                await self._on_undeliverable(incident_id)

    async def _watch_provider(self, batch: Sequence[_Sent]) -> None:
        if not self._provider_resumed:
            # An outage raised before a restart goes on: its end is still reported once.
            raised = await self._store.raised_condition(PROVIDER_SUBJECT, PROVIDER_DOWN)
            if raised is not None:
                self.provider.resume(raised[1])
            self._provider_resumed = True
        for sent in batch:
            transient = sent.result.status is DeliveryStatus.FAILED_TRANSIENT
            change = self.provider.observe(
                Outcome.TRANSIENT if transient else Outcome.ANSWERED, sent.at
            )
            if change is not None:
                await self._report_provider(change, sent)

    async def _report_provider(self, change: ProviderChange, sent: _Sent) -> None:
        if change.down:
            health_id = await self._store.raise_condition(
                PROVIDER_SUBJECT, PROVIDER_DOWN, sent.at,
                {"since": change.since, "failures": change.failures,
                 "error": sent.result.error_message},
            )
            log.error("provider.outage", since=change.since, failing_s=round(
                sent.at - change.since, 1), failures=change.failures,
                error=sent.result.error_message, health_id=health_id)
        else:
            health_id = await self._store.clear_condition(PROVIDER_SUBJECT, PROVIDER_DOWN,
                                                          sent.at)
            log.warning("provider.recovered", outage_s=round(sent.at - change.since, 1),
                        failures=change.failures, health_id=health_id)

    def _log(self, sent: _Sent, *, cancelled: bool) -> None:
        row, result = sent.row, sent.result
        delivery = _delivery(sent)
        fields = {"incident": row.incident_id, "to": row.phone, "person": row.person_id,
                  "purpose": row.purpose, "sid": result.provider_sid,
                  "attempts": result.attempts}
        if result.ok:
            self.messages_sent += 1
            log.info(delivery.event, **fields)
        elif cancelled:
            log.info("outbox.cancelled", reason="incident_closed", error=result.error_message,
                     **fields)
        elif sent.retry_at is not None:
            self.retries_scheduled += 1
            log.warning(delivery.event, error_code=result.error_code,
                        error=result.error_message, sends=row.attempts + 1,
                        retry_in_s=round(sent.retry_at - sent.at, 3), **fields)
        else:
            log.error(delivery.event, error_code=result.error_code, error=result.error_message,
                      permanent=True, **fields)
