"""panicd dies while incidents escalate: SIGKILLed 3 times with pages in flight.

Issue 12 items 3 and 5. Twelve incidents from twelve buttons escalate through two levels
(SMS and a call to two responders, then the command centre), the provider is slow on 20%
of its answers, and each kill lands while the provider has accepted a page whose answer
panicd has not yet received (the recording peer holds the answer back) — the moment
that used to page twice. After each restart panicd asks the provider about every page
left in doubt before sending it again. Counted at the provider: every alert of every
incident was accepted exactly once (none twice, none never), and every escalation step
fired once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto
from tests.daemon_proc import DaemonProcess, wait_until
from tests.dispatch_e2e import (
    Fault,
    RecordingPeer,
    client_id,
    deploy,
    duplicated_outbox_keys,
    policies_toml,
    press_panic,
    rows,
    twilio_env,
    twilio_peer,
)

__all__ = ["client_id", "twilio_env", "twilio_peer"]  # fixtures used by name

pytestmark = pytest.mark.slow

INCIDENTS = 12
FIRST = 6  # incidents opened before the first kill; two more before each restart
KILLS = 3
LEVEL_WAIT_S = 3
# Level 1: two people, SMS and a call each; level 2: the command centre, SMS and a call.
PAGES_PER_INCIDENT = 6
SENT = "SELECT COUNT(*) FROM outbox WHERE purpose = 'alert' AND state = 'sent'"


class Provider:
    """The peer's fault hook: slow on 20% of creates; while ``holding``, every create is
    accepted and its answer withheld (panicd is about to be killed)."""

    def __init__(self, peer: RecordingPeer) -> None:
        self.peer = peer
        self.holding = threading.Event()
        self.held_before = 0
        self._random = random.Random(12)

    def __call__(self, method: str, _path: str, _form: Mapping[str, str]) -> Fault | None:
        if method != "POST":
            return None
        if self.holding.is_set():
            return Fault("hold")
        if self._random.random() < 0.2:
            return Fault("slow", seconds=self._random.uniform(0.2, 1.0))
        return None

    def held(self) -> int:
        return sum(1 for r in self.peer.requests if r.method == "POST" and not r.answered)


def wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)




@pytest.mark.usefixtures("twilio_env")
def test_no_page_is_sent_twice_or_lost_when_panicd_is_killed_with_pages_in_flight(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    fault_report: Callable[[str], None],
) -> None:
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(LEVEL_WAIT_S),
                  buttons=INCIDENTS)
    provider = Provider(twilio_peer)
    twilio_peer.fault = provider
    buttons = iter(site.devices)
    daemons: list[DaemonProcess] = []
    for run in range(KILLS + 1):
        daemon = DaemonProcess(site.config, site.keys, tmp_path / f"run{run}")
        daemons.append(daemon)
        daemon.start()
        for device in [next(buttons) for _ in range(FIRST if run == 0 else 2)]:
            press_panic(mosquitto, device)
        if run == KILLS:
            break
        # Kill while the provider holds an accepted page whose answer panicd awaits.
        provider.held_before = provider.held()
        provider.holding.set()
        wait(lambda: provider.held() > provider.held_before, 30,
             f"a page in flight before kill {run + 1}")
        time.sleep(random.uniform(0.0, 0.3))
        daemon.kill9()
        provider.holding.clear()
        twilio_peer.release()
    expected = INCIDENTS * PAGES_PER_INCIDENT
    assert wait_until(SENT, site.database, expected, 90) == expected, daemons[-1].log()
    assert daemons[-1].terminate() == 0

    # Counted at the provider: one accepted create per alert row, every row accepted.
    accepted = {**twilio_peer.creates("Messages.json"), **twilio_peer.creates("Calls.json")}
    alerts = rows(site.database, "SELECT id, channel, state, provider_sid FROM outbox"
                                 " WHERE purpose = 'alert'")
    callbacks = {f"{site.public_url}/twilio/status/{'sms' if channel == 'sms' else 'call'}/{i}"
                 for i, channel, _, _ in alerts}
    twice = sum(n - 1 for key, n in accepted.items() if key in callbacks and n > 1)
    never = sum(1 for key in callbacks if key not in accepted)
    sids = [sid for *_, sid in alerts]
    held_sids = {str(d["sid"]) for d in twilio_peer.accepted}
    found = sum(len(d.events("outbox.found")) for d in daemons)
    fault_report(
        f"panicd SIGKILL x{KILLS} with pages in flight, provider slow on 20%:"
        f" incidents {INCIDENTS}, pages {len(alerts)}, found at the provider after a"
        f" restart {found}, sent twice {twice}, never sent {never}"
    )
    assert len(alerts) == expected
    assert twice == 0, f"{twice} pages sent twice"
    assert never == 0, f"{never} pages never reached the provider"
    assert found >= KILLS, "no kill caught a page in flight: the test proves nothing"
    assert {state for _, _, state, _ in alerts} == {"sent"}
    assert len(set(sids)) == len(sids) and set(sids) <= held_sids
    # Every step fired once: two levels per incident, no outbox key twice.
    steps = rows(site.database, "SELECT incident_id, level, state FROM escalation_steps")
    assert len(steps) == INCIDENTS * 2 and {s for *_, s in steps} == {"fired"}
    assert duplicated_outbox_keys(site.database) == []
    assert rows(site.database, "SELECT COUNT(*) FROM incidents") == [(INCIDENTS,)]
