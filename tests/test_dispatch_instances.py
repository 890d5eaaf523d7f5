"""Two PgDispatchStore instances on one PostgreSQL database (issue 13 item 3): claiming
at the same time they never claim one outbox row twice nor start two calls to a number,
a peer's claim is left alone while its lease holds, and once the lease runs out the other
takes the row back in doubt (the path a crash leaves: the outbox asks the provider before
sending it again); of two acks at once, one is the first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from store.dispatch import Delivery, NewMessage, Notice
from store.pg_dispatch import PgDispatchStore
from store.sql import Tx
from tests.dispatch_backends import T0, run, store_incidents

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


class _PausingTx:
    """A Tx that stops after the store's statement containing ``pause_on`` until told to
    go on, its transaction still open."""

    def __init__(self, tx: Tx, store: _PausedStore) -> None:
        self._tx = tx
        self._store = store

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        rows = await self._tx.rows(sql, params)
        if self._store.pause_on in sql:
            self._store.selected.set()
            await self._store.go.wait()
        return rows

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        return await self._tx.one(sql, params)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self._tx.execute(sql, params)

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        await self._tx.executemany(sql, params)


class _PausedStore(PgDispatchStore):
    """The real PgDispatchStore, a transaction held open after one statement."""

    def __init__(self, url: str, instance: str, pause_on: str = "SKIP LOCKED") -> None:
        super().__init__(url, instance=instance)
        self.pause_on = pause_on
        self.selected = asyncio.Event()
        self.go = asyncio.Event()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """The pool's transaction, pausing after the statement."""
        async with super().transaction() as tx:
            yield _PausingTx(tx, self)


def _call(n: int, due_at: float) -> NewMessage:
    return NewMessage(key=f"call:{n}", incident_id=None, person_id="ani", phone="+6281200001",
                      channel="voice", purpose="ops", body="x", due_at=due_at)


async def test_two_instances_claiming_at_once_start_one_call_to_a_number_not_two(
    pg_database: str,
) -> None:
    # A call carries nothing of panicd's, so a number has one call unsettled at a time
    # (issue 12 item 3). b's claim runs while a's has chosen the first call and not yet
    # committed: the second call must wait for the first to settle, on either instance.
    async with (_PausedStore(pg_database, "a") as a,
                PgDispatchStore(pg_database, instance="b") as b):
        await b.queue_messages([_call(1, T0), _call(2, T0 + 1)], T0)
        by_a = asyncio.create_task(a.claim_outbox(T0 + 1, 1))
        await a.selected.wait()
        by_b = asyncio.create_task(b.claim_outbox(T0 + 1, 10))
        await asyncio.sleep(0.3)  # time enough for b's claim to finish, if it need not wait
        a.go.set()
        got_a, got_b = await asyncio.gather(by_a, by_b)
        assert [r.key for r in got_a] == ["call:1"]
        assert got_b == []
        assert await run(b, "SELECT key FROM outbox WHERE state = 'sending'") == [("call:1",)]


async def test_of_two_acks_at_once_on_two_instances_one_is_the_first(pg_database: str) -> None:
    # a has read the incident 'open' and not yet committed its ack when b's arrives.
    notice = Notice("handled", "handled", "ditangani")
    async with (_PausedStore(pg_database, "a", pause_on="FROM incidents i WHERE id") as a,
                PgDispatchStore(pg_database, instance="b") as b):
        await store_incidents(b, ["open"], planned={1})
        by_a = asyncio.create_task(a.record_ack(1, person_id="ani", name="Ani", via="link",
                                                now=T0, handled=notice))
        await a.selected.wait()
        by_b = asyncio.create_task(b.record_ack(1, person_id="budi", name="Budi", via="call",
                                                now=T0, handled=notice))
        await asyncio.sleep(0.3)  # time enough for b's ack to commit, if it need not wait
        a.go.set()
        first, second = await asyncio.gather(by_a, by_b)
        assert (first.outcome, second.outcome) == ("first", "added")
        assert await run(b, "SELECT person_id, first FROM acks ORDER BY id") == [
            ("ani", 1), ("budi", 0)]
