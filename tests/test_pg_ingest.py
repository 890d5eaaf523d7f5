"""Two panicd instances ingesting the same presses into one PostgreSQL database at once.

Every instance receives every press (issue 13 item 2). Each instance here is a real
PgIngestStore with the pipeline's real BatchProcessor over a loaded fleet config and
real signed frames; only the MQTT source is left out, so the two commit the same batch
exactly when the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

import store.pg_ingest
from firmware_sim.fleet import SimDevice
from gateway.batch import BatchProcessor, Inbound, Outcome, Repeated, Stored, batch_keys
from gateway.dedup import DedupPolicy
from gateway.formats import native
from gateway.model import Reception, Trust
from store.errors import StoreError
from store.ingest import BatchState, BatchWrites, DeadLetterRow
from store.pg import PgDatabase
from store.pg_ingest import PgIngestStore, PressConflictError
from tests.pipeline import T0, Fleet, decode_native, frame_bytes, make_fleet

POLICY = DedupPolicy(cancel_grace_s=120.0, burst_urgent_presses=3, test_window_s=600.0)
DEVICES = 12
ROUNDS = 40


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp("fleet"), devices=DEVICES)


def _inbound(device: SimDevice, counter: int, at: float, path: str) -> Inbound:
    """A signed panic press as an instance's MQTT source hands it to ingest."""
    payload = frame_bytes(device, counter)
    return Inbound(
        decoded=decode_native(native.uplink_topic(device.id), payload),
        payload=payload,
        reception=Reception(path=path, received_at=at, source="local"),
        format=native.FORMAT,
        trust=Trust.SIGNED,
        on_done=lambda _outcome: None,
    )


class Instance:
    """One panicd instance's ingest writer: one batch is one transaction."""

    def __init__(self, name: str, fleet: Fleet, store: PgIngestStore) -> None:
        self.name = name
        self.fleet = fleet
        self.store = store
        self.processor = BatchProcessor(fleet.config, fleet.locator, POLICY, store)
        # Set by a test to line the two instances up between reading and writing.
        self.after_read: asyncio.Barrier | None = None

    async def commit(self, batch: list[Inbound]) -> tuple[BatchState, list[Outcome]]:
        """Decide and commit one batch as Ingestor._commit does (no retry)."""
        await self.store.begin()
        try:
            state = await self.store.batch_state(*batch_keys(batch, self.fleet.config))
            if self.after_read is not None:
                await self.after_read.wait()
            outcomes, work = self.processor.process(batch, state)
            await self.store.write(work.writes)
            await self.store.commit()
        except BaseException:
            await self.store.rollback()
            raise
        return state, outcomes


@pytest.fixture
async def instances(fleet: Fleet, pg_database: str) -> AsyncIterator[tuple[Instance, Instance]]:
    async with PgIngestStore(pg_database) as first, PgIngestStore(pg_database) as second:
        yield Instance("a", fleet, first), Instance("b", fleet, second)


def _round(fleet: Fleet, number: int, path: str) -> list[Inbound]:
    return [_inbound(device, number, T0 + number, path) for device in fleet.devices]


async def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _assert_exact(url: str, presses: int) -> None:
    """Every press stored once, at most one active incident per device."""
    assert await _rows(url, "SELECT count(*) FROM presses") == [(presses,)]
    assert await _rows(
        url, "SELECT device_id, counter FROM presses GROUP BY 1, 2 HAVING count(*) > 1"
    ) == []
    assert await _rows(
        url,
        "SELECT device_id FROM incidents WHERE status IN ('open', 'acknowledged')"
        " GROUP BY device_id, test HAVING count(*) > 1",
    ) == []


async def test_two_instances_committing_the_same_presses_store_each_once(
    instances: tuple[Instance, Instance], fleet: Fleet, pg_database: str
) -> None:
    first, second = instances
    for number in range(1, ROUNDS + 1):
        (state_a, got_a), (state_b, got_b) = await asyncio.gather(
            first.commit(_round(fleet, number, "mqtt:a")),
            second.commit(_round(fleet, number, "mqtt:b")),
        )
        # The device locks order the two: one read before the other committed anything
        # of this round, the other read after and found every press known.
        assert sorted([len(state_a.known), len(state_b.known)]) == [0, DEVICES], number
        for a, b in zip(got_a, got_b, strict=True):
            kinds = sorted(type(outcome).__name__ for outcome in (a, b))
            assert kinds == ["Repeated", "Stored"], (number, a, b)
            stored = a if isinstance(a, Stored) else b
            repeated = b if isinstance(a, Stored) else a
            assert isinstance(stored, Stored)
            assert isinstance(repeated, Repeated)
            assert repeated.press_id == stored.press_id
    await _assert_exact(pg_database, DEVICES * ROUNDS)
    # One burst per device, all its presses in it, heard on both instances' paths.
    assert await _rows(
        pg_database, "SELECT count(*), min(press_count), max(press_count) FROM incidents"
    ) == [(DEVICES, ROUNDS, ROUNDS)]
    assert await _rows(
        pg_database, "SELECT count(*) FROM press_paths GROUP BY press_id HAVING count(*) <> 2"
    ) == []


def _without_device_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's device locks gone: both statements that take them select instead."""
    monkeypatch.setattr(store.pg_ingest, "_LOCK_DEVICES", "SELECT $1::int4, $2::int4[]")
    monkeypatch.setattr(store.pg_ingest, "_LOCK_DEVICES_LITERAL",
                        "SELECT {cls}::int4, '{{{keys}}}'::int4[]")


async def test_without_the_device_locks_the_database_still_refuses_a_second_copy(
    instances: tuple[Instance, Instance],
    fleet: Fleet,
    pg_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Why the locks are there: with them gone and both instances reading before either
    # writes, both take every press for new. The constraints keep the data exact (the
    # second line of defence), but the second batch fails and must be decided again.
    _without_device_locks(monkeypatch)
    barrier = asyncio.Barrier(2)
    first, second = instances
    first.after_read = second.after_read = barrier
    results = await asyncio.gather(
        first.commit(_round(fleet, 1, "mqtt:a")),
        second.commit(_round(fleet, 1, "mqtt:b")),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1, results
    # The incident insert comes first, so the unique active-incident index refuses it.
    assert isinstance(failed[0], (asyncpg.UniqueViolationError, PressConflictError))
    await _assert_exact(pg_database, DEVICES)
    # Decided again, the failed batch finds every press known.
    first.after_read = second.after_read = None
    state, outcomes = await second.commit(_round(fleet, 1, "mqtt:b"))
    assert len(state.known) == DEVICES
    assert all(isinstance(outcome, Repeated) for outcome in outcomes)
    await _assert_exact(pg_database, DEVICES)


async def test_press_conflict_without_a_new_incident_is_refused_too(
    instances: tuple[Instance, Instance], fleet: Fleet, pg_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Presses attached to incidents both instances already know: no incident insert to
    # trip over, so the press insert's ON CONFLICT is what catches the second copy.
    first, second = instances
    await first.commit(_round(fleet, 1, "mqtt:a"))
    _without_device_locks(monkeypatch)
    barrier = asyncio.Barrier(2)
    first.after_read = second.after_read = barrier
    results = await asyncio.gather(
        first.commit(_round(fleet, 2, "mqtt:a")),
        second.commit(_round(fleet, 2, "mqtt:b")),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1, results
    assert isinstance(failed[0], PressConflictError), failed
    assert "already stored" in str(failed[0])
    await _assert_exact(pg_database, 2 * DEVICES)
    assert await _rows(pg_database, "SELECT sum(press_count) FROM incidents") == [
        (2 * DEVICES,)
    ]


async def test_ids_reserved_by_two_instances_never_meet(pg_database: str) -> None:
    async with PgIngestStore(pg_database, batch_max=8) as first, \
            PgIngestStore(pg_database, batch_max=8) as second:
        taken: list[set[int]] = [set(), set()]

        async def batches(pg: PgIngestStore, into: set[int]) -> None:
            for _ in range(20):
                await pg.begin()
                into.update(pg.allocate_press_id() for _ in range(8))
                into.update(-pg.allocate_incident_id() for _ in range(8))
                await pg.commit()

        await asyncio.gather(batches(first, taken[0]), batches(second, taken[1]))
    assert len(taken[0]) == len(taken[1]) == 20 * 16
    assert not taken[0] & taken[1]


async def test_a_batch_larger_than_reserved_fits_after_a_few_retries(pg_database: str) -> None:
    # batch_max is what the composition promises; a bigger batch fails (before anything
    # is written) and each retry, as ingest makes them, reserves twice as many.
    failures = 0
    async with PgIngestStore(pg_database, batch_max=4) as pg:
        while True:
            await pg.begin()
            try:
                ids = [pg.allocate_press_id() for _ in range(20)]
            except StoreError as exc:
                assert "more ids than were reserved" in str(exc)
                await pg.rollback()
                failures += 1
                continue
            await pg.commit()
            break
    assert 1 <= failures <= 3
    assert len(set(ids)) == 20


async def test_closing_with_a_batch_open_rolls_it_back(pg_database: str) -> None:
    with pytest.raises(RuntimeError, match="caller failed"):
        async with PgIngestStore(pg_database) as pg:
            await pg.begin()
            await pg.write(BatchWrites(dead_letters=[DeadLetterRow(
                T0, "local", "mqtt:a", "native", None, "bad_json", "", b"x")]))
            raise RuntimeError("caller failed")
    assert await _rows(pg_database, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_ids_of_a_commit_in_doubt_are_never_handed_out_again(pg_database: str) -> None:
    async with PgIngestStore(pg_database) as pg:
        await pg.begin()
        used = pg.allocate_press_id()
        # Something written: the transaction has begun on the server.
        await pg.write(BatchWrites(dead_letters=[DeadLetterRow(
            T0, "local", "mqtt:a", "native", None, "bad_json", "", b"x")]))
        conn = pg.conn
        # The connection dies under commit(): the store cannot tell whether the COMMIT
        # reached the server, so it must treat the ids as possibly stored.
        conn.terminate()
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError)):
            await pg.commit()
        await pg.rollback()
        await pg.begin()
        assert pg.allocate_press_id() != used
        await pg.rollback()


async def test_the_pool_returns_connections_without_a_reset_query(pg_database: str) -> None:
    # asyncpg's default reset (RESET ALL, UNLISTEN *, …) is one more round trip per
    # batch; with it, the setting below would be gone on the next acquire.
    async with PgDatabase(pg_database, min_size=1, max_size=1) as database:
        async with database.pool.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
        async with database.pool.acquire() as conn:
            assert await conn.fetchval("SHOW application_name") == "kept"


def test_a_url_with_a_password_is_refused_before_connecting() -> None:
    with pytest.raises(StoreError, match="password"):
        PgIngestStore("postgresql://panicd:hunter2@127.0.0.1:1/panicd")
