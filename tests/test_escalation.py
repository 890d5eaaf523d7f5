"""Tests for dispatch.escalation: planning, fire-time expansion, ack/cancel and idempotency."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.escalation import (
    CloseReason,
    EscalationStep,
    IncidentRef,
    Page,
    StepState,
    apply_cancel,
    close,
    due_steps,
    expand_step,
    is_exhausted,
    next_due_at,
    plan_steps,
    reschedule_after_empty_level,
    resolve_targets,
    steps_to_cancel,
)
from dispatch.policy import Level, Medium, Policy, Targets
from dispatch.responders import WIB, Responders, parse_responders

RESPONDERS = """
people = [
  { id = "pagi", name = "Ani", phone = "+628120000101" },
  { id = "malam", name = "Budi", phone = "+628120000102" },
  { id = "lurah", name = "Citra", phone = "+628120000111" },
  { id = "op", name = "Dedi", phone = "+628120009901" },
]
groups = [{ id = "kantor", members = ["lurah", "pagi"] }]
[[rosters]]
id = "linmas"
shifts = [
  { days = "daily", start = "06:00", end = "18:00", people = ["pagi"] },
  { days = "daily", start = "18:00", end = "06:00", people = ["malam"] },
]
[[rosters]]
id = "gappy"
shifts = [{ days = "daily", start = "08:00", end = "16:00", people = ["lurah"] }]
[[rosters]]
id = "siaga112"
shifts = [{ days = "daily", start = "00:00", end = "00:00", people = ["op"] }]
"""

BOTH = (Medium.SMS, Medium.VOICE)
POLICY = Policy(
    "kel",
    (
        Level(Targets(rosters=("linmas",)), BOTH, 60),
        Level(Targets(groups=("kantor",)), BOTH, 120),
        Level(Targets(rosters=("siaga112",)), BOTH, 120),
    ),
    repeat=2,
)
# 17:59 WIB: level 0 fires on the day shift, level 1 two minutes later on the night one.
OPENED = datetime(2026, 3, 2, 17, 59, tzinfo=WIB).timestamp()
INCIDENT = IncidentRef("inc-7", OPENED)


def responders() -> Responders:
    loaded, _ = parse_responders(tomllib.loads(RESPONDERS), "responders.toml")
    return loaded


def test_levels_fall_due_at_opened_at_plus_the_waits_before_them() -> None:
    steps = plan_steps(INCIDENT, POLICY)
    assert [(s.round, s.level, s.due_at - OPENED) for s in steps] == [
        (0, 0, 0),
        (0, 1, 60),
        (0, 2, 180),
        (1, 0, 300),
        (1, 1, 360),
        (1, 2, 480),
    ]
    assert all(s.state is StepState.PENDING for s in steps)
    assert steps[0].key == "inc-7:0:0"


def test_rosters_resolve_when_the_level_fires_not_when_planned() -> None:
    people = responders()
    level = POLICY.levels[0]
    assert resolve_targets(level, people, OPENED) == ("pagi",)
    assert resolve_targets(level, people, OPENED + 60) == ("malam",)
    # A datetime is accepted too, for the on-call report.
    assert resolve_targets(level, people, datetime(2026, 3, 2, 3, 0, tzinfo=WIB)) == ("malam",)


def test_expand_step_pages_each_person_once_per_channel_sms_first() -> None:
    policy = replace(
        POLICY,
        levels=(
            Level(Targets(people=("lurah",), groups=("kantor",), rosters=("linmas",)), BOTH, 60),
        ),
    )
    step = plan_steps(INCIDENT, policy)[0]
    pages = expand_step(step, policy, responders(), OPENED + 5)
    assert [(p.person_id, p.channel) for p in pages] == [
        ("lurah", Medium.SMS),
        ("pagi", Medium.SMS),
        ("lurah", Medium.VOICE),
        ("pagi", Medium.VOICE),
    ]
    assert pages[0].key == "inc-7:0:0:lurah:sms"
    assert all(p.due_at == OPENED + 5 for p in pages)


def test_overdue_steps_fire_at_once_in_order_after_a_restart() -> None:
    steps = plan_steps(INCIDENT, POLICY)
    assert due_steps(steps, OPENED - 1) == ()
    assert next_due_at(steps) == OPENED
    # Down for four minutes: everything up to round 1 level 0 is overdue.
    overdue = due_steps(steps, OPENED + 300)
    assert [(s.round, s.level) for s in overdue] == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_ack_cancels_what_is_pending_and_tells_the_others_who_handles_it() -> None:
    people = responders()
    steps = plan_steps(INCIDENT, POLICY)
    fired = [replace(s, state=StepState.FIRED) for s in steps[:2]]
    steps = (*fired, *steps[2:])
    sent = [p for s in fired for p in expand_step(s, POLICY, people, s.due_at)]
    closure = close(CloseReason.ACK, steps, sent, acked_by="lurah")
    assert closure.handled_by == "lurah"
    assert [s.key for s in closure.cancel_steps] == [
        "inc-7:0:2",
        "inc-7:1:0",
        "inc-7:1:1",
        "inc-7:1:2",
    ]
    # Level 0 paged the day volunteer; level 1 the kantor (lurah, pagi) — pagi once.
    assert closure.notify == ("pagi",)


def test_cancel_press_tells_everyone_already_paged() -> None:
    people = responders()
    steps = plan_steps(INCIDENT, POLICY)
    first = replace(steps[0], state=StepState.FIRED)
    sent = expand_step(first, POLICY, people, first.due_at)
    queued = expand_step(replace(steps[1], state=StepState.FIRED), POLICY, people, steps[1].due_at)
    closure = close(CloseReason.CANCEL, (first, *steps[1:]), sent, unsent=queued)
    assert closure.notify == ("pagi",)
    assert closure.handled_by is None
    assert closure.cancel_pages == queued
    assert len(closure.cancel_steps) == len(steps) - 1


def test_ack_without_a_person_is_refused() -> None:
    with pytest.raises(ValueError, match="acked_by"):
        close(CloseReason.ACK, (), ())


def test_after_an_ack_nothing_remains_due_and_a_second_ack_changes_nothing() -> None:
    steps = plan_steps(INCIDENT, POLICY)
    closure = close(CloseReason.ACK, steps, (), acked_by="pagi")
    after = apply_cancel(steps, closure.cancel_steps)
    assert due_steps(after, math.inf) == ()
    assert next_due_at(after) is None
    assert steps_to_cancel(after) == ()
    assert not is_exhausted(after)


def test_exhausted_when_every_step_fired() -> None:
    steps = tuple(replace(s, state=StepState.FIRED) for s in plan_steps(INCIDENT, POLICY))
    assert is_exhausted(steps)
    assert not is_exhausted(())


def test_an_empty_level_pulls_the_rest_forward_keeping_their_spacing() -> None:
    policy = replace(
        POLICY,
        levels=(Level(Targets(rosters=("gappy",)), BOTH, 300), *POLICY.levels[1:]),
        repeat=1,
    )
    steps = plan_steps(INCIDENT, policy)
    first = replace(steps[0], state=StepState.FIRED)
    assert expand_step(first, policy, responders(), OPENED) == ()  # 17:59 WIB: gap
    moved = reschedule_after_empty_level((first, *steps[1:]), first, OPENED)
    assert [(s.key, s.due_at - OPENED) for s in moved] == [("inc-7:0:1", 0), ("inc-7:0:2", 120)]
    # Nothing to move when the next level is already due.
    assert reschedule_after_empty_level((first, *moved), first, OPENED) == ()


@dataclass
class FakeStore:
    """The claim protocol the real store implements, with a crash switch."""

    steps: dict[str, EscalationStep]
    outbox: dict[str, Page] = field(default_factory=dict)
    expansions: int = 0

    def fire_due(self, now: float, people: Responders, *, crash_after: int | None = None) -> None:
        for fired, step in enumerate(due_steps(self.steps.values(), now)):
            if crash_after is not None and fired == crash_after:
                return
            # One transaction: claim pending → fired, then insert the pages by key.
            if self.steps[step.key].state is not StepState.PENDING:
                continue
            self.steps[step.key] = replace(step, state=StepState.FIRED)
            self.expansions += 1
            for page in expand_step(step, POLICY, people, now):
                self.outbox.setdefault(page.key, page)


def test_a_restart_mid_escalation_never_fires_a_step_twice() -> None:
    people = responders()
    store = FakeStore({s.key: s for s in plan_steps(INCIDENT, POLICY)})
    store.fire_due(OPENED + 200, people, crash_after=1)
    assert store.expansions == 1
    store.fire_due(OPENED + 200, people)  # after restart: the rest of the overdue ones
    store.fire_due(OPENED + 200, people)  # and a duplicate wake-up
    assert store.expansions == 3
    assert [s.state for s in store.steps.values()][:4] == [
        StepState.FIRED,
        StepState.FIRED,
        StepState.FIRED,
        StepState.PENDING,
    ]


def test_a_step_claimed_after_an_ack_does_not_fire() -> None:
    people = responders()
    store = FakeStore({s.key: s for s in plan_steps(INCIDENT, POLICY)})
    store.fire_due(OPENED, people)
    closure = close(CloseReason.ACK, store.steps.values(), store.outbox.values(), acked_by="pagi")
    for step in apply_cancel(store.steps.values(), closure.cancel_steps):
        store.steps[step.key] = step
    # The scheduler woke for level 1 just as the ack committed: its claim finds nothing.
    store.fire_due(OPENED + 60, people)
    assert store.expansions == 1
    assert {p.person_id for p in store.outbox.values()} == {"pagi"}


levels_strategy = st.lists(
    st.builds(
        Level,
        targets=st.sampled_from(
            [
                Targets(rosters=("linmas",)),
                Targets(groups=("kantor",)),
                Targets(people=("op",), rosters=("linmas", "gappy")),
            ]
        ),
        channels=st.sampled_from([(Medium.SMS,), (Medium.VOICE,), BOTH]),
        wait_s=st.integers(0, 900),
    ),
    min_size=1,
    max_size=5,
)
policies = st.builds(Policy, id=st.just("p"), levels=levels_strategy, repeat=st.integers(1, 3))
instants = st.floats(1.7e9, 1.9e9, allow_nan=False)


@given(policy=policies, opened_at=instants)
def test_plan_is_ordered_complete_and_uniquely_keyed(policy: Policy, opened_at: float) -> None:
    steps = plan_steps(IncidentRef("i", opened_at), policy)
    assert len(steps) == len(policy.levels) * policy.repeat
    assert steps[0].due_at == opened_at
    assert all(a.due_at <= b.due_at for a, b in pairwise(steps))
    assert len({s.key for s in steps}) == len(steps)


@given(policy=policies, opened_at=instants)
def test_every_page_of_an_incident_has_a_unique_key(policy: Policy, opened_at: float) -> None:
    people = responders()
    pages = [
        page
        for step in plan_steps(IncidentRef("i", opened_at), policy)
        for page in expand_step(step, policy, people, step.due_at)
    ]
    assert len({p.key for p in pages}) == len(pages)


@given(policy=policies, opened_at=instants, ack_after=st.floats(0, 10_000))
def test_after_an_ack_nothing_remains_due_and_fired_steps_stay_fired(
    policy: Policy, opened_at: float, ack_after: float
) -> None:
    steps = plan_steps(IncidentRef("i", opened_at), policy)
    ack_at = opened_at + ack_after
    fired = apply_fired(steps, ack_at)
    closure = close(CloseReason.ACK, fired, (), acked_by="op")
    after = apply_cancel(fired, closure.cancel_steps)
    assert due_steps(after, math.inf) == ()
    assert [s for s in after if s.state is StepState.FIRED] == [
        s for s in fired if s.state is StepState.FIRED
    ]


def apply_fired(steps: tuple[EscalationStep, ...], now: float) -> tuple[EscalationStep, ...]:
    due = {s.key for s in due_steps(steps, now)}
    return tuple(replace(s, state=StepState.FIRED) if s.key in due else s for s in steps)
