"""The dispatch store on both backends, the same assertions on each: SqliteDispatchStore on
a real SQLite file and PgDispatchStore on the private PostgreSQL (a fresh database per
test, tests/dispatch_backends.py). An interrupted transaction never wedges the store, a
status callback or an outcome moves a row forward only, and on SQLite the statements it
repeats reach their rows through indexes (tests/query_plans.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import asyncpg
import pytest

from store.dispatch import Delivery, NewMessage
from store.sql import pg_placeholders
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_backends import BACKENDS, T0, Store, run, store_factory, store_incidents
from tests.query_plans import plan, traced, whole_reads


@pytest.fixture(params=BACKENDS)
async def new_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Store]]:
    """Makes (not yet opened) dispatch stores on one fresh database of each backend."""
    async with store_factory(request.param, request, tmp_path) as factory:
        yield factory


def test_placeholders_are_numbered_outside_quoted_text_only() -> None:
    assert pg_placeholders("SELECT ? , '?', \"a?\", ? FROM t WHERE x = '' AND y = ?") == (
        "SELECT $1 , '?', \"a?\", $2 FROM t WHERE x = '' AND y = $3"
    )
    assert pg_placeholders("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"


async def test_a_transaction_cancelled_while_beginning_leaves_the_store_usable(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        entered = asyncio.Event()

        async def claim() -> None:
            async with store.transaction():
                entered.set()

        task = asyncio.create_task(claim())
        await asyncio.sleep(0)  # the task is now awaiting its BEGIN
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not entered.is_set()

        async with store.transaction() as tx:
            await tx.execute("CREATE TABLE probe (x INTEGER)")
            assert await tx.execute("INSERT INTO probe VALUES (1), (2)") == 2
        assert await run(store, "SELECT COUNT(*) FROM probe") == [(2,)]
        if isinstance(store, SqliteDispatchStore):
            assert not store.db.in_transaction


async def test_a_failing_statement_rolls_back_and_the_next_transaction_commits(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
            async with store.transaction() as tx:
                await tx.execute("CREATE TABLE probe (x INTEGER UNIQUE)")
                await tx.execute("INSERT INTO probe VALUES (1)")
                await tx.execute("INSERT INTO probe VALUES (1)")
        # The CREATE was rolled back with the rest (DDL is transactional on both).
        async with store.transaction() as tx:
            await tx.execute("CREATE TABLE probe (x INTEGER UNIQUE)")
            await tx.execute("INSERT INTO probe VALUES (1)")
        assert await run(store, "SELECT x FROM probe") == [(1,)]


async def test_requeuing_stale_sends_reads_only_the_rows_left_sending(tmp_path: Path) -> None:
    # The outbox loop runs this every 60 s inside the write lock press ingest shares, so a
    # scan of the whole outbox delays presses: 11.7 ms on 100,000 messages (audit).
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store, traced(store.db) as statements:
        await store.requeue_interrupted(T0, older_than=T0 - 300)
    (update,) = [sql for sql in statements if sql.startswith("UPDATE outbox")]
    with closing(sqlite3.connect(path)) as db:
        assert whole_reads(db, update) == []


async def test_claiming_and_recording_messages_read_no_whole_table(tmp_path: Path) -> None:
    # Every page passes through these; a call's claim also looks for an unsettled call to
    # its number (issue 12 item 3), which must not read the outbox's history.
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store, traced(store.db) as statements:
        await store.claim_outbox(T0, 10)
        await store.next_outbox_due()
        await store.record_deliveries([Delivery(
            outbox_id=1, incident_id=None, state="sent", at=T0, sid="CA" + "1" * 32,
            error_code=None, error=None, event="call.placed", reason="alert", detail={})])
    # The claim's take-back of expired leases and its SELECT, the two reads of when the
    # next row is due (a pending row, a lease running out), the outcome's UPDATE.
    reads = [sql for sql in statements if sql.startswith(("SELECT", "UPDATE outbox"))]
    assert len(reads) == 5
    with closing(sqlite3.connect(path)) as db:
        for sql in reads:
            assert whole_reads(db, sql) == [], sql


async def test_unplanned_incidents_are_the_open_ones_without_a_plan_above_the_id_in_order(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(
            store, ["open", "cancelled", "open", "acknowledged", "resolved", "open"],
            planned={3},
        )
        assert [i.id for i in await store.unplanned_incidents(0)] == [1, 4, 6]
        assert [i.id for i in await store.unplanned_incidents(1)] == [4, 6]
        assert [i.id for i in await store.unplanned_incidents(6)] == []
        assert await store.newest_incident_id() == 6


async def test_unplanned_incidents_are_read_through_the_index_of_open_incidents(
    tmp_path: Path,
) -> None:
    # The start-up scan (above id 0) once walked the rowid range, i.e. every incident
    # ever stored: 4.0 ms on 50,000 incidents (audit), through incidents_active 0.02 ms.
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store, traced(store.db) as statements:
        await store.unplanned_incidents(0)
    (select,) = [sql for sql in statements if "FROM incidents i" in sql]
    with closing(sqlite3.connect(path)) as db:
        reads = [step for step in plan(db, select) if step.split()[1] == "i"]
    assert reads == ["SCAN i USING INDEX incidents_active"]


async def _store_outbox(store: Store, rows: list[tuple[int, str | None, str]]) -> None:
    """Outbox rows (id, provider_sid, state) of incident 1, SMS alerts to ani."""
    async with store.transaction() as tx:
        await tx.executemany(
            "INSERT INTO outbox (id, key, incident_id, person_id, phone, channel, purpose,"
            " body, state, provider_sid, created_at, due_at, updated_at)"
            " VALUES (?, ?, 1, 'ani', '+628120001001', 'sms', 'alert', 'x', ?, ?, ?, ?, ?)",
            [(i, f"k{i}", state, sid, T0, T0, T0) for i, sid, state in rows],
        )


async def _row(store: Store, outbox_id: int) -> tuple[str, str | None]:
    (row,) = await run(store, "SELECT state, provider_sid FROM outbox WHERE id = ?",
                        (outbox_id,))
    return row[0], row[1]


async def _status_lines(store: Store) -> list[str]:
    return [r[0] for r in await run(
        store, "SELECT reason FROM incident_events WHERE event = 'sms.status' ORDER BY id")]


SID_A, SID_B = "SM" + "a" * 32, "SM" + "b" * 32


async def test_a_replayed_or_older_status_callback_adds_no_line_and_never_moves_back(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned={1})
        await _store_outbox(store, [(1, SID_A, "sent")])

        async def callback(state: str, rank: int) -> str:
            return await store.record_status_callback(
                1, sid=SID_A, state=state, rank=rank, now=T0 + 5, error_code=None,
                event="sms.status", detail={"provider_status": state},
            )

        assert await callback("sent", 3) == "applied"
        assert await callback("delivered", 4) == "applied"
        # Twilio's scheme has no nonce: the same callback again, an older one, or another
        # final status after the final one, change nothing.
        assert [await callback("delivered", 4), await callback("sent", 3),
                await callback("failed", 4)] == ["replayed"] * 3
        assert await _row(store, 1) == ("delivered", SID_A)
        assert await _status_lines(store) == ["sent", "delivered"]


async def test_a_status_callback_naming_another_sid_than_the_rows_is_refused(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned={1})
        await _store_outbox(store, [(1, SID_A, "sent")])
        for sid in (SID_B, ""):
            outcome = await store.record_status_callback(
                1, sid=sid, state="failed", rank=4, now=T0 + 5, error_code=30003,
                event="sms.status", detail={},
            )
            assert outcome == "sid_mismatch"
        assert await _row(store, 1) == ("sent", SID_A)
        assert await _status_lines(store) == []
        assert await store.record_status_callback(
            99, sid=SID_A, state="failed", rank=4, now=T0, error_code=None,
            event="sms.status", detail={},
        ) == "unknown"


async def test_a_callback_racing_the_send_binds_its_sid_unless_another_row_holds_it(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned={1})
        await _store_outbox(store, [(1, None, "sending"), (2, SID_B, "sent")])

        async def callback(sid: str) -> str:
            return await store.record_status_callback(
                1, sid=sid, state="sent", rank=1, now=T0 + 1, error_code=None,
                event="sms.status", detail={},
            )

        assert await callback(SID_B) == "sid_mismatch"  # row 2's message
        assert await _row(store, 1) == ("sending", None)
        assert await callback(SID_A) == "applied"
        assert await _row(store, 1) == ("sent", SID_A)
        assert await callback("SM" + "c" * 32) == "sid_mismatch"  # now bound to SID_A


async def _sending_alert(store: Store, incident_id: int, *, round_: int | None) -> int:
    """An alert row of the incident, claimed ('sending'); returns its id."""
    (row,) = await run(
        store,
        "INSERT INTO outbox (key, incident_id, person_id, phone, channel, purpose, round,"
        " level, body, state, attempts, created_at, due_at, updated_at) VALUES"
        " (?, ?, 'ani', '+628120001001', 'sms', 'alert', ?, 0, 'x', 'sending', 1, ?, ?, ?)"
        " RETURNING id",
        (f"{incident_id}:{round_}:ani", incident_id, round_, T0, T0, T0),
    )
    return int(row[0])


def _transient(outbox_id: int, incident_id: int) -> Delivery:
    return Delivery(outbox_id=outbox_id, incident_id=incident_id, state="pending", at=T0 + 1,
                    sid=None, error_code=None, error="OSError(24, 'Too many open files')",
                    event="sms.retrying", reason="alert", detail={}, retry_at=T0 + 31)


async def test_a_transient_outcome_goes_back_to_pending_due_later_with_its_error(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned={1})
        row = await _sending_alert(store, 1, round_=0)
        assert await store.record_deliveries([_transient(row, 1)]) == []
        assert await store.next_outbox_due() == T0 + 31
        assert await run(store, "SELECT state, due_at, error FROM outbox") == [
            ("pending", T0 + 31, "OSError(24, 'Too many open files')")
        ]


async def test_a_transient_outcome_of_a_closed_incidents_alert_is_cancelled(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["resolved", "acknowledged", "acknowledged"],
                               planned={1, 2, 3})
        resolved = await _sending_alert(store, 1, round_=0)
        escalation = await _sending_alert(store, 2, round_=0)
        reassigned = await _sending_alert(store, 3, round_=None)  # an operator's reassign page
        cancelled = await store.record_deliveries(
            [_transient(resolved, 1), _transient(escalation, 2), _transient(reassigned, 3)]
        )
        assert cancelled == [resolved, escalation]
        states = {r[0]: r[1] for r in await run(store, "SELECT id, state FROM outbox")}
        events = [tuple(r) for r in await run(
            store, "SELECT incident_id, event, reason FROM incident_events ORDER BY id")]
    assert states == {resolved: "cancelled", escalation: "cancelled", reassigned: "pending"}
    assert events == [(1, "outbox.cancelled", "incident_closed"),
                      (2, "outbox.cancelled", "incident_closed"), (3, "sms.retrying", "alert")]


async def test_a_health_condition_is_raised_once_until_cleared(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        first = await store.raise_condition("provider:twilio", "provider_down", T0, {"n": 1})
        assert first is not None
        assert await store.raise_condition("provider:twilio", "provider_down", T0 + 5, {}) is None
        assert await store.raised_condition("provider:twilio", "provider_down") == (first, T0)
        assert await store.clear_condition("provider:twilio", "provider_down", T0 + 9) == first
        assert await store.clear_condition("provider:twilio", "provider_down", T0 + 9) is None
        assert await store.raised_condition("provider:twilio", "provider_down") is None
        again = await store.raise_condition("provider:twilio", "provider_down", T0 + 20, {})
        assert again not in (None, first)


def _ops_message(n: int) -> NewMessage:
    return NewMessage(key=f"ops:k{n}:ani", incident_id=None, person_id="ani",
                      phone="+628120001001", channel="sms", purpose="ops", body=f"b{n}",
                      due_at=T0)


async def test_queueing_counts_only_new_keys_across_statements_of_many_rows(
    new_store: Callable[[], Store],
) -> None:
    # The rows go in as multi-row INSERTs of at most 80 (SQLite's 999 parameters), each
    # counting what it added with RETURNING: keys already queued, in any statement of the
    # batch, are neither counted nor changed.
    async with new_store() as store:
        assert await store.queue_messages([_ops_message(n) for n in range(0, 300, 3)], T0) == 100
        batch = [_ops_message(n) for n in range(250)]
        assert await store.queue_messages(batch, T0 + 1) == 250 - 84
        assert await store.queue_messages(batch, T0 + 2) == 0
        assert await store.queue_messages([], T0 + 3) == 0
        # 100 keys first, then the 166 of 0..249 that are no multiple of 3.
        assert await run(store, "SELECT COUNT(*), COUNT(DISTINCT key) FROM outbox") == [
            (266, 266)]
        # A key queued first keeps its first row: created at T0, not T0 + 1.
        assert await run(store, "SELECT created_at FROM outbox WHERE key = 'ops:k3:ani'"
                          ) == [(T0,)]
