"""The broker dies: Mosquitto SIGKILLed and restarted 3 times during a storm of signed presses.

Issue 12 items 1 and 5. Mosquitto acknowledges a QoS 1 publish from memory and writes its
persistence file only every ``autosave_interval`` (10 s as shipped). Here each broker
life is a few seconds, so most restarts come back with no saved session for panicd:
buttons that are back on the broker before panicd has re-subscribed get their presses
PUBACKed and dropped (no subscriber), and whatever was queued in memory is gone too.
The buttons' duty therefore ends at panicd's own "received" feedback
(docs/FRAMES.md): they retransmit until it arrives, and panicd's anti-replay window
accepts a late retransmission. Counted from the button side, every press a button made
is stored exactly once and got its feedback, and panicd, never restarted, reconnects by
itself. The same storm whose duty ends at the PUBACK loses presses: that contrast is what
makes the first test mean something.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware_sim.fleet import write_fleet
from firmware_sim.storm import Key, StormResult, storm
from tests.daemon_proc import DaemonProcess, count_rows, stored_presses, wait_until
from tests.faults.conftest import KillableMosquitto

BUTTONS = 100
RATE = 200.0
KILLS = 3
# How long the crashed broker stays away before it is back (a supervisor's restart delay).
DOWN_S = 0.5
COUNTER_BASE = 1000


@dataclass(frozen=True, slots=True)
class Outcome:
    """One storm under broker kills, counted from the button side and from the database."""

    result: StormResult
    stored: dict[Key, int]  # rows in presses per (device, counter)
    kills: int
    panicd_connects: int
    panicd_survived: bool
    dead_letters: int

    @property
    def lost(self) -> list[Key]:
        """Presses a button made that panicd never stored."""
        return sorted(key for key in self.result.sent if key not in self.stored)

    @property
    def twice(self) -> list[Key]:
        """Presses stored more than once."""
        return sorted(key for key, rows in self.stored.items() if rows > 1)

    def figures(self) -> str:
        """One line for the report."""
        summary = self.result.summary()
        return (
            f"kills={self.kills} presses={summary['presses']} feedback={summary['feedback']}"
            f" retransmissions={summary['retransmissions']}"
            f" storm_reconnects={summary['reconnects']} stored={len(self.stored)}"
            f" lost={len(self.lost)}"
            f" lost_after_puback={len(set(self.lost) & self.result.pubacked)}"
            f" twice={len(self.twice)} panicd_connects={self.panicd_connects}"
            f" dead_letters={self.dead_letters}"
        )






def storm_under_broker_kills(
    broker: KillableMosquitto, workdir: Path, *, presses: int, retransmit: bool
) -> Outcome:
    """A real panicd; a storm at RATE from BUTTONS buttons; the broker killed KILLS times."""
    config, keys, devices = write_fleet(
        workdir / "cfg", devices=BUTTONS, mqtt_port=broker.port, client_id="panicd-faults"
    )
    # panicd reconnects with its shipped backoff (0.5 s doubling, full jitter), not the
    # test fleet's quick one: as deployed, buttons are often back on the broker first.
    text = config.read_text(encoding="utf-8")
    quick = "reconnect_min_s = 0.1\nreconnect_max_s = 1\n"
    assert quick in text
    config.write_text(text.replace(quick, ""), encoding="utf-8")
    database = workdir / "cfg" / "panicd.sqlite3"
    daemon = DaemonProcess(config, keys, workdir / "run")
    results: list[StormResult] = []
    errors: list[BaseException] = []

    def press() -> None:
        try:
            results.append(asyncio.run(storm(
                broker.host, broker.port, devices, count=presses, rate=RATE,
                counter_base=COUNTER_BASE, watch_feedback=True, retransmit=retransmit,
                # Retransmitting buttons get their feedback within the cap (8 s); the
                # others only lose time waiting for feedback that will never come.
                feedback_grace_s=20.0 if retransmit else 3.0,
                client_id=f"faults-storm-{retransmit}",
            )))
        except BaseException as exc:  # handed to the test thread, which fails with it
            errors.append(exc)
            raise

    with daemon:
        assert daemon.process is not None
        pid = daemon.process.pid
        buttons = threading.Thread(target=press, name="storm")
        started = time.monotonic()
        buttons.start()
        sending_s = presses / RATE
        for kill in range(KILLS):
            # Spread over the storm, each in the middle of a stream of presses.
            time.sleep(max(0.0, started + sending_s * (kill + 1) / (KILLS + 1) - time.monotonic()))
            broker.kill9()
            time.sleep(DOWN_S)
            broker.restart()
        buttons.join(timeout=sending_s + 60)
        assert not buttons.is_alive(), "the storm did not end by itself"
        assert not errors, f"the storm failed: {errors!r}"
        (result,) = results
        # What reached panicd is committed within milliseconds; give stragglers a moment.
        wait_until("SELECT COUNT(*) FROM presses", database, len(result.sent), 5.0)
        survived = daemon.process.poll() is None and daemon.process.pid == pid
        connects = len(daemon.events("mqtt.connected"))
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    return Outcome(
        result=result,
        stored=stored_presses(database),
        kills=KILLS,
        panicd_connects=connects,
        panicd_survived=survived,
        dead_letters=count_rows(database, "SELECT COUNT(*) FROM dead_letters"),
    )


@pytest.mark.slow
def test_broker_killed_3_times_mid_storm_every_press_is_stored_once_and_confirmed(
    killable_broker: KillableMosquitto, tmp_path: Path,
    record_property: Callable[[str, object], None], fault_report: Callable[[str], None],
) -> None:
    outcome = storm_under_broker_kills(killable_broker, tmp_path, presses=3000, retransmit=True)
    figures = outcome.figures()
    record_property("broker_kills_end_to_end", figures)
    fault_report(f"broker SIGKILL x{KILLS}, end-to-end retransmission: {figures}")
    result = outcome.result

    assert len(result.sent) == 3000, figures
    assert outcome.lost == [], f"presses lost: {outcome.lost[:10]} ({figures})"
    assert outcome.twice == [], f"presses stored twice: {outcome.twice[:10]} ({figures})"
    assert set(outcome.stored) == set(result.sent), figures
    # Every button's duty ended where it must: at panicd's feedback for that counter.
    assert result.unconfirmed() == [], f"no feedback: {result.unconfirmed()[:10]} ({figures})"
    # The kills really cost something that only retransmission recovered.
    assert result.retransmissions > 0, figures
    assert result.forged_feedback == 0, figures
    # A retransmission of a stored press is a duplicate, never a dead letter.
    assert outcome.dead_letters == 0, figures
    # panicd was never restarted: the same process reconnected after every kill.
    assert outcome.panicd_survived, figures
    assert outcome.panicd_connects == KILLS + 1, figures


@pytest.mark.slow
def test_broker_killed_3_times_mid_storm_loses_presses_when_the_duty_ends_at_puback(
    killable_broker: KillableMosquitto, tmp_path: Path,
    record_property: Callable[[str, object], None], fault_report: Callable[[str], None],
) -> None:
    outcome = storm_under_broker_kills(killable_broker, tmp_path, presses=3000, retransmit=False)
    figures = outcome.figures()
    record_property("broker_kills_puback_only", figures)
    fault_report(f"broker SIGKILL x{KILLS}, duty ends at PUBACK: {figures}")

    # The broker had acknowledged presses it then lost with its memory: why the duty
    # cannot end at the PUBACK.
    assert set(outcome.lost) & outcome.result.pubacked, f"nothing lost? ({figures})"
    assert outcome.twice == [], figures
    assert outcome.panicd_survived, figures
