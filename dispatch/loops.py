"""What every dispatch loop shares: survive a failure, sleep until due, and a clock that
an NTP step cannot make fire a step early or hold it back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.backoff import Backoff, Jitter

log = structlog.get_logger("panicd.dispatch")

# 1 s after the first failure, doubling to 30 s.
LOOP_BACKOFF = Backoff(0.5, 30.0, Jitter.NONE)


async def resilient(name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` forever; a failure is logged and retried after a pause, never fatal.

    Dispatch must outlive a transient database error: ingest keeps committing presses
    and the rows a loop needs are still there when it comes back.
    """
    failures = 0
    while True:
        try:
            await body()
            failures = 0
        except Exception as exc:  # noqa: BLE001 -- logged, retried; the rows persist
            failures += 1
            delay = LOOP_BACKOFF.delay_s(failures, 0.0)
            log.error(  # noqa: TRY400 -- one journal line, not a traceback
                "dispatch.loop_failed", loop=name, error=repr(exc), failures=failures,
                retry_in_s=delay,
            )
            await asyncio.sleep(delay)


async def wait_until(event: asyncio.Event, until: float | None, clock: Callable[[], float]) -> None:
    """Sleep until ``event`` is set or the clock reaches ``until`` (None: only the event)."""
    timeout = None if until is None else max(0.0, until - clock())
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


#: A wall-clock step smaller than this is not followed: NTP slews such corrections
#: (at most 0.5 ms/s), and following every few milliseconds would rewrite rows for nothing.
STEP_TOLERANCE_S = 0.5


class SteadyClock:
    """Unix seconds that advance with the monotonic clock, and follow a step of the wall
    clock (NTP, ``date -s``) only when its owner applies the step to its stored due times.

    Due times are stored as wall-clock seconds so a restart can resume them; a wait that
    was planned as "60 s" must still last 60 s of real time when the wall clock jumps in
    between. So the dispatcher compares due times with this clock, notices a step
    (:meth:`step`), shifts every pending due time by it in one commit and then
    :meth:`follow` s it: the stored times and the clock change frame together.
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        tolerance_s: float = STEP_TOLERANCE_S,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._tolerance_s = tolerance_s
        self._offset = wall() - monotonic()

    def __call__(self) -> float:
        """Now, in the frame of the due times stored so far."""
        return self._monotonic() + self._offset

    def step(self) -> float:
        """How far the wall clock was stepped against this clock; 0.0 within tolerance."""
        delta = self._wall() - self()
        return delta if abs(delta) > self._tolerance_s else 0.0

    def follow(self, delta: float) -> None:
        """Take ``delta`` (from :meth:`step`) into the frame: due times were shifted by it."""
        self._offset += delta


#: A difference between this host's clock and the database's worth a journal line.
SKEW_WARN_S = 1.0


class SharedClock:
    """Unix seconds in the database's clock, for instances that share one store.

    Due times, message due times and leases are written by one instance and compared by
    another, so they must be in one clock: the database's (issue 13 item 3). Reading it
    for every comparison would cost a round trip each, so this clock advances with the
    local monotonic clock from an offset that :meth:`sync` measures (the read's midpoint)
    and re-measures as often as its owner calls it. A step of this host's wall clock
    changes nothing here, so nothing is shifted in the shared rows (the single box's
    :class:`SteadyClock` shifts them to follow a step; on a shared store each instance
    would shift every peer's rows again).
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        # Until the first sync: this host's clock (the owner syncs before it plans).
        self._offset = wall() - monotonic()
        self.synced = False
        self.skew_s = 0.0  # this host's wall clock minus the database's, as last seen

    def __call__(self) -> float:
        """Now, in the database's clock."""
        return self._monotonic() + self._offset

    async def sync(self, read: Callable[[], Awaitable[float | None]]) -> bool:
        """Measure the database's clock with ``read``; False when it has none to give."""
        before = self._monotonic()
        database = await read()
        after = self._monotonic()
        if database is None:
            return False
        self._offset = database - (before + after) / 2
        self.synced = True
        skew = self._wall() - self()
        if abs(skew) >= SKEW_WARN_S and abs(skew - self.skew_s) >= SKEW_WARN_S / 2:
            log.warning("clock.skewed", skew_s=round(skew, 3),
                        hint="this host's clock differs from the database's; due times"
                             " follow the database's, press times this host's: run NTP")
        self.skew_s = skew
        return True
