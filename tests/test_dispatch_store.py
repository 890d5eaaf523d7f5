"""SqliteDispatchStore on a real SQLite file: an interrupted transaction never wedges the
connection that the scheduler, the outbox senders and the webhooks share, and the
statements it repeats reach their rows through indexes (tests/query_plans.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

from store.dispatch import Delivery, NewMessage
from store.sqlite_dispatch import SqliteDispatchStore
from tests.query_plans import plan, traced, whole_reads

T0 = 1_780_000_000.0


async def test_a_transaction_cancelled_while_beginning_leaves_the_connection_usable(
    tmp_path: Path,
) -> None:
    async with SqliteDispatchStore(tmp_path / "panicd.sqlite3") as store:
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
    async with SqliteDispatchStore(tmp_path / "panicd.sqlite3") as store:
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
    reads = [sql for sql in statements if sql.startswith(("SELECT", "UPDATE outbox"))]
    assert len(reads) == 3
    with closing(sqlite3.connect(path)) as db:
        for sql in reads:
            assert whole_reads(db, sql) == [], sql


def _store_incidents(path: Path, statuses: list[str], *, planned: set[int]) -> None:
    """Incidents 1, 2, ... with these statuses; those in ``planned`` get a plan row."""
    with closing(sqlite3.connect(path)) as db:
        for incident_id, status in enumerate(statuses, 1):
            db.execute(
                "INSERT INTO incidents (id, device_id, status, test, opened_at, updated_at,"
                " press_count, last_press_at, location_source, kelurahan_match, address,"
                " landmark) VALUES (?, 'BTN-1', ?, 0, ?, ?, 1, ?, 'registered', 'inside',"
                " '', '')",
                (incident_id, status, T0, T0, T0),
            )
        db.executemany(
            "INSERT INTO incident_dispatch (incident_id, policy_id, route, planned_at)"
            " VALUES (?, 'city', 'city', ?)",
            [(incident_id, T0) for incident_id in planned],
        )
        db.commit()


async def test_unplanned_incidents_are_the_open_ones_without_a_plan_above_the_id_in_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        _store_incidents(path, ["open", "cancelled", "open", "acknowledged", "resolved", "open"],
                         planned={3})
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


def _store_outbox(path: Path, rows: list[tuple[int, str | None, str]]) -> None:
    """Outbox rows (id, provider_sid, state) of incident 1, SMS alerts to ani."""
    with closing(sqlite3.connect(path)) as db:
        db.executemany(
            "INSERT INTO outbox (id, key, incident_id, person_id, phone, channel, purpose,"
            " body, state, provider_sid, created_at, due_at, updated_at)"
            " VALUES (?, ?, 1, 'ani', '+628120001001', 'sms', 'alert', 'x', ?, ?, ?, ?, ?)",
            [(i, f"k{i}", state, sid, T0, T0, T0) for i, sid, state in rows],
        )
        db.commit()


def _row(path: Path, outbox_id: int) -> tuple[str, str | None]:
    with closing(sqlite3.connect(path)) as db:
        state, sid = db.execute(
            "SELECT state, provider_sid FROM outbox WHERE id = ?", (outbox_id,)
        ).fetchone()
    return state, sid


def _status_lines(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [r[0] for r in db.execute(
            "SELECT reason FROM incident_events WHERE event = 'sms.status' ORDER BY id"
        )]


SID_A, SID_B = "SM" + "a" * 32, "SM" + "b" * 32


async def test_a_replayed_or_older_status_callback_adds_no_line_and_never_moves_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        _store_incidents(path, ["open"], planned={1})
        _store_outbox(path, [(1, SID_A, "sent")])

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
        assert _row(path, 1) == ("delivered", SID_A)
        assert _status_lines(path) == ["sent", "delivered"]


async def test_a_status_callback_naming_another_sid_than_the_rows_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        _store_incidents(path, ["open"], planned={1})
        _store_outbox(path, [(1, SID_A, "sent")])
        for sid in (SID_B, ""):
            outcome = await store.record_status_callback(
                1, sid=sid, state="failed", rank=4, now=T0 + 5, error_code=30003,
                event="sms.status", detail={},
            )
            assert outcome == "sid_mismatch"
        assert _row(path, 1) == ("sent", SID_A)
        assert _status_lines(path) == []
        assert await store.record_status_callback(
            99, sid=SID_A, state="failed", rank=4, now=T0, error_code=None,
            event="sms.status", detail={},
        ) == "unknown"


async def test_a_callback_racing_the_send_binds_its_sid_unless_another_row_holds_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        _store_incidents(path, ["open"], planned={1})
        _store_outbox(path, [(1, None, "sending"), (2, SID_B, "sent")])

        async def callback(sid: str) -> str:
            return await store.record_status_callback(
                1, sid=sid, state="sent", rank=1, now=T0 + 1, error_code=None,
                event="sms.status", detail={},
            )

        assert await callback(SID_B) == "sid_mismatch"  # row 2's message
        assert _row(path, 1) == ("sending", None)
        assert await callback(SID_A) == "applied"
        assert _row(path, 1) == ("sent", SID_A)
        assert await callback("SM" + "c" * 32) == "sid_mismatch"  # now bound to SID_A


def _sending_alert(path: Path, incident_id: int, *, round_: int | None) -> int:
    """An alert row of the incident, claimed ('sending'); returns its id."""
    with closing(sqlite3.connect(path)) as db:
        cursor = db.execute(
            "INSERT INTO outbox (key, incident_id, person_id, phone, channel, purpose, round,"
            " level, body, state, attempts, created_at, due_at, updated_at) VALUES"
            " (?, ?, 'ani', '+628120001001', 'sms', 'alert', ?, 0, 'x', 'sending', 1, ?, ?, ?)",
            (f"{incident_id}:{round_}:ani", incident_id, round_, T0, T0, T0),
        )
        db.commit()
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def _transient(outbox_id: int, incident_id: int) -> Delivery:
    return Delivery(outbox_id=outbox_id, incident_id=incident_id, state="pending", at=T0 + 1,
                    sid=None, error_code=None, error="OSError(24, 'Too many open files')",
                    event="sms.retrying", reason="alert", detail={}, retry_at=T0 + 31)


async def test_a_transient_outcome_goes_back_to_pending_due_later_with_its_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        _store_incidents(path, ["open"], planned={1})
        row = _sending_alert(path, 1, round_=0)
        assert await store.record_deliveries([_transient(row, 1)]) == []
        assert await store.next_outbox_due() == T0 + 31
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT state, due_at, error FROM outbox").fetchall() == [
            ("pending", T0 + 31, "OSError(24, 'Too many open files')")
        ]


async def test_a_transient_outcome_of_a_closed_incidents_alert_is_cancelled(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        _store_incidents(path, ["resolved", "acknowledged", "acknowledged"], planned={1, 2, 3})
        resolved = _sending_alert(path, 1, round_=0)
        escalation = _sending_alert(path, 2, round_=0)
        reassigned = _sending_alert(path, 3, round_=None)  # an operator's reassign page
        cancelled = await store.record_deliveries(
            [_transient(resolved, 1), _transient(escalation, 2), _transient(reassigned, 3)]
        )
        assert cancelled == [resolved, escalation]
    with closing(sqlite3.connect(path)) as db:
        states = dict(db.execute("SELECT id, state FROM outbox").fetchall())
        events = db.execute("SELECT incident_id, event, reason FROM incident_events"
                            " ORDER BY id").fetchall()
    assert states == {resolved: "cancelled", escalation: "cancelled", reassigned: "pending"}
    assert events == [(1, "outbox.cancelled", "incident_closed"),
                      (2, "outbox.cancelled", "incident_closed"), (3, "sms.retrying", "alert")]


async def test_a_health_condition_is_raised_once_until_cleared(tmp_path: Path) -> None:
    async with SqliteDispatchStore(tmp_path / "panicd.sqlite3") as store:
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
    tmp_path: Path,
) -> None:
    # The rows go in as multi-row INSERTs of at most 80 (SQLite's 999 parameters), each
    # counting what it added with RETURNING: keys already queued, in any statement of the
    # batch, are neither counted nor changed.
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        assert await store.queue_messages([_ops_message(n) for n in range(0, 300, 3)], T0) == 100
        batch = [_ops_message(n) for n in range(250)]
        assert await store.queue_messages(batch, T0 + 1) == 250 - 84
        assert await store.queue_messages(batch, T0 + 2) == 0
        assert await store.queue_messages([], T0 + 3) == 0
    with closing(sqlite3.connect(path)) as db:
        # 100 keys first, then the 166 of 0..249 that are no multiple of 3.
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM outbox").fetchone() == (
            266, 266)
        # A key queued first keeps its first row: created at T0, not T0 + 1.
        assert db.execute("SELECT created_at FROM outbox WHERE key = 'ops:k3:ani'"
                          ).fetchone() == (T0,)
