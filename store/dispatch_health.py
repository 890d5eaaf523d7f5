"""device_health rows — the provider's outage raised and cleared by the outbox,
the device-health monitor's raises and clears, and what it reads to decide and report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from store.dispatch import HealthRaise, HealthRow
from store.dispatch_base import DispatchBase

_OPEN_INCIDENTS_COUNT = "SELECT COUNT(*) FROM incidents WHERE status IN ('open', 'acknowledged')"


def _health_of(row: Sequence[Any]) -> HealthRow:
    """A row read as (id, subject, condition, raised_at, cleared_at, detail)."""
    return HealthRow(int(row[0]), row[1], row[2], float(row[3]), row[4],
                     json.loads(row[5] or "{}"))


class Health(DispatchBase):
    """device_health's statements."""

    async def raised_condition(self, subject: str, condition: str) -> tuple[int, float] | None:
        """The raised (not cleared) health row of ``subject``/``condition``: (id, raised_at)."""
        row = await self._one(
            "SELECT id, raised_at FROM device_health"
            " WHERE subject = ? AND condition = ? AND cleared_at IS NULL",
            (subject, condition),
        )
        return None if row is None else (int(row[0]), float(row[1]))

    async def raise_condition(
        self, subject: str, condition: str, now: float, detail: Mapping[str, Any]
    ) -> int | None:
        """Raise a health condition once; None if it is raised already."""
        async with self.transaction() as tx:
            new = await tx.rows(
                # device_health_active is UNIQUE (subject, condition) WHERE not cleared.
                "INSERT INTO device_health (subject, condition, raised_at, detail)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (subject, condition, now, json.dumps(dict(detail), sort_keys=True)),
            )
        return int(new[0][0]) if new else None

    async def clear_condition(self, subject: str, condition: str, now: float) -> int | None:
        """Clear a raised health condition; returns its row id, None if none was raised."""
        async with self.transaction() as tx:
            rows = await tx.rows(
                "UPDATE device_health SET cleared_at = ? WHERE subject = ? AND condition = ?"
                " AND cleared_at IS NULL RETURNING id",
                (now, subject, condition),
            )
        return int(rows[0][0]) if rows else None

    async def raised_health(self) -> list[HealthRow]:
        """Every raised (not cleared) condition."""
        rows = await self._rows(
            "SELECT id, subject, condition, raised_at FROM device_health WHERE cleared_at IS NULL"
        )
        return [HealthRow(int(r[0]), r[1], r[2], float(r[3])) for r in rows]

    async def device_sightings(self) -> dict[str, tuple[float | None, int | None]]:
        """Device id -> (last seen at, battery %) of every device heard from."""
        rows = await self._rows("SELECT id, last_seen_at, battery FROM devices")
        return {r[0]: (r[1], r[2]) for r in rows}

    async def record_health(
        self, raised: Sequence[HealthRaise], cleared: Sequence[int], now: float
    ) -> list[int]:
        """Raise and clear (by row id) conditions in one commit; returns the new ids in
        ``raised``'s order."""
        new_ids = []
        async with self.transaction() as tx:
            for finding in raised:
                rows = await tx.rows(
                    "INSERT INTO device_health (subject, condition, raised_at, detail)"
                    " VALUES (?, ?, ?, ?) RETURNING id",
                    (finding.subject, finding.condition, now,
                     json.dumps(dict(finding.detail), sort_keys=True)),
                )
                new_ids.append(int(rows[0][0]))
            for row_id in cleared:
                await tx.execute(
                    "UPDATE device_health SET cleared_at = ? WHERE id = ?", (now, row_id)
                )
        return new_ids

    async def health_since(self, conditions: Sequence[str], since: float) -> list[HealthRow]:
        """Rows of these conditions raised after ``since``, cleared or not."""
        marks = ",".join("?" * len(conditions))
        rows = await self._rows(
            "SELECT id, subject, condition, raised_at, cleared_at, detail"  # noqa: S608
            f" FROM device_health WHERE condition IN ({marks}) AND raised_at > ?",  # marks only
            (*conditions, since),
        )
        return [_health_of(r) for r in rows]

    async def unannounced_health(self, since: float) -> list[HealthRow]:
        """Rows raised after ``since`` with no operations SMS queued about them."""
        # The keys 'ops:health:<id>:...' (send_ops) as a range on the key's index, ';'
        # being the character after ':'. SQLite uses an index for LIKE only with a
        # constant pattern on a NOCASE column (sqlite.org/optoverview.html, "The LIKE
        # optimization"), so LIKE walked every key per health row: 1.1 s -> 0.08 ms on
        # 100,000 messages (query-plan audit). LIKE also ignored case; send_ops builds
        # every key lowercase, so the range admits the same rows. (On PostgreSQL the
        # range reads the key's index only under COLLATE "C".)
        rows = await self._rows(
            "SELECT h.id, h.subject, h.condition, h.raised_at, h.cleared_at, h.detail"
            " FROM device_health h WHERE h.raised_at > ? AND NOT EXISTS (SELECT 1 FROM outbox o"
            " WHERE o.key >= 'ops:health:' || h.id || ':'"
            " AND o.key < 'ops:health:' || h.id || ';')",
            (since,),
        )
        return [_health_of(r) for r in rows]

    async def summary_counts(self, since: float) -> tuple[int, int]:
        """Incidents open now, and real (not test) incidents opened since ``since``."""
        row = await self._one(
            f"SELECT ({_OPEN_INCIDENTS_COUNT}),"  # noqa: S608 -- a constant only
            " (SELECT COUNT(*) FROM incidents WHERE opened_at >= ? AND test = 0)",
            (since,),
        )
        assert row is not None  # one row of two counts, always
        return int(row[0]), int(row[1])

    async def open_counts(self) -> tuple[int, int]:
        """Open (or acknowledged) incidents and pending escalation steps."""
        row = await self._one(
            f"SELECT ({_OPEN_INCIDENTS_COUNT}),"  # noqa: S608 -- a constant only
            " (SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending')"
        )
        assert row is not None  # one row of two counts, always
        return int(row[0]), int(row[1])
