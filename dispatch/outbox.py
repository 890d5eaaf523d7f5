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

No page twice (issue 12 item 3): a row whose earlier request may have been accepted
without panicd hearing of it — left 'sending' by a crash, or a timeout or a dropped
connection after the request went out — is "in doubt". Before sending it again the
outbox asks the provider what it holds for that number since the doubtful request
(:meth:`dispatch.channel.Channel.recent`) and adopts the match — an SMS carrying this
row's own signed ack link, or for a call (whose resource carries nothing of ours) the
oldest call to that number no other row holds; a number has only one call unsettled at
a time (DispatchStore.claim_outbox), so that call can only be this row's. Its SID and
status are recorded instead of sending. Not found: it is sent. The provider cannot be
asked: the row waits and asks again, but not for longer than ``IN_DOUBT_MAX_S`` (or at
all when asking cannot work, e.g. credentials without the right to list): a page sent
twice is a nuisance, a page never sent can cost a life.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from dispatch.channel import (
    CALL_STATES,
    SMS_STATES,
    Channel,
    DeliveryResult,
    DeliveryStatus,
    ProviderLookupError,
    ProviderRecord,
)
from dispatch.loops import resilient, wait_until
from dispatch.policy import Medium
from dispatch.retry import Outcome, ProviderChange, ProviderWatch, RequeuePolicy
from store.dispatch import Delivery, DispatchStore, OutboxRow

log = structlog.get_logger("panicd.dispatch")

# Longer than the retry policy's deadline plus a request timeout (dispatch/retry.py).
STALE_SENDING_S = 300.0
# The health condition an outage of the provider raises (dispatch/health.py).
PROVIDER_SUBJECT = "provider:twilio"
PROVIDER_DOWN = "provider_down"
# How long a row in doubt waits for the provider to answer a lookup before it is sent
# anyway (a possible duplicate rather than a possible loss).
IN_DOUBT_MAX_S = 60.0
# A provider's clock may be behind ours: records this much older than the doubtful
# request still count.
CLOCK_MARGIN_S = 60.0
_LINK = re.compile(r"https?://\S+")


@dataclass(frozen=True, slots=True)
class _Sent:
    row: OutboxRow
    result: DeliveryResult
    at: float
    # A transient failure: when to send again (set when it is recorded).
    retry_at: float | None = None
    # A transient failure: since when the row is in doubt (None: it is not).
    in_doubt_since: float | None = None
    # The provider already held this page (a lookup found it): its status word.
    found_status: str | None = None


def _delivery(sent: _Sent) -> Delivery:
    row, result = sent.row, sent.result
    kind = "sms" if row.channel == Medium.SMS.value else "call"
    detail: dict[str, object] = {"to": row.person_id, "sid": result.provider_sid,
                                 "error_code": result.error_code, "attempts": result.attempts}
    if result.ok:
        event, state = ("sms.sent" if kind == "sms" else "call.placed"), "sent"
        if sent.found_status is not None:
            states = SMS_STATES if kind == "sms" else CALL_STATES
            state = states.get(sent.found_status, ("sent", 0))[0]
            detail.update(found=True, provider_status=sent.found_status)
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
        in_doubt_since=sent.in_doubt_since if state == "pending" else None,
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
        # Set whenever the provider accepts a page (before it is recorded): start-up waits
        # on it to give the first overdue page a head start (panicd/daemon.py).
        self.accepted = asyncio.Event()
        self.retries_scheduled = 0
        # A row queued by a peer, or one a peer's send or lease freed (its number's next
        # call may go now), wakes this claim at once rather than at its timer.
        store.on_wake("outbox", self.wake)

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
        started = self._clock()
        doubt = row.in_doubt_since
        if doubt is not None:
            try:
                found = await self._find(row, doubt)
            except Exception as exc:  # noqa: BLE001 -- a lookup bug must not stall the page
                permanent = isinstance(exc, ProviderLookupError) and exc.permanent
                if not permanent and started - doubt < IN_DOUBT_MAX_S:
                    log.warning("outbox.lookup_failed", incident=row.incident_id,
                                person=row.person_id, to=row.phone, error=str(exc),
                                in_doubt_s=round(started - doubt, 1))
                    return self._transient(row, DeliveryResult(
                        DeliveryStatus.FAILED_TRANSIENT, error_message=f"lookup: {exc}",
                        attempts=0), doubt)
                log.error(  # noqa: TRY400 -- an expected refusal: no traceback
                    "outbox.sent_unverified", incident=row.incident_id,
                          person=row.person_id, to=row.phone, error=str(exc),
                          permanent=permanent, in_doubt_s=round(started - doubt, 1))
            else:
                if found is not None:
                    return _Sent(row, DeliveryResult(DeliveryStatus.SENT, provider_sid=found.sid,
                                                      attempts=0),
                                 self._clock(), found_status=found.status)
        try:
            result = await self._deliver(row)
        except Exception as exc:  # noqa: BLE001 -- a channel bug must not stall the outbox
            # Retried like any transient failure: a bug that passes (or a local OSError a
            # channel let through) must not end the page.
            result = DeliveryResult(DeliveryStatus.FAILED_TRANSIENT, error_message=repr(exc))
        if result.ok:
            self.accepted.set()
        if result.status is not DeliveryStatus.FAILED_TRANSIENT:
            return _Sent(row, result, self._clock())
        return self._transient(row, result, started if result.in_doubt else None)

    def _transient(self, row: OutboxRow, result: DeliveryResult,
                   in_doubt_since: float | None) -> _Sent:
        now = self._clock()
        # row.attempts is the count before this claim added one.
        retry_at = now + self._requeue.delay_s(row.attempts + 1, result.retry_after_s,
                                               self._rand())
        return _Sent(row, result, now, retry_at, in_doubt_since)

    async def _find(self, row: OutboxRow, since: float) -> ProviderRecord | None:
        """The provider's record of this row's page, if it accepted one since ``since``."""
        call = row.channel != Medium.SMS.value
        records = await self._channel.recent("call" if call else "sms", row.phone,
                                             since=since - CLOCK_MARGIN_S)
        if not call:
            links = _LINK.findall(row.body)
            marker = links[-1] if links else row.body
            records = [r for r in records if r.body is not None and marker in r.body]
        held = await self._store.recorded_sids([r.sid for r in records])
        mine = sorted((r for r in records if r.sid not in held), key=lambda r: r.created_at)
        if not mine:
            log.info("outbox.not_found", incident=row.incident_id, person=row.person_id,
                     to=row.phone, channel=row.channel, checked=len(records))
            return None
        log.warning("outbox.found", incident=row.incident_id, person=row.person_id,
                    to=row.phone, channel=row.channel, sid=mine[0].sid,
                    provider_status=mine[0].status, candidates=len(mine))
        return mine[0]

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
