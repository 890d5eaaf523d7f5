"""what operators and monitoring read of dispatch — the counts behind ``GET
/metrics`` and the open incidents and raised conditions of ``panicctl status``.

The statements are shared with panicctl's database fallback (panicd/ctl_ops.py), which
runs them on its own read-only connection, so both agree.
"""

from __future__ import annotations

from store.dispatch import OpenIncident, QueueDepths, Unhealthy
from store.dispatch_base import DispatchBase

# By id,
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
# plain GROUP BY (tests/test_metrics.py). Every branch groups by each column it reads
# (state too, constant as it is there): PostgreSQL refuses a column outside GROUP BY.
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
    " UNION ALL SELECT channel, state, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY 1, 2"
    " UNION ALL SELECT channel, state, COUNT(*) FROM outbox WHERE state = 'sending' GROUP BY 1, 2"
)
UNHEALTHY_SQL = (
    "SELECT subject, condition, raised_at, detail FROM device_health WHERE cleared_at IS NULL"
    " ORDER BY subject, condition"
)


RAISED_BY_CONDITION_SQL = (
    "SELECT condition, COUNT(*) FROM device_health WHERE cleared_at IS NULL GROUP BY condition"
)


class Observe(DispatchBase):
    """Reads for metrics and status."""

    async def _grouped(self, sql: str) -> dict[tuple[str, ...], int]:
        return {tuple(str(v) for v in row[:-1]): int(row[-1]) for row in await self._rows(sql)}

    async def incident_counts(self) -> dict[str, int]:
        """Incidents by status."""
        return {key[0]: n for key, n in (await self._grouped(INCIDENTS_BY_STATUS_SQL)).items()}

    async def notification_counts(self) -> dict[tuple[str, str], int]:
        """Outbox messages by (channel, state)."""
        return {(key[0], key[1]): n
                for key, n in (await self._grouped(NOTIFICATIONS_BY_STATE_SQL)).items()}

    async def raised_counts(self) -> dict[str, int]:
        """Raised health conditions by condition."""
        return {key[0]: n for key, n in (await self._grouped(RAISED_BY_CONDITION_SQL)).items()}

    async def queue_depths(self) -> QueueDepths:
        """Messages and steps waiting."""
        return QueueDepths(await self._count(PENDING_OUTBOX_SQL),
                           await self._count(PENDING_STEPS_SQL))

    async def open_incidents(self) -> list[OpenIncident]:
        """Open and acknowledged incidents by id."""
        return [OpenIncident(int(r[0]), r[1], bool(r[2]), bool(r[3]), r[4], r[5], r[6], r[7])
                for r in await self._rows(OPEN_INCIDENTS_SQL)]

    async def unhealthy(self) -> list[Unhealthy]:
        """Raised conditions by subject and condition."""
        return [Unhealthy(r[0], r[1], float(r[2])) for r in await self._rows(UNHEALTHY_SQL)]
