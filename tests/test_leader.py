"""The cluster's once-only work has one leader: store/leader.py on a real PostgreSQL.

Two (or three) instances try the advisory lock on connections of their own: exactly one
leads; when it stops, dies or has its session cut by the server, a peer leads within a
few retries; device health checks only on the leader; and each instance's heartbeat row
says whether it leads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from dispatch.health import Finding, HealthSettings, Key
from dispatch.health_monitor import HealthMonitor
from store import locks
from store.leader import HEALTH_LEADER_LOCK, PgLeader, SoleLeader
from store.pg_dispatch import PgDispatchStore

RETRY_S = 0.05


@pytest.fixture
async def migrated(pg_database: str) -> str:
    """pg_database with panicd's schema, as every instance has migrated it before it
    tries to lead (the heartbeat's table)."""
    async with PgDispatchStore(pg_database, max_size=1):
        pass
    return pg_database


def _leaders(url: str, count: int, changes: list[tuple[int, bool]] | None = None,
             ) -> list[PgLeader]:
    def note(k: int) -> Callable[[bool], None]:
        return lambda leading: changes.append((k, leading)) if changes is not None else None

    return [PgLeader(url, password=None, instance=f"i{k}", retry_s=RETRY_S, on_change=note(k))
            for k in range(count)]


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.01)


def _who(leaders: list[PgLeader]) -> list[int]:
    return [k for k, leader in enumerate(leaders) if leader.leading()]


async def test_one_of_three_leads_and_a_peer_takes_over_when_it_stops(migrated: str) -> None:
    changes: list[tuple[int, bool]] = []
    leaders = _leaders(migrated, 3, changes)
    for leader in leaders:
        await leader.__aenter__()
    try:
        await _until(lambda: len(_who(leaders)) == 1)
        await asyncio.sleep(RETRY_S * 10)  # the others keep trying, and keep failing
        (first,) = _who(leaders)
        await leaders[first].__aexit__(None, None, None)  # a graceful stop
        assert not leaders[first].leading()
        await _until(lambda: len(_who(leaders)) == 1)
        (second,) = _who(leaders)
        assert second != first
        await asyncio.sleep(RETRY_S * 10)
        assert _who(leaders) == [second]
    finally:
        for leader in leaders:
            await leader.__aexit__(None, None, None)
    assert changes[:3] == [(first, True), (first, False), (second, True)]


async def test_a_leader_whose_session_the_server_cuts_stops_leading_and_a_peer_leads(
    migrated: str,
) -> None:
    # As when the leader's host dies or the network between it and the database fails:
    # its backend goes away and the server releases the lock with the session.
    leaders = _leaders(migrated, 2)
    for leader in leaders:
        await leader.__aenter__()
    try:
        await _until(lambda: len(_who(leaders)) == 1)
        (first,) = _who(leaders)
        conn = await asyncpg.connect(migrated)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
                " WHERE l.locktype = 'advisory' AND l.granted")
        finally:
            await conn.close()
        assert killed == 1
        await _until(lambda: _who(leaders) == [1 - first])
        # The cut one reconnects and then waits its turn; it does not lead again.
        await asyncio.sleep(RETRY_S * 20)
        assert _who(leaders) == [1 - first]
    finally:
        for leader in leaders:
            await leader.__aexit__(None, None, None)


async def test_each_instance_heartbeats_and_its_row_says_whether_it_leads(
    migrated: str,
) -> None:
    leaders = _leaders(migrated, 2)
    conn = await asyncpg.connect(migrated)
    for leader in leaders:
        await leader.__aenter__()
    try:
        await _until(lambda: len(_who(leaders)) == 1)
        (first,) = _who(leaders)
        rows: list[asyncpg.Record] = []

        async def beating() -> bool:
            rows[:] = await conn.fetch("SELECT instance_id, is_leader, heartbeat_at"
                                       " FROM instances ORDER BY instance_id")
            return [r["is_leader"] for r in rows] == [k == first for k in range(2)]

        deadline = time.monotonic() + 10
        while not await beating():
            assert time.monotonic() < deadline, f"rows never agreed with the lock: {rows}"
            await asyncio.sleep(0.01)
        seen = {r["instance_id"]: r["heartbeat_at"] for r in rows}
        await asyncio.sleep(RETRY_S * 5)
        later = await conn.fetch("SELECT instance_id, heartbeat_at FROM instances")
        assert all(r["heartbeat_at"] > seen[r["instance_id"]] for r in later)
        assert {r["instance_id"] for r in later} == {"i0", "i1"}
    finally:
        for leader in leaders:
            await leader.__aexit__(None, None, None)
        await conn.close()


async def test_a_new_leader_counts_the_watch_from_the_oldest_live_instance(
    migrated: str,
) -> None:
    # "old" has run for an hour and still heartbeats; "gone" started two hours ago and
    # stopped a minute ago: the cluster has watched without a gap for the last hour.
    conn = await asyncpg.connect(migrated)
    now = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    await conn.executemany(
        "INSERT INTO instances (instance_id, host, pid, started_at, heartbeat_at, is_leader)"
        " VALUES ($1, 'h', 1, $2, $3, false)",
        [("old", now - 3600, now), ("gone", now - 7200, now - 60)])
    leader = PgLeader(migrated, password=None, instance="new", retry_s=1.0)
    assert leader.watching_since() is None
    try:
        async with leader:
            await _until(leader.leading)
            since = leader.watching_since()
    finally:
        await conn.close()
    assert since is not None
    assert abs(since - (now - 3600)) < 1.0


async def test_the_sole_leader_of_one_box_always_leads() -> None:
    async with SoleLeader() as leader:
        assert leader.leading()


class _NotLeading:
    def leading(self) -> bool:
        return False

    def watching_since(self) -> float | None:
        return None


async def test_device_health_checks_only_on_the_leading_instance(pg_database: str) -> None:
    checks: list[str] = []

    class Counting(HealthMonitor):
        async def check(self) -> tuple[list[Finding], list[Key]]:
            checks.append("leader" if self is led else "follower")
            return await super().check()

    settings = HealthSettings(check_every_s=0.05)
    led = Counting(PgDispatchStore(pg_database, max_size=1), {}, list, settings, ops=None,
                   leader=SoleLeader())
    follower = Counting(PgDispatchStore(pg_database, max_size=1), {}, list, settings,
                        ops=None, leader=_NotLeading())
    async with led, follower:
        await _until(lambda: checks.count("leader") >= 3)
    assert "follower" not in checks


def test_no_two_uses_of_an_advisory_lock_share_a_key() -> None:
    # The leader's session lock once was the outbox's claim lock: the leading instance's
    # outbox waited on it until the statement timed out, and its pages never went.
    assert len(set(locks.SINGLE_KEYS.values())) == len(locks.SINGLE_KEYS)
    assert HEALTH_LEADER_LOCK == locks.HEALTH_LEADER
