"""Two small pieces every dispatch loop shares: survive a failure, and sleep until due."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("panicd.dispatch")


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
            delay = min(30.0, 0.5 * 2.0 ** min(failures, 6))
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
