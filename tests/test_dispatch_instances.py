"""Two PgDispatchStore instances on one PostgreSQL database (issue 13 item 3): claiming
at the same time they never claim one outbox row twice nor start two calls to a number,
a peer's claim is left alone while its lease holds, and once the lease runs out the other
takes the row back in doubt (the path a crash leaves: the outbox asks the provider before
sending it again); of two acks at once, one is the first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from dispatch.engine import Dispatcher, DispatchSettings
from dispatch.loops import SharedClock
from store.dispatch import (
    WAKE_KINDS,
    Delivery,
    Fired,
    Firing,
    NewMessage,
    Notice,
    Plan,
    StepRow,
)
from store.errors import StoreError
from store.pg_dispatch import PgDispatchStore
from store.sql import Tx
from tests.dispatch_backends import T0, run, store_incidents
from tests.dispatch_world import (
    ACK_SECRET,
    KODE_LADDER,
    PEOPLE,
    PUBLIC_URL,
    RESPONDERS,
    ROUTING,
    Clock,
    RecordingChannel,
)

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

    def __init__(
        self, url: str, instance: str, pause_on: str = "SKIP LOCKED", **options: Any
    ) -> None:
        super().__init__(url, instance=instance, **options)
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


# -- wake-ups (LISTEN/NOTIFY), a hung peer's step, a dead peer's send, peers' incidents ---


class _WatchedPg(PgDispatchStore):
    """The real PgDispatchStore, telling the test what dispatch did with it."""

    def __init__(self, url: str, instance: str, **options: Any) -> None:
        super().__init__(url, instance=instance, **options)
        self.parked = asyncio.Event()  # the scheduler read "no step pending"
        self.planning = asyncio.Event()  # plan_incidents was called
        self.planned: list[int] = []  # plan_incidents calls returned, by incident ids
        self.plan_done = asyncio.Event()
        self.fired: list[str] = []
        self.fired_any = asyncio.Event()

    async def next_step_due(self) -> float | None:
        due = await super().next_step_due()
        if due is None:
            self.parked.set()
        return due

    async def plan_incidents(self, plans: Sequence[Plan], now: float) -> list[Fired]:
        self.planning.set()
        fired = await super().plan_incidents(plans, now)
        self.planned += [plan.incident_id for plan in plans]
        self.plan_done.set()
        return fired

    async def fire_steps(self, firings: Sequence[Firing], now: float) -> list[Fired]:
        fired = await super().fire_steps(firings, now)
        self.fired += [f.key for f in fired]
        if fired:
            self.fired_any.set()
        return fired


class _PausedWatchedPg(_PausedStore, _WatchedPg):
    """Watched, and its transaction held open after one statement."""


def _engine(store: PgDispatchStore, channel: RecordingChannel | None = None,
            clock: Callable[[], float] | None = None) -> Dispatcher:
    return Dispatcher(store, ROUTING, RESPONDERS, channel or RecordingChannel(),
                      DispatchSettings(PUBLIC_URL, ACK_SECRET, ack_ttl_s=3600.0),
                      clock=clock or Clock(T0))


_INSERT_INCIDENT = (
    "INSERT INTO incidents (id, device_id, status, test, opened_at, updated_at, press_count,"
    " last_press_at, location_source, kelurahan_kode, kelurahan, kecamatan, kelurahan_match,"
    " address, landmark) VALUES (?, ?, 'open', 0, ?, ?, 1, ?, 'registered', ?, 'Kuncen',"
    " 'Taman', 'inside', 'Jl. Kuncen No. 5', 'depan masjid')"
)


async def _store_incident(tx: Tx, incident_id: int) -> None:
    """An open Kuncen incident (the three-level ladder), as a peer's ingest commits it."""
    await tx.execute(_INSERT_INCIDENT,
                     (incident_id, f"BTN-{incident_id}", T0, T0, T0, KODE_LADDER))


async def _events(store: PgDispatchStore, incident_id: int) -> list[str]:
    rows = await run(store, "SELECT event FROM incident_events WHERE incident_id = ?"
                            " ORDER BY id", (incident_id,))
    return [str(r[0]) for r in rows]


async def test_a_step_a_peer_queues_wakes_a_sleeping_scheduler_without_a_timer(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a") as a,
                _WatchedPg(pg_database, instance="b") as b, _engine(b)):
        # b's scheduler has no step to wait for: it sleeps on its wake-up alone.
        async with asyncio.timeout(30):  # guards a hang only
            await b.parked.wait()
        # a stores an incident with its plan and a step due now, in one commit, and
        # fires nothing itself (as if it died right after): only a NOTIFY can wake b.
        async with a.transaction() as tx:
            await _store_incident(tx, 1)
            await tx.execute("INSERT INTO incident_dispatch (incident_id, policy_id, route,"
                             " planned_at) VALUES (1, 'kel-kuncen', 'kelurahan', ?)", (T0,))
            await tx.execute("INSERT INTO escalation_steps (key, incident_id, round, level,"
                             " due_at, state) VALUES ('1:0:0', 1, 0, 0, ?, 'pending')", (T0,))
        async with asyncio.timeout(30):
            await b.fired_any.wait()
        assert b.fired == ["1:0:0"]
        assert b.planned == []  # its peer scan found the plan a's commit carried
        assert (await _events(a, 1)).count("escalation.step_fired") == 1


async def test_a_step_claimed_by_a_hung_peer_is_fired_once_when_the_server_ends_its_claim(
    pg_database: str,
) -> None:
    # a claims the step and hangs, its transaction open; the server ends a transaction
    # idle past the limit (the step's lease), and b, waiting on the row, then fires it.
    async with (_PausedStore(pg_database, "a", pause_on="SET state = 'fired'",
                             tx_idle_limit_s=1.0) as a,
                PgDispatchStore(pg_database, instance="b") as b):
        step = StepRow("1:0:0", 1, 0, 0, T0, "kel-kuncen")
        async with b.transaction() as tx:
            await _store_incident(tx, 1)
        await b.plan_incidents([Plan(1, "kel-kuncen", "kelurahan", (step,), {})], T0)
        firing = Firing(step, live=True, people=("ani",), via=("person",), messages=(
            NewMessage(key="1:0:0:ani:sms", incident_id=1, person_id="ani",
                       phone=PEOPLE["ani"].phone, channel="sms", purpose="alert", body="x",
                       due_at=T0, round=0, level=0),))
        by_a = asyncio.create_task(a.fire_steps([firing], T0))
        await a.selected.wait()
        assert await b.fire_steps([firing], T0 + 1) == [Fired("1:0:0", 1, 0)]
        a.go.set()  # a wakes up to find its session ended and its claim rolled back
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await by_a
        assert (await _events(b, 1)).count("escalation.step_fired") == 1
        assert await run(b, "SELECT key, state FROM outbox") == [("1:0:0:ani:sms", "pending")]
        assert await run(b, "SELECT state, fired_at FROM escalation_steps") == [
            ("fired", T0 + 1)]


async def test_a_message_a_dead_peer_claimed_is_sent_once_by_another_after_its_lease(
    pg_database: str,
) -> None:
    channel = RecordingChannel()
    async with (PgDispatchStore(pg_database, instance="a", lease_s=1.0) as a,
                PgDispatchStore(pg_database, instance="b", lease_s=1.0) as b):
        claimed_at = time.time()
        await a.queue_messages([NewMessage(
            key="ops:dead-peer", incident_id=None, person_id="dewi", phone=PEOPLE["dewi"].phone,
            channel="sms", purpose="ops", body="x", due_at=claimed_at)], claimed_at)
        assert len(await a.claim_outbox(claimed_at, 10)) == 1
        # a dies here, mid-send: b's outbox timer is its lease's end, not its next poll.
        async with _engine(b, channel, clock=time.time):
            await channel.wait_for(1, timeout_s=30)
            sent_at = time.time()
        assert [s.to for s in channel.sent] == [PEOPLE["dewi"].phone]
        assert sent_at >= claimed_at + 1.0  # never while a's lease held
        assert await run(b, "SELECT state, attempts, claimed_by FROM outbox") == [
            ("sent", 2, "b")]


async def test_a_killed_listening_connection_comes_back_and_wakes_everything(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a") as a,
                PgDispatchStore(pg_database, instance="b") as b):
        woken = {kind: asyncio.Event() for kind in WAKE_KINDS}
        for kind, event in woken.items():
            b.on_wake(kind, event.set)
        (killed,) = await run(
            a, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
               " WHERE application_name = 'panicd-wake b'")
        assert killed == (True,)
        async with asyncio.timeout(30):  # guards a hang only
            for event in woken.values():
                await event.wait()
        assert b.wake_reconnects == 1
        # ... and it listens again: a's next message wakes b's outbox.
        woken["outbox"].clear()
        await a.queue_messages([_sms(1)], T0)
        async with asyncio.timeout(30):
            await woken["outbox"].wait()


async def test_a_store_opened_without_wake_ups_holds_no_listening_connection(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a") as a,
                PgDispatchStore(pg_database, instance="quiet", listen=False) as quiet):
        listening = await run(a, "SELECT application_name FROM pg_stat_activity WHERE"
                                 " datname = current_database() AND application_name"
                                 " LIKE 'panicd-wake %'")
        assert listening == [("panicd-wake a",)]
        with pytest.raises(StoreError, match="without wake-ups"):
            quiet.on_wake("step", lambda: None)
        assert await quiet.database_time() is not None


async def test_an_incident_a_peer_stored_and_never_planned_is_planned_by_another(
    pg_database: str,
) -> None:
    async with (PgDispatchStore(pg_database, instance="a") as a,
                _WatchedPg(pg_database, instance="b") as b):
        # b has planned incident 100 already; a reserved 50 before that and commits it
        # only now, then dies: ids below what b has planned still need a look.
        async with a.transaction() as tx:
            await _store_incident(tx, 100)
        async with _engine(b):
            async with asyncio.timeout(30):
                await b.plan_done.wait()
            b.plan_done.clear()
            async with a.transaction() as tx:
                await _store_incident(tx, 50)
            async with asyncio.timeout(30):
                await b.plan_done.wait()
        assert b.planned == [100, 50]
        assert (await _events(a, 50)).count("escalation.planned") == 1
        assert (await _events(a, 50)).count("escalation.step_fired") == 1


async def test_two_instances_planning_one_incident_at_once_plan_and_fire_it_once(
    pg_database: str,
) -> None:
    async with (_PausedWatchedPg(pg_database, "a", pause_on="INSERT INTO incident_dispatch")
                as a,
                _WatchedPg(pg_database, instance="b") as b,
                _engine(a), _engine(b)):
        async with b.transaction() as tx:
            await _store_incident(tx, 1)
        # Both were woken by the commit and found it unplanned: a has inserted its plan
        # and not committed; b plans it too.
        async with asyncio.timeout(30):
            await a.selected.wait()
            await b.planning.wait()
        a.go.set()
        async with asyncio.timeout(30):
            await a.plan_done.wait()
            await b.plan_done.wait()
        assert (a.planned, b.planned) == ([1], [1])
        events = await _events(b, 1)
        assert (events.count("escalation.planned"), events.count("escalation.step_fired")) == (
            1, 1)
        assert await run(b, "SELECT COUNT(*) FROM incident_dispatch") == [(1,)]
        assert await run(b, "SELECT COUNT(*), COUNT(DISTINCT key) FROM outbox"
                            " WHERE purpose = 'alert'") == [(4, 4)]


# -- one clock: the database's ------------------------------------------------------------


async def test_an_instance_whose_clock_runs_ahead_fires_a_step_at_the_databases_due_time(
    pg_database: str,
) -> None:
    # Due times are written by one instance and compared by another: in the database's
    # clock. This instance's wall clock is five minutes ahead; with its own clock it
    # would fire a step due in 1.5 s at once.
    ahead = SharedClock(wall=lambda: time.time() + 300.0)
    async with (PgDispatchStore(pg_database, instance="a") as a,
                _WatchedPg(pg_database, instance="b") as b):
        due = await a.database_time()
        assert due is not None
        due += 1.5
        async with a.transaction() as tx:
            await _store_incident(tx, 1)
            await tx.execute("INSERT INTO incident_dispatch (incident_id, policy_id, route,"
                             " planned_at) VALUES (1, 'kel-kuncen', 'kelurahan', ?)", (T0,))
            await tx.execute("INSERT INTO escalation_steps (key, incident_id, round, level,"
                             " due_at, state) VALUES ('1:0:0', 1, 0, 0, ?, 'pending')", (due,))
        async with _engine(b, clock=ahead):
            assert abs(ahead.skew_s - 300.0) < 1.0
            async with asyncio.timeout(30):
                await b.fired_any.wait()
        (fired_at,) = (await run(b, "SELECT fired_at FROM escalation_steps"))[0]
        assert due <= fired_at < due + 5.0


async def test_the_shared_clock_reads_the_database_and_ignores_this_hosts_wall_clock(
    pg_database: str,
) -> None:
    behind = SharedClock(wall=lambda: time.time() - 86_400.0)
    async with PgDispatchStore(pg_database, instance="a") as a:
        assert await behind.sync(a.database_time)
        database = await a.database_time()
        assert database is not None
        assert abs(behind() - database) < 0.5
        assert abs(behind.skew_s + 86_400.0) < 1.0
