"""End to end with real parts (DESIGN §4): Mosquitto, the real panicd subprocess, and
Prism serving Twilio's own API spec as the peer.

A signed MQTT press → SMS and call requests that Prism validates against the spec (201,
provider sids) → a signed Gather webhook with Digits=1 → escalation stops and the others
already paged are told. And: nobody acks, so level 2 fires after its (short) wait.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from firmware_sim.broker import Mosquitto
from tests.daemon_proc import DaemonProcess, wait_until
from tests.dispatch_e2e import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    RecordingPeer,
    client_id,
    daemon_store,
    deploy,
    duplicated_outbox_keys,
    policies_toml,
    press_panic,
    rows,
    twilio_env,
    twilio_peer,
)

__all__ = ["client_id", "daemon_store", "twilio_env", "twilio_peer"]  # fixtures used by name

pytestmark = pytest.mark.slow

SENT_ALERTS = "SELECT COUNT(*) FROM outbox WHERE purpose = 'alert' AND state = 'sent'"


def post_signed(url: str, form: dict[str, str], *, token: str = AUTH_TOKEN) -> tuple[int, str]:
    """POST a form as Twilio would, signed over the full public URL and the form."""
    signature = RequestValidator(token).compute_signature(url, form)

    async def go() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.post(
            url, data=form, headers={"X-Twilio-Signature": signature}
        ) as response:
            return response.status, await response.text()

    return asyncio.run(go())


@pytest.mark.usefixtures("twilio_env")
def test_a_press_pages_through_twilio_and_a_gather_ack_stops_escalation(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    daemon_store: str | None,
) -> None:
    # Level 1 waits 60 s: the ack below must stop level 2 long before it is due.
    # On both backends: the daemon is the same program on a SQLite file or PostgreSQL.
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(60),
                  store_url=daemon_store)
    database = site.database
    with DaemonProcess(site.config, site.keys, tmp_path / "run") as daemon:
        press_panic(mosquitto, site.devices[0])
        assert wait_until(SENT_ALERTS, database, 4, 30) == 4, daemon.log()

        pages = rows(database, "SELECT id, person_id, channel, state, provider_sid, incident_id"
                               " FROM outbox WHERE purpose = 'alert' ORDER BY id")
        assert sorted((p[1], p[2]) for p in pages) == [
            ("ani", "sms"), ("ani", "voice"), ("budi", "sms"), ("budi", "voice")
        ]
        # Prism answered 201 with a resource shaped by Twilio's spec: SM… and CA… sids.
        for _, _, channel, state, sid, _ in pages:
            assert state == "sent"
            assert isinstance(sid, str)
            assert sid.startswith("SM" if channel == "sms" else "CA"), sid
        incident = pages[0][5]
        assert rows(database, "SELECT status FROM incidents WHERE id = ?", (incident,)) == [
            ("open",)
        ]
        # What reached the peer: one SMS and one call each, valid by Twilio's spec (201).
        base = f"/2010-04-01/Accounts/{ACCOUNT_SID}/"
        for phone in ("+628120001001", "+628120001002"):
            (sms,) = twilio_peer.to(phone, "Messages.json")
            (call,) = twilio_peer.to(phone, "Calls.json")
            for request in (sms, call):
                assert request.path.startswith(base)
                assert (request.status, request.violations) == (201, None)
            assert "/a/" in sms.form["Body"] and len(sms.form["Body"]) <= 160
            assert sms.form["StatusCallback"].startswith(f"{site.public_url}/twilio/status/sms/")
            assert call.form["Url"].startswith(f"{site.public_url}/twilio/voice/")
            assert call.form["MachineDetection"] == "Enable"
        sids = {p[4] for p in pages}
        assert len(sids) == 4

        # Ani picks up and presses 1.
        # Twilio names the call on every webhook; it must be the call placed for this row.
        ((ani_call, ani_sid),) = [(p[0], str(p[4])) for p in pages
                                  if p[1:3] == ("ani", "voice")]
        status, twiml = post_signed(f"{site.public_url}/twilio/voice/{ani_call}",
                                    {"CallSid": ani_sid, "AnsweredBy": "human"})
        assert status == 200 and "<Gather" in twiml
        unsigned = post_signed(f"{site.public_url}/twilio/gather/{ani_call}", {"Digits": "1"},
                               token="not-the-auth-token")
        assert unsigned[0] == 403
        status, twiml = post_signed(f"{site.public_url}/twilio/gather/{ani_call}",
                                    {"CallSid": ani_sid, "Digits": "1"})
        assert status == 200 and "Anda tercatat menangani" in twiml, twiml

        handled = ("SELECT COUNT(*) FROM outbox WHERE purpose = 'handled'"
                   " AND state = 'sent'")
        assert wait_until(handled, database, 1, 30) == 1, daemon.log()
        assert daemon.terminate() == 0

    assert rows(database, "SELECT status FROM incidents WHERE id = ?", (incident,)) == [
        ("acknowledged",)
    ]
    told = rows(database, "SELECT person_id, provider_sid, body FROM outbox"
                          " WHERE purpose = 'handled'")
    assert [(t[0], str(t[1])[:2]) for t in told] == [("budi", "SM")]
    (notice,) = [r for r in twilio_peer.to("+628120001002", "Messages.json")
                 if "ditangani" in r.form["Body"]]
    assert notice.status == 201
    # The command centre was never paged (operations summaries to it are not alerts).
    assert [r for r in twilio_peer.to("+628120009901", "Messages.json")
            if "/a/" in r.form["Body"]] == []
    assert twilio_peer.to("+628120009901", "Calls.json") == []
    assert "ditangani oleh Ani Rahayu" in str(told[0][2])
    assert rows(database, "SELECT level, state FROM escalation_steps ORDER BY level") == [
        (0, "fired"), (1, "cancelled")
    ]
    assert rows(database, "SELECT COUNT(*) FROM outbox WHERE person_id = 'dewi'"
                          " AND purpose = 'alert'") == [(0,)]
    events = [e for (e,) in rows(database, "SELECT event FROM incident_events"
                                           " WHERE incident_id = ? ORDER BY id", (incident,))]
    assert events.index("escalation.step_fired") < events.index("incident.acknowledged")
    assert duplicated_outbox_keys(database) == []


def test_nobody_acks_so_level_2_fires_after_its_wait(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    twilio_env: None,
) -> None:
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(2))
    database = site.database
    with DaemonProcess(site.config, site.keys, tmp_path / "run") as daemon:
        press_panic(mosquitto, site.devices[0])
        assert wait_until(SENT_ALERTS, database, 6, 30) == 6, daemon.log()
        assert daemon.terminate() == 0

    steps = rows(database, "SELECT level, state, due_at, fired_at FROM escalation_steps"
                           " ORDER BY level")
    assert [(s[0], s[1]) for s in steps] == [(0, "fired"), (1, "fired")]
    level_2 = steps[1]
    assert isinstance(level_2[2], float) and isinstance(level_2[3], float)
    assert level_2[3] >= level_2[2]  # not before its due time
    dewi = rows(database, "SELECT channel, state, provider_sid FROM outbox"
                          " WHERE person_id = 'dewi' AND purpose = 'alert' ORDER BY channel")
    assert [(d[0], d[1], str(d[2])[:2]) for d in dewi] == [
        ("sms", "sent", "SM"), ("voice", "sent", "CA")
    ]
    assert [r.status for r in twilio_peer.to("+628120009901", "Messages.json")
            if "/a/" in r.form["Body"]] == [201]
    assert [r.status for r in twilio_peer.to("+628120009901", "Calls.json")] == [201]
    assert duplicated_outbox_keys(database) == []
