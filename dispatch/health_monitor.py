"""The device-health shell: every ``check_every_s`` it reads device and source states,
asks :mod:`dispatch.health` what changed, records each raise and clear in
``device_health`` and queues the operations SMS through :meth:`Dispatcher.send_ops`.

A condition is alerted once: its row stays raised (``cleared_at IS NULL``) until it
clears, and the SMS keys name the row, so a repeated send is a no-op. A crash between
recording a transition and queueing its SMS is healed at start (:meth:`heal`).

Conditions raised elsewhere (the provider's outage, raised and cleared by the outbox,
which sees every send) are only announced here (:meth:`announce_external`): the same
rows, the same keys, the same once-per-outage SMS and recovery SMS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import structlog

from dispatch.health import (
    EXTERNAL_CONDITIONS,
    Condition,
    DeviceView,
    Finding,
    HealthSettings,
    Key,
    SourceState,
    SourceWatch,
    Summary,
    alert_text,
    evaluate,
    next_summary_at,
    recovery_text,
    sources_settle_at,
    summary_due,
    summary_text,
    transitions,
)
from gateway.model import Device
from store.dispatch import DispatchStore
from store.sqlite import Writers

log = structlog.get_logger("panicd.health")

SourceProbe = Callable[[], Iterable[tuple[str, str, bool]]]
# device id -> since when its network reports it offline (absent: online or unknown).
AvailabilityProbe = Callable[[], Mapping[str, float]]
# source name -> its latest session alarm (reason, when); absent: none.
AlarmProbe = Callable[[], Mapping[str, tuple[str, float]]]


class Ops(Protocol):
    """Where operations messages go (the Dispatcher)."""

    async def send_ops(self, key: str, body: str) -> int:
        """Queue an operations SMS, idempotent by ``key``; returns how many rows."""
        ...


class HealthMonitor:
    """Owns the ``health.monitor`` task; an async context manager."""

    def __init__(
        self,
        database: Path,
        devices: Mapping[str, Device],
        sources: SourceProbe,
        settings: HealthSettings,
        *,
        ops: Ops | None,
        clock: Callable[[], float] = time.time,
        autostart: bool = True,
        writers: Writers | None = None,
        reported_offline: AvailabilityProbe | None = None,
        source_alarms: AlarmProbe | None = None,
    ) -> None:
        self._reported_offline = reported_offline
        self._source_alarms = source_alarms
        self._autostart = autostart  # False: the caller drives check() itself (tests)
        self._store = DispatchStore(database, writers=writers)
        self._devices = devices
        self._probe = sources
        self._settings = settings
        self._ops = ops
        self._clock = clock
        self._watch = SourceWatch()
        self._baseline = clock()
        self._summary_sent: date | None = None
        self._summary_held_until: float | None = None  # a due summary waits for sources
        self._announced: set[str] = set()  # ops keys of external conditions queued
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self.active: dict[Key, Finding] = {}

    async def __aenter__(self) -> Self:
        await self._store.__aenter__()
        self._baseline = self._clock()
        self.source_states()
        if self._autostart:
            self._group = asyncio.TaskGroup()
            await self._group.__aenter__()
            self._task = self._group.create_task(self._run(), name="health.monitor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._group is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._group.__aexit__(exc_type, exc, tb)
        await self._store.__aexit__(exc_type, exc, tb)

    def source_states(self) -> list[SourceState]:
        """Every source with since when it has been up or down."""
        now = self._clock()
        states = [self._watch.observe(name, kind, up, now) for name, kind, up in self._probe()]
        alarms = self._source_alarms() if self._source_alarms else {}
        return [replace(s, alarm=alarms[s.name][0], alarm_at=alarms[s.name][1])
                if s.name in alarms else s for s in states]

    async def _run(self) -> None:
        await self._guarded("heal", self.heal)
        while True:
            await self._guarded("check", self.check)
            await self._guarded("external", self.announce_external)
            await self._guarded("summary", self.maybe_summary)
            now = self._clock()
            due = min(now + self._settings.check_every_s,
                      next_summary_at(now, self._settings.daily_summary_at))
            settle = self._summary_held_until
            if settle is not None and settle > now:  # the held summary goes out on time
                due = min(due, settle)
            await asyncio.sleep(max(0.0, due - self._clock()))

    async def _guarded(self, step: str, body: Callable[[], Awaitable[object]]) -> None:
        try:
            await body()
        except Exception as exc:  # noqa: BLE001 -- health must outlive a transient DB error
            log.error("health.check_failed", step=step, error=repr(exc))  # noqa: TRY400

    async def _raised(self) -> dict[Key, tuple[int, float]]:
        rows = await self._store.db.execute_fetchall(
            "SELECT id, subject, condition, raised_at FROM device_health WHERE cleared_at IS NULL"
        )
        return {(r[1], Condition(r[2])): (int(r[0]), float(r[3])) for r in rows}

    async def _device_views(self) -> list[DeviceView]:
        rows = await self._store.db.execute_fetchall(
            "SELECT id, last_seen_at, battery FROM devices"
        )
        seen = {r[0]: (r[1], r[2]) for r in rows}
        offline = self._reported_offline() if self._reported_offline else {}
        return [
            DeviceView(d.id, d.heartbeat_interval_s, *seen.get(d.id, (None, None)),
                       label=d.landmark or d.address, reported_offline_since=offline.get(d.id))
            for d in self._devices.values()
        ]

    async def check(self) -> tuple[list[Finding], list[Key]]:
        """One evaluation: record what was raised or cleared and tell operations."""
        now = self._clock()
        raised = {key: row for key, row in (await self._raised()).items()
                  if key[1] not in EXTERNAL_CONDITIONS}
        views = await self._device_views()
        current = evaluate(views, self.source_states(), self._settings, now,
                           baseline=self._baseline, raised=set(raised))
        change = transitions(set(raised), current)
        known = {f"device:{d}" for d in self._devices} | {
            f"source:{s.name}" for s in self.source_states()
        }
        new_ids: list[tuple[int, Finding]] = []
        cleared: list[tuple[int, Key, float]] = []
        async with self._store.transaction() as db:
            for finding in change.raise_:
                cursor = await db.execute(
                    "INSERT INTO device_health (subject, condition, raised_at, detail)"
                    " VALUES (?, ?, ?, ?)",
                    (finding.subject, finding.condition.value, now,
                     json.dumps(dict(finding.detail), sort_keys=True)),
                )
                assert cursor.lastrowid is not None
                new_ids.append((cursor.lastrowid, finding))
            for key in change.clear:
                row_id, raised_at = raised[key]
                await db.execute(
                    "UPDATE device_health SET cleared_at = ? WHERE id = ?", (now, row_id)
                )
                if key[0] in known:  # a device removed from the registry recovers silently
                    cleared.append((row_id, key, raised_at))
        self.active = current
        batteries = {v.id: v.battery for v in views}
        for row_id, finding in new_ids:
            log.warning("health.raised", subject=finding.subject,
                        condition=finding.condition.value, health_id=row_id)
            await self._send(f"health:{row_id}", alert_text(finding))
        for row_id, key, raised_at in cleared:
            log.info("health.cleared", subject=key[0], condition=key[1].value, health_id=row_id)
            battery = batteries.get(key[0].split(":", 1)[1])
            await self._send(f"health:{row_id}:cleared",
                             recovery_text(key, now, raised_at=raised_at, battery=battery))
        return [f for _, f in new_ids], [k for _, k, _ in cleared]

    async def _send(self, key: str, body: str) -> None:
        if self._ops is None:
            log.info("health.ops_not_configured", key=key)
            return
        await self._ops.send_ops(key, body)

    async def announce_external(self) -> int:
        """Queue the SMS of conditions other components raised or cleared (the provider's
        outage); each row's alert and recovery once. Returns how many were queued."""
        marks = ",".join("?" * len(EXTERNAL_CONDITIONS))
        rows = await self._store.db.execute_fetchall(
            "SELECT id, subject, condition, raised_at, cleared_at, detail"  # noqa: S608
            f" FROM device_health WHERE condition IN ({marks}) AND raised_at > ?",  # marks only
            (*sorted(EXTERNAL_CONDITIONS), self._clock() - 86400.0),
        )
        queued = 0
        for row_id, subject, condition, raised_at, cleared_at, detail in rows:
            key = f"health:{row_id}"
            if key not in self._announced:
                finding = Finding(subject, Condition(condition), raised_at,
                                  json.loads(detail or "{}"))
                log.warning("health.raised", subject=subject, condition=condition,
                            health_id=row_id)
                await self._send(key, alert_text(finding))
                self._announced.add(key)
                queued += 1
            if cleared_at is not None and f"{key}:cleared" not in self._announced:
                log.info("health.cleared", subject=subject, condition=condition,
                         health_id=row_id)
                await self._send(f"{key}:cleared", recovery_text(
                    (subject, Condition(condition)), cleared_at, raised_at=raised_at))
                self._announced.add(f"{key}:cleared")
                queued += 1
        return queued

    async def heal(self) -> int:
        """Queue the SMS of transitions recorded just before a crash; returns how many."""
        # The keys 'ops:health:<id>:...' (send_ops) as a range on the key's index, ';'
        # being the character after ':'. SQLite uses an index for LIKE only with a
        # constant pattern on a NOCASE column (sqlite.org/optoverview.html, "The LIKE
        # optimization"), so LIKE walked every key per health row: 1.1 s -> 0.08 ms on
        # 100,000 messages (query-plan audit). LIKE also ignored case; send_ops builds
        # every key lowercase, so the range admits the same rows.
        rows = await self._store.db.execute_fetchall(
            "SELECT h.id, h.subject, h.condition, h.raised_at, h.cleared_at, h.detail"
            " FROM device_health h WHERE h.raised_at > ? AND NOT EXISTS (SELECT 1 FROM outbox o"
            " WHERE o.key >= 'ops:health:' || h.id || ':'"
            " AND o.key < 'ops:health:' || h.id || ';')",
            (self._clock() - 86400.0,),
        )
        healed = 0
        for row_id, subject, condition, raised_at, cleared_at, detail in rows:
            if cleared_at is None:
                finding = Finding(subject, Condition(condition), None, json.loads(detail or "{}"))
                if finding.condition is Condition.SOURCE_DOWN:
                    finding = Finding(subject, finding.condition, raised_at, finding.detail)
                await self._send(f"health:{row_id}", alert_text(finding))
                healed += 1
        return healed

    async def maybe_summary(self) -> date | None:
        """Queue today's summary once it is due (once per local day) and the sources have
        had their start-up grace to connect; returns its day."""
        now = self._clock()
        day = summary_due(now, self._settings.daily_summary_at, self._summary_sent)
        if day is None:
            return None
        sources = self.source_states()
        settle = sources_settle_at(sources, self._settings, baseline=self._baseline)
        if now < settle:
            # Just started: the sources have not had their chance to connect yet.
            self._summary_held_until = settle
            return None
        self._summary_held_until = None
        rows = list(await self._store.db.execute_fetchall(
            "SELECT (SELECT COUNT(*) FROM incidents WHERE status IN ('open', 'acknowledged')),"
            " (SELECT COUNT(*) FROM incidents WHERE opened_at >= ? AND test = 0)",
            (now - 86400.0,),
        ))
        open_incidents, last_day = rows[0]
        conditions = [key[1] for key in self.active]
        summary = Summary(
            day=day,
            devices=len(self._devices),
            offline=conditions.count(Condition.OFFLINE),
            low_battery=conditions.count(Condition.LOW_BATTERY),
            sources_up=sum(1 for s in sources if s.connected),
            sources=len(sources),
            open_incidents=int(open_incidents),
            incidents_24h=int(last_day),
        )
        await self._send(f"health-summary:{day.isoformat()}", summary_text(summary))
        self._summary_sent = day
        log.info("health.summary_queued", day=day.isoformat(), offline=summary.offline,
                 low_battery=summary.low_battery, open_incidents=summary.open_incidents)
        return day

    async def counts(self) -> tuple[int, int]:
        """Open (or acknowledged) incidents and pending escalation steps, for STATUS=."""
        rows = list(await self._store.db.execute_fetchall(
            "SELECT (SELECT COUNT(*) FROM incidents WHERE status IN ('open', 'acknowledged')),"
            " (SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending')"
        ))
        return int(rows[0][0]), int(rows[0][1])
