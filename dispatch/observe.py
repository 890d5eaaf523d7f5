"""What operators and monitoring see of a running panicd: ``GET /metrics`` (Prometheus
text, public web server), ``GET /ops/status`` and ``POST /ops/incidents/{id}/reassign``
(control socket).

``/metrics`` is unauthenticated like most exporters: bind the web server to a private
address or firewall the path (docs/OPERATIONS.md). It reveals counts, never people.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiosqlite
from aiohttp import web

from dispatch.engine import Dispatcher
from dispatch.health import Condition, SourceState
from dispatch.metrics import Family, render
from store.dispatch import DispatchStore

INCIDENT_STATUSES = ("open", "acknowledged", "resolved", "cancelled")
OUTBOX_STATES = ("pending", "sending", "sent", "delivered", "failed", "no_answer", "cancelled")

# Shared with panicctl's database fallback (gateway/ctl_ops.py), so both agree. By id,
# SQLite 3.40 (no ANALYZE) walked every incident in rowid order; +id lets it read the few
# open ones from incidents_active and sort them: 4.1 -> 0.07 ms on 50,000 incidents
# (query-plan audit).
OPEN_INCIDENTS_SQL = (
    "SELECT id, status, test, urgent, device_id, opened_at, kelurahan, kecamatan FROM incidents"
    " WHERE status IN ('open', 'acknowledged') ORDER BY +id"
)
PENDING_STEPS_SQL = "SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending'"
# The counts below read one partial index per branch (outbox_pending, outbox_sending,
# incidents_active, and schema 4's incidents_closed and outbox_final) instead of scanning
# the tables, which keep every incident and message. On 50,000 incidents and 100,000
# messages (query-plan audit, SQLite 3.40 without ANALYZE): queued messages 12.9 -> 0.01
# ms, incidents by status 9.5 -> 3.0 ms, messages by state 71 -> 8.9 ms. The branches
# together name every value the schema's CHECK constraints allow, so the counts equal a
# plain GROUP BY (tests/test_metrics.py).
PENDING_OUTBOX_SQL = (
    "SELECT (SELECT COUNT(*) FROM outbox WHERE state = 'pending')"
    " + (SELECT COUNT(*) FROM outbox WHERE state = 'sending')"
)
INCIDENTS_BY_STATUS_SQL = (
    "SELECT status, COUNT(*) FROM incidents WHERE status IN ('open', 'acknowledged')"
    " GROUP BY status"
    " UNION ALL SELECT status, COUNT(*) FROM incidents"
    " WHERE status IN ('resolved', 'cancelled') GROUP BY status"
)
NOTIFICATIONS_BY_STATE_SQL = (
    "SELECT channel, state, COUNT(*) FROM outbox"
    " WHERE state IN ('sent', 'delivered', 'failed', 'no_answer', 'cancelled') GROUP BY 1, 2"
    " UNION ALL SELECT channel, state, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY 1"
    " UNION ALL SELECT channel, state, COUNT(*) FROM outbox WHERE state = 'sending' GROUP BY 1"
)
UNHEALTHY_SQL = (
    "SELECT subject, condition, raised_at, detail FROM device_health WHERE cleared_at IS NULL"
    " ORDER BY subject, condition"
)


class Runtime(Protocol):
    """The daemon's in-process state that the database does not hold."""

    def source_states(self) -> Sequence[SourceState]:
        """Every source with since when it has been up or down."""
        ...

    def ingest_depth(self) -> int:
        """Items submitted to ingest but not yet committed."""
        ...

    def press_counts(self) -> Mapping[tuple[str, str], int]:
        """Committed items by (source, outcome) since start."""
        ...


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
OBS_DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("obs_dispatcher", Dispatcher)
OBS_STORE: web.AppKey[DispatchStore] = web.AppKey("obs_store", DispatchStore)


async def _count(db: aiosqlite.Connection, sql: str) -> int:
    return int(next(iter(await db.execute_fetchall(sql)))[0])


async def _grouped(db: aiosqlite.Connection, sql: str) -> dict[tuple[str, ...], int]:
    return {tuple(str(v) for v in row[:-1]): int(row[-1]) for row in
            await db.execute_fetchall(sql)}


async def collect(runtime: Runtime, dispatcher: Dispatcher, db: aiosqlite.Connection,
                  accept: str = "") -> tuple[bytes, str]:
    """Every metric family, encoded for ``accept``: (body, content type)."""
    incidents = await _grouped(db, INCIDENTS_BY_STATUS_SQL)
    outbox = await _grouped(db, NOTIFICATIONS_BY_STATE_SQL)
    health = await _grouped(db, "SELECT condition, COUNT(*) FROM device_health"
                                " WHERE cleared_at IS NULL GROUP BY condition")
    families = [
        Family("panicd_presses_total", "counter",
               "Frames committed by ingest since start, by source and outcome.",
               [({"source": s, "outcome": o}, n)
                for (s, o), n in sorted(runtime.press_counts().items())]),
        Family("panicd_incidents", "gauge", "Incidents in the database by status.",
               [({"status": s}, incidents.get((s,), 0)) for s in INCIDENT_STATUSES]),
        Family("panicd_notifications", "gauge",
               "Outbox messages (SMS, voice calls) by channel and state.",
               [({"channel": c, "state": s}, outbox.get((c, s), 0))
                for c in ("sms", "voice") for s in OUTBOX_STATES]),
        Family("panicd_escalation_latency_seconds", "histogram",
               "Lateness of escalation steps: fired time minus due time.",
               histogram=dispatcher.step_latency),
        Family("panicd_queue_depth", "gauge",
               "Work waiting: ingest items, outbox messages, escalation steps.",
               [({"queue": "ingest"}, runtime.ingest_depth()),
                ({"queue": "outbox"}, await _count(db, PENDING_OUTBOX_SQL)),
                ({"queue": "escalation"}, await _count(db, PENDING_STEPS_SQL))]),
        Family("panicd_device_health_conditions", "gauge",
               "Raised health conditions (offline, low battery, source down).",
               [({"condition": c.value}, health.get((c.value,), 0)) for c in Condition]),
        Family("panicd_source_up", "gauge", "1 if the source is connected.",
               [({"source": s.name, "kind": s.kind}, int(s.connected))
                for s in runtime.source_states()]),
    ]
    return render(families, accept)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text 0.0.4, or OpenMetrics when the scraper asks."""
    app = request.app
    body, content_type = await collect(app[RUNTIME], app[OBS_DISPATCHER], app[OBS_STORE].db,
                                       request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def status_snapshot(runtime: Runtime, db: aiosqlite.Connection) -> dict[str, Any]:
    """The daemon's view for ``panicctl status``."""
    columns = ("id", "status", "test", "urgent", "device_id", "opened_at", "kelurahan",
               "kecamatan")
    open_rows = [dict(zip(columns, row, strict=True))
                 for row in await db.execute_fetchall(OPEN_INCIDENTS_SQL)]
    unhealthy = [{"subject": r[0], "condition": r[1], "raised_at": r[2]}
                 for r in await db.execute_fetchall(UNHEALTHY_SQL)]
    return {
        "daemon": {"reachable": True, "pid": os.getpid(), "now": time.time()},
        "sources": [{"name": s.name, "kind": s.kind, "connected": s.connected,
                     "since": s.since} for s in runtime.source_states()],
        "queues": {"ingest": runtime.ingest_depth(),
                   "outbox": await _count(db, PENDING_OUTBOX_SQL),
                   "escalation": await _count(db, PENDING_STEPS_SQL)},
        "open_incidents": open_rows,
        "unhealthy": unhealthy,
    }


async def ops_status(request: web.Request) -> web.Response:
    """``GET /ops/status``."""
    snapshot = await status_snapshot(request.app[RUNTIME], request.app[OBS_STORE].db)
    return web.json_response(snapshot)


async def ops_reassign(request: web.Request) -> web.Response:
    """``POST /ops/incidents/{id}/reassign`` with ``{"to": PERSON, "by": NAME}``."""
    body = await request.json()
    incident_id = int(request.match_info["id"])
    to = str(body.get("to", "")).strip()
    by = str(body.get("by", "operator")).strip() or "operator"
    dispatcher = request.app[OBS_DISPATCHER]
    if await request.app[OBS_STORE].incident(incident_id) is None:
        return web.json_response({"error": f"no incident {incident_id}"}, status=404)
    try:
        queued = await dispatcher.reassign(incident_id, to, actor=by)
    except KeyError:
        return web.json_response({"error": f"unknown person {to!r} (see responders.toml)"},
                                 status=400)
    if queued is None:
        return web.json_response(
            {"error": f"incident {incident_id} is closed; nothing to reassign"}, status=409)
    return web.json_response({"incident": incident_id, "to": to, "messages": queued})


def install(
    public: web.Application,
    control: web.Application,
    runtime: Runtime,
    dispatcher: Dispatcher,
    store: DispatchStore,
) -> None:
    """Add ``/metrics`` to the public app and the status/reassign routes to the control app."""
    for app in (public, control):
        app[RUNTIME] = runtime
        app[OBS_DISPATCHER] = dispatcher
        app[OBS_STORE] = store
    public.router.add_get("/metrics", metrics)
    control.router.add_get("/ops/status", ops_status)
    control.router.add_post("/ops/incidents/{id:\\d+}/reassign", ops_reassign)
