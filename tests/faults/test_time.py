"""The wall clock steps forward and back under a running escalation (issue 12 item 5, time).

NTP (or an operator's ``date -s``, or a Raspberry Pi without an RTC syncing after boot)
steps the wall clock. Due times are stored as wall-clock seconds, so a restart resumes
them; a level planned as "wait 2 s" must still fire 2 s of real time after the level
before it, not early after a forward step and not an hour late after a backward one.

The real Dispatcher over real SQLite and a recording channel; the only fake is the wall
clock, stepped by the test (time.time() plus an offset). Sleeps are asyncio's own, on the
real monotonic clock, so the waits measured here are real elapsed time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest

from dispatch.channel import DeliveryResult
from dispatch.engine import Dispatcher, DispatchSettings
from dispatch.loops import SteadyClock
from dispatch.policy import Level, Medium, Policy, Routing, Targets
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_world import (
    ACK_SECRET,
    CENTRE,
    KODE_LADDER,
    PEOPLE,
    PUBLIC_URL,
    RESPONDERS,
    ROUTING,
    RecordingChannel,
    Sent,
    open_incident,
    query,
)

WAIT_S = 2
# Real waits on a shared 2-core machine: a pass may run this much late, never early.
SLACK_S = 0.6
# Level 1's own page (the reference) may have gone out this much after it was due.
EARLY_S = 0.3
HOUR = 3600.0

STEPPED = Policy(
    "kel-stepped",
    (
        Level(Targets(people=("ani",)), (Medium.SMS,), WAIT_S),
        Level(Targets(people=("budi",)), (Medium.SMS,), WAIT_S),
        Level(CENTRE, (Medium.SMS,), WAIT_S),
    ),
)
ROUTES = Routing(
    policies=MappingProxyType({STEPPED.id: STEPPED}),
    by_kelurahan=MappingProxyType({KODE_LADDER: STEPPED.id}),
    by_kecamatan=MappingProxyType({}),
    city=STEPPED.id,
    operations=ROUTING.operations,
    command_centre=ROUTING.command_centre,
)
LEVELS = ("ani", "budi", "dewi")


class SteppedWall:
    """The system's wall clock plus an offset the test steps, as NTP would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def step(self, seconds: float) -> None:
        """Jump the wall clock (the monotonic clock does not move)."""
        self.offset += seconds


@dataclass
class TimedChannel(RecordingChannel):
    """Records when (monotonic) each person was first paged."""

    paged_at: dict[str, float] = field(default_factory=dict)

    def _record(self, sent: Sent) -> DeliveryResult:
        person = next(p for p, who in PEOPLE.items() if who.phone == sent.to)
        self.paged_at.setdefault(person, time.monotonic())
        return super()._record(sent)

    async def wait_paged(self, person: str, timeout_s: float) -> float:
        """When (monotonic) ``person`` was first paged; fails after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while person not in self.paged_at:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"{person} was not paged within {timeout_s} s: {self.paged_at}")
        return self.paged_at[person]


def _dispatcher(store: SqliteDispatchStore, channel: TimedChannel, wall: SteppedWall) -> Dispatcher:
    return Dispatcher(store, ROUTES, RESPONDERS, channel,
                      DispatchSettings(PUBLIC_URL, ACK_SECRET, ack_ttl_s=3600.0),
                      clock=SteadyClock(wall))


def _pending_due(database: Path) -> list[float]:
    return [float(str(r[0])) for r in query(
        database, "SELECT due_at FROM escalation_steps WHERE state = 'pending' ORDER BY level")]


async def _escalate_with_step(database: Path, step_s: float) -> dict[str, float]:
    """Open an incident, step the wall clock half a second after level 1, and return when
    each level was paged, in real seconds after level 1."""
    wall = SteppedWall()
    await open_incident(database, KODE_LADDER, at=wall())
    channel = TimedChannel()
    async with SqliteDispatchStore(database) as store, _dispatcher(store, channel, wall):
        first = await channel.wait_paged("ani", 5)
        wall.step(step_s)
        for person in LEVELS[1:]:
            await channel.wait_paged(person, 2 * WAIT_S + SLACK_S)
    return {p: at - first for p, at in channel.paged_at.items()}


@pytest.mark.parametrize("step_s", [HOUR, -HOUR], ids=["forward_1h", "back_1h"])
async def test_each_level_waits_its_real_seconds_when_the_wall_clock_steps(
    tmp_path: Path, step_s: float,
) -> None:
    paged = await _escalate_with_step(tmp_path / "panicd.sqlite3", step_s)
    # Forward: the old scheduler fired level 3 together with level 2 (overdue by an hour
    # in the new frame). Back: it held level 2 back an hour.
    for index, person in enumerate(LEVELS[1:], start=1):
        assert index * WAIT_S - EARLY_S <= paged[person] <= index * WAIT_S + SLACK_S, paged


async def test_a_step_is_stored_so_a_restart_keeps_the_remaining_wait(tmp_path: Path) -> None:
    database = tmp_path / "panicd.sqlite3"
    wall = SteppedWall()
    await open_incident(database, KODE_LADDER, at=wall())
    channel = TimedChannel()
    async with SqliteDispatchStore(database) as store, _dispatcher(store, channel, wall) as engine:
        first = await channel.wait_paged("ani", 5)
        planned = _pending_due(database)
        wall.step(HOUR)
        await engine.follow_clock_step()  # or its clock task already did
        shifted = _pending_due(database)
    # Stored in the new frame: the persisted due times moved with the clock.
    assert shifted == pytest.approx([due + HOUR for due in planned], abs=0.1)
    assert "budi" not in channel.paged_at

    # A restart in the stepped frame: level 2 is due WAIT_S after level 1 in real time,
    # not "an hour overdue" as unshifted rows would be.
    after = TimedChannel()
    async with SqliteDispatchStore(database) as store, _dispatcher(store, after, wall):
        budi = await after.wait_paged("budi", 2 * WAIT_S)
        assert WAIT_S - EARLY_S <= budi - first <= WAIT_S + SLACK_S
        dewi = await after.wait_paged("dewi", 2 * WAIT_S + SLACK_S)
        assert 2 * WAIT_S - EARLY_S <= dewi - first <= 2 * WAIT_S + SLACK_S


def test_a_slewed_clock_is_not_a_step_and_a_jump_is() -> None:
    wall, mono = [1000.0], [50.0]
    clock = SteadyClock(lambda: wall[0], lambda: mono[0])
    mono[0] += 10
    wall[0] += 10.3  # NTP slewing: within tolerance, the frame stays monotonic
    assert clock.step() == 0.0
    assert clock() == pytest.approx(1010.0)
    wall[0] -= HOUR
    assert clock.step() == pytest.approx(-HOUR + 0.3)
    assert clock() == pytest.approx(1010.0)  # unchanged until the step is applied
    clock.follow(clock.step())
    assert clock() == pytest.approx(wall[0])
    assert clock.step() == 0.0
