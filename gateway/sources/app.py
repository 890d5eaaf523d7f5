"""The city service app's panic endpoint: ``POST /app/v1/panic`` on panicd's web server.

Each app installation is registered like a button (``hardware = "app"``, ``mobile =
true``) with its own secret in the device-keys credential, provisioned when the user
enrols. The app posts the same signed JSON frame a native button publishes (docs/FRAMES.md),
with the phone's GPS fix; the frame's HMAC tag and counter are the authentication and
the replay protection, so a stolen request cannot be replayed and a forged one is refused.

The answer comes only after the press is committed (or refused and dead-lettered), so a
200 means the same as a PUBACK: it is stored. See docs/APP_API.md for codes and bodies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from gateway.errors import DecodeError
from gateway.formats import native
from gateway.ingest import DeadLettered, Inbound, Ingestor, Outcome, Repeated, Stored
from gateway.model import Frame, Reception, Trust

log = structlog.get_logger("panicd.app")

SOURCE = "app"
FORMAT = "app"
# Rejection reasons and the HTTP status the app sees for each.
UNAUTHORISED = frozenset({"unknown_device", "bad_tag", "unsigned", "no_key"})
CONFLICT = frozenset({"stale_counter", "replayed_counter", "counter_reused"})


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Rate limit per client address: ``burst`` requests, refilled at ``per_minute``."""

    per_minute: float = 30.0
    burst: int = 10
    commit_timeout_s: float = 10.0


class RateLimiter:
    """Token buckets keyed by client address (pure: the clock is injected)."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> float | None:
        """None if allowed (and a token is taken), else seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:
                # Forget full buckets so a scan of many addresses cannot grow memory.
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self._burst}
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self._rate if self._rate > 0 else 60.0


INGESTOR: web.AppKey[Ingestor] = web.AppKey("ingestor", Ingestor)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter", RateLimiter)
SETTINGS: web.AppKey[AppSettings] = web.AppKey("app_settings", AppSettings)


def _error(status: int, reason: str, detail: str = "", **extra: object) -> web.Response:
    body: dict[str, object] = {"status": "rejected", "error": reason}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.json_response(body, status=status)


def outcome_response(outcome: Outcome) -> web.Response:
    """The HTTP answer for a committed outcome."""
    match outcome:
        case Stored(press_id, _device, _counter, incident_id, result):
            return web.json_response({"status": "stored", "press": press_id,
                                      "incident": incident_id, "outcome": result})
        case Repeated(press_id, _device, _counter):
            return web.json_response({"status": "duplicate", "press": press_id})
        case DeadLettered(reason):
            if reason in UNAUTHORISED:
                return _error(401, reason)
            if reason in CONFLICT:
                return _error(409, reason)
            return _error(400, reason)


async def panic(request: web.Request) -> web.Response:
    """Receive one signed frame from the app; answer after commit."""
    remote = request.remote or "unknown"
    retry_after = request.app[LIMITER].allow(remote)
    if retry_after is not None:
        log.warning("app.rate_limited", remote=remote)
        return web.json_response(
            {"status": "rejected", "error": "rate_limited"}, status=429,
            headers={"Retry-After": str(max(1, round(retry_after)))},
        )
    if request.content_type != "application/json":
        return _error(415, "unsupported_media_type", "send application/json")
    payload = await request.read()
    try:
        decoded: Frame | DecodeError = native.decode("", payload)
    except DecodeError as exc:
        decoded = exc
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Outcome] = loop.create_future()

    def on_done(outcome: Outcome) -> None:
        if not done.done():
            done.set_result(outcome)

    inbound = Inbound(
        decoded=decoded,
        payload=payload,
        reception=Reception(path=f"app:{remote}", received_at=time.time(), source=SOURCE),
        format=FORMAT,
        trust=Trust.SIGNED,
        on_done=on_done,
    )
    ingestor = request.app[INGESTOR]
    try:
        await ingestor.submit(inbound)
    except RuntimeError:
        return _error(503, "shutting_down", "retry the same frame shortly")
    try:
        async with asyncio.timeout(request.app[SETTINGS].commit_timeout_s):
            outcome = await done
    except TimeoutError:
        # Queued but not yet committed: the app must retry with the SAME frame; a commit
        # that lands meanwhile makes the retry a duplicate, never a second press.
        return _error(503, "not_committed_yet", "retry the same frame")
    return outcome_response(outcome)


def app_api(ingestor: Ingestor, settings: AppSettings,
            clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The sub-application mounted at ``/app`` on panicd's public web server."""
    app = web.Application(client_max_size=native.MAX_FRAME_BYTES * 2)
    app[INGESTOR] = ingestor
    app[LIMITER] = RateLimiter(settings.per_minute, settings.burst, clock)
    app[SETTINGS] = settings
    app.router.add_post("/v1/panic", panic)
    return app
