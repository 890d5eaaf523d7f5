"""The ingest stores on real databases, SQLite and PostgreSQL alike: schema, batch state,
writes, ids, constraints. Each test runs on both (tests/store_backends.py) with the same
assertions; the few that read SQLite's own internals say so and run on it alone."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest

from gateway.dedup import ActiveIncident
from gateway.model import PressKind
from gateway.verify import DeviceState, KnownPress
from store.ingest import (
    BatchWrites,
    DeadLetterRow,
    DeviceSeen,
    IncidentChange,
    IncidentRow,
    PathRow,
    PressRow,
    TimelineRow,
)
from store.sqlite import SCHEMA_VERSION, SqliteStore, StoreError
from tests import store_backends
from tests.store_backends import AnyStore, Backend, PgBackend

backend = store_backends.backend

T0 = 1_700_000_000.0


def _seen(  # noqa: PLR0917 -- mirrors the row's columns
    device: str, counter: int | None, at: float, kind: str, path: str, battery: int | None
) -> DeviceSeen:
    return DeviceSeen(
        DeviceState(device, counter, at, battery, window=0 if counter is None else 1), kind, path
    )


def _press(
    id_: int,
    *,
    device: str = "btn-1",
    counter: int | None = 1,
    kind: str = "panic",
    trust: str = "signed",
    incident: int | None = None,
    at: float = T0,
) -> PressRow:
    return PressRow(
        id=id_,
        device_id=device,
        counter=counter,
        kind=kind,
        format="native",
        trust=trust,
        received_at=at,
        device_time=None,
        battery=80,
        lat=-7.6,
        lon=111.5,
        accuracy_m=12.0,
        incident_id=incident,
        outcome="opened" if incident else "heartbeat",
    )


def _incident(
    id_: int, *, device: str = "btn-1", test: bool = False, at: float = T0
) -> IncidentRow:
    return IncidentRow(
        id=id_,
        device_id=device,
        test=test,
        opened_at=at,
        lat=-7.62182,
        lon=111.53096,
        location_source="registered",
        kelurahan_kode="35.77.01.1001",
        kelurahan="Oro-oro Ombo",
        kecamatan="Kartoharjo",
        kelurahan_match="inside",
        address="Jl. Pahlawan",
        landmark="Pos kamling",
    )


async def _rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read through a second, independent connection: only committed data is visible."""
    async with aiosqlite.connect(path) as db:
        return [tuple(row) for row in await db.execute_fetchall(sql, params)]


async def _commit(store: AnyStore, writes: BatchWrites) -> None:
    await store.begin()
    await store.write(writes)
    await store.commit()


# --- schema ---------------------------------------------------------------------------


async def test_migrate_from_empty_records_the_version_and_creates_every_table(
    backend: Backend,
) -> None:
    async with backend.store():
        pass
    assert await backend.version() == SCHEMA_VERSION
    assert await backend.tables() == {
        "devices",
        "incidents",
        "presses",
        "press_paths",
        "incident_events",
        "dead_letters",
        "incident_dispatch",
        "escalation_steps",
        "outbox",
        "acks",
        "device_health",
        *backend.version_tables,
        *backend.own_tables,
    }


async def test_sqlite_database_is_made_in_a_new_directory_in_wal_mode(tmp_path: Path) -> None:
    # SQLite only: a file path and a journal mode are SQLite's.
    path = tmp_path / "sub" / "panicd.sqlite3"
    async with SqliteStore(path):
        pass
    assert await _rows(path, "PRAGMA journal_mode") == [("wal",)]


async def test_reopen_is_idempotent_and_keeps_data(backend: Backend) -> None:
    async with backend.store() as store:
        first = store.allocate_press_id()
        await _commit(store, BatchWrites(presses=[_press(first)]))
    async with backend.store() as store:
        # A fresh id after a reopen is past every stored one.
        assert store.allocate_press_id() > first
        assert store.allocate_incident_id() >= 1
    assert await backend.version() == SCHEMA_VERSION
    assert await backend.rows("SELECT id FROM presses") == [(first,)]


async def test_database_from_a_newer_panicd_is_refused(backend: Backend) -> None:
    await backend.set_version(SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="newer"):
        async with backend.store():
            pass
    # Refused before touching the schema.
    assert await backend.tables() == set(backend.version_tables)
    assert await backend.version() == SCHEMA_VERSION + 1


async def test_closed_store_refuses_use(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises(StoreError, match="not open"):
        await store.begin()


# --- batch_state ----------------------------------------------------------------------


async def test_batch_state_of_an_empty_database_is_empty(backend: Backend) -> None:
    async with backend.store() as store:
        state = await store.batch_state(["btn-1"], [("btn-1", 1)])
    assert (state.devices, state.active, state.active_test, state.known) == ({}, {}, {}, {})


async def test_batch_state_returns_device_states(backend: Backend) -> None:
    async with backend.store() as store:
        seen = {
            "btn-1": _seen("btn-1", 41, T0, "heartbeat", "mqtt:local", 77),
            "btn-2": _seen("btn-2", None, T0 + 1, "panic", "mqtt:local", None),
        }
        await _commit(store, BatchWrites(devices=seen))
        state = await store.batch_state(["btn-1", "btn-2", "btn-3"], [])
    assert state.devices == {
        "btn-1": DeviceState("btn-1", 41, T0, 77, window=1),
        "btn-2": DeviceState("btn-2", None, T0 + 1, None),
    }


async def test_batch_state_splits_active_incidents_by_test_flag(backend: Backend) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                incidents=[
                    _incident(1),
                    _incident(2, test=True, at=T0 + 5),
                    _incident(3, device="btn-2"),
                    _incident(4, device="btn-3"),
                ],
                incident_changes=[
                    IncidentChange(1, T0, add_presses=1),
                    IncidentChange(1, T0 + 1, add_presses=1, urgent=True),
                    IncidentChange(2, T0 + 5, add_presses=1),
                    IncidentChange(3, T0, add_presses=1, status="acknowledged"),
                    IncidentChange(4, T0, add_presses=1, status="resolved"),
                ],
            ),
        )
        state = await store.batch_state(["btn-1", "btn-2", "btn-3"], [])
    assert state.active == {
        "btn-1": ActiveIncident(1, "btn-1", False, T0, 2, True),
        "btn-2": ActiveIncident(3, "btn-2", False, T0, 1, False),
    }
    assert state.active_test == {"btn-1": ActiveIncident(2, "btn-1", True, T0 + 5, 1, False)}


async def test_batch_state_prefers_the_newest_of_several_active_incidents(
    tmp_path: Path,
) -> None:
    # SQLite only: PostgreSQL's schema refuses a second active incident of one device
    # (several instances write at once there); see the test after this one.
    async with SqliteStore(tmp_path / "db") as store:
        await _commit(store, BatchWrites(incidents=[_incident(1), _incident(2, at=T0 + 9)]))
        state = await store.batch_state(["btn-1"], [])
    assert state.active["btn-1"].id == 2


async def test_postgresql_refuses_a_second_active_incident_of_one_device(
    pg_database: str,
) -> None:
    pg = PgBackend(pg_database)
    async with pg.store() as store:
        await _commit(store, BatchWrites(incidents=[_incident(1), _incident(2, test=True)]))
        await store.begin()
        with pytest.raises(asyncpg.UniqueViolationError, match="incidents_active"):
            await store.write(BatchWrites(incidents=[_incident(3, at=T0 + 9)]))
        await store.rollback()
        # Closed incidents are no obstacle: once the first is resolved, a new one opens.
        await _commit(
            store,
            BatchWrites(
                incident_changes=[IncidentChange(1, T0 + 10, status="resolved")],
                incidents=[_incident(4, at=T0 + 11)],
            ),
        )
        state = await store.batch_state(["btn-1"], [])
    assert state.active["btn-1"].id == 4
    assert state.active_test["btn-1"].id == 2


async def test_batch_state_finds_known_presses_by_device_and_counter(backend: Backend) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                presses=[
                    _press(1, counter=5, kind="panic"),
                    _press(2, counter=6, kind="cancel", at=T0 + 3),
                    _press(3, device="btn-2", counter=5, kind="test"),
                    _press(4, device="btn-3", counter=None, kind="heartbeat"),
                ]
            ),
        )
        state = await store.batch_state(
            ["btn-1"], [("btn-1", 5), ("btn-1", 6), ("btn-2", 5), ("btn-2", 6), ("btn-1", 7)]
        )
    assert state.known == {
        ("btn-1", 5): KnownPress(1, PressKind.PANIC, T0),
        ("btn-1", 6): KnownPress(2, PressKind.CANCEL, T0 + 3),
        ("btn-2", 5): KnownPress(3, PressKind.TEST, T0),
    }


async def test_batch_state_searches_indexes_instead_of_scanning_tables(tmp_path: Path) -> None:
    # Every batch runs these lookups; a full scan of presses grows with every press ever
    # stored (it once did: a row-value IN over VALUES), so each must be an index search.
    # SQLite only: it reads SQLite's statement trace and EXPLAIN QUERY PLAN.
    statements: list[str] = []
    async with SqliteStore(tmp_path / "db") as store:
        await _commit(store, BatchWrites(presses=[_press(n, counter=n) for n in range(1, 50)]))
        await store.db.set_trace_callback(statements.append)
        await store.batch_state(["btn-1", "btn-2"], [("btn-1", 5), ("btn-2", 6)])
        await store.db.set_trace_callback(lambda _sql: None)
    selects = [sql for sql in statements if "SELECT" in sql]
    assert len(selects) == 3
    with sqlite3.connect(tmp_path / "db") as db:
        for sql in selects:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            scans = [step for step in plan if step.startswith("SCAN ")
                     and step != "SCAN k" and not step.endswith("CONSTANT ROWS")]
            assert not scans, (sql, plan)


async def test_batch_state_known_press_is_the_newest_network_copy(backend: Backend) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                presses=[
                    _press(1, counter=3, trust="network"),
                    _press(2, counter=3, trust="network", at=T0 + 900),
                ]
            ),
        )
        state = await store.batch_state([], [("btn-1", 3)])
    assert state.known[("btn-1", 3)].press_id == 2


async def test_batch_state_chunks_more_than_400_devices_and_keys(backend: Backend) -> None:
    devices = [f"btn-{n:04d}" for n in range(1000)]
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                presses=[_press(n + 1, device=d, counter=n) for n, d in enumerate(devices)],
                devices={
                    d: _seen(d, n, T0, "panic", "p", n % 101) for n, d in enumerate(devices)
                },
                incidents=[
                    _incident(n + 1, device=d, test=n % 2 == 1) for n, d in enumerate(devices)
                ],
            ),
        )
        keys = [(d, n) for n, d in enumerate(devices)] + [(d, n + 1) for n, d in enumerate(devices)]
        state = await store.batch_state(devices, keys)
    assert len(state.devices) == 1000
    assert state.devices["btn-0999"] == DeviceState("btn-0999", 999, T0, 999 % 101, window=1)
    assert len(state.known) == 1000
    assert state.known["btn-0777", 777].press_id == 778
    assert ("btn-0777", 778) not in state.known
    assert len(state.active) == 500
    assert len(state.active_test) == 500
    assert state.active_test["btn-0999"].id == 1000


# --- write ----------------------------------------------------------------------------


async def test_write_stores_a_new_incident_with_its_first_press(backend: Backend) -> None:
    async with backend.store() as store:
        press_id = store.allocate_press_id()
        incident_id = store.allocate_incident_id()
        await _commit(
            store,
            BatchWrites(
                incidents=[_incident(incident_id, at=T0)],
                incident_changes=[IncidentChange(incident_id, T0, add_presses=1)],
                presses=[_press(press_id, incident=incident_id)],
                paths=[PathRow(press_id, "mqtt:local", T0, -97.5, 7.25)],
                timeline=[
                    TimelineRow(
                        incident_id,
                        T0,
                        "incident.opened",
                        "panic_press",
                        actor="device:btn-1",
                        press_id=press_id,
                        detail={"path": "mqtt:local", "distance_m": None},
                    )
                ],
            ),
        )
    assert await backend.rows(
        "SELECT id, device_id, status, test, urgent, opened_at, updated_at, closed_at,"
        " press_count, last_press_at, kelurahan, kecamatan, kelurahan_match, address"
        " FROM incidents",
    ) == [
        (
            1,
            "btn-1",
            "open",
            0,
            0,
            T0,
            T0,
            None,
            1,
            T0,
            "Oro-oro Ombo",
            "Kartoharjo",
            "inside",
            "Jl. Pahlawan",
        )
    ]
    assert await backend.rows(
        "SELECT id, device_id, counter, kind, format, trust, received_at, battery, lat, lon,"
        " accuracy_m, incident_id, outcome FROM presses",
    ) == [(1, "btn-1", 1, "panic", "native", "signed", T0, 80, -7.6, 111.5, 12.0, 1, "opened")]
    assert await backend.rows("SELECT * FROM press_paths") == [
        (1, "mqtt:local", T0, T0, 1, -97.5, 7.25)
    ]
    events = await backend.rows(
        "SELECT incident_id, at, event, reason, actor, press_id, detail FROM incident_events"
    )
    assert events == [(1, T0, "incident.opened", "panic_press", "device:btn-1", 1, events[0][6])]
    assert json.loads(events[0][6]) == {"path": "mqtt:local", "distance_m": None}


async def test_incident_changes_update_counts_urgency_location_and_closure(
    backend: Backend,
) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                incidents=[_incident(1)],
                incident_changes=[IncidentChange(1, T0, add_presses=1)],
            ),
        )
        await _commit(
            store,
            BatchWrites(
                incident_changes=[
                    IncidentChange(
                        1,
                        T0 + 10,
                        add_presses=1,
                        urgent=True,
                        lat=-7.7,
                        lon=111.6,
                        location_source="gps",
                    ),
                    # An out-of-order change never moves the times backwards.
                    IncidentChange(1, T0 + 5, add_presses=1),
                    IncidentChange(1, T0 + 20, add_presses=1, status="cancelled"),
                ]
            ),
        )
    assert await backend.rows(
        "SELECT status, urgent, press_count, last_press_at, updated_at, closed_at, lat, lon,"
        " location_source FROM incidents",
    ) == [("cancelled", 1, 4, T0 + 20, T0 + 20, T0 + 20, -7.7, 111.6, "gps")]


async def test_incident_change_without_presses_keeps_last_press_time(backend: Backend) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                incidents=[_incident(1)],
                incident_changes=[
                    IncidentChange(1, T0, add_presses=1),
                    IncidentChange(1, T0 + 60, status="acknowledged"),
                ],
            ),
        )
    assert await backend.rows(
        "SELECT status, press_count, last_press_at, updated_at, closed_at FROM incidents"
    ) == [("acknowledged", 1, T0, T0 + 60, None)]


async def test_device_upsert_keeps_old_values_where_the_new_frame_has_none(
    backend: Backend,
) -> None:
    async with backend.store() as store:
        await _commit(
            store, BatchWrites(devices={"btn-1": _seen("btn-1", 5, T0, "panic", "a", 90)})
        )
        await _commit(
            store,
            BatchWrites(
                devices={"btn-1": _seen("btn-1", None, T0 + 30, "heartbeat", "b", None)}
            ),
        )
        await _commit(
            store, BatchWrites(devices={"btn-1": _seen("btn-1", 2, T0 + 10, "panic", "c", 40)})
        )
    # The counter the newest state carries is stored; last_seen_at never goes back.
    assert await backend.rows("SELECT * FROM devices") == [
        ("btn-1", 2, T0 + 30, "panic", "c", 40, 1, None)
    ]


async def test_dead_letters_keep_reason_and_raw_payload(backend: Backend) -> None:
    payload = b'{"v":1,\xff}'
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                dead_letters=[
                    DeadLetterRow(
                        T0, "local", "mqtt:local", "native", None, "bad_encoding", "x", payload
                    ),
                    DeadLetterRow(
                        T0 + 1, "local", "mqtt:local", "native", "btn-1", "bad_tag", "", b"{}"
                    ),
                ]
            ),
        )
    assert await backend.rows(
        "SELECT received_at, source, path, format, device_ref, reason, detail, payload"
        " FROM dead_letters ORDER BY id",
    ) == [
        (T0, "local", "mqtt:local", "native", None, "bad_encoding", "x", payload),
        (T0 + 1, "local", "mqtt:local", "native", "btn-1", "bad_tag", "", b"{}"),
    ]


async def test_press_path_heard_again_bumps_heard_and_last_time(backend: Backend) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                presses=[_press(1)],
                paths=[PathRow(1, "gw-1", T0, -100.0, 5.0), PathRow(1, "gw-1", T0 + 2, -90.0, 6.0)],
            ),
        )
        await _commit(
            store,
            BatchWrites(
                paths=[
                    PathRow(1, "gw-1", T0 + 1, None, None),
                    PathRow(1, "gw-2", T0 + 3, None, None),
                ]
            ),
        )
    assert await backend.rows(
        "SELECT path, first_heard_at, last_heard_at, heard, rssi, snr"
        " FROM press_paths ORDER BY path",
    ) == [
        ("gw-1", T0, T0 + 2, 3, -100.0, 5.0),
        ("gw-2", T0 + 3, T0 + 3, 1, None, None),
    ]


# --- transactions and ids -------------------------------------------------------------


async def test_rollback_forgets_allocated_ids_and_writes(backend: Backend) -> None:
    async with backend.store() as store:
        await store.begin()
        press, incident = store.allocate_press_id(), store.allocate_incident_id()
        await store.write(BatchWrites(presses=[_press(press)], incidents=[_incident(incident)]))
        assert store.allocate_press_id() != press
        await store.rollback()
        # Never committed: the same ids are handed out again.
        assert store.allocate_press_id() == press
        assert store.allocate_incident_id() == incident
        await store.rollback()  # no transaction: still safe, ids still rewound
        assert store.allocate_press_id() == press
    assert await backend.rows("SELECT count(*) FROM presses") == [(0,)]
    assert await backend.rows("SELECT count(*) FROM incidents") == [(0,)]


async def test_commit_keeps_allocated_ids_for_the_next_batch(backend: Backend) -> None:
    async with backend.store() as store:
        await store.begin()
        first = store.allocate_press_id()
        await store.write(BatchWrites(presses=[_press(first)]))
        await store.commit()
        await store.begin()
        second = store.allocate_press_id()
        assert second > first
        await store.rollback()
        assert store.allocate_press_id() == second


async def test_signed_unique_index_refuses_a_second_signed_press(backend: Backend) -> None:
    # SQLite refuses the row; PostgreSQL skips it (ON CONFLICT DO NOTHING, so a peer's copy
    # never aborts the statement) and then refuses the batch, which must be decided again.
    async with backend.store() as store:
        await _commit(store, BatchWrites(presses=[_press(1, counter=9)]))
        await store.begin()
        with pytest.raises(backend.duplicate_press, match=backend.duplicate_press_match):
            await store.write(BatchWrites(presses=[_press(2, counter=9)]))
        await store.rollback()
    assert await backend.rows("SELECT id FROM presses") == [(1,)]


async def test_one_batch_may_open_cancel_and_open_again_for_one_device(backend: Backend) -> None:
    # The pipeline does this for panic, cancel, panic from one button in one batch: the
    # first incident must be closed before the second counts as active.
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                incidents=[_incident(1), _incident(2, at=T0 + 5)],
                incident_changes=[
                    IncidentChange(1, T0, add_presses=1),
                    IncidentChange(1, T0 + 2, add_presses=1, status="cancelled"),
                    IncidentChange(2, T0 + 5, add_presses=1),
                ],
            ),
        )
        state = await store.batch_state(["btn-1"], [])
    assert state.active == {"btn-1": ActiveIncident(2, "btn-1", False, T0 + 5, 1, False)}
    assert await backend.rows(
        "SELECT id, status, press_count, last_press_at, updated_at, closed_at FROM incidents"
        " ORDER BY id"
    ) == [(1, "cancelled", 2, T0 + 2, T0 + 2, T0 + 2), (2, "open", 1, T0 + 5, T0 + 5, None)]


async def test_a_test_incident_replaced_in_a_batch_is_closed_first(backend: Backend) -> None:
    # A test press after the test window: the old test incident is resolved by a change
    # listed after the new incident's row.
    async with backend.store() as store:
        await _commit(store, BatchWrites(incidents=[_incident(1, test=True)]))
        await _commit(
            store,
            BatchWrites(
                incident_changes=[IncidentChange(1, T0 + 900, status="resolved"),
                                  IncidentChange(2, T0 + 900, add_presses=1)],
                incidents=[_incident(2, test=True, at=T0 + 900)],
            ),
        )
        state = await store.batch_state(["btn-1"], [])
    assert state.active_test["btn-1"].id == 2
    assert await backend.rows("SELECT id, status FROM incidents ORDER BY id") == [
        (1, "resolved"), (2, "open"),
    ]


async def test_network_presses_may_repeat_a_counter(backend: Backend) -> None:
    async with backend.store() as store:
        await _commit(
            store,
            BatchWrites(
                presses=[
                    _press(1, counter=9, trust="network"),
                    _press(2, counter=9, trust="network"),
                    _press(3, counter=9, trust="signed"),
                ]
            ),
        )
    assert await backend.rows("SELECT id, trust FROM presses ORDER BY id") == [
        (1, "network"),
        (2, "network"),
        (3, "signed"),
    ]


async def test_uncommitted_batch_is_invisible_to_other_connections(backend: Backend) -> None:
    async with backend.store() as store:
        await store.begin()
        await store.write(BatchWrites(presses=[_press(store.allocate_press_id())]))
        assert await backend.rows("SELECT count(*) FROM presses") == [(0,)]
        await store.commit()
        assert await backend.rows("SELECT count(*) FROM presses") == [(1,)]
