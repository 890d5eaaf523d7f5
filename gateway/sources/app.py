"""The city service app's panic endpoint: ``POST /app/v1/panic`` on panicd's web server.

Each app installation is registered like a button (``hardware = "app"``, ``mobile =
true``) with its own secret in the device-keys credential, provisioned when the user
enrols. The app posts the same signed JSON frame a native button publishes (docs/FRAMES.md),
with the phone's GPS fix; the frame's HMAC tag and counter are the authentication and
the replay protection, so a stolen request cannot be replayed and a forged one is refused.

The answer comes only after the press is committed (or refused and dead-lettered), so a
200 means the same as a PUBACK: it is stored. See docs/APP_API.md for codes and bodies.

Rate limits never let one client's traffic refuse another's panic (issue 11 case 3). A
frame whose tag checks out with its installation's key is charged to that installation
alone (fresh counters and repeats in buckets of their own, so replaying a captured frame
cannot use up the next real press); everything else is charged to its client address:
the peer, or, from a configured trusted proxy only, the address that proxy appended to
X-Forwarded-For. The tag check here only picks the bucket: the ingest writer still
verifies every frame. Buckets are bounded in number (least recently charged go first).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Protocol

import structlog
from aiohttp import web

from gateway.errors import DecodeError
from gateway.formats import native
from gateway.ingest import DeadLettered, Inbound, Ingestor, Outcome, Repeated, Stored
from gateway.model import Device, Frame, Reception, Trust
from gateway.verify import tag_valid, window_add, window_has

log = structlog.get_logger("panicd.app")

SOURCE = "app"
FORMAT = "app"
# Rejection reasons and the HTTP status the app sees for each.
UNAUTHORISED = frozenset({"unknown_device", "bad_tag", "unsigned", "no_key"})
CONFLICT = frozenset({"stale_counter", "replayed_counter", "counter_reused"})


IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class AppSettings:
    """Rate limit per bucket: ``burst`` requests, refilled at ``per_minute``."""

    per_minute: float = 30.0
    burst: int = 10
    commit_timeout_s: float = 10.0
    # Reverse proxies whose X-Forwarded-For entry names the client ([app] trusted_proxies).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Buckets kept at most (a flood from many addresses cannot grow memory past this).
    max_buckets: int = 10_000


class DeviceLookup(Protocol):
    """The registry, as far as picking a bucket needs it (gateway.config.Config)."""

    def device_for(self, frame: Frame) -> Device | None:
        """The registered device a frame's identity refers to."""
        ...


class RateLimiter:
    """Token buckets by key, at most ``max_keys`` of them (pure: the clock is injected)."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float],
                 *, max_keys: int = 10_000) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        # Least recently charged first: the ones to forget when there are too many.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> float | None:
        """None if allowed (and a token is taken), else seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        wait: float | None = None
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self._rate if self._rate > 0 else 60.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait


class FreshCounters:
    """Which signed counters each installation already sent here (pure, bounded by the
    registry: only frames whose tag checked out are remembered)."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}

    def fresh(self, device_id: str, counter: int | None) -> bool:
        """True (and remembered) the first time; False for a retry or a replay."""
        if counter is None:
            return False
        last, window = self._windows.get(device_id, (None, 0))
        if last is not None and window_has(last, window, counter):
            return False
        self._windows[device_id] = window_add(last, window, counter)
        return True


def _parse_address(text: str | None) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For entry ("a.b.c.d", "[v6]:port", …)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The client to charge: the peer, unless it is a trusted proxy; then the nearest
    X-Forwarded-For entry that is not itself a trusted proxy.

    Entries are read from the right: each trusted proxy appends the address it saw, so
    everything left of the last untrusted hop is whatever the client chose to send.
    """
    address = _parse_address(peer)
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    while address is not None and hops and any(address in net for net in trusted):
        hop = _parse_address(hops.pop())
        if hop is None:
            break  # garbage from the next hop: charge the proxy that passed it on
        address = hop
    return address


def address_bucket(address: IPAddress | None) -> str:
    """The bucket of a client address (an IPv6 client holds a whole /64)."""
    if address is None:
        return "addr:unknown"
    if isinstance(address, IPv6Address):
        return f"addr:{IPv6Network((address, 64), strict=False)}"
    return f"addr:{address}"


INGESTOR: web.AppKey[Ingestor] = web.AppKey("ingestor", Ingestor)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter", RateLimiter)
SETTINGS: web.AppKey[AppSettings] = web.AppKey("app_settings", AppSettings)
REGISTRY: web.AppKey[DeviceLookup] = web.AppKey("registry", DeviceLookup)
COUNTERS: web.AppKey[FreshCounters] = web.AppKey("fresh_counters", FreshCounters)
STAMP: web.AppKey[Callable[[], float]] = web.AppKey("stamp")


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


def _bucket(app: web.Application, decoded: Frame | DecodeError | None,
            address: IPAddress | None) -> str:
    """The installation's bucket for a frame its key signed, else the client address's."""
    if isinstance(decoded, Frame):
        device = app[REGISTRY].device_for(decoded)
        if device is not None and device.key is not None and tag_valid(decoded, device.key):
            fresh = app[COUNTERS].fresh(device.id, decoded.counter)
            return f"dev:{device.id}:{'new' if fresh else 'again'}"
    return address_bucket(address)


async def panic(request: web.Request) -> web.Response:
    """Receive one signed frame from the app; answer after commit."""
    settings = request.app[SETTINGS]
    address = client_address(request.remote, request.headers.getall("X-Forwarded-For", []),
                             settings.trusted_proxies)
    remote = str(address) if address is not None else "unknown"
    decoded: Frame | DecodeError | None = None
    payload = b""
    if request.content_type == "application/json":
        payload = await request.read()
        try:
            decoded = native.decode("", payload)
        except DecodeError as exc:
            decoded = exc
    bucket = _bucket(request.app, decoded, address)
    retry_after = request.app[LIMITER].allow(bucket)
    if retry_after is not None:
        log.warning("app.rate_limited", remote=remote, bucket=bucket)
        return web.json_response(
            {"status": "rejected", "error": "rate_limited"}, status=429,
            headers={"Retry-After": str(max(1, round(retry_after)))},
        )
    if decoded is None:
        return _error(415, "unsupported_media_type", "send application/json")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Outcome] = loop.create_future()

    def on_done(outcome: Outcome) -> None:
        if not done.done():
            done.set_result(outcome)

    inbound = Inbound(
        decoded=decoded,
        payload=payload,
        reception=Reception(path=f"app:{remote}", received_at=request.app[STAMP](),
                            source=SOURCE),
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


def app_api(ingestor: Ingestor, settings: AppSettings, registry: DeviceLookup,
            clock: Callable[[], float] = time.monotonic,
            stamp: Callable[[], float] = time.time) -> web.Application:
    """The sub-application mounted at ``/app`` on panicd's public web server. ``clock``
    paces the rate limit; ``stamp`` is a press's reception time (the database's clock
    on a store several instances share)."""
    app = web.Application(client_max_size=native.MAX_FRAME_BYTES * 2)
    app[INGESTOR] = ingestor
    app[STAMP] = stamp
    app[LIMITER] = RateLimiter(settings.per_minute, settings.burst, clock,
                               max_keys=settings.max_buckets)
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[COUNTERS] = FreshCounters()
    app.router.add_post("/v1/panic", panic)
    return app
