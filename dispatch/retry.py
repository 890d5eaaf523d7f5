"""panicd's own delivery retry policy: pure, with randomness and time passed in.

Capped exponential backoff with full jitter (the delay before retry ``n`` is uniform in
``[0, min(cap, base * 2**(n-1))]``), a server's ``Retry-After`` honoured as a floor, and
a bound on both attempts and total time: past either the caller gets a transient
failure and escalates to the next channel or target instead of waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailureKind(StrEnum):
    """Why one attempt failed, as far as retrying is concerned."""

    # The provider refused this request for a reason re-sending cannot change.
    PERMANENT = "permanent"
    # The provider asked us to slow down (HTTP 429), possibly saying for how long.
    THROTTLED = "throttled"
    # Server error, timeout or connection failure: the same request may succeed later.
    TRANSIENT = "transient"


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """One failed attempt: its kind, the provider's status/code and Retry-After if any."""

    kind: FailureKind
    message: str
    http_status: int | None = None
    error_code: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds and backoff shape for one delivery (one SMS or one call)."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # Total time budget from the first attempt; a panic page must not wait longer here
    # than it would take the next escalation level to reach someone else.
    deadline_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")

    def backoff_s(self, attempt: int, rand: float) -> float:
        """Return the full-jitter delay after failed attempt number ``attempt`` (from 1)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return ceiling * rand

    def delay_before_retry(
        self, failure: AttemptFailure, attempt: int, elapsed_s: float, rand: float
    ) -> float | None:
        """Return how long to wait before the next attempt, or None to give up now."""
        if failure.kind is FailureKind.PERMANENT or attempt >= self.max_attempts:
            return None
        if failure.retry_after_s is not None:
            # Retry-After is the server's floor (RFC 9110 §10.2.3); a little jitter goes on
            # top so the sends it throttled together do not all return in one instant.
            delay = failure.retry_after_s + self.base_delay_s * rand
        else:
            delay = self.backoff_s(attempt, rand)
        if elapsed_s + delay >= self.deadline_s:
            return None
        return delay
