"""Two PgDispatchStore instances on one PostgreSQL database (issue 13 item 3): claiming
at the same time they never claim one outbox row twice, a peer's claim is left alone
while its lease holds, and once the lease runs out the other takes the row back in doubt
(the path a crash leaves: the outbox asks the provider before sending it again)."""

from __future__ import annotations

import asyncio

from store.dispatch import Delivery, NewMessage
from store.pg_dispatch import PgDispatchStore
from tests.dispatch_backends import T0, run

ROWS = 300


def _sms(n: int) -> NewMessage:
    return NewMessage(key=f"ops:lease:{n}", incident_id=None, person_id=f"p{n}",
                      phone=f"+62812{n:05d}", channel="sms", purpose="ops", body="x", due_at=T0)


async def _claim_all(store: PgDispatchStore, start: asyncio.Event) -> list[int]:
    """Claim in small batches until nothing is left; the ids this store got."""
    await start.wait()
    got: list[int] = []
    while rows := await store.claim_outbox(T0, 7):
        got += [r.id for r in rows]
    return got


async def test_two_instances_claiming_at_once_never_claim_one_row_twice(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a", max_size=3) as a,
                PgDispatchStore(pg_database, instance="b", max_size=3) as b):
        assert await a.queue_messages([_sms(n) for n in range(ROWS)], T0) == ROWS
        start = asyncio.Event()
        # Three claimers per instance: each pool's connections interleave their
        # transactions with the peer's, as instances on separate machines would.
        tasks = [asyncio.create_task(_claim_all(store, start))
                 for store in (a, b, a, b, a, b)]
        await asyncio.sleep(0)
        start.set()
        got = await asyncio.gather(*tasks)
        by_a = [i for claims in got[0::2] for i in claims]
        by_b = [i for claims in got[1::2] for i in claims]
        assert len(by_a) + len(by_b) == len(set(by_a) | set(by_b)) == ROWS
        assert by_a and by_b  # both took part
        owners = {int(r[0]): r[1] for r in await run(
            a, "SELECT id, claimed_by FROM outbox WHERE state = 'sending'")}
    assert owners == {**dict.fromkeys(by_a, "a"), **dict.fromkeys(by_b, "b")}


def _transient(outbox_id: int, at: float) -> Delivery:
    return Delivery(outbox_id=outbox_id, incident_id=None, state="pending", at=at, sid=None,
                    error_code=None, error="TimeoutError()", event="sms.retrying",
                    reason="ops", detail={}, retry_at=at + 30)


async def test_a_peers_claim_is_left_alone_until_its_lease_runs_out_then_taken_in_doubt(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a", lease_s=30) as a,
                PgDispatchStore(pg_database, instance="b", lease_s=30) as b):
        await a.queue_messages([_sms(1)], T0)
        (mine,) = await a.claim_outbox(T0, 10)
        # b starts (its start-up requeue) and claims while a's lease holds: nothing of a's.
        assert await b.requeue_interrupted(T0 + 10) == 0
        assert await b.claim_outbox(T0 + 10, 10) == []
        assert await b.next_outbox_due() == T0 + 30  # when a's lease runs out
        # a died mid-send: once its lease ran out, b takes the row back, in doubt since
        # a's claim, and claims it as its own.
        (taken,) = await b.claim_outbox(T0 + 30, 10)
        assert (taken.id, taken.attempts, taken.in_doubt_since) == (mine.id, 1, T0)
        # a was only slow: its late transient failure must not undo b's claim.
        assert await a.record_deliveries([_transient(mine.id, T0 + 31)]) == []
        assert await run(a, "SELECT state, claimed_by, lease_until FROM outbox") == [
            ("sending", "b", T0 + 60)]


async def test_a_restarted_instance_takes_back_only_its_own_rows_at_start(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a") as a,
                PgDispatchStore(pg_database, instance="b") as b):
        await a.queue_messages([_sms(1), _sms(2)], T0)
        (first,) = await a.claim_outbox(T0, 1)
        (second,) = await b.claim_outbox(T0, 1)
    async with PgDispatchStore(pg_database, instance="a") as again:
        assert await again.requeue_interrupted(T0 + 5) == 1
        states = {int(r[0]): (r[1], r[2]) for r in await run(
            again, "SELECT id, state, claimed_by FROM outbox")}
    assert states == {first.id: ("pending", None), second.id: ("sending", "b")}
