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

from aiohttp import web

from dispatch.engine import Dispatcher
from dispatch.health import Condition, SourceState
from dispatch.metrics import Family, render
from store.dispatch import DispatchStore

INCIDENT_STATUSES = ("open", "acknowledged", "resolved", "cancelled")
OUTBOX_STATES = ("pending", "sending", "sent", "delivered", "failed", "no_answer", "cancelled")

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


async def collect(runtime: Runtime, dispatcher: Dispatcher, store: DispatchStore,
                  accept: str = "") -> tuple[bytes, str]:
    """Every metric family, encoded for ``accept``: (body, content type)."""
    incidents = await store.incident_counts()
    outbox = await store.notification_counts()
    health = await store.raised_counts()
    depths = await store.queue_depths()
    families = [
        Family("panicd_presses_total", "counter",
               "Frames committed by ingest since start, by source and outcome.",
               [({"source": s, "outcome": o}, n)
                for (s, o), n in sorted(runtime.press_counts().items())]),
        Family("panicd_incidents", "gauge", "Incidents in the database by status.",
               [({"status": s}, incidents.get(s, 0)) for s in INCIDENT_STATUSES]),
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
                ({"queue": "outbox"}, depths.outbox),
                ({"queue": "escalation"}, depths.escalation)]),
        Family("panicd_device_health_conditions", "gauge",
               "Raised health conditions (offline, low battery, source down).",
               [({"condition": c.value}, health.get(c.value, 0)) for c in Condition]),
        Family("panicd_source_up", "gauge", "1 if the source is connected.",
               [({"source": s.name, "kind": s.kind}, int(s.connected))
                for s in runtime.source_states()]),
    ]
    return render(families, accept)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text 0.0.4, or OpenMetrics when the scraper asks."""
    app = request.app
    body, content_type = await collect(app[RUNTIME], app[OBS_DISPATCHER], app[OBS_STORE],
                                       request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def status_snapshot(runtime: Runtime, store: DispatchStore) -> dict[str, Any]:
    """The daemon's view for ``panicctl status``."""
    # Booleans as 0/1, as panicctl's database fallback (panicd/ctl_ops.py) shows them.
    open_rows = [{"id": i.id, "status": i.status, "test": int(i.test), "urgent": int(i.urgent),
                  "device_id": i.device_id, "opened_at": i.opened_at,
                  "kelurahan": i.kelurahan, "kecamatan": i.kecamatan}
                 for i in await store.open_incidents()]
    unhealthy = [{"subject": u.subject, "condition": u.condition, "raised_at": u.raised_at}
                 for u in await store.unhealthy()]
    depths = await store.queue_depths()
    return {
        "daemon": {"reachable": True, "pid": os.getpid(), "now": time.time()},
        "sources": [{"name": s.name, "kind": s.kind, "connected": s.connected,
                     "since": s.since} for s in runtime.source_states()],
        "queues": {"ingest": runtime.ingest_depth(),
                   "outbox": depths.outbox,
                   "escalation": depths.escalation},
        "open_incidents": open_rows,
        "unhealthy": unhealthy,
    }


async def ops_status(request: web.Request) -> web.Response:
    """``GET /ops/status``."""
    snapshot = await status_snapshot(request.app[RUNTIME], request.app[OBS_STORE])
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
