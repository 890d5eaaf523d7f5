"""panicd's own delivery retry policy: pure, with randomness and time passed in.

Two layers (issue 12 item 2: a transient error never ends a page):

- :class:`RetryPolicy`, inside one send: capped exponential backoff with full jitter
  (the delay before retry ``n`` is uniform in ``[0, min(cap, base * 2**(n-1))]``), a
  server's ``Retry-After`` honoured as a floor, and a small bound on attempts and time,
  so one send never holds an outbox slot for long.
- :class:`RequeuePolicy`, across sends: a send that still failed for a passing reason
  goes back to the outbox as 'pending' with a later due time, again and again, for as
  long as the page can matter (until accepted, or its incident is closed). A count of
  attempts is never a reason to stop.

:class:`ProviderWatch` turns the stream of outcomes into "the provider has been failing
since …" for the once-per-outage operations alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.backoff import Backoff, Jitter


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

    max_attempts: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # Total time budget from the first attempt. Short: past it the outbox re-queues the
    # page (RequeuePolicy) instead of this send holding a slot the next pages need.
    deadline_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")

    def backoff_s(self, attempt: int, rand: float) -> float:
        """Return the full-jitter delay after failed attempt number ``attempt`` (from 1)."""
        return Backoff(self.base_delay_s, self.max_delay_s, Jitter.FULL).delay_s(
            attempt - 1, rand)

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


@dataclass(frozen=True, slots=True)
class RequeuePolicy:
    """When an outbox row whose send failed transiently is due again.

    "Equal jitter": the delay after the ``n``-th failed send is uniform in
    ``[c/2, c]`` with ``c = min(cap, base * 2**(n-1))``, so a long outage settles at one
    try per row every 30-60 s without the rows it failed together returning together.
    A ``Retry-After`` is the server's floor (RFC 9110 §10.2.3), bounded by
    ``max_retry_after_s`` so a wrong header cannot park a panic page for hours.
    """

    base_delay_s: float = 2.0
    max_delay_s: float = 60.0
    max_retry_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 < base_delay_s <= max_delay_s")
        if self.max_retry_after_s < 0:
            raise ValueError("max_retry_after_s must not be negative")

    def delay_s(self, failures: int, retry_after_s: float | None, rand: float) -> float:
        """Seconds until the next send after ``failures`` (from 1) transient failures."""
        delay = Backoff(self.base_delay_s, self.max_delay_s, Jitter.EQUAL).delay_s(
            failures - 1, rand)
        if retry_after_s is not None:
            floor = min(max(0.0, retry_after_s), self.max_retry_after_s)
            delay = max(delay, floor + self.base_delay_s * rand)
        return delay


class Outcome(StrEnum):
    """What one send told us about the provider."""

    # The provider accepted it, or refused it for a reason of its own (a 4xx): it is up.
    ANSWERED = "answered"
    # Throttled, 5xx, timeout, refused or reset connection, a local OSError: no answer.
    TRANSIENT = "transient"


@dataclass(frozen=True, slots=True)
class ProviderChange:
    """A transition of the provider's state worth telling operations about."""

    down: bool  # True: the outage is declared; False: it has ended
    since: float  # when the failing began (down) or the outage's start (recovered)
    failures: int  # transient failures seen in the outage so far


class ProviderWatch:
    """Counts a run of transient failures; declares an outage once it lasts ``alert_after_s``.

    Any answer from the provider ends the run. The outage is declared once per run and
    its end is reported once, so operations hear of it once per outage, not per page.
    """

    def __init__(self, alert_after_s: float = 60.0) -> None:
        self.alert_after_s = alert_after_s
        self.failing_since: float | None = None
        self.failures = 0
        self.declared = False

    def resume(self, since: float) -> None:
        """Continue an outage declared before a restart (its row is still raised)."""
        self.failing_since = since
        self.declared = True

    def observe(self, outcome: Outcome, now: float) -> ProviderChange | None:
        """Record one send's outcome at ``now``; returns a change to report, if any."""
        if outcome is Outcome.ANSWERED:
            change = None
            if self.declared and self.failing_since is not None:
                change = ProviderChange(down=False, since=self.failing_since,
                                        failures=self.failures)
            self.failing_since, self.failures, self.declared = None, 0, False
            return change
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        if not self.declared and now - self.failing_since >= self.alert_after_s:
            self.declared = True
            return ProviderChange(down=True, since=self.failing_since, failures=self.failures)
        return None
