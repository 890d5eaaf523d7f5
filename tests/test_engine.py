"""The Dispatcher over a real SQLite database, a recording Channel and an injected clock.

DESIGN §2 Routing and escalation, Acknowledgement, Delivery: every step is a row with a
due time; a step fires once (two due together, a repeated fire(), a restart); the first
ack stops escalation and tells the others; cancel and resolve notify those paged.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import structlog

from dispatch.channel import ConsoleChannel
from dispatch.messages import SMS_LIMIT, is_single_segment
from dispatch.webhook_auth import verify_ack_token
from gateway.ingest import IncidentEvent
from store.dispatch import IncidentInfo
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_world import (
    ACK_SECRET,
    KODE_GAP,
    KODE_LADDER,
    KODE_TOGETHER,
    PEOPLE,
    PUBLIC_URL,
    T0,
    Clock,
    Feedbacks,
    RecordingChannel,
    WatchedStore,
    cancel_incident,
    dispatcher,
    events,
    open_incident,
    outbox,
    query,
    steps,
    timeline,
)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "panicd.sqlite3"


def alert_keys(database: Path, incident_id: int) -> Counter[tuple[int | None, str, str]]:
    return Counter(
        (row.level, row.person_id, row.channel)
        for row in outbox(database, incident_id)
        if row.purpose == "alert"
    )


async def test_an_opened_incident_pages_level_1_by_sms_with_an_ack_link_and_by_voice(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0 + 0.2), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        assert await engine.plan_missing() == 1
        assert await engine.plan_missing() == 0  # planned once
        assert await engine.fire_due() == 1
        assert await engine.send_due() == 4

    assert [s.to for s in channel.sent if s.kind == "sms"] == [
        PEOPLE["ani"].phone,
        PEOPLE["budi"].phone,
    ]
    for person in ("ani", "budi"):
        (sms,) = channel.to(person, "sms")
        assert len(sms.body) <= SMS_LIMIT
        assert is_single_segment(sms.body)
        assert f"#{incident}" in sms.body
        assert "Kel. Kuncen" in sms.body
        link = sms.body.rsplit(" ", 1)[-1]
        assert link.startswith(f"{PUBLIC_URL}/a/")
        claim = verify_ack_token(ACK_SECRET, link.removeprefix(f"{PUBLIC_URL}/a/"), clock())
        assert (claim.incident_id, claim.responder_id) == (str(incident), person)
        (call,) = channel.to(person, "call")
        assert call.machine_detection
    rows = outbox(database, incident)
    assert [(r.person_id, r.channel, r.state) for r in rows] == [
        ("ani", "sms", "sent"),
        ("budi", "sms", "sent"),
        ("ani", "voice", "sent"),
        ("budi", "voice", "sent"),
    ]
    voice_row = rows[2]
    assert channel.to("ani", "call")[0].url == f"{PUBLIC_URL}/twilio/voice/{voice_row.id}"
    assert all(r.provider_sid for r in rows)
    assert [s[2] for s in steps(database, incident)] == ["fired", "pending", "pending"]


async def test_advancing_past_the_wait_fires_level_2_exactly_once(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        clock.advance(59.9)
        assert await engine.fire_due() == 0  # not yet
        clock.advance(0.2)
        assert await engine.fire_due() == 1
        assert await engine.fire_due() == 0
        assert await engine.send_due() == 2
        assert await engine.send_due() == 0

    assert len(channel.to("citra")) == 2
    assert alert_keys(database, incident) == Counter(
        {(0, "ani", "sms"): 1, (0, "budi", "sms"): 1, (0, "ani", "voice"): 1,
         (0, "budi", "voice"): 1, (1, "citra", "sms"): 1, (1, "citra", "voice"): 1}
    )
    assert [s[2] for s in steps(database, incident)] == ["fired", "fired", "pending"]


async def test_two_steps_due_at_the_same_time_both_fire_once(database: Path) -> None:
    incident = await open_incident(database, KODE_TOGETHER, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        assert await engine.fire_due() == 2  # level 1 (wait 0) and level 2, both due now
        assert await engine.fire_due() == 0
        await engine.send_due()
    assert [s.to for s in channel.sent] == [PEOPLE["ani"].phone, PEOPLE["budi"].phone]
    assert [s[2] for s in steps(database, incident)] == ["fired", "fired", "pending"]


async def test_firing_the_same_step_twice_sends_once(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        (step,) = await store.due_steps(clock())
        assert await engine.fire(step) is True
        assert await engine.fire(step) is False
        await engine.send_due()
    assert len(channel.sent) == 4
    assert sum(1 for e in events(database, incident) if e == "escalation.step_fired") == 1


async def test_after_a_restart_overdue_steps_fire_at_once_and_fired_ones_do_not_refire(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, before = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, before, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
    level_1_fired_at = steps(database, incident)[0][4]

    # Down for ten minutes: level 2 (due +60 s) and level 3 (due +180 s) are overdue.
    clock.advance(600)
    after = RecordingChannel()
    async with WatchedStore(database) as store, dispatcher(store, after, clock) as engine:
        await store.wait_recorded(4)  # citra and dewi, sms + voice, without a wake-up from us
        assert engine.steps_fired == 2
        assert await engine.fire_due() == 0

    assert sorted(s.to for s in after.sent) == sorted(
        [PEOPLE["citra"].phone] * 2 + [PEOPLE["dewi"].phone] * 2
    )
    assert after.to("ani") == [] and after.to("budi") == []
    rows = steps(database, incident)
    assert [r[2] for r in rows] == ["fired", "fired", "fired"]
    assert rows[0][4] == level_1_fired_at
    assert rows[1][4] == rows[2][4] == clock()
    assert set(alert_keys(database, incident).values()) == {1}
    assert "escalation.exhausted" in set(events(database, incident))


@pytest.mark.parametrize(("test", "level"), [(True, "info"), (False, "warning")])
async def test_running_out_of_levels_warns_for_a_real_incident_not_a_test_press(
    database: Path, test: bool, level: str,
) -> None:
    # A test press pages the one-level operations policy: exhausting it is its normal end.
    incident = await open_incident(database, KODE_LADDER, at=T0, test=test)
    clock = Clock(T0)
    with structlog.testing.capture_logs() as logs:
        async with SqliteDispatchStore(database) as store:
            engine = dispatcher(store, RecordingChannel(), clock)
            await engine.plan_missing()
            for _ in range(3):
                await engine.fire_due()
                clock.advance(600)
    (exhausted,) = [e for e in logs if e["event"] == "escalation.exhausted"]
    assert exhausted["log_level"] == level
    assert exhausted["incident"] == incident
    assert exhausted["test"] is test


async def test_the_console_channel_after_a_restart_records_every_send(database: Path) -> None:
    # The default channel (no Twilio credentials): a new process must not reuse sids.
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, ConsoleChannel(io.StringIO()), clock)
        await engine.plan_missing()
        await engine.fire_due()
        assert await engine.send_due() == 4
    clock.advance(61)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, ConsoleChannel(io.StringIO()), clock)
        await engine.fire_due()
        assert await engine.send_due() == 2
    rows = outbox(database, incident)
    assert [r.state for r in rows] == ["sent"] * 6
    assert len({r.provider_sid for r in rows}) == 6


async def test_rows_left_sending_by_a_crash_are_requeued_and_sent(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, RecordingChannel(), clock)
        await engine.plan_missing()
        await engine.fire_due()
        # The crash: claimed for sending, never handed over.
        assert len(await store.claim_outbox(clock(), 100)) == 4
    assert {r.state for r in outbox(database, incident)} == {"sending"}

    clock.advance(5)
    channel = RecordingChannel()
    async with WatchedStore(database) as store, dispatcher(store, channel, clock):
        await store.wait_recorded(4)
    rows = outbox(database, incident)
    assert [(r.state, r.attempts) for r in rows] == [("sent", 2)] * 4
    assert len(channel.sent) == 4


async def test_the_first_ack_stops_escalation_and_tells_the_others_who_handles_it(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0, device="BTN-7")
    clock, channel, feedback = Clock(T0), RecordingChannel(), Feedbacks()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock, feedback)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()  # ani and budi paged
        clock.advance(61)
        await engine.fire_due()  # citra's pages are queued, not yet sent

        clock.advance(1)
        result = await engine.ack(incident, person_id="ani", actor="ani", via="voice")
        assert (result.first, result.accepted, result.status) == (True, True, "acknowledged")
        assert await engine.send_due() == 1
        clock.advance(300)
        assert await engine.fire_due() == 0  # level 3 was cancelled

        second = await engine.ack(incident, person_id="budi", actor="budi", via="link")
        assert (second.first, second.accepted) == (False, True)
        assert await engine.send_due() == 0

    handled = channel.sent[4:]
    assert [s.to for s in handled] == [PEOPLE["budi"].phone]
    assert "ditangani oleh Ani Rahayu" in handled[0].body
    assert len(handled[0].body) <= SMS_LIMIT
    assert channel.to("citra") == []  # queued pages cancelled, never called after an ack
    assert [s[2] for s in steps(database, incident)] == ["fired", "fired", "cancelled"]
    states = {(r.person_id, r.purpose): r.state for r in outbox(database, incident)}
    assert states[("citra", "alert")] == "cancelled"
    assert states[("budi", "handled")] == "sent"
    assert ("ani", "handled") not in states
    assert query(database, "SELECT status FROM incidents WHERE id = ?", (incident,)) == [
        ("acknowledged",)
    ]
    assert query(
        database, "SELECT person_id, via, first FROM acks WHERE incident_id = ? ORDER BY id",
        (incident,),
    ) == [("ani", "voice", 1), ("budi", "link", 0)]
    entries = timeline(database, incident)
    assert ("incident.acknowledged", "voice", "Ani Rahayu") in entries
    assert ("responder.added", "link", "Budi Santoso") in entries
    assert feedback.calls == [("BTN-7", incident, "help_coming")]


async def test_a_cli_ack_by_an_operator_tells_everyone_paged(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        await engine.ack(incident, person_id=None, actor="Pak Operator", via="cli")
        await engine.send_due()
    told = channel.sent[4:]
    assert sorted(s.to for s in told) == sorted([PEOPLE["ani"].phone, PEOPLE["budi"].phone])
    assert all("ditangani oleh Pak Operator" in s.body for s in told)


async def test_a_cancel_press_stops_escalation_and_tells_those_paged(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0, device="BTN-3")
    clock, channel, feedback = Clock(T0), RecordingChannel(), Feedbacks()
    async with WatchedStore(database) as store, dispatcher(
        store, channel, clock, feedback
    ) as engine:
        await store.wait_recorded(4)  # the running scheduler paged level 1 at start
        clock.advance(20)
        await cancel_incident(database, incident, at=clock())
        engine.on_incident(IncidentEvent(incident, "BTN-3", "cancelled", clock(), test=False))
        await store.wait_recorded(6)
        clock.advance(600)
        assert await engine.fire_due() == 0

    notices = channel.sent[4:]
    assert sorted(s.to for s in notices) == sorted([PEOPLE["ani"].phone, PEOPLE["budi"].phone])
    assert all(f"#{incident} DIBATALKAN" in s.body and s.kind == "sms" for s in notices)
    assert [s[2] for s in steps(database, incident)] == ["fired", "cancelled", "cancelled"]
    assert ("escalation.stopped", "cancelled", "device:BTN-3") in timeline(database, incident)
    assert feedback.calls == [("BTN-3", incident, "cancelled")]


async def test_an_operator_resolve_stops_escalation_and_tells_those_paged(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        assert await engine.close(incident, reason="resolved", actor="operator", note="hoaks")
        assert not await engine.close(incident, reason="resolved", actor="operator")
        assert await engine.send_due() == 2
        late = await engine.ack(incident, person_id="budi", actor="budi", via="voice")
        assert not late.accepted

    assert sorted(s.to for s in channel.sent[4:]) == sorted(
        [PEOPLE["ani"].phone, PEOPLE["budi"].phone]
    )
    assert [s[2] for s in steps(database, incident)] == ["fired", "cancelled", "cancelled"]
    assert query(database, "SELECT status FROM incidents WHERE id = ?", (incident,)) == [
        ("resolved",)
    ]
    entries = timeline(database, incident)
    assert ("incident.resolved", "resolved", "operator") in entries
    assert ("ack.ignored", "incident_resolved", "Budi Santoso") in entries


async def test_a_roster_gap_pulls_the_next_level_forward(database: Path) -> None:
    incident = await open_incident(database, KODE_GAP, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        assert await engine.fire_due() == 1  # the night roster: nobody at 10:00 WIB
        assert await engine.send_due() == 0
        assert await engine.fire_due() == 1  # the command centre, now, not in 300 s
        await engine.send_due()
    assert [s.to for s in channel.sent] == [PEOPLE["dewi"].phone]
    rows = steps(database, incident)
    assert rows[1][3] == T0  # due_at moved from T0 + 300
    entries = timeline(database, incident)
    assert ("escalation.level_empty", "nobody_on_call", None) in entries


async def test_a_permanent_channel_failure_is_recorded_and_escalation_continues(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = RecordingChannel(permanent={PEOPLE["ani"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        clock.advance(60)
        assert await engine.fire_due() == 1
        await engine.send_due()
        # A failed page is not "notified": ani is not told who handles it.
        await engine.ack(incident, person_id="citra", actor="citra", via="link")
        await engine.send_due()

    by_person = {(r.person_id, r.channel, r.purpose): r for r in outbox(database, incident)}
    failed = by_person[("ani", "sms", "alert")]
    assert (failed.state, failed.error_code, failed.attempts) == ("failed", 21211, 1)
    assert by_person[("ani", "voice", "alert")].state == "failed"
    assert by_person[("budi", "sms", "alert")].state == "sent"
    assert by_person[("citra", "voice", "alert")].state == "sent"
    assert ("ani", "sms", "handled") not in by_person
    assert by_person[("budi", "sms", "handled")].state == "sent"
    assert ("sms.failed", "alert", None) in timeline(database, incident)
    detail = query(
        database,
        "SELECT detail FROM incident_events WHERE incident_id = ? AND event = 'sms.failed'",
        (incident,),
    )
    assert json.loads(str(detail[0][0]))["error_code"] == 21211


async def test_the_timeline_has_every_transition_with_its_reason(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        clock.advance(60)
        await engine.fire_due()
        await engine.send_due()
        await engine.ack(incident, person_id="citra", actor="citra", via="link")
        await engine.send_due()
        await engine.close(incident, reason="resolved", actor="operator", note="selesai")

    entries = timeline(database, incident)
    assert [e for e, _, _ in entries] == [
        "escalation.planned",
        "escalation.step_fired",
        *["sms.sent"] * 2,
        *["call.placed"] * 2,
        "escalation.step_fired",
        "sms.sent",
        "call.placed",
        "incident.acknowledged",
        *["sms.sent"] * 2,
        "incident.resolved",
    ]
    assert all(reason for _, reason, _ in entries)
    assert entries[0][1] == "kelurahan"
    assert [r for e, r, _ in entries if e == "escalation.step_fired"] == ["level 1", "level 2"]
    assert [r for e, r, _ in entries if e == "sms.sent"] == ["alert"] * 3 + ["handled"] * 2


async def test_planning_with_fire_now_fires_level_1_in_the_same_commit_exactly_once(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0 + 0.1), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        assert await engine.plan_missing(fire_now=True) == 1
        # Level 1 is already fired: the scheduler finds nothing due, and a later wait
        # still belongs to level 2 only.
        assert [s[2] for s in steps(database, incident)] == ["fired", "pending", "pending"]
        assert await engine.fire_due() == 0
        assert await engine.send_due() == 4
    timeline = list(events(database, incident))
    assert timeline.count("escalation.step_fired") == 1
    assert timeline.index("escalation.planned") < timeline.index("escalation.step_fired")


async def test_a_level_nobody_can_be_reached_at_moves_on_without_waiting(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    # Both level-1 people have numbers Twilio refuses (21211): nobody there can be paged.
    channel = RecordingChannel(permanent={PEOPLE["ani"].phone, PEOPLE["budi"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        assert await engine.send_due() == 4
        # No clock advance: level 2 (due in 60 s) was pulled forward to now.
        assert await engine.fire_due() == 1
        await engine.send_due()
    assert len(channel.to("citra")) == 2
    assert ("escalation.hastened", "level_undeliverable", None) in timeline(database, incident)


async def test_one_reachable_person_keeps_the_level_waiting_its_turn(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = RecordingChannel(permanent={PEOPLE["ani"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        assert await engine.fire_due() == 0  # budi was reached: level 2 waits its 60 s
    assert "escalation.hastened" not in set(events(database, incident))


class ScanWatchingStore(SqliteDispatchStore):
    """The real SqliteDispatchStore, recording the id above which each unplanned scan looked."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.scanned_above: list[int] = []

    async def unplanned_incidents(self, after_id: int = 0) -> list[IncidentInfo]:
        """Scan, and remember where from."""
        self.scanned_above.append(after_id)
        return await super().unplanned_incidents(after_id)


async def test_after_a_restart_with_nothing_to_plan_a_panic_scans_only_above_the_newest(
    database: Path,
) -> None:
    # Everything stored at start is planned or closed; scanning from id 0 again at the
    # first panic read every incident ever stored on the plan SQLite 3.40 made for it.
    await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, RecordingChannel(), clock)
        assert await engine.plan_missing(fire_now=True) == 1
        assert await engine.send_due() == 4  # nothing of it is due after the restart
    # Cancelled before anything planned it: newer than every incident planned.
    cancelled = await open_incident(database, KODE_LADDER, at=T0, device="BTN-2")
    await cancel_incident(database, cancelled, at=T0)

    channel = RecordingChannel()
    async with ScanWatchingStore(database) as store, dispatcher(store, channel, clock) as engine:
        new = await open_incident(database, KODE_LADDER, at=T0, device="BTN-3")
        engine.on_incident(IncidentEvent(new, "BTN-3", "opened", clock(), test=False))
        await channel.wait_for(4)
    assert store.scanned_above == [0, cancelled]
    assert all(f"#{new}" in s.body for s in channel.sent if s.kind == "sms")
    assert "escalation.planned" not in set(events(database, cancelled))
