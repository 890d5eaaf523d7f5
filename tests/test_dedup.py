"""Incident dedup decisions: every branch, and invariants over random press sequences."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from gateway.dedup import (
    ActiveIncident,
    Attach,
    Cancel,
    CancelRefused,
    DedupPolicy,
    NoIncident,
    OpenIncident,
    decide,
)
from gateway.model import PressKind

POLICY = DedupPolicy(cancel_grace_s=120.0, burst_urgent_presses=3, test_window_s=600.0)
T0 = 1_700_000_000.0


def _incident(
    id_: int = 1,
    *,
    test: bool = False,
    opened_at: float = T0,
    presses: int = 1,
    urgent: bool = False,
) -> ActiveIncident:
    return ActiveIncident(id_, "btn-1", test, opened_at, presses, urgent)


def _decide(
    kind: PressKind,
    *,
    active: ActiveIncident | None = None,
    active_test: ActiveIncident | None = None,
    at: float = T0,
) -> object:
    return decide(kind, active=active, active_test=active_test, at=at, policy=POLICY)


# --- heartbeat ------------------------------------------------------------------------


def test_heartbeat_touches_no_incident_even_with_active_ones() -> None:
    assert _decide(PressKind.HEARTBEAT) == NoIncident("heartbeat")
    assert _decide(
        PressKind.HEARTBEAT, active=_incident(1), active_test=_incident(2, test=True)
    ) == NoIncident("heartbeat")


# --- panic ----------------------------------------------------------------------------


def test_panic_without_active_incident_opens_a_real_one() -> None:
    assert _decide(PressKind.PANIC) == OpenIncident(test=False)


def test_panic_with_only_a_test_incident_opens_a_real_one() -> None:
    assert _decide(PressKind.PANIC, active_test=_incident(2, test=True)) == OpenIncident(test=False)


def test_panic_with_active_incident_attaches_below_threshold() -> None:
    assert _decide(PressKind.PANIC, active=_incident(9, presses=1)) == Attach(9, now_urgent=False)


def test_panic_reaching_burst_threshold_marks_urgent() -> None:
    assert _decide(PressKind.PANIC, active=_incident(9, presses=2)) == Attach(9, now_urgent=True)


def test_panic_on_an_already_urgent_incident_does_not_mark_urgent_again() -> None:
    verdict = _decide(PressKind.PANIC, active=_incident(9, presses=2, urgent=True))
    assert verdict == Attach(9, now_urgent=False)


def test_panic_past_threshold_on_non_urgent_incident_marks_urgent() -> None:
    # e.g. the threshold was lowered in config while the incident was open
    assert _decide(PressKind.PANIC, active=_incident(9, presses=10)) == Attach(9, now_urgent=True)


def test_panic_attaches_however_old_the_active_incident_is() -> None:
    verdict = _decide(PressKind.PANIC, active=_incident(9, opened_at=T0 - 7 * 86400))
    assert isinstance(verdict, Attach)
    assert verdict.incident_id == 9


# --- test -----------------------------------------------------------------------------


def test_test_press_without_test_incident_opens_a_test_incident() -> None:
    assert _decide(PressKind.TEST) == OpenIncident(test=True)


def test_test_press_never_attaches_to_a_real_incident() -> None:
    assert _decide(PressKind.TEST, active=_incident(1)) == OpenIncident(test=True)


def test_test_press_within_window_attaches_without_urgency() -> None:
    active_test = _incident(4, test=True, presses=10)
    verdict = _decide(PressKind.TEST, active_test=active_test, at=T0 + POLICY.test_window_s)
    assert verdict == Attach(4, now_urgent=False)


def test_test_press_past_window_opens_a_new_test_incident() -> None:
    active_test = _incident(4, test=True)
    verdict = _decide(PressKind.TEST, active_test=active_test, at=T0 + POLICY.test_window_s + 1)
    assert verdict == OpenIncident(test=True)


# --- cancel ---------------------------------------------------------------------------


def test_cancel_within_grace_cancels_the_real_incident() -> None:
    verdict = _decide(PressKind.CANCEL, active=_incident(3), at=T0 + POLICY.cancel_grace_s)
    assert verdict == Cancel(3)


def test_cancel_after_grace_is_refused_and_keeps_the_incident() -> None:
    verdict = _decide(PressKind.CANCEL, active=_incident(3), at=T0 + POLICY.cancel_grace_s + 0.001)
    assert verdict == CancelRefused(3, "grace_expired")


def test_cancel_prefers_the_real_incident_over_a_test_one() -> None:
    verdict = _decide(PressKind.CANCEL, active=_incident(3), active_test=_incident(4, test=True))
    assert verdict == Cancel(3)


def test_cancel_after_grace_does_not_fall_through_to_the_test_incident() -> None:
    verdict = _decide(
        PressKind.CANCEL,
        active=_incident(3),
        active_test=_incident(4, test=True, opened_at=T0 + 1000),
        at=T0 + 1000,
    )
    assert verdict == CancelRefused(3, "grace_expired")


def test_cancel_with_only_a_test_incident_cancels_it_at_any_age() -> None:
    verdict = _decide(PressKind.CANCEL, active_test=_incident(4, test=True), at=T0 + 86400)
    assert verdict == Cancel(4)


def test_cancel_with_nothing_active_touches_no_incident() -> None:
    assert _decide(PressKind.CANCEL) == NoIncident("nothing_to_cancel")


def test_cancel_grace_follows_the_policy() -> None:
    strict = DedupPolicy(cancel_grace_s=0.0)
    verdict = decide(PressKind.CANCEL, active=_incident(3), active_test=None, at=T0, policy=strict)
    assert verdict == Cancel(3)
    late = decide(
        PressKind.CANCEL, active=_incident(3), active_test=None, at=T0 + 0.5, policy=strict
    )
    assert late == CancelRefused(3, "grace_expired")


# --- invariants over press sequences --------------------------------------------------


@dataclass
class _Model:
    """One device's incidents, updated from decisions as the ingest writer does."""

    policy: DedupPolicy
    active: ActiveIncident | None = None
    active_test: ActiveIncident | None = None
    next_id: int = 1
    attached: dict[int, int] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)
    open_ids: set[int] = field(default_factory=set)

    def press(self, kind: PressKind, at: float) -> object:
        active, active_test = self.active, self.active_test
        decision = decide(kind, active=active, active_test=active_test, at=at, policy=self.policy)
        match decision:
            case OpenIncident(test):
                # Invariants: a panic never opens a second incident while one is active,
                # and a test press opens a new test incident only once the old one is stale.
                assert not test or kind is PressKind.TEST
                if test:
                    assert (
                        active_test is None
                        or at - active_test.opened_at > self.policy.test_window_s
                    )
                    if active_test is not None:
                        # Superseded: the ingest writer replaces it in its working view
                        # (the old row stays open in the store until an operator acts).
                        self.open_ids.discard(active_test.id)
                else:
                    assert kind is PressKind.PANIC
                    assert active is None
                incident = ActiveIncident(self.next_id, "btn-1", test, at, 1, False)
                self.next_id += 1
                self.attached[incident.id] = 0
                self.open_ids.add(incident.id)
                if test:
                    self.active_test = incident
                else:
                    self.active = incident
            case Attach(incident_id, now_urgent):
                target = active_test if kind is PressKind.TEST else active
                assert target is not None
                assert target.id == incident_id
                assert kind in (PressKind.PANIC, PressKind.TEST)
                updated = dataclasses.replace(
                    target, press_count=target.press_count + 1, urgent=target.urgent or now_urgent
                )
                self.attached[incident_id] += 1
                if now_urgent:
                    assert not target.urgent
                    assert updated.press_count >= self.policy.burst_urgent_presses
                if kind is PressKind.TEST:
                    assert not now_urgent
                    self.active_test = updated
                else:
                    self.active = updated
            case Cancel(incident_id):
                assert kind is PressKind.CANCEL
                if active is not None:
                    # Cancel after grace never closes a real incident.
                    assert incident_id == active.id
                    assert at - active.opened_at <= self.policy.cancel_grace_s
                    self.active = None
                else:
                    assert active_test is not None
                    assert incident_id == active_test.id
                    self.active_test = None
                self.closed.add(incident_id)
                self.open_ids.discard(incident_id)
            case CancelRefused(incident_id, _):
                assert kind is PressKind.CANCEL
                assert active is not None
                assert incident_id == active.id
                assert at - active.opened_at > self.policy.cancel_grace_s
            case NoIncident(reason):
                assert kind is PressKind.HEARTBEAT or (
                    kind is PressKind.CANCEL and active is None and active_test is None
                ), reason
        return decision

    def resolve(self) -> None:
        """An operator resolves the real incident (an ack path closed it)."""
        if self.active is not None:
            self.closed.add(self.active.id)
            self.open_ids.discard(self.active.id)
            self.active = None

    def check(self) -> None:
        open_real = [i for i in (self.active,) if i is not None]
        open_test = [i for i in (self.active_test,) if i is not None]
        assert len(open_real) <= 1
        assert len(open_test) <= 1
        # The model's open set is exactly the active slots: nothing is left dangling.
        assert self.open_ids == {i.id for i in open_real + open_test}
        for incident in open_real + open_test:
            assert incident.id not in self.closed
            assert not incident.test if incident is self.active else incident.test
            # press count = presses attached + the one that opened it
            assert incident.press_count == self.attached[incident.id] + 1
            if not incident.test:
                assert incident.urgent == (incident.press_count >= self.policy.burst_urgent_presses)


actions = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(list(PressKind)), st.floats(0, 400)),
        st.tuples(st.just("resolve"), st.just(0.0)),
    ),
    max_size=40,
)


@given(
    steps=actions,
    grace=st.sampled_from([0.0, 30.0, 120.0]),
    burst=st.integers(2, 5),
    window=st.sampled_from([0.0, 60.0, 600.0]),
)
def test_press_sequences_keep_incident_invariants(
    steps: list[tuple[PressKind | str, float]], grace: float, burst: int, window: float
) -> None:
    model = _Model(
        DedupPolicy(cancel_grace_s=grace, burst_urgent_presses=burst, test_window_s=window)
    )
    at = T0
    for action, gap in steps:
        at += gap
        if isinstance(action, PressKind):
            model.press(action, at)
        else:
            model.resolve()
        model.check()


@given(gaps=st.lists(st.floats(0, 3600), min_size=1, max_size=30))
def test_repeated_panics_open_exactly_one_incident(gaps: list[float]) -> None:
    model = _Model(POLICY)
    at = T0
    opened = 0
    for gap in gaps:
        at += gap
        if isinstance(model.press(PressKind.PANIC, at), OpenIncident):
            opened += 1
    assert opened == 1
    assert model.active is not None
    assert model.active.press_count == len(gaps)
    assert model.active.urgent == (len(gaps) >= POLICY.burst_urgent_presses)


@given(first=st.floats(0, 3600), second=st.floats(0, 3600))
def test_after_resolve_the_next_panic_opens_a_new_incident(first: float, second: float) -> None:
    model = _Model(POLICY)
    model.press(PressKind.PANIC, T0 + first)
    assert model.active is not None
    old = model.active.id
    model.resolve()
    assert model.press(PressKind.PANIC, T0 + first + second) == OpenIncident(test=False)
    assert model.active is not None
    assert model.active.id != old
