"""Capped exponential backoff, the one shape every retry in panicd uses (issue 18).

The delay after the ``n``-th doubling is drawn from the ceiling ``c = min(cap, base *
2**n)`` by a :class:`Jitter` rule; randomness is passed in, so each use stays pure and
testable. Who uses which, and why:

=========================================  ==========  ========================================
retry                                      jitter      why
=========================================  ==========  ========================================
MQTT / serial reconnect (``Attempts``)     ABOVE_BASE  never sooner than the configured minimum
one send's retries (``RetryPolicy``)       FULL        spread retries of one burst widely
outbox requeue (``RequeuePolicy``)         EQUAL       at least half the ceiling: a long outage
                                                       settles at one try per page per 30-60 s
a failed dispatch loop (``resilient``)     NONE        one loop, nothing to spread
a simulated button's retransmission        SPREAD      ±20 % around the ceiling (docs/FRAMES.md)
=========================================  ==========  ========================================

The AWS Architecture Blog's "Exponential Backoff And Jitter" names FULL and EQUAL. A
library (tenacity, backoff) would add a decorator-driven retry loop around each call;
panicd's loops decide per outcome (Retry-After, permanent errors, requeue in the
database) and need only the delay, so the shape is kept here, in one place.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

# Past this many doublings every ceiling is the cap; also keeps 2**n a small float.
MAX_DOUBLINGS = 32


class Jitter(StrEnum):
    """How a delay is drawn from its ceiling ``c`` (``rand`` uniform in [0, 1))."""

    NONE = "none"  # c
    FULL = "full"  # [0, c]
    EQUAL = "equal"  # [c/2, c]
    ABOVE_BASE = "above_base"  # [base, c]
    SPREAD = "spread"  # c * [1 - spread, 1 + spread]


@dataclass(frozen=True, slots=True)
class Backoff:
    """``base_s`` doubling up to ``cap_s``, drawn by ``jitter``."""

    base_s: float
    cap_s: float
    jitter: Jitter = Jitter.FULL
    spread: float = 0.0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError("need 0 <= base_s <= cap_s")
        if not 0 <= self.spread < 1:
            raise ValueError("spread must be in [0, 1)")

    def ceiling_s(self, doublings: int) -> float:
        """``min(cap, base * 2**doublings)``."""
        return min(self.cap_s, self.base_s * 2.0 ** min(max(doublings, 0), MAX_DOUBLINGS))

    def delay_s(self, doublings: int, rand: float) -> float:
        """The delay after ``doublings`` doublings of the base, drawn with ``rand``."""
        ceiling = self.ceiling_s(doublings)
        match self.jitter:
            case Jitter.NONE:
                return ceiling
            case Jitter.FULL:
                return ceiling * rand
            case Jitter.EQUAL:
                return ceiling / 2 + ceiling / 2 * rand
            case Jitter.ABOVE_BASE:
                return self.base_s + (ceiling - self.base_s) * rand
            case Jitter.SPREAD:
                return ceiling * (1.0 - self.spread + 2.0 * self.spread * rand)


class Attempts:
    """A :class:`Backoff` with its count of failures since the last success (reconnects)."""

    def __init__(self, backoff: Backoff, rand: Callable[[], float] = random.random) -> None:
        self._backoff = backoff
        self._rand = rand
        self._failures = 0

    def reset(self) -> None:
        """Start again from the shortest delay (after a success)."""
        self._failures = 0

    def next_delay(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        delay = self._backoff.delay_s(self._failures, self._rand())
        self._failures = min(self._failures + 1, MAX_DOUBLINGS)
        return delay
