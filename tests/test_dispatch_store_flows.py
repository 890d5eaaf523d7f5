"""Dispatch's flows through the store on both backends, the same assertions on each: an
escalation plan fires each step once, the first ack stops it and tells the others, a
closure cancels what is unsent, a claim takes each row once, a clock step shifts the due
times once, health rows are raised, cleared and announced once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from store.dispatch import (
    ClockShift,
    Fired,
    Firing,
    HealthRaise,
    NewMessage,
    Notice,
    Plan,
    QueueDepths,
    StepRow,
)
from tests.dispatch_backends import BACKENDS, T0, Store, run, store_factory, store_incidents


@pytest.fixture(params=BACKENDS)
async def new_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Store]]:
    """Makes (not yet opened) dispatch stores on one fresh database of each backend."""
    async with store_factory(request.param, request, tmp_path) as factory:
        yield factory


def _alert(incident_id: int, person: str, level: int, *, channel: str = "sms") -> NewMessage:
    return NewMessage(key=f"{incident_id}:0:{level}:{person}:{channel}",
                      incident_id=incident_id, person_id=person, phone=f"+62812{person}",
                      channel=channel, purpose="alert", body="tolong", due_at=T0,
                      round=0, level=level)


def _ladder(incident_id: int) -> Plan:
    """Two levels: ani now (fired in the plan's commit), budi a minute later."""
    steps = tuple(StepRow(f"{incident_id}:0:{level}", incident_id, 0, level, T0 + 60 * level,
                          "city") for level in (0, 1))
    fire = Firing(steps[0], live=True, messages=(_alert(incident_id, "ani", 0),),
                  people=("ani",), via=("sms",))
    return Plan(incident_id, "city", "city", steps, {"levels": 2}, (fire,))


HANDLED = Notice("handled", "handled", "ditangani")


async def test_a_plan_fires_its_due_step_once_and_the_next_waits_its_time(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned=set())
        plan_ = _ladder(1)
        assert await store.plan_incidents([plan_], T0) == [Fired("1:0:0", 1, 1)]
        assert await store.fire_steps(plan_.fire, T0) == []  # fired once
        assert await store.plan_incidents([plan_], T0) == []  # planned once
        assert await store.unplanned_incidents() == []
        assert await store.due_steps(T0 + 59) == []
        assert await store.next_step_due() == T0 + 60
        (due,) = await store.due_steps(T0 + 60)
        assert due == StepRow("1:0:1", 1, 0, 1, T0 + 60, "city")
        nobody = Firing(due, live=True, messages=(), people=(), via=())
        assert await store.fire_steps([nobody, nobody], T0 + 60) == [Fired("1:0:1", 0, 0)]
        assert await store.pending_step_count() == 0
        events = [r[0] for r in await run(
            store, "SELECT event FROM incident_events ORDER BY id")]
    assert events == ["escalation.planned", "escalation.step_fired", "escalation.step_fired",
                      "escalation.level_empty", "escalation.exhausted"]


async def test_the_first_ack_stops_escalation_and_tells_the_others_who_handles_it(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned=set())
        plan_ = _ladder(1)
        fire = Firing(plan_.steps[0], live=True, people=("ani", "cici"), via=("sms",),
                      messages=(_alert(1, "ani", 0), _alert(1, "cici", 0)))
        await store.plan_incidents([Plan(1, "city", "city", plan_.steps, {}, (fire,))], T0)
        assert [r.person_id for r in await store.claim_outbox(T0, 10)] == ["ani", "cici"]

        async def ack(person: str | None, name: str) -> tuple[str, str]:
            outcome = await store.record_ack(1, person_id=person, name=name, via="link",
                                             now=T0 + 5, handled=HANDLED)
            return outcome.status, outcome.outcome

        assert await ack("cici", "Cici") == ("open", "first")
        assert await ack("cici", "Cici") == ("acknowledged", "repeated")
        assert await ack(None, "Pak RT") == ("acknowledged", "added")
        assert await ack(None, "Pak RT") == ("acknowledged", "repeated")
        assert await store.pending_step_count() == 0
        # Only ani, paged and not the one who acked, is told who handles it.
        assert await run(store, "SELECT key FROM outbox WHERE purpose = 'handled'") == [
            ("handled:ani",)]
        assert await store.close_incident(1, reason="resolved", actor="op", note="",
                                          now=T0 + 9, notice=HANDLED) == 0
        assert await store.close_incident(1, reason="resolved", actor="op", note="",
                                          now=T0 + 9, notice=HANDLED) is None
        assert await ack("budi", "Budi") == ("resolved", "ignored")
        assert await store.incident_counts() == {"resolved": 1}
        assert await store.open_incidents() == []


async def test_a_closed_incident_tells_everyone_paged_and_cancels_its_unsent_alerts(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned=set())
        plan_ = _ladder(1)
        fire = Firing(plan_.steps[0], live=True, people=("ani", "cici"), via=("sms",),
                      messages=(_alert(1, "ani", 0), _alert(1, "cici", 0)))
        await store.plan_incidents([Plan(1, "city", "city", plan_.steps, {}, (fire,))], T0)
        (claimed,) = await store.claim_outbox(T0, 1)
        assert (await store.open_incidents())[0].id == 1
        assert await store.close_incident(1, reason="resolved", actor="op", note="ok",
                                          now=T0 + 9, notice=Notice("done", "done", "s")) == 1
        states = {tuple(r[:2]): r[2] for r in await run(
            store, "SELECT person_id, purpose, state FROM outbox")}
    assert states == {(claimed.person_id, "alert"): "sending", ("cici", "alert"): "cancelled",
                      (claimed.person_id, "done"): "pending"}


async def test_a_claim_takes_each_due_row_once_and_one_call_per_number(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned=set())
        await store.queue_messages([_alert(1, "ani", 0), _alert(1, "ani", 1, channel="voice"),
                                    _alert(1, "ani", 2, channel="voice")], T0)
        first = await store.claim_outbox(T0, 10)
        assert [(r.channel, r.attempts) for r in first] == [("sms", 0), ("voice", 0)]
        assert await store.claim_outbox(T0, 10) == []  # the second call waits for the first
        assert await store.queue_depths() == QueueDepths(3, 0)
        assert await store.notification_counts() == {("sms", "sending"): 1,
                                                     ("voice", "sending"): 1,
                                                     ("voice", "pending"): 1}
        # A restart: what was left sending is pending again, in doubt since its claim.
        assert await store.requeue_interrupted(T0 + 7) == 2
        again = await store.claim_outbox(T0 + 7, 10)
        assert [(r.channel, r.attempts, r.in_doubt_since) for r in again] == [
            ("sms", 1, T0), ("voice", 1, T0)]


class _Frame:
    """A clock frame stepped once by ``delta``."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.followed = 0.0

    def step(self) -> float:
        return self.delta - self.followed

    def follow(self, delta: float) -> None:
        self.followed += delta


async def test_a_clock_step_shifts_pending_due_times_once(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open"], planned=set())
        await store.plan_incidents([_ladder(1)], T0)
        frame = _Frame(-30.0)
        assert await store.follow_clock_step(frame) == ClockShift(-30.0, 1, 1)
        assert await store.follow_clock_step(frame) is None
        assert await store.next_step_due() == T0 + 30
        assert await store.next_outbox_due() == T0 - 30


async def test_health_rows_are_recorded_read_back_and_announced_once(
    new_store: Callable[[], Store],
) -> None:
    async with new_store() as store:
        await store_incidents(store, ["open", "resolved"], planned=set())
        ids = await store.record_health([HealthRaise("device:BTN-1", "offline", {"h": 3}),
                                         HealthRaise("device:BTN-2", "low_battery", {})],
                                        [], T0)
        await store.record_health([], [ids[1]], T0 + 1)
        assert [(h.subject, h.cleared_at, dict(h.detail)) for h in await store.health_since(
            ["offline", "low_battery"], T0 - 1)] == [("device:BTN-1", None, {"h": 3}),
                                                    ("device:BTN-2", T0 + 1, {})]
        assert await store.raised_counts() == {"offline": 1}
        assert [u.subject for u in await store.unhealthy()] == ["device:BTN-1"]
        await store.queue_messages([NewMessage(
            key=f"ops:health:{ids[0]}:ani", incident_id=None, person_id="ani", phone="+62",
            channel="sms", purpose="ops", body="x", due_at=T0)], T0)
        assert [h.id for h in await store.unannounced_health(T0 - 1)] == [ids[1]]
        assert await store.summary_counts(T0 - 1) == (1, 2)
        assert await store.open_counts() == (1, 0)
