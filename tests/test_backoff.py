"""The one backoff shape (gateway/backoff.py), and that each retry keeps its old curve."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.loops import LOOP_BACKOFF
from firmware_sim.button import RetransmitPolicy
from gateway.backoff import Attempts, Backoff, Jitter

unit = st.floats(min_value=0.0, max_value=0.999999)


@given(st.integers(min_value=0, max_value=100), unit)
def test_each_jitter_stays_within_its_band_under_the_cap(doublings: int, rand: float) -> None:
    ceiling = min(8.0, 0.5 * 2.0 ** min(doublings, 32))
    assert Backoff(0.5, 8.0, Jitter.NONE).delay_s(doublings, rand) == ceiling
    assert 0 <= Backoff(0.5, 8.0, Jitter.FULL).delay_s(doublings, rand) <= ceiling
    assert ceiling / 2 <= Backoff(0.5, 8.0, Jitter.EQUAL).delay_s(doublings, rand) <= ceiling
    assert 0.5 <= Backoff(0.5, 8.0, Jitter.ABOVE_BASE).delay_s(doublings, rand) <= ceiling
    spread = Backoff(0.5, 8.0, Jitter.SPREAD, 0.2).delay_s(doublings, rand)
    assert ceiling * 0.8 <= spread <= ceiling * 1.2


def test_reconnect_attempts_double_from_the_minimum_and_start_over_after_a_success() -> None:
    attempts = Attempts(Backoff(0.5, 4.0, Jitter.ABOVE_BASE), rand=lambda: 0.999999)
    delays = [round(attempts.next_delay(), 3) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    attempts.reset()
    assert round(attempts.next_delay(), 3) == 0.5


def test_the_old_curves_are_kept() -> None:
    # resilient(): 1, 2, 4 … 30 s after successive failures (was min(30, 0.5 * 2**n)).
    assert [LOOP_BACKOFF.delay_s(n, 0.0) for n in (1, 2, 3, 6, 7, 40)] == [
        1.0, 2.0, 4.0, 30.0, 30.0, 30.0]
    # The simulated button: 1 s doubling to 8 s, ±20 %.
    policy = RetransmitPolicy(first_s=1.0, cap_s=8.0, jitter=0.2)
    assert policy.delay(3, 0.5) == pytest.approx(8.0)
    assert policy.delay(0, 0.0) == pytest.approx(0.8)


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="base_s"):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError, match="spread"):
        Backoff(1.0, 2.0, Jitter.SPREAD, 1.5)
