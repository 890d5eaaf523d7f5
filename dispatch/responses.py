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

import structlog

from dispatch.escalation import resolve_targets_via
from dispatch.messages import build_alert_sms, build_cancelled_sms, build_handled_sms
from dispatch.outbox import Outbox
from dispatch.policy import Medium, Routing
from dispatch.responders import Responders
from dispatch.webhook_auth import make_ack_token
from store.dispatch import DispatchStore, IncidentInfo, NewMessage, Notice

log = structlog.get_logger("panicd.dispatch")

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
        queued = await self._store.queue_messages(messages, now)
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
        queued = await self._store.record_reassign(incident_id, person_id, actor, messages, now)
        self._outbox.wake()
        log.info("incident.reassigned", incident=incident_id, to=person_id, by=actor,
                 messages=queued)
        return queued

    # -- acks and closures ----------------------------------------------------------------

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
        body = build_handled_sms(
            incident_code=str(incident_id), responder_name=name, at=now, test=incident.test
        )
        recorded = await self._store.record_ack(
            incident_id, person_id=person_id, name=name, via=via, now=now,
            handled=Notice(f"{incident_id}:handled", "handled", body),
        )
        if recorded.outcome == "ignored":
            return AckResult(incident_id, recorded.status, first=False, accepted=False)
        if recorded.outcome == "repeated":
            log.info("ack.repeated", incident=incident_id, by=name, via=via)
            return AckResult(incident_id, recorded.status, first=False, accepted=True,
                             repeated=True)
        first = recorded.outcome == "first"
        self._outbox.wake()
        if first:
            log.info("incident.acknowledged", incident=incident_id, by=name, via=via)
            if self._feedback is not None:
                self._feedback(incident.device_id, incident_id, "help_coming")
        else:
            log.info("incident.responder_added", incident=incident_id, by=name, via=via)
        return AckResult(incident_id, "acknowledged", first=first, accepted=True)

    async def close(self, incident_id: int, *, reason: str, actor: str, note: str = "") -> bool:
        """Stop escalation for a cancelled or resolved incident and tell those paged.

        ``reason`` is "cancelled" (the ingest side already set the status) or "resolved"
        (an operator; this sets the status). Returns False if it was already closed.
        """
        now = self._clock()
        incident = await self._store.incident(incident_id)
        if incident is None:
            return False
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
        notified = await self._store.close_incident(
            incident_id, reason=reason, actor=actor, note=note, now=now,
            notice=Notice(f"{incident_id}:{reason}", reason, body),
        )
        if notified is None:
            return False
        self._outbox.wake()
        self._wake_scheduler()
        log.info(
            "incident.closed",
            incident=incident_id,
            reason=reason,
            by=actor,
            notified=notified,
        )
        if self._feedback is not None:
            self._feedback(incident.device_id, incident_id, reason)
        return True
