"""Delivery through Twilio: the official library's async API over panicd's own HTTP client.

DESIGN §2 Delivery: the library is driven with ``create_async`` through an http client
whose base URL is configurable (tests point it at Prism) and which never retries by
itself; :class:`TwilioChannel` owns retrying with :class:`dispatch.retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog
from twilio.base.exceptions import (
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http.response import Response
from twilio.rest import Client

from dispatch.channel import DeliveryResult, DeliveryStatus, ProviderLookupError, ProviderRecord
from dispatch.retry import AttemptFailure, FailureKind, RetryPolicy
from gateway.errors import ConfigError

log = structlog.get_logger(__name__)

TWILIO_API_BASE = "https://api.twilio.com"
ACCOUNT_SID_RE = re.compile(r"^AC[0-9a-fA-F]{32}$")
CREDENTIAL_TOKEN_FILE = "twilio-auth-token"  # noqa: S105  # a file name, not a secret
CREDENTIAL_SID_FILE = "twilio-account-sid"

# Twilio errors answered at create time that re-sending the same request cannot fix
# (https://www.twilio.com/docs/api/errors/<code>). Any other 4xx but 429 is treated as
# permanent too: the request itself is wrong, so a retry would only repeat it.
PERMANENT_ERROR_CODES: Mapping[int, str] = {
    20003: "authentication failed (docs/api/errors/20003)",
    20404: "resource not found, e.g. wrong account sid (docs/api/errors/20404)",
    21211: "invalid 'To' phone number (docs/api/errors/21211)",
    21212: "invalid 'From' phone number (docs/api/errors/21212)",
    21215: "voice geo permissions do not allow this destination (docs/api/errors/21215)",
    21217: "'To' phone number does not appear to be valid (docs/api/errors/21217)",
    21219: "trial account: 'To' number not verified (docs/api/errors/21219)",
    21401: "invalid phone number (docs/api/errors/21401)",
    21408: "SMS geo permissions not enabled for the region (docs/api/errors/21408)",
    21602: "message body is required (docs/api/errors/21602)",
    21606: "'From' number is not SMS-capable for this account (docs/api/errors/21606)",
    21608: "trial account: unverified 'To' number (docs/api/errors/21608)",
    21610: "recipient unsubscribed by replying STOP (docs/api/errors/21610)",
    21612: "'To'/'From' pair cannot be routed by SMS (docs/api/errors/21612)",
    21614: "'To' number is not a mobile number, e.g. a landline (docs/api/errors/21614)",
    21617: "message body exceeds 1600 characters (docs/api/errors/21617)",
}

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TwilioCredentials:
    """An account sid and auth token; the token never appears in repr or logs."""

    account_sid: str
    auth_token: str = field(repr=False)


def twilio_credentials_from_env(environ: Mapping[str, str]) -> TwilioCredentials | None:
    """Read Twilio credentials from the environment or systemd credentials; None if unset.

    The token comes from ``$CREDENTIALS_DIRECTORY/twilio-auth-token`` (systemd
    ``LoadCredential=``) when present, else ``TWILIO_AUTH_TOKEN``; the sid from
    ``TWILIO_ACCOUNT_SID`` or ``$CREDENTIALS_DIRECTORY/twilio-account-sid``. Neither set
    means "no Twilio" (the console channel); only one set is a configuration error.
    """
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")

    def from_file(name: str) -> str | None:
        if not cred_dir:
            return None
        path = Path(cred_dir) / name
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    sid = environ.get("TWILIO_ACCOUNT_SID", "").strip() or from_file(CREDENTIAL_SID_FILE)
    token = from_file(CREDENTIAL_TOKEN_FILE) or environ.get("TWILIO_AUTH_TOKEN", "").strip()
    if not sid and not token:
        return None
    if not sid:
        raise ConfigError("environment", "TWILIO_ACCOUNT_SID", "auth token set but no account sid")
    if not token:
        raise ConfigError(
            "environment",
            "TWILIO_AUTH_TOKEN",
            f"account sid set but no token (env or $CREDENTIALS_DIRECTORY/{CREDENTIAL_TOKEN_FILE})",
        )
    if not ACCOUNT_SID_RE.fullmatch(sid):
        raise ConfigError("environment", "TWILIO_ACCOUNT_SID", "must match AC + 32 hex digits")
    return TwilioCredentials(sid, token)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Return the seconds a Retry-After header asks for (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify_http(status: int) -> FailureKind:
    """Classify a non-2xx Twilio answer by HTTP status; the Twilio error code only explains it."""
    if status == 429:
        return FailureKind.THROTTLED
    if status >= 500 or status == 408:
        return FailureKind.TRANSIENT
    return FailureKind.PERMANENT


def _twilio_error(text: str) -> tuple[int | None, str]:
    """Extract Twilio's error code and message from an error body, if it has them."""
    try:
        body = json.loads(text)
    except ValueError:
        return None, text[:200]
    if not isinstance(body, dict):
        return None, text[:200]
    code = body.get("code")
    message = body.get("message") or body.get("detail") or body.get("title") or ""
    return (code if isinstance(code, int) else None), str(message)


class TwilioRetryableHttpError(Exception):
    """Twilio answered 429 or 5xx; raised by the http client so the channel can retry."""

    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(f"HTTP {failure.http_status}: {failure.message}")
        self.failure = failure


class TwilioApiHttpClient:
    """An async http client for twilio-python that rebases URLs and never retries.

    It implements ``twilio.http.AsyncHttpClient``'s interface (the library reads only
    ``is_async`` and ``request``). URLs under ``https://api.twilio.com`` are rewritten to
    ``base_url``. Answers 429 and 5xx raise :class:`TwilioRetryableHttpError` carrying
    Retry-After, which the library's exceptions would drop; other answers go back to
    the library, which raises ``TwilioRestException`` for 4xx.
    """

    is_async = True

    def __init__(
        self,
        base_url: str = TWILIO_API_BASE,
        *,
        timeout_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._wall_clock = wall_clock
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def rebase(self, uri: str) -> str:
        """Return ``uri`` with Twilio's API origin replaced by the configured base URL."""
        if uri.startswith(TWILIO_API_BASE + "/"):
            return self.base_url + uri[len(TWILIO_API_BASE) :]
        if self.base_url != TWILIO_API_BASE:
            # A rebased client (a test peer, a proxy) must never leak to another live host.
            raise ValueError(f"refusing to send outside {TWILIO_API_BASE}: {uri}")
        return uri

    def extra_headers(self) -> Mapping[str, str]:
        """Return headers to add to the next request; none in production (a test seam)."""
        return {}

    # The signature is twilio.http.AsyncHttpClient.request's, which the library calls.
    async def request(  # noqa: PLR0917
        self,
        method: str,
        uri: str,
        params: Mapping[str, object] | None = None,
        data: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # the library passes it
        allow_redirects: bool = False,
    ) -> Any:
        """Send one HTTP request exactly once and return a ``twilio.http.response.Response``."""
        if self._session is None:
            raise RuntimeError("TwilioApiHttpClient used outside 'async with'")
        all_headers = {**(headers or {}), **self.extra_headers()}
        if auth is not None:
            all_headers["Authorization"] = basic_authorization(*auth)
        async with self._session.request(
            method.upper(),
            self.rebase(uri),
            params=_form_fields(params),
            data=_form_fields(data),
            headers=all_headers,
            timeout=aiohttp.ClientTimeout(total=timeout) if timeout is not None else None,
            allow_redirects=allow_redirects,
        ) as resp:
            text = await resp.text()
            if resp.status == 429 or resp.status >= 500:
                code, message = _twilio_error(text)
                raise TwilioRetryableHttpError(
                    AttemptFailure(
                        kind=classify_http(resp.status),
                        message=message or resp.reason or "",
                        http_status=resp.status,
                        error_code=code,
                        retry_after_s=parse_retry_after(
                            resp.headers.get("Retry-After"), self._wall_clock()
                        ),
                    )
                )
            return Response(resp.status, text, dict(resp.headers))


def basic_authorization(username: str, password: str) -> str:
    """Return an HTTP Basic ``Authorization`` value (RFC 7617) for the account sid and token."""
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _form_fields(values: Mapping[str, object] | None) -> list[tuple[str, str]] | None:
    """Flatten Twilio's params into form pairs, repeating a key once per list item."""
    if values is None:
        return None
    pairs: list[tuple[str, str]] = []
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        pairs.extend((key, _form_value(item)) for item in items)
    return pairs


def _form_value(value: object) -> str:
    # twilio-python serialises booleans itself as "true"/"false"; guard the rest.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


CALL_STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")


class TwilioChannel:
    """A Channel that sends SMS and places calls through Twilio with panicd's retry policy."""

    def __init__(
        self,
        credentials: TwilioCredentials,
        *,
        from_number: str,
        base_url: str = TWILIO_API_BASE,
        policy: RetryPolicy | None = None,
        request_timeout_s: float = 10.0,
        ring_timeout_s: int = 30,
        http_client: TwilioApiHttpClient | None = None,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.from_number = from_number
        self.policy = policy or RetryPolicy()
        self.ring_timeout_s = ring_timeout_s
        self.http_client = http_client or TwilioApiHttpClient(base_url, timeout_s=request_timeout_s)
        # environment={}: no TWILIO_* variable (region, edge) may redirect requests behind
        # the configuration's back; credentials come only from twilio_credentials_from_env.
        self._client = Client(
            credentials.account_sid,
            credentials.auth_token,
            http_client=self.http_client,
            environment={},
        )
        self._account_sid = credentials.account_sid
        self._sleep = sleep
        self._rand = rand
        self._monotonic = monotonic

    async def __aenter__(self) -> Self:
        await self.http_client.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.http_client.__aexit__(exc_type, exc, tb)

    async def send_sms(self, to: str, body: str, *, status_callback: str | None) -> DeliveryResult:
        """Send one SMS; retries throttling and server errors within the policy's bounds."""

        async def create() -> str:
            message = await self._client.messages.create_async(
                to=to,
                from_=self.from_number,
                body=body,
                status_callback=status_callback,
            )
            return str(message.sid)

        return await self._deliver("sms", to, create)

    async def place_call(
        self,
        to: str,
        *,
        twiml_url: str,
        status_callback: str | None,
        machine_detection: bool = True,
    ) -> DeliveryResult:
        """Start one call fetching its script from ``twiml_url``, with answering machine detection.

        With ``MachineDetection=Enable`` Twilio posts ``AnsweredBy`` (human, machine_start,
        fax, unknown) to ``twiml_url``, so the script can hang up on voicemail; a
        voicemail can never press the ack digit either way.
        """
        # Unset optional parameters stay out of the request entirely, as the library does
        # with its own ``values.unset`` default.
        extra: dict[str, object] = {}
        if status_callback is not None:
            extra["status_callback"] = status_callback
            extra["status_callback_event"] = list(CALL_STATUS_EVENTS)
            extra["status_callback_method"] = "POST"
        if machine_detection:
            extra["machine_detection"] = "Enable"

        async def create() -> str:
            call = await self._client.calls.create_async(
                to=to,
                from_=self.from_number,
                url=twiml_url,
                method="POST",
                timeout=self.ring_timeout_s,
                **extra,
            )
            return str(call.sid)

        return await self._deliver("call", to, create)

    async def _deliver(
        self, kind: str, to: str, create: Callable[[], Awaitable[str]]
    ) -> DeliveryResult:
        started = self._monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                sid = await create()
            except (TwilioRestException, TwilioServiceException) as exc:
                failure = _library_failure(exc)
            except TwilioRetryableHttpError as exc:
                failure = exc.failure
                if failure.http_status == 504:
                    # A gateway gave up waiting for Twilio, which may have accepted it.
                    return self._in_doubt(kind, to, failure, attempt)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # OSError too: out of descriptors (EMFILE), no buffer space, a reset, are
                # this machine's passing trouble, not the page's (issue 11 case 4). It
                # escaped as a bare OSError before, which the outbox counted as failed.
                failure = AttemptFailure(
                    FailureKind.TRANSIENT, f"{type(exc).__name__}: {exc}".rstrip(": ")
                )
                if not _never_sent(exc):
                    # Re-POSTing now could page twice (issue 12 item 3: 11 of 642 pages
                    # sent twice after dropped connections): the outbox asks first.
                    return self._in_doubt(kind, to, failure, attempt)
            else:
                return DeliveryResult(DeliveryStatus.SENT, provider_sid=sid, attempts=attempt)

            elapsed = self._monotonic() - started
            delay = self.policy.delay_before_retry(failure, attempt, elapsed, self._rand())
            if delay is None:
                return self._give_up(kind, to, failure, attempt)
            log.warning(
                "twilio.retrying",
                channel=kind,
                to=to,
                attempt=attempt,
                failure=failure.kind.value,
                http_status=failure.http_status,
                error_code=failure.error_code,
                retry_after_s=failure.retry_after_s,
                delay_s=round(delay, 3),
            )
            await self._sleep(delay)

    def _in_doubt(
        self, kind: str, to: str, failure: AttemptFailure, attempts: int
    ) -> DeliveryResult:
        log.warning("twilio.in_doubt", channel=kind, to=to, attempts=attempts,
                    http_status=failure.http_status, error=failure.message)
        return DeliveryResult(DeliveryStatus.FAILED_TRANSIENT, error_code=failure.error_code,
                              error_message=failure.message, attempts=attempts, in_doubt=True)

    async def recent(self, kind: str, to: str, *, since: float) -> list[ProviderRecord]:
        """Twilio's Messages or Calls list filtered by ``To`` and this channel's ``From``,
        newest first, read until a record older than ``since`` (client-side: the API's
        date filters are by day and skip messages not yet sent)."""
        found: list[ProviderRecord] = []
        resource = self._client.messages if kind == "sms" else self._client.calls
        try:
            async for item in await resource.stream_async(
                to=to, from_=self.from_number, page_size=LOOKUP_PAGE_SIZE, limit=LOOKUP_LIMIT,
            ):
                created = _timestamp(item.date_created)
                if created < since:
                    break
                body = str(getattr(item, "body", None) or "") if kind == "sms" else None
                found.append(ProviderRecord(str(item.sid), str(item.status), created, body))
        except (TwilioRestException, TwilioServiceException) as exc:
            failure = _library_failure(exc)
            raise ProviderLookupError(f"HTTP {failure.http_status}: {failure.message}",
                                      permanent=failure.kind is FailureKind.PERMANENT) from exc
        except TwilioRetryableHttpError as exc:
            raise ProviderLookupError(str(exc), permanent=False) from exc
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise ProviderLookupError(f"{type(exc).__name__}: {exc}".rstrip(": "),
                                      permanent=False) from exc
        return found

    def _give_up(
        self, kind: str, to: str, failure: AttemptFailure, attempts: int
    ) -> DeliveryResult:
        status = (
            DeliveryStatus.FAILED_PERMANENT
            if failure.kind is FailureKind.PERMANENT
            else DeliveryStatus.FAILED_TRANSIENT
        )
        log.warning(
            "twilio.failed",
            channel=kind,
            to=to,
            status=status.value,
            attempts=attempts,
            http_status=failure.http_status,
            error_code=failure.error_code,
            error=failure.message,
        )
        return DeliveryResult(
            status,
            error_code=failure.error_code,
            error_message=failure.message,
            attempts=attempts,
            retry_after_s=failure.retry_after_s,
        )


# Records read per lookup at most: the pages of one responder since a send may have begun.
LOOKUP_PAGE_SIZE = 50
LOOKUP_LIMIT = 1000


def _timestamp(value: object) -> float:
    """A Twilio ``date_created`` (the library parses RFC 2822 into an aware datetime)."""
    if isinstance(value, datetime):
        return value.timestamp()
    raise ValueError(f"Twilio record without date_created: {value!r}")


def _never_sent(exc: BaseException) -> bool:
    """Whether a failed request certainly never reached the provider: the connection was
    never made (refused, no route, DNS, connect timeout, no descriptor for a socket)."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return True
    # Out of descriptors: no socket could even be made.
    return type(exc) is OSError and exc.errno in {errno.EMFILE, errno.ENFILE}


def _library_failure(exc: TwilioRestException | TwilioServiceException) -> AttemptFailure:
    """Turn the library's 4xx exception into an AttemptFailure."""
    status = int(exc.status)
    code = exc.code if isinstance(exc.code, int) else None
    message = str(
        getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", "")
    )
    if code is not None and code in PERMANENT_ERROR_CODES and not message:
        message = PERMANENT_ERROR_CODES[code]
    return AttemptFailure(classify_http(status), message, http_status=status, error_code=code)
