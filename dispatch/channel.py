"""The seam between escalation and the outside world: a Channel delivers one SMS or one call.

The escalation engine depends only on :class:`Channel`; :mod:`dispatch.twilio_channel`
delivers through Twilio and :class:`ConsoleChannel` (the default when no Twilio
credentials are configured, DESIGN §2 Delivery) prints what would have been sent.
"""

from __future__ import annotations

import itertools
import secrets
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TextIO

from gateway.redact import mask_phone


class DeliveryStatus(StrEnum):
    """How one hand-over to the provider ended (not whether the phone got it)."""

    SENT = "sent"
    # Re-sending cannot help (invalid number, landline, unsubscribed …): move on.
    FAILED_PERMANENT = "failed_permanent"
    # Every attempt within this send's short budget failed for a passing reason (429,
    # 5xx, timeout, refused/reset connection, a local OSError such as EMFILE): the
    # outbox sends it again later; it never ends the page (issue 12 item 2).
    FAILED_TRANSIENT = "failed_transient"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one send_sms/place_call, with the provider's sid or error."""

    status: DeliveryStatus
    provider_sid: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    attempts: int = 1
    # The provider's Retry-After on the last throttled attempt, for the outbox's requeue.
    retry_after_s: float | None = None
    # A request went out and no answer came back (a timeout, a dropped connection): the
    # provider may have accepted it. The outbox asks the provider before sending again.
    in_doubt: bool = False

    @property
    def ok(self) -> bool:
        """Whether the provider accepted the message or call."""
        return self.status is DeliveryStatus.SENT


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One message or call the provider holds, as its list endpoint tells it."""

    sid: str
    # The provider's own status word (Twilio's MessageStatus / CallStatus).
    status: str
    # When the provider created it (Unix seconds).
    created_at: float
    # The SMS text as the provider holds it; None for a call.
    body: str | None = None


class ProviderLookupError(Exception):
    """The provider could not be asked what it holds; ``permanent`` if asking again cannot help
    (e.g. credentials without the right to list), so the caller should not wait for it."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


# Twilio MessageStatus / CallStatus → (outbox state, rank). The rank orders one message's
# or one call's statuses, so that a replayed callback, or one overtaken by a later status,
# is recognised and changes nothing (DispatchStore.record_status_callback).
SMS_STATES = {
    "queued": ("sent", 1),
    "sending": ("sent", 2),
    "sent": ("sent", 3),
    "delivered": ("delivered", 4),
    "undelivered": ("failed", 4),
    "failed": ("failed", 4),
}
CALL_STATES = {
    "queued": ("sent", 1),
    "initiated": ("sent", 2),
    "ringing": ("sent", 3),
    "in-progress": ("sent", 4),
    "completed": ("delivered", 5),
    "busy": ("no_answer", 5),
    "no-answer": ("no_answer", 5),
    "canceled": ("failed", 5),
    "failed": ("failed", 5),
}


class Channel(Protocol):
    """Delivers SMS and voice calls; implementations own their retry policy."""

    async def send_sms(self, to: str, body: str, *, status_callback: str | None) -> DeliveryResult:
        """Send one SMS to an E.164 number."""
        ...

    async def place_call(
        self,
        to: str,
        *,
        twiml_url: str,
        status_callback: str | None,
        machine_detection: bool = True,
    ) -> DeliveryResult:
        """Start one voice call whose script is fetched from ``twiml_url``."""
        ...

    async def recent(self, kind: str, to: str, *, since: float) -> list[ProviderRecord]:
        """What the provider holds of ``kind`` ("sms" or "call") sent to ``to`` from this
        channel's number and created at or after ``since``; raises :class:`ProviderLookupError`.

        Asked before sending again a page whose earlier request may have been accepted
        (issue 12 item 3), so that a crash or a dropped connection does not page twice.
        """
        ...


class ConsoleChannel:
    """A Channel that prints each would-be SMS or call as one block and reports it sent.

    The number is masked as the logs mask it (+62812****102): the console is a log too,
    and the masked form still tells two responders apart.
    """

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._serial = itertools.count(1)
        # The outbox keeps provider sids UNIQUE: a counter alone would repeat
        # CONSOLE-SM000001 after every restart, and recording that send would fail.
        self._run = secrets.token_hex(4).upper()

    def _write(self, block: str) -> None:
        # Resolved per call so a redirected sys.stdout (tests, daemon) is honoured.
        out = self._out if self._out is not None else sys.stdout
        out.write(block)
        out.flush()

    async def send_sms(self, to: str, body: str, *, status_callback: str | None) -> DeliveryResult:
        """Print the SMS and return a fake ``CONSOLE-SM…`` sid."""
        sid = f"CONSOLE-SM{self._run}{next(self._serial):06d}"
        self._write(
            f"----- SMS {sid} to {mask_phone(to)} ({len(body)} chars)\n"
            f"{body}\n"
            f"----- status callback: {status_callback or '-'}\n"
        )
        return DeliveryResult(DeliveryStatus.SENT, provider_sid=sid)

    async def place_call(
        self,
        to: str,
        *,
        twiml_url: str,
        status_callback: str | None,
        machine_detection: bool = True,
    ) -> DeliveryResult:
        """Print the call (its script URL) and return a fake ``CONSOLE-CA…`` sid."""
        sid = f"CONSOLE-CA{self._run}{next(self._serial):06d}"
        self._write(
            f"----- CALL {sid} to {mask_phone(to)}\n"
            f"script: {twiml_url}\n"
            f"machine detection: {'on' if machine_detection else 'off'}\n"
            f"----- status callback: {status_callback or '-'}\n"
        )
        return DeliveryResult(DeliveryStatus.SENT, provider_sid=sid)

    async def recent(
        self, kind: str, to: str, *, since: float  # noqa: ARG002 -- the protocol's signature
    ) -> list[ProviderRecord]:
        """Nothing: the console keeps no record, so a page interrupted by a crash is shown
        again (there is no phone to page twice)."""
        return []
