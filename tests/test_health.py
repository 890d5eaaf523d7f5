"""Device health: the pure core (conditions, transitions, texts, the summary schedule) and
the HealthMonitor shell over a database written by the real ingest pipeline, with an
injected clock and a recording Ops behind the Protocol.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import structlog

from dispatch.health import (
    BATTERY_CLEAR_MARGIN,
    SESSION_ALARM_HOLD_S,
    Condition,
    DeviceView,
    Finding,
    HealthSettings,
    Key,
    SourceState,
    SourceWatch,
    Summary,
    alert_text,
    device_findings,
    evaluate,
    next_summary_at,
    recovery_text,
    source_findings,
    sources_settle_at,
    summary_due,
    summary_text,
    transitions,
)
from dispatch.health_monitor import HealthMonitor
from dispatch.messages import is_single_segment
from gateway.dedup import DedupPolicy
from gateway.ingest import Ingestor
from gateway.model import PressKind
from store.sqlite import SqliteStore
from store.sqlite_dispatch import SqliteDispatchStore
from tests.pipeline import Collector, Fleet, frame_bytes, make_fleet, rows
from tests.query_plans import traced, whole_reads

WIB = ZoneInfo("Asia/Jakarta")
# Wednesday 5 March 2025, 06:00 WIB.
T0 = datetime(2025, 3, 5, 6, 0, tzinfo=WIB).timestamp()
SETTINGS = HealthSettings()
HOUR = 3600.0


def _device(last_seen: float | None = T0, battery: int | None = 80) -> DeviceView:
    return DeviceView("BTN-1", 3600, last_seen, battery, label="Pos ronda RT 03")


# -- the pure core ---------------------------------------------------------------------


def test_a_device_is_offline_only_past_its_interval_times_the_grace_factor() -> None:
    device = _device()
    assert device_findings(device, SETTINGS, T0 + 1.5 * HOUR, baseline=T0) == []
    (finding,) = device_findings(device, SETTINGS, T0 + 1.5 * HOUR + 1, baseline=T0)
    assert (finding.subject, finding.condition) == ("device:BTN-1", Condition.OFFLINE)
    assert finding.detail["last_seen_at"] == T0


def test_a_device_its_network_reports_offline_is_offline_after_the_flap_threshold() -> None:
    # Heard a minute ago, so silence alone says nothing; the LWT says it dropped off.
    device = DeviceView("BTN-1", 3600, T0 - 60, 80, reported_offline_since=T0)
    assert device_findings(device, SETTINGS, T0 + SETTINGS.source_down_alert_s - 1,
                           baseline=T0) == []
    (finding,) = device_findings(device, SETTINGS, T0 + SETTINGS.source_down_alert_s,
                                 baseline=T0)
    assert finding.condition is Condition.OFFLINE
    assert finding.detail["reported_offline"] is True


def test_silence_while_panicd_was_down_counts_from_its_start_until_raised() -> None:
    old = _device(last_seen=T0 - 10 * HOUR)
    started = T0
    assert device_findings(old, SETTINGS, T0 + HOUR, baseline=started) == []
    assert device_findings(old, SETTINGS, T0 + 2 * HOUR, baseline=started) != []
    never = _device(last_seen=None)
    assert device_findings(never, SETTINGS, T0 + HOUR, baseline=started) == []
    (finding,) = device_findings(never, SETTINGS, T0 + 2 * HOUR, baseline=started)
    assert "belum pernah terdengar" in alert_text(finding)
    # Once raised, a restart (a later baseline) does not clear it without a real press.
    raised = {("device:BTN-1", Condition.OFFLINE)}
    assert device_findings(old, SETTINGS, T0 + 2 * HOUR, baseline=T0 + 2 * HOUR - 1,
                           raised=raised) != []


def test_low_battery_raises_at_the_threshold_and_clears_above_it_plus_a_margin() -> None:
    at = T0 + 60
    assert device_findings(_device(battery=21), SETTINGS, at, baseline=T0) == []
    (low,) = device_findings(_device(battery=20), SETTINGS, at, baseline=T0)
    assert low.condition is Condition.LOW_BATTERY
    raised = {low.key}
    still = device_findings(_device(battery=20 + BATTERY_CLEAR_MARGIN), SETTINGS, at,
                            baseline=T0, raised=raised)
    assert [f.condition for f in still] == [Condition.LOW_BATTERY]
    assert device_findings(_device(battery=21 + BATTERY_CLEAR_MARGIN), SETTINGS, at,
                           baseline=T0, raised=raised) == []
    custom = HealthSettings(low_battery_percent=35)
    assert device_findings(_device(battery=30), custom, at, baseline=T0) != []


def test_a_source_is_down_only_after_the_threshold() -> None:
    down = SourceState("lora-1", "serial", connected=False, since=T0)
    assert source_findings(down, SETTINGS, T0 + 59) == []
    (finding,) = source_findings(down, SETTINGS, T0 + 60)
    assert finding.key == ("source:lora-1", Condition.SOURCE_DOWN)
    assert "penerima LoRa lora-1 terputus sejak 06:00 WIB" in alert_text(finding)
    up = SourceState("lora-1", "serial", connected=True, since=T0)
    assert source_findings(up, SETTINGS, T0 + 3600) == []


def test_sources_are_counted_at_once_when_up_and_after_the_start_up_grace_when_not() -> None:
    up = SourceState("local", "mqtt", connected=True, since=T0)
    down = SourceState("lora-1", "serial", connected=False, since=T0)
    assert sources_settle_at([up], SETTINGS, baseline=T0) == T0
    assert sources_settle_at([], SETTINGS, baseline=T0) == T0
    assert sources_settle_at([up, down], SETTINGS, baseline=T0) == T0 + 60
    custom = HealthSettings(source_down_alert_s=5)
    assert sources_settle_at([down], custom, baseline=T0) == T0 + 5


def test_a_session_alarm_is_alerted_and_clears_after_a_quiet_hold() -> None:
    up = SourceState("city", "mqtt", connected=True, since=T0)
    assert source_findings(up, SETTINGS, T0 + 10) == []
    lost = SourceState("city", "mqtt", True, T0, alarm="session_lost", alarm_at=T0 + 5)
    (finding,) = source_findings(lost, SETTINGS, T0 + 10)
    assert finding.key == ("source:city", Condition.SESSION_ALARM)
    assert "sesi MQTT city hilang" in alert_text(finding)
    taken = SourceState("city", "mqtt", True, T0, alarm="taken_over", alarm_at=T0 + 5)
    (finding,) = source_findings(taken, SETTINGS, T0 + 10)
    assert "direbut klien lain (06:00 WIB)" in alert_text(finding)
    assert source_findings(taken, SETTINGS, T0 + 5 + SESSION_ALARM_HOLD_S) == []


def test_source_watch_keeps_the_time_of_the_last_change() -> None:
    watch = SourceWatch()
    assert watch.observe("broker", "mqtt", True, T0).since == T0
    assert watch.observe("broker", "mqtt", True, T0 + 5).since == T0
    assert watch.observe("broker", "mqtt", False, T0 + 9) == SourceState("broker", "mqtt",
                                                                          False, T0 + 9)
    assert watch.observe("broker", "mqtt", False, T0 + 99).since == T0 + 9


def test_transitions_raise_new_conditions_and_clear_vanished_ones() -> None:
    current = evaluate([_device(last_seen=T0 - 9 * HOUR, battery=10)], [], SETTINGS, T0,
                       baseline=T0 - 9 * HOUR)
    assert set(current) == {("device:BTN-1", Condition.OFFLINE),
                            ("device:BTN-1", Condition.LOW_BATTERY)}
    change = transitions({("device:BTN-1", Condition.OFFLINE),
                          ("source:x", Condition.SOURCE_DOWN)}, current)
    assert [f.condition for f in change.raise_] == [Condition.LOW_BATTERY]
    assert change.clear == (("source:x", Condition.SOURCE_DOWN),)


@pytest.mark.parametrize("shift", range(1, 9))
def test_a_long_label_is_shortened_at_a_word_boundary(shift: int) -> None:
    label = "x" * shift + " Pos kamling di ujung gang dekat masjid Al-Ikhlas sebelah" * 3
    device = DeviceView("BTN-1", 3600, T0, 5, label=label)
    (low,) = device_findings(device, SETTINGS, T0, baseline=T0)
    text = alert_text(low)
    shown = text.split(" (", 1)[1].split(") lemah", 1)[0]
    assert shown.endswith("..")
    assert label.startswith(shown.removesuffix("..") + " ")
    assert is_single_segment(text)


def test_every_text_is_one_gsm7_segment_even_with_a_long_label() -> None:
    label = "Pos kamling di ujung gang dekat masjid Al-Ikhlas, sebelah warung Bu Sri " * 3
    device = DeviceView("BTN-" + "9" * 40, 86_400, T0, 5, label=label)
    texts = [alert_text(f) for f in device_findings(device, SETTINGS, T0 + 9 * 86_400,
                                                    baseline=T0)]
    texts.append(alert_text(Finding("source:broker-utama", Condition.SOURCE_DOWN, T0,
                                    {"source": "broker-utama", "kind": "mqtt"})))
    texts += [alert_text(Finding("source:broker-utama", Condition.SESSION_ALARM, T0,
                                 {"source": "broker-utama", "alarm": alarm, "at": T0}))
              for alarm in ("session_lost", "taken_over")]
    texts += [recovery_text(("device:BTN-1", c), T0 + 600, raised_at=T0, battery=88)
              for c in Condition]
    texts.append(summary_text(Summary(date(2025, 3, 5), 12_000, 1_500, 900, 3, 4, 120, 4000)))
    assert len(texts) == 6 + len(Condition)
    for text in texts:
        assert is_single_segment(text), text
    assert texts[0].startswith("OPS panicd: tombol BTN-")
    assert ".. tidak terdengar" not in texts[0]
    assert ".) tidak terdengar" in texts[0]


def test_the_summary_is_due_once_per_local_day_at_its_time() -> None:
    at = time(7, 0)
    six = T0
    assert summary_due(six, at, None) is None
    assert next_summary_at(six, at) == T0 + HOUR
    seven = T0 + HOUR
    assert summary_due(seven, at, None) == date(2025, 3, 5)
    assert summary_due(seven + 600, at, date(2025, 3, 5)) is None
    assert next_summary_at(seven, at) == seven + 86_400
    assert summary_due(seven + 86_400, at, date(2025, 3, 5)) == date(2025, 3, 6)


# -- the monitor over a real database ----------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingOps:
    """The Ops Protocol: remembers every operations SMS, idempotent by key like send_ops."""

    sent: dict[str, str] = field(default_factory=dict)
    queued: asyncio.Event = field(default_factory=asyncio.Event)

    async def send_ops(self, key: str, body: str) -> int:
        """Record once per key."""
        if key in self.sent:
            return 0
        self.sent[key] = body
        self.queued.set()
        return 1


@dataclass
class World:
    """A fleet, its pipeline, the monitor and its fakes."""

    fleet: Fleet
    pipe: Collector
    monitor: HealthMonitor
    ops: RecordingOps
    clock: Clock
    sources: dict[str, bool]
    counter: int = 0

    async def heartbeat(self, index: int, battery: int | None = 90) -> None:
        """A signed heartbeat from device ``index`` at the clock's now."""
        self.counter += 1
        device = self.fleet.devices[index]
        payload = frame_bytes(device, self.counter, PressKind.HEARTBEAT, battery=battery)
        await self.pipe.send(self.pipe.item(payload, at=self.clock.now))

    def texts(self) -> list[str]:
        """The operations texts in the order they were queued."""
        return list(self.ops.sent.values())


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Two devices (heartbeat every hour), one MQTT source, the monitor at 06:00 WIB."""
    fleet = make_fleet(tmp_path / "cfg", devices=2)
    clock = Clock(T0)
    ops = RecordingOps()
    sources = {"local": True}
    with structlog.testing.capture_logs():
        async with (
            SqliteStore(fleet.database) as store,
            Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor,
            HealthMonitor(fleet.database, fleet.config.devices,
                          lambda: [(n, "mqtt", up) for n, up in sources.items()],
                          SETTINGS, ops=ops, clock=clock, autostart=False) as monitor,
        ):
            world = World(fleet, Collector(ingestor), monitor, ops, clock, sources)
            for index in range(2):
                await world.heartbeat(index)
            yield world


def _health_rows(world: World) -> list[tuple[object, ...]]:
    return rows(world.fleet.database,
                "SELECT subject, condition, cleared_at IS NULL FROM device_health ORDER BY id")


async def test_an_offline_device_is_alerted_once_and_its_recovery_announced(
    world: World,
) -> None:
    await world.monitor.check()
    assert world.ops.sent == {}
    world.clock.now = T0 + 1.2 * HOUR
    await world.heartbeat(1)  # only the second button keeps talking
    world.clock.now = T0 + 1.6 * HOUR
    raised, cleared = await world.monitor.check()
    assert [(f.subject, f.condition) for f in raised] == [("device:SIM-00000",
                                                           Condition.OFFLINE)]
    assert cleared == []
    world.clock.now = T0 + 1.7 * HOUR
    assert await world.monitor.check() == ([], [])
    (alert,) = world.texts()
    assert alert.startswith("OPS panicd: tombol SIM-00000 (RT 01) tidak terdengar sejak 05/03")
    assert _health_rows(world) == [("device:SIM-00000", "offline", 1)]

    await world.heartbeat(0)
    raised, cleared = await world.monitor.check()
    assert (raised, cleared) == ([], [("device:SIM-00000", Condition.OFFLINE)])
    assert world.texts()[1] == "OPS panicd PULIH: tombol SIM-00000 terdengar lagi 07:42 WIB."
    assert _health_rows(world) == [("device:SIM-00000", "offline", 0)]
    assert await world.monitor.check() == ([], [])
    assert len(world.ops.sent) == 2


async def test_a_low_battery_is_alerted_once_and_cleared_by_a_new_battery(
    world: World,
) -> None:
    await world.heartbeat(0, battery=15)
    await world.monitor.check()
    await world.heartbeat(0, battery=14)
    await world.monitor.check()
    (alert,) = world.texts()
    assert alert == "OPS panicd: baterai tombol SIM-00000 (RT 01) lemah 15%. Mohon ganti baterai."
    await world.heartbeat(0, battery=None)  # a frame without a level keeps the stored one
    await world.monitor.check()
    assert len(world.texts()) == 1
    await world.heartbeat(0, battery=100)
    await world.monitor.check()
    assert world.texts()[1] == "OPS panicd PULIH: baterai tombol SIM-00000 sudah normal 100%."


async def test_a_source_down_beyond_the_threshold_is_alerted_and_its_return_announced(
    world: World,
) -> None:
    world.clock.now = T0 + 10
    world.sources["local"] = False
    await world.monitor.check()
    world.clock.now = T0 + 69
    await world.monitor.check()
    assert world.texts() == []
    world.clock.now = T0 + 70
    await world.monitor.check()
    (alert,) = world.texts()
    assert alert.startswith("OPS panicd: broker MQTT local terputus sejak 06:00 WIB.")
    world.clock.now = T0 + 200
    world.sources["local"] = True
    await world.monitor.check()
    assert world.texts()[1] == "OPS panicd PULIH: local tersambung lagi 06:03 WIB (alarm 2 mnt)."
    assert [s.connected for s in world.monitor.source_states()] == [True]


async def test_the_daily_summary_is_sent_once_per_day_at_its_time(world: World) -> None:
    assert await world.monitor.maybe_summary() is None
    world.clock.now = T0 + HOUR
    assert await world.monitor.maybe_summary() == date(2025, 3, 5)
    world.clock.now = T0 + 2 * HOUR
    assert await world.monitor.maybe_summary() is None
    world.clock.now = T0 + 25 * HOUR
    await world.monitor.check()  # both buttons silent for a day now
    assert await world.monitor.maybe_summary() == date(2025, 3, 6)
    summaries = {k: v for k, v in world.ops.sent.items() if k.startswith("health-summary:")}
    assert list(summaries) == ["health-summary:2025-03-05", "health-summary:2025-03-06"]
    assert summaries["health-summary:2025-03-05"] == (
        "OPS panicd 05/03: 2 tombol, 0 offline, 0 baterai lemah; sumber 1/1 aktif;"
        " 0 kejadian terbuka, 0 kejadian 24 jam."
    )
    assert "2 tombol, 2 offline" in summaries["health-summary:2025-03-06"]


async def _started_at_seven(tmp_path: Path, sources: dict[str, bool],
                            clock: Clock, ops: RecordingOps) -> HealthMonitor:
    fleet = make_fleet(tmp_path / "cfg", devices=1)
    return HealthMonitor(fleet.database, fleet.config.devices,
                         lambda: [(n, "mqtt", up) for n, up in sources.items()],
                         SETTINGS, ops=ops, clock=clock, autostart=False)


async def test_a_summary_due_at_start_waits_for_the_sources_to_connect(
    tmp_path: Path,
) -> None:
    # panicd starts after 07:00: the day's summary is due before MQTT has connected.
    clock, ops, sources = Clock(T0 + HOUR + 1), RecordingOps(), {"local": False}
    async with await _started_at_seven(tmp_path, sources, clock, ops) as monitor:
        assert await monitor.maybe_summary() is None
        clock.now += 0.5
        sources["local"] = True
        assert await monitor.maybe_summary() == date(2025, 3, 5)
        assert await monitor.check() == ([], [])
    (summary,) = ops.sent.values()
    assert "sumber 1/1 aktif" in summary


async def test_a_source_still_down_after_the_start_up_grace_is_counted_and_alerted(
    tmp_path: Path,
) -> None:
    clock, ops, sources = Clock(T0 + HOUR + 1), RecordingOps(), {"local": False}
    async with await _started_at_seven(tmp_path, sources, clock, ops) as monitor:
        clock.now += SETTINGS.source_down_alert_s - 1
        assert await monitor.maybe_summary() is None
        assert await monitor.check() == ([], [])
        clock.now += 1
        assert await monitor.maybe_summary() == date(2025, 3, 5)
        raised, _ = await monitor.check()
    assert [f.key for f in raised] == [("source:local", Condition.SOURCE_DOWN)]
    summary, alert = ops.sent.values()
    assert "sumber 0/1 aktif" in summary
    assert alert.startswith("OPS panicd: broker MQTT local terputus")


async def test_the_monitor_task_sends_a_held_summary_when_the_grace_ends(
    tmp_path: Path,
) -> None:
    # The real clock: a summary due at any hour, a down source, a short grace. Without
    # a wake-up at the grace's end the task would sleep check_every_s (an hour) first.
    fleet = make_fleet(tmp_path / "cfg", devices=1)
    ops = RecordingOps()
    settings = HealthSettings(source_down_alert_s=0.2, daily_summary_at=time(0, 0),
                              check_every_s=3600)
    with structlog.testing.capture_logs():
        async with HealthMonitor(fleet.database, fleet.config.devices,
                                 lambda: [("local", "mqtt", False)], settings, ops=ops):
            async with asyncio.timeout(5):
                while not any(k.startswith("health-summary:") for k in ops.sent):
                    ops.queued.clear()
                    await ops.queued.wait()
    summary = next(v for k, v in ops.sent.items() if k.startswith("health-summary:"))
    assert "sumber 0/1 aktif" in summary


async def test_an_alert_recorded_but_never_queued_is_sent_after_a_restart(
    world: World, tmp_path: Path,
) -> None:
    world.clock.now = T0 + 2 * HOUR
    silent = RecordingOps()
    # A crash right after the transition was committed: nothing reached the outbox.
    world.monitor._ops = None
    await world.monitor.check()
    assert len(_health_rows(world)) == 2
    async with HealthMonitor(world.fleet.database, world.fleet.config.devices, list,
                             SETTINGS, ops=silent, clock=world.clock,
                             autostart=False) as restarted:
        assert await restarted.heal() == 2
    assert sorted(silent.sent) == ["health:1", "health:2"]
    assert all("tidak terdengar" in text for text in silent.sent.values())


async def test_the_monitor_task_checks_on_start(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path / "cfg", devices=1)
    ops = RecordingOps()
    clock = Clock(T0)
    with structlog.testing.capture_logs() as logs:
        async with HealthMonitor(fleet.database, fleet.config.devices,
                                 lambda: [("local", "mqtt", False)],
                                 HealthSettings(source_down_alert_s=0), ops=ops,
                                 clock=clock):
            tasks = {t.get_name() for t in asyncio.all_tasks()}
            assert "health.monitor" in tasks
            async with asyncio.timeout(5):
                await ops.queued.wait()
    assert next(iter(ops.sent.values())).startswith("OPS panicd: broker MQTT local terputus")
    assert any(e["event"] == "health.raised" for e in logs)


class _TookOver:
    """A leader that took the lead from a cluster watching since ``since``."""

    def __init__(self, since: float | None) -> None:
        self.since = since

    def leading(self) -> bool:
        return True

    def watching_since(self) -> float | None:
        return self.since


@pytest.mark.parametrize(("watching_since", "alerted"), [
    (T0 - HOUR, True),  # a peer had watched since before the button went quiet
    (None, False),      # nobody watched before this process: the grace starts now
])
async def test_a_takeover_does_not_restart_the_offline_grace(
    tmp_path: Path, watching_since: float | None, alerted: bool,
) -> None:
    # The button was last heard at T0; 2 h later (its interval is 1 h) the leader dies
    # and a freshly started instance takes over. Before, the new leader counted the
    # silence from its own start and said nothing for another 1.5 h.
    fleet = make_fleet(tmp_path / "cfg", devices=1)
    ops = RecordingOps()
    clock = Clock(T0)
    with structlog.testing.capture_logs():
        async with (SqliteStore(fleet.database) as store,
                    Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor):
            pipe = Collector(ingestor)
            await pipe.send(pipe.item(frame_bytes(fleet.devices[0], 1, PressKind.HEARTBEAT),
                                      at=T0))
        clock.now = T0 + 2 * HOUR
        async with HealthMonitor(fleet.database, fleet.config.devices,
                                 lambda: [("local", "mqtt", True)], SETTINGS, ops=ops,
                                 clock=clock, leader=_TookOver(watching_since)) as monitor:
            deadline = asyncio.get_running_loop().time() + (5.0 if alerted else 0.5)
            offline: list[Key] = []
            while not offline and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
                offline = [key for key in monitor.active if key[1] == Condition.OFFLINE]
    assert offline == ([(f"device:{fleet.devices[0].id}", Condition.OFFLINE)] if alerted
                       else [])
    texts = [body for key, body in ops.sent.items() if "summary" not in key]
    assert len(texts) == (1 if alerted else 0)


async def test_a_sources_session_alarm_reaches_operations_once(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path / "cfg", devices=1)
    ops = RecordingOps()
    clock = Clock(T0)
    alarms = {"local": ("taken_over", T0)}
    async with HealthMonitor(fleet.database, fleet.config.devices,
                             lambda: [("local", "mqtt", True)], SETTINGS, ops=ops,
                             clock=clock, autostart=False,
                             source_alarms=lambda: alarms) as monitor:
        raised, _ = await monitor.check()
        assert [f.key for f in raised] == [("source:local", Condition.SESSION_ALARM)]
        alarms["local"] = ("taken_over", T0 + 60)  # the fight goes on: no second alert
        clock.now = T0 + 90
        assert await monitor.check() == ([], [])
        clock.now = T0 + 60 + SESSION_ALARM_HOLD_S
        _, cleared = await monitor.check()
    assert cleared == [("source:local", Condition.SESSION_ALARM)]
    first, recovery = ops.sent.values()
    assert first.startswith("OPS panicd: sesi MQTT local direbut klien lain")
    assert recovery.startswith("OPS panicd PULIH: sesi MQTT local")


def _record_conditions(world: World, ids: list[int], outbox_keys: list[str]) -> None:
    """Raised offline rows with these ids, and operations messages with these keys."""
    with closing(sqlite3.connect(world.fleet.database)) as db:
        db.executemany(
            "INSERT INTO device_health (id, subject, condition, raised_at, detail)"
            " VALUES (?, ?, 'offline', ?, ?)",
            [(i, f"device:BTN-{i}", world.clock.now, json.dumps({"device": f"BTN-{i}"}))
             for i in ids],
        )
        db.executemany(
            "INSERT INTO outbox (key, person_id, phone, channel, purpose, body, state,"
            " created_at, due_at, updated_at) VALUES (?, 'dewi', '+62', 'sms', 'ops', 'b',"
            " 'delivered', 1, 1, 1)",
            [(key,) for key in outbox_keys],
        )
        db.commit()


async def test_healing_counts_only_the_outbox_keys_of_each_condition(world: World) -> None:
    # The key of condition 12 must not pass for condition 1 (a prefix without its ':'),
    # nor the recovery key of condition 2 for anything else.
    _record_conditions(world, [1, 2, 12], ["ops:health:12:dewi", "ops:health:2:cleared:dewi"])
    ops = RecordingOps()
    async with HealthMonitor(world.fleet.database, world.fleet.config.devices, list,
                             SETTINGS, ops=ops, clock=world.clock,
                             autostart=False) as restarted:
        assert await restarted.heal() == 1
    assert list(ops.sent) == ["health:1"]


async def test_healing_searches_the_outbox_keys_instead_of_walking_them(
    world: World,
) -> None:
    # heal runs each time the monitor starts, before its first check; walking every
    # outbox key per recent condition took 1.1 s on 100,000 messages (audit).
    _record_conditions(world, [1], [])
    restarted = HealthMonitor(world.fleet.database, world.fleet.config.devices, list,
                              SETTINGS, ops=RecordingOps(), clock=world.clock,
                              autostart=False)
    store = restarted._store
    assert isinstance(store, SqliteDispatchStore)
    async with restarted, traced(store.db) as statements:
        await restarted.heal()
    (select,) = [sql for sql in statements if "FROM device_health" in sql]
    with closing(sqlite3.connect(world.fleet.database)) as db:
        assert whole_reads(db, select) == []
