"""The demo's wait on the daemon's log: a scene moves on only once its own events came."""

from __future__ import annotations

import io
import os
import threading

import pytest

from firmware_sim.demo import DaemonLog, DemoError

STEP = "2026-12-03T13:30:22.450216Z [info     ] escalation.step_due   incident={i} level={lv}" \
       " round=1 people=1 messages={m} late_s=0.01\n"
PAGE = "2026-12-03T13:30:22.459803Z [info     ] {event}   incident={i} to=+62812****102" \
       " purpose=alert attempts=1\n"


def _log(text: str, timeout_s: float = 5.0) -> DaemonLog:
    log = DaemonLog(io.BytesIO(text.encode()), timeout_s=timeout_s)
    log.join(5)
    return log


def test_wait_matches_whole_key_value_tokens() -> None:
    log = _log(PAGE.format(event="sms.sent", i=10), timeout_s=0.05)
    with pytest.raises(DemoError, match="saw 0"):
        log.wait(("sms.sent",), {"incident": 1})
    assert len(log.wait(("sms.sent",), {"incident": 10, "purpose": "alert"})) == 1


def test_wait_pages_waits_for_every_message_of_the_steps_so_far() -> None:
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reader, os.fdopen(write, "wb", buffering=0) as writer:
        log = DaemonLog(reader, timeout_s=5.0)
        writer.write(STEP.format(i=1, lv=1, m=2).encode())
        writer.write(PAGE.format(event="sms.sent", i=1).encode())
        done = threading.Event()

        def wait() -> None:
            log.wait_pages(1, 1)
            done.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert not done.wait(0.2)  # one of two pages so far
        writer.write(PAGE.format(event="call.placed", i=1).encode())
        waiter.join(5)
        assert done.is_set()


def test_a_step_that_never_comes_fails_the_demo() -> None:
    log = _log(STEP.format(i=1, lv=1, m=2), timeout_s=0.05)
    with pytest.raises(DemoError, match=r"escalation\.step_due"):
        log.wait_pages(1, 2)
