"""What people do to an incident once it is paged: acks, closures, reassignment, and the
operations messages that page no responder (DESIGN §2 Acknowledgement).

The first ack stops escalation (pending steps and unsent alerts cancelled in the same
commit) and tells everyone already paged who is handling it; a cancel press or an
operator resolve tells them to stand down. Every transition is on the timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiosqlite
import structlog

from dispatch.escalation import resolve_targets_via
from dispatch.messages import build_alert_sms, build_cancelled_sms, build_handled_sms
from dispatch.outbox import Outbox
from dispatch.policy import Medium, Routing
from dispatch.responders import Responders
from dispatch.webhook_auth import make_ack_token
from store.dispatch import DispatchStore, IncidentInfo, NewMessage

log = structlog.get_logger("panicd.dispatch")

# People who were (or are being) reached by an alert: they get the follow-up notices.
_NOTIFIED_SQL = (
    "SELECT person_id, MIN(phone) FROM outbox WHERE incident_id = ? AND purpose = 'alert'"
    " AND state IN ('sending', 'sent', 'delivered', 'no_answer') AND person_id IS NOT ?"
    " GROUP BY person_id ORDER BY MIN(id)"
)


class Feedback(Protocol):
    """Tells a button something about its incident (MQTT command topic, LoRa downlink)."""

    def __call__(self, device_id: str, incident_id: int, state: str) -> None:
        """Send ``state`` ("help_coming", "cancelled", …) to the device, best effort."""
        ...


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Where panicd is reachable and how ack links are signed."""

    public_base_url: str
    ack_secret: bytes
    ack_ttl_s: float = 6 * 3600.0
    send_concurrency: int = 16


@dataclass(frozen=True, slots=True)
class AckResult:
    """What an ack did: ``first`` stopped escalation; ``status`` is the incident's now;
    ``repeated``: this responder was already recorded on it, and nothing changed."""

    incident_id: int
    status: str
    first: bool
    accepted: bool
    repeated: bool = False


def _place(incident: IncidentInfo) -> str:
    parts = [p for p in (incident.landmark, incident.address) if p]
    return ", ".join(parts) or "lokasi tidak diketahui"


def _kind_label(incident: IncidentInfo) -> str:
    return "DARURAT MENDESAK" if incident.urgent else "DARURAT"


def alert_body(settings: DispatchSettings, incident: IncidentInfo, person_id: str,
               now: float) -> str:
    """The alert SMS for one person, with their own signed ack link."""
    token = make_ack_token(
        settings.ack_secret, str(incident.id), person_id, int(now + settings.ack_ttl_s)
    )
    return build_alert_sms(
        incident_code=str(incident.id),
        kind_label=_kind_label(incident),
        kelurahan=incident.kelurahan or "(di luar Kota Madiun)",
        place=_place(incident),
        occurred_at=incident.opened_at,
        ack_url=f"{settings.public_base_url.rstrip('/')}/a/{token}",
        test=incident.test,
    )


class Responses:
    """Acks, closures, reassignment and operations messages over the dispatch store."""

    def __init__(
        self,
        store: DispatchStore,
        routing: Routing,
        responders: Responders,
        settings: DispatchSettings,
        *,
        outbox: Outbox,
        wake_scheduler: Callable[[], None],
        clock: Callable[[], float] = time.time,
        feedback: Feedback | None = None,
    ) -> None:
        self._store = store
        self._routing = routing
        self._responders = responders
        self._settings = settings
        self._outbox = outbox
        self._wake_scheduler = wake_scheduler
        self._clock = clock
        self._feedback = feedback

    # -- operations messages ----------------------------------------------------------

    async def send_ops(self, key: str, body: str) -> int:
        """Queue an operations SMS (device health, daily summary) to the operations policy's
        first level, resolved now; never a responder page. ``key`` makes it idempotent."""
        now = self._clock()
        level = self._routing.operations.levels[0]
        people = resolve_targets_via(level, self._responders, now)
        messages = [
            NewMessage(key=f"ops:{key}:{person_id}", incident_id=None, person_id=person_id,
                       phone=self._responders.people[person_id].phone, channel="sms",
                       purpose="ops", body=body, due_at=now)
            for person_id, _via in people
        ]
        async with self._store.transaction() as db:
            queued = await DispatchStore.insert_messages(db, messages, now)
        if queued:
            self._outbox.wake()
        log.info("ops.alert_queued", key=key, people=len(people), messages=queued)
        return queued

    async def reassign(self, incident_id: int, person_id: str, *, actor: str) -> int | None:
        """Page one named person for an open or acknowledged incident (an operator's
        choice); returns the messages queued, or None if the incident is not active."""
        person = self._responders.people.get(person_id)
        if person is None:
            raise KeyError(person_id)
        incident = await self._store.incident(incident_id)
        if incident is None or incident.status not in ("open", "acknowledged"):
            return None
        now = self._clock()
        # The call script of an acknowledged incident says "already handled": SMS only.
        channels = [Medium.SMS, Medium.VOICE] if incident.status == "open" else [Medium.SMS]
        messages = [
            NewMessage(key=f"{incident_id}:reassign:{int(now * 1000)}:{person_id}:{c.value}",
                       incident_id=incident_id, person_id=person_id, phone=person.phone,
                       channel=c.value, purpose="alert", due_at=now,
                       body=(alert_body(self._settings, incident, person_id, now)
                             if c is Medium.SMS else ""))
            for c in channels
        ]
        async with self._store.transaction() as db:
            queued = await DispatchStore.insert_messages(db, messages, now)
            await DispatchStore.timeline(db, incident_id, now, "incident.reassigned", "operator",
                                         actor=actor, detail={"person": person_id,
                                                              "messages": queued})
        self._outbox.wake()
        log.info("incident.reassigned", incident=incident_id, to=person_id, by=actor,
                 messages=queued)
        return queued

    # -- acks and closures ----------------------------------------------------------------

    async def _notified(
        self, db: aiosqlite.Connection, incident_id: int, exclude: str | None
    ) -> list[tuple[str, str]]:
        rows = await db.execute_fetchall(_NOTIFIED_SQL, (incident_id, exclude))
        return [(r[0], r[1]) for r in rows]

    @staticmethod
    async def _stop_escalation(db: aiosqlite.Connection, incident_id: int) -> None:
        await db.execute(
            "UPDATE escalation_steps SET state = 'cancelled'"
            " WHERE incident_id = ? AND state = 'pending'",
            (incident_id,),
        )
        await db.execute(
            "UPDATE outbox SET state = 'cancelled' WHERE incident_id = ?"
            " AND purpose = 'alert' AND state = 'pending'",
            (incident_id,),
        )

    def person_name(self, person_id: str | None) -> str | None:
        """A responder's display name, if the id is known."""
        person = self._responders.people.get(person_id) if person_id else None
        return person.name if person else None

    async def ack(
        self, incident_id: int, *, person_id: str | None, actor: str, via: str
    ) -> AckResult:
        """Record an ack; the first one stops escalation and tells the others who handles it."""
        now = self._clock()
        name = self.person_name(person_id) or actor
        incident = await self._store.incident(incident_id)
        if incident is None:
            return AckResult(incident_id, "unknown", first=False, accepted=False)
        async with self._store.transaction() as db:
            status = next(
                iter(
                    await db.execute_fetchall(
                        "SELECT status FROM incidents WHERE id = ?", (incident_id,)
                    )
                )
            )[0]
            if status in ("resolved", "cancelled"):
                await DispatchStore.timeline(
                    db,
                    incident_id,
                    now,
                    "ack.ignored",
                    f"incident_{status}",
                    actor=name,
                    detail={"via": via},
                )
                return AckResult(incident_id, status, first=False, accepted=False)
            if await self._acked_before(db, incident_id, person_id, name):
                # A replayed link POST, a second key press, the CLI run twice: the same
                # person is already recorded (first or not), so no second ack row, no
                # "responder added", and never "handled by another officer" to them.
                log.info("ack.repeated", incident=incident_id, by=name, via=via)
                return AckResult(incident_id, status, first=False, accepted=True, repeated=True)
            first = status == "open"
            await db.execute(
                "INSERT INTO acks (incident_id, person_id, actor, via, at, first)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (incident_id, person_id, name, via, now, int(first)),
            )
            if first:
                await db.execute(
                    "UPDATE incidents SET status = 'acknowledged', updated_at = ? WHERE id = ?",
                    (now, incident_id),
                )
                await db.execute(
                    "UPDATE incident_dispatch SET handled_by = ? WHERE incident_id = ?",
                    (name, incident_id),
                )
                await self._stop_escalation(db, incident_id)
                body = build_handled_sms(
                    incident_code=str(incident_id), responder_name=name, at=now, test=incident.test
                )
                await DispatchStore.insert_messages(
                    db,
                    [
                        NewMessage(
                            key=f"{incident_id}:handled:{pid}",
                            incident_id=incident_id,
                            person_id=pid,
                            phone=phone,
                            channel="sms",
                            purpose="handled",
                            body=body,
                            due_at=now,
                        )
                        for pid, phone in await self._notified(db, incident_id, person_id)
                    ],
                    now,
                )
                await DispatchStore.timeline(
                    db,
                    incident_id,
                    now,
                    "incident.acknowledged",
                    via,
                    actor=name,
                    detail={"person": person_id},
                )
            else:
                await DispatchStore.timeline(
                    db,
                    incident_id,
                    now,
                    "responder.added",
                    via,
                    actor=name,
                    detail={"person": person_id},
                )
        self._outbox.wake()
        if first:
            log.info("incident.acknowledged", incident=incident_id, by=name, via=via)
            if self._feedback is not None:
                self._feedback(incident.device_id, incident_id, "help_coming")
        else:
            log.info("incident.responder_added", incident=incident_id, by=name, via=via)
        return AckResult(incident_id, "acknowledged", first=first, accepted=True)

    @staticmethod
    async def _acked_before(
        db: aiosqlite.Connection, incident_id: int, person_id: str | None, name: str
    ) -> bool:
        """Whether this person (a known responder by id, anyone else by name) acked it."""
        rows = await db.execute_fetchall(
            "SELECT 1 FROM acks WHERE incident_id = ? AND (person_id = ?"
            " OR (? IS NULL AND person_id IS NULL AND actor = ?)) LIMIT 1",
            (incident_id, person_id, person_id, name),
        )
        return bool(list(rows))

    async def close(self, incident_id: int, *, reason: str, actor: str, note: str = "") -> bool:
        """Stop escalation for a cancelled or resolved incident and tell those paged.

        ``reason`` is "cancelled" (the ingest side already set the status) or "resolved"
        (an operator; this sets the status). Returns False if it was already closed.
        """
        now = self._clock()
        incident = await self._store.incident(incident_id)
        if incident is None:
            return False
        async with self._store.transaction() as db:
            status, closed_at = next(
                iter(
                    await db.execute_fetchall(
                        "SELECT i.status, d.closed_at FROM incidents i"
                        " LEFT JOIN incident_dispatch d ON d.incident_id = i.id WHERE i.id = ?",
                        (incident_id,),
                    )
                )
            )
            if closed_at is not None or (reason == "resolved" and status == "resolved"):
                return False
            if reason == "resolved":
                if status == "cancelled":
                    return False
                await db.execute(
                    "UPDATE incidents SET status = 'resolved', closed_at = ?,"
                    " updated_at = ? WHERE id = ?",
                    (now, now, incident_id),
                )
            await db.execute(
                "UPDATE incident_dispatch SET closed_at = ?, close_reason = ?"
                " WHERE incident_id = ?",
                (now, reason, incident_id),
            )
            await self._stop_escalation(db, incident_id)
            if reason == "cancelled":
                body = build_cancelled_sms(
                    incident_code=str(incident_id),
                    kelurahan=incident.kelurahan or "-",
                    at=now,
                    test=incident.test,
                )
            else:
                body = build_handled_sms(
                    incident_code=str(incident_id),
                    responder_name=actor,
                    at=now,
                    test=incident.test,
                )
            notify = await self._notified(db, incident_id, None)
            if status == "acknowledged":
                # Those already told "ditangani oleh …" need no second notice.
                notify = []
            await DispatchStore.insert_messages(
                db,
                [
                    NewMessage(
                        key=f"{incident_id}:{reason}:{pid}",
                        incident_id=incident_id,
                        person_id=pid,
                        phone=phone,
                        channel="sms",
                        purpose=reason,
                        body=body,
                        due_at=now,
                    )
                    for pid, phone in notify
                ],
                now,
            )
            event = "incident.resolved" if reason == "resolved" else "escalation.stopped"
            await DispatchStore.timeline(
                db,
                incident_id,
                now,
                event,
                reason,
                actor=actor,
                detail={"note": note, "notified": len(notify)},
            )
        self._outbox.wake()
        self._wake_scheduler()
        log.info(
            "incident.closed",
            incident=incident_id,
            reason=reason,
            by=actor,
            notified=len(notify),
        )
        if self._feedback is not None:
            self._feedback(incident.device_id, incident_id, reason)
        return True
