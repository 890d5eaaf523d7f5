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
from store.dispatch import DispatchStore, HealthRaise
from store.leader import Leader, SoleLeader
from store.sqlite import Writers
from store.sqlite_dispatch import SqliteDispatchStore

log = structlog.get_logger("panicd.health")

# How often an instance that does not lead looks again whether it does (a peer died).
NOT_LEADING_RECHECK_S = 1.0

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
        database: Path | DispatchStore,
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
        leader: Leader | None = None,
    ) -> None:
        # Several instances on one store: only the leader checks (store/leader.py).
        self._leader: Leader = leader or SoleLeader()
        self._led = False
        self._reported_offline = reported_offline
        self._source_alarms = source_alarms
        self._autostart = autostart  # False: the caller drives check() itself (tests)
        # A store of its own (unopened; entered here), or a SQLite file's path (tests).
        self._store: DispatchStore = (
            SqliteDispatchStore(database, writers=writers) if isinstance(database, Path)
            else database)
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
        while True:
            self.source_states()  # every instance watches its own sources' uptime
            if self._leader.leading():
                if not self._led:
                    # Leading from now on (at start, or a peer died): first queue what
                    # the previous leader recorded but may not have sent.
                    self._led = True
                    # Silence is the device's since the cluster has watched, not since
                    # this instance started: a takeover does not restart the grace.
                    since = self._leader.watching_since()
                    if since is not None:
                        self._baseline = min(self._baseline, since)
                    await self._guarded("heal", self.heal)
                await self._guarded("check", self.check)
                await self._guarded("external", self.announce_external)
                await self._guarded("summary", self.maybe_summary)
            else:
                self._led = False
                await asyncio.sleep(NOT_LEADING_RECHECK_S)  # a peer leads: ask again soon
                continue
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
        return {(r.subject, Condition(r.condition)): (r.id, r.raised_at)
                for r in await self._store.raised_health()}

    async def _device_views(self) -> list[DeviceView]:
        seen = await self._store.device_sightings()
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
        ids = await self._store.record_health(
            [HealthRaise(f.subject, f.condition.value, f.detail) for f in change.raise_],
            [raised[key][0] for key in change.clear], now,
        )
        new_ids = list(zip(ids, change.raise_, strict=True))
        # A device removed from the registry recovers silently.
        cleared = [(raised[key][0], key, raised[key][1]) for key in change.clear
                   if key[0] in known]
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
        rows = await self._store.health_since(sorted(EXTERNAL_CONDITIONS),
                                              self._clock() - 86400.0)
        queued = 0
        for row in rows:
            row_id, subject, condition, raised_at, cleared_at = (
                row.id, row.subject, row.condition, row.raised_at, row.cleared_at)
            key = f"health:{row_id}"
            if key not in self._announced:
                finding = Finding(subject, Condition(condition), raised_at, row.detail)
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
        rows = await self._store.unannounced_health(self._clock() - 86400.0)
        healed = 0
        for row in rows:
            if row.cleared_at is None:
                finding = Finding(row.subject, Condition(row.condition), None, row.detail)
                if finding.condition is Condition.SOURCE_DOWN:
                    finding = Finding(row.subject, finding.condition, row.raised_at,
                                      finding.detail)
                await self._send(f"health:{row.id}", alert_text(finding))
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
        open_incidents, last_day = await self._store.summary_counts(now - 86400.0)
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
        return await self._store.open_counts()
