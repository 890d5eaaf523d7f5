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

    @property
    def ok(self) -> bool:
        """Whether the provider accepted the message or call."""
        return self.status is DeliveryStatus.SENT


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


class ConsoleChannel:
    """A Channel that prints each would-be SMS or call as one block and reports it sent."""

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
            f"----- SMS {sid} to {to} ({len(body)} chars)\n"
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
            f"----- CALL {sid} to {to}\n"
            f"script: {twiml_url}\n"
            f"machine detection: {'on' if machine_detection else 'off'}\n"
            f"----- status callback: {status_callback or '-'}\n"
        )
        return DeliveryResult(DeliveryStatus.SENT, provider_sid=sid)
