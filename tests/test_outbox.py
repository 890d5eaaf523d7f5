"""The outbox over a real SQLite database: a transient failure never ends a page.

Issue 12 item 2 and issue 11 case 4: 429, 5xx, timeouts, refused connections and local
OSErrors (EMFILE) send the page again later, as often as it takes, until the provider
accepts it or its incident is closed; only a permanent refusal marks it failed and may
move the escalation on early; operations hear of a provider outage once.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatch.channel import DeliveryResult, DeliveryStatus
from dispatch.health import HealthSettings
from dispatch.health_monitor import HealthMonitor
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_world import (
    KODE_LADDER,
    KODE_TOGETHER,
    PEOPLE,
    T0,
    Clock,
    RecordingChannel,
    dispatcher,
    events,
    open_incident,
    outbox,
    query,
    steps,
    timeline,
)

THROTTLED = DeliveryResult(DeliveryStatus.FAILED_TRANSIENT, error_code=20429,
                           error_message="Too Many Requests", attempts=3, retry_after_s=30.0)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "panicd.sqlite3"


@dataclass
class FlakyChannel(RecordingChannel):
    """A RecordingChannel whose numbers in ``down`` fail transiently: by raising
    ``error`` (what escaped the Twilio channel in the attack), else with ``result``."""

    down: set[str] = field(default_factory=set)
    error: Exception | None = None
    result: DeliveryResult = THROTTLED
    failures: int = 0

    def _failing(self, to: str) -> DeliveryResult | None:
        if to not in self.down:
            return None
        self.failures += 1
        if self.error is not None:
            raise self.error
        return self.result

    async def send_sms(self, to: str, body: str, *, status_callback: str | None) -> DeliveryResult:
        """Fail for a number that is down, else record the SMS."""
        return self._failing(to) or await super().send_sms(
            to, body, status_callback=status_callback
        )

    async def place_call(
        self,
        to: str,
        *,
        twiml_url: str,
        status_callback: str | None,
        machine_detection: bool = True,
    ) -> DeliveryResult:
        """Fail for a number that is down, else record the call."""
        return self._failing(to) or await super().place_call(
            to, twiml_url=twiml_url, status_callback=status_callback,
            machine_detection=machine_detection,
        )


EMFILE = OSError(errno.EMFILE, "Too many open files")
EVERYONE = {person.phone for person in PEOPLE.values()}


def alert_rows(database: Path, incident: int) -> list[tuple[str, str, str, float, str | None]]:
    """(person, channel, state, due_at, error) of the incident's alerts."""
    with closing(sqlite3.connect(database)) as conn:
        return list(conn.execute(
            "SELECT person_id, channel, state, due_at, error FROM outbox"
            " WHERE incident_id = ? AND purpose = 'alert' ORDER BY id", (incident,)))


def next_due(database: Path) -> float:
    rows = query(database, "SELECT MIN(due_at) FROM outbox WHERE state = 'pending'")
    value = rows[0][0]
    assert isinstance(value, float)
    return value


async def test_a_local_oserror_requeues_every_page_and_never_hastens_the_escalation(
    database: Path,
) -> None:
    # The attack: every SMS and call raised OSError(24) and the escalation was hastened
    # through every level as "level_undeliverable".
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = FlakyChannel(down=set(EVERYONE), error=EMFILE)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        assert await engine.send_due() == 4
        assert await engine.fire_due() == 0  # level 2 keeps its 60 s wait
    rows = alert_rows(database, incident)
    assert [state for _, _, state, _, _ in rows] == ["pending"] * 4
    assert all(T0 + 1.0 <= due <= T0 + 2.0 for _, _, _, due, _ in rows)  # 2 s, equal jitter
    assert all("Too many open files" in str(error) for *_, error in rows)
    assert [s[2:4] for s in steps(database, incident)][1] == ("pending", T0 + 60)
    assert "escalation.hastened" not in set(events(database, incident))
    assert list(events(database, incident)).count("sms.retrying") == 2


async def test_a_page_is_sent_again_until_accepted_however_many_sends_fail(
    database: Path,
) -> None:
    # Level 1 of this policy is ani by SMS only: one row retrying, nothing else due.
    incident = await open_incident(database, KODE_TOGETHER, at=T0)
    clock = Clock(T0)
    ani = PEOPLE["ani"].phone
    channel = FlakyChannel(down={ani}, result=DeliveryResult(
        DeliveryStatus.FAILED_TRANSIENT, error_code=None, error_message="HTTP 503"))
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        for _ in range(12):  # far past the old budget of 4 attempts in one send
            clock.now = next_due(database)
            await engine.send_due()
        delays = [float(str(d)) for (d,) in query(
            database, "SELECT json_extract(detail, '$.retry_in_s') FROM incident_events"
            " WHERE event = 'sms.retrying'")]
        channel.down.clear()
        clock.now = next_due(database)
        await engine.send_due()
    ani_sms = [r for r in outbox(database, incident) if r.person_id == "ani"]
    assert [(r.state, r.attempts) for r in ani_sms] == [("sent", 14)]
    # Backoff doubles from 2 s and stays under the 60 s cap, never below half of it.
    assert len(delays) == 13
    assert 1.0 <= delays[0] <= 2.0
    assert all(30.0 <= d <= 60.0 for d in delays[-4:])
    assert len(channel.to("ani")) == 1


async def test_retry_after_sets_the_earliest_next_send(database: Path) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = FlakyChannel(down={PEOPLE["ani"].phone})  # THROTTLED: Retry-After 30 s
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        clock.advance(29)
        assert await engine.send_due() == 0  # not due before the server's 30 s
        clock.advance(3)
        assert await engine.send_due() == 2
    ani = [(c, due) for p, c, _, due, _ in alert_rows(database, incident) if p == "ani"]
    assert all(due >= T0 + 30 for _, due in ani)


async def test_a_page_still_failing_when_its_level_ends_does_not_hold_the_escalation_back(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = FlakyChannel(down={PEOPLE["ani"].phone, PEOPLE["budi"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        clock.advance(59)
        assert await engine.fire_due() == 0
        clock.advance(1)
        assert await engine.fire_due() == 1  # level 2 at its own time, not before, not later
        await engine.send_due()
    assert len(channel.to("citra")) == 2
    states = {(p, c): s for p, c, s, _, _ in alert_rows(database, incident)}
    assert states[("ani", "sms")] == "pending"  # level 1 keeps trying meanwhile


class GatedChannel(FlakyChannel):
    """Holds each send until the test lets it answer."""

    def __init__(self, down: set[str]) -> None:
        super().__init__(down=down)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send_sms(self, to: str, body: str, *, status_callback: str | None) -> DeliveryResult:
        """Wait for the release, then answer as FlakyChannel."""
        self.entered.set()
        await self.release.wait()
        return await super().send_sms(to, body, status_callback=status_callback)


async def test_a_page_failing_while_its_incident_is_resolved_is_cancelled_not_retried(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_TOGETHER, at=T0)  # ani by SMS
    clock = Clock(T0)
    channel = GatedChannel(down={PEOPLE["ani"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        sending = asyncio.create_task(engine.send_due())
        await channel.entered.wait()  # ani's alert is 'sending', past the closing's reach
        await engine.close(incident, reason="resolved", actor="operator", note="selesai")
        channel.release.set()
        await sending
        clock.advance(120)
        await engine.send_due()
    states = {(p, c): s for p, c, s, _, _ in alert_rows(database, incident)}
    assert states[("ani", "sms")] == "cancelled"
    alert = [r for r in outbox(database, incident) if (r.person_id, r.purpose) == ("ani", "alert")]
    assert [r.attempts for r in alert] == [1]  # never sent again
    # Telling her it is resolved still matters: that notice keeps trying.
    notice = [r for r in outbox(database, incident) if r.purpose == "resolved"]
    assert {(r.person_id, r.state) for r in notice} == {("ani", "pending"), ("budi", "sent")}
    assert ("outbox.cancelled", "incident_closed", None) in timeline(database, incident)


async def test_a_permanent_refusal_still_fails_and_moves_an_unreachable_level_on(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = FlakyChannel(permanent={PEOPLE["ani"].phone, PEOPLE["budi"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        assert await engine.fire_due() == 1  # hastened: nobody at level 1 can be paged
    assert {s for _, _, s, _, _ in alert_rows(database, incident)} >= {"failed"}
    assert ("escalation.hastened", "level_undeliverable", None) in timeline(database, incident)


async def test_one_page_retrying_keeps_a_level_with_permanent_refusals_from_hastening(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = FlakyChannel(permanent={PEOPLE["ani"].phone}, down={PEOPLE["budi"].phone})
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        assert await engine.fire_due() == 0
    assert "escalation.hastened" not in set(events(database, incident))


async def test_pages_requeued_before_a_restart_are_sent_by_the_next_process(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, FlakyChannel(down=set(EVERYONE), error=EMFILE), clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
    clock.advance(5)
    healthy = RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, healthy, clock)
        assert await engine.send_due() == 4
    assert {s for _, _, s, _, _ in alert_rows(database, incident)} == {"sent"}


def health_rows(database: Path) -> list[tuple[str, str, float | None]]:
    return [(str(s), str(c), None if x is None else float(str(x))) for s, c, x in query(
        database, "SELECT subject, condition, cleared_at FROM device_health ORDER BY id")]


def ops_messages(database: Path) -> list[str]:
    return [str(body) for (body,) in query(
        database, "SELECT body FROM outbox WHERE purpose = 'ops' ORDER BY id")]


async def test_a_provider_outage_alerts_operations_once_and_its_end_once(
    database: Path,
) -> None:
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    channel = FlakyChannel(down=set(EVERYONE), error=EMFILE)
    with capture_logs() as logs:
        async with SqliteDispatchStore(database) as store:
            engine = dispatcher(store, channel, clock)
            await engine.plan_missing()
            await engine.fire_due()
            async with HealthMonitor(database, {}, list, HealthSettings(), ops=engine,
                                     clock=clock, autostart=False) as monitor:
                while clock.now < T0 + 130:  # two minutes of only transient failures
                    await engine.send_due()
                    await engine.fire_due()
                    await monitor.announce_external()
                    clock.now = next_due(database)
                assert health_rows(database) == [("provider:twilio", "provider_down", None)]
                assert len(ops_messages(database)) == 1  # one outage: one SMS, not per page
                channel.down.clear()
                channel.error = None
                await engine.send_due()
                await monitor.announce_external()
                await monitor.announce_external()
    outages = [e for e in logs if e["event"] == "provider.outage"]
    assert len(outages) == 1
    assert outages[0]["log_level"] == "error"
    assert outages[0]["failing_s"] >= 60.0
    assert [e["event"] for e in logs].count("provider.recovered") == 1
    assert [(s, c, x is not None) for s, c, x in health_rows(database)] == [
        ("provider:twilio", "provider_down", True)
    ]
    texts = ops_messages(database)
    assert len(texts) == 2
    assert "Twilio" in texts[0] and "gagal" in texts[0]
    assert texts[1].startswith("OPS panicd PULIH")
    assert "escalation.hastened" not in set(events(database, incident))


async def test_an_outage_raised_before_a_restart_is_cleared_by_the_next_process(
    database: Path,
) -> None:
    await open_incident(database, KODE_LADDER, at=T0)
    clock = Clock(T0)
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, FlakyChannel(down=set(EVERYONE), error=EMFILE), clock)
        await engine.plan_missing()
        await engine.fire_due()
        while not health_rows(database) and clock.now < T0 + 600:
            await engine.send_due()
            clock.now = next_due(database)
    assert health_rows(database)[0][2] is None
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, RecordingChannel(), clock)
        await engine.send_due()
    assert health_rows(database)[0][2] == clock.now

