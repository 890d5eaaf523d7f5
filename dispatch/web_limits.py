"""Limits that keep the public web server from eating what paging needs (issue 11 case 4).

With 1,100 idle, half-sent connections at a 1,024 descriptor limit, every SMS and call
failed with EMFILE: the connections held every descriptor the provider client needed.
Here the public server gets

- a cap on concurrent connections, sized so a reserve of descriptors is always left for
  the provider client, the broker and the database (:func:`plan_descriptors`): a
  connection over the cap is answered 503 and closed at once;
- a header timeout: a connection that has not sent a complete request head within
  ``header_timeout_s`` of connecting is aborted (aiohttp has none of its own; its
  keep-alive timeout, set to the same value, covers the requests after the first);
- a body timeout: a request body must arrive within ``body_timeout_s``
  (:func:`body_timeout_middleware`);
- one journal line per kind of repeated trouble, then a count per interval
  (:class:`RepeatedEventLog`), also for asyncio's "socket.accept() out of system
  resource", which it logs once per failed accept (:class:`AcceptErrorFilter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("panicd.web")

# The message asyncio's selector loop passes to the exception handler when accept()
# fails with EMFILE, ENFILE, ENOBUFS or ENOMEM (asyncio/selector_events.py,
# _accept_connection); it retries the accept a second later and logs again.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n"
    b"Retry-After: 5\r\n\r\n"
)
# Below this many connections the web server could not serve Twilio's webhooks and an
# operator at once; the budget never sizes the cap lower.
MIN_CONNECTIONS = 8
# With no hard limit at all, raise the soft one this far.
UNLIMITED_TARGET = 65_536


@dataclass(frozen=True, slots=True)
class WebLimits:
    """The public web server's limits, from the ``[dispatch]`` table."""

    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    # Descriptors always left for the provider client, the broker and the database.
    fd_reserve: int = 128


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    """The process's descriptor limit and how much of it the web server may use."""

    soft_before: int
    soft: int
    hard: int
    in_use: int
    reserve: int
    max_connections: int

    @property
    def short(self) -> bool:
        """Whether the limit leaves less than the configured cap (the cap was lowered)."""
        return self.soft - self.in_use - self.reserve < self.max_connections


def connection_cap(soft: int, in_use: int, reserve: int, wanted: int) -> int:
    """The connection cap that keeps ``reserve`` descriptors free under ``soft``."""
    return max(MIN_CONNECTIONS, min(wanted, soft - in_use - reserve))


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after, hard).

    systemd gives services a soft limit of 1,024 and a far higher hard one, and asks
    programs that need more to raise it themselves (systemd.exec(5), LimitNOFILE=).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            # A seccomp filter or a container may forbid it: work within what we have.
            log.warning("web.fd_limit_not_raised", soft=soft, hard=hard, error=repr(exc))
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def descriptors_in_use() -> int:
    """How many descriptors the process has open now (0 if the system cannot say)."""
    try:
        # Minus the descriptor the listing itself holds open.
        return max(0, sum(1 for _ in Path("/proc/self/fd").iterdir()) - 1)
    except OSError:
        return 0


def plan_descriptors(limits: WebLimits) -> DescriptorBudget:
    """Raise the limit, count what is open and size the connection cap; logs the budget."""
    before, soft, hard = raise_nofile_limit()
    in_use = descriptors_in_use()
    cap = connection_cap(soft, in_use, limits.fd_reserve, limits.max_connections)
    budget = DescriptorBudget(before, soft, hard, in_use, limits.fd_reserve, cap)
    fields = {"soft_before": before, "soft": soft, "hard": hard, "in_use": in_use,
              "reserve": limits.fd_reserve, "max_connections": cap,
              "configured_max_connections": limits.max_connections}
    if budget.short:
        log.warning("web.fd_budget", short=True, **fields)
    else:
        log.info("web.fd_budget", **fields)
    return budget


class RepeatedEventLog:
    """Logs the first of a run of one event in full, then one count per interval.

    The first occurrence is never lost; while it keeps happening, one line per
    ``interval_s`` says how many more there were (``suppressed=N``); once an interval
    passes without any, the next occurrence is logged in full again.
    """

    def __init__(self, event: str, *, interval_s: float = 10.0, error: bool = True) -> None:
        self.event = event
        self.interval_s = interval_s
        self._error = error
        self._handle: asyncio.TimerHandle | None = None
        self.suppressed = 0
        self.total = 0

    def _emit(self, **fields: Any) -> None:
        if self._error:
            log.error(self.event, **fields)
        else:
            log.warning(self.event, **fields)

    def hit(self, **fields: Any) -> None:
        """One occurrence, with what the first line of a run should say."""
        self.total += 1
        if self._handle is not None:
            self.suppressed += 1
            return
        self._emit(**fields)
        self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._flush)

    def _flush(self) -> None:
        self._handle = None
        if self.suppressed:
            self._emit(suppressed=self.suppressed, interval_s=self.interval_s,
                       total=self.total)
            self.suppressed = 0
            self._handle = asyncio.get_running_loop().call_later(self.interval_s, self._flush)

    def close(self) -> None:
        """Stop the interval timer, saying what was suppressed since the last line."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.suppressed:
            self._emit(suppressed=self.suppressed, interval_s=self.interval_s,
                       total=self.total)
            self.suppressed = 0


class AcceptErrorFilter:
    """The loop's exception handler while the web server runs: accept() running out of
    descriptors is logged through :class:`RepeatedEventLog`; anything else goes to the
    handler that was there before (asyncio's default)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval_s: float = 10.0) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self.accept_failed = RepeatedEventLog("web.accept_failed", interval_s=interval_s)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Handle one exception context from the loop."""
        if context.get("message") == ACCEPT_OUT_OF_RESOURCES:
            exc = context.get("exception")
            self.accept_failed.hit(errno=getattr(exc, "errno", None), error=repr(exc),
                                   in_use=descriptors_in_use())
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def install(self) -> None:
        """Become the loop's exception handler."""
        self._loop.set_exception_handler(self)

    def uninstall(self) -> None:
        """Restore the previous handler and say what was suppressed."""
        self._loop.set_exception_handler(self._previous)
        self.accept_failed.close()


class ConnectionGate:
    """The protocol factory of the public listener: counts connections, refuses those
    over the cap and aborts those that send no complete request head in time; what it
    admits is served by aiohttp's own request handler from ``server``."""

    def __init__(self, server: web.Server, *, max_connections: int,
                 header_timeout_s: float, interval_s: float = 10.0) -> None:
        self.server = server
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.peak = 0
        self.refused = RepeatedEventLog("web.connections_capped", interval_s=interval_s,
                                        error=False)
        self.timed_out = RepeatedEventLog("web.header_timeout", interval_s=interval_s,
                                          error=False)

    def __call__(self) -> asyncio.Protocol:
        """A protocol for one accepted connection."""
        return _GuardedConnection(self)

    def close(self) -> None:
        """Stop the log timers."""
        self.refused.close()
        self.timed_out.close()


class _GuardedConnection(asyncio.Protocol):
    """One connection: forwards to aiohttp's RequestHandler once admitted."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        gate = self._gate
        self._transport = transport
        if gate.open >= gate.max_connections:
            gate.refused.hit(open=gate.open, max_connections=gate.max_connections,
                             peer=_peer(transport))
            transport.write(REFUSAL)
            transport.close()
            return
        gate.open += 1
        gate.peak = max(gate.peak, gate.open)
        self._timer = asyncio.get_running_loop().call_later(
            gate.header_timeout_s, self._header_expired
        )
        self._inner = gate.server()
        self._inner.connection_made(transport)

    def _header_expired(self) -> None:
        self._timer = None
        self._gate.timed_out.hit(timeout_s=self._gate.header_timeout_s,
                                 peer=_peer(self._transport), open=self._gate.open)
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            # The request head ends with an empty line (RFC 9112 §2.1).
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> None:
        # None, as aiohttp's own handler answers: the transport closes on EOF.
        if self._inner is not None:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        if self._inner is not None:
            self._gate.open -= 1
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return None if peer is None else str(peer[0])


def body_timeout_middleware(timeout_s: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware that reads each request body within ``timeout_s`` before any handler.

    ``request.read()`` keeps the body, so the handlers' ``post()``/``json()``/``read()``
    use it; a body that does not arrive in time closes the connection.
    """

    @web.middleware
    async def body_timeout(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()
            except TimeoutError:
                log.warning("web.body_timeout", path=request.path, timeout_s=timeout_s,
                            peer=request.remote)
                if request.transport is not None:
                    request.transport.abort()
                raise web.HTTPRequestTimeout from None
        return await handler(request)

    return body_timeout


async def serve_public(
    runner: web.AppRunner, host: str, port: int, limits: WebLimits, budget: DescriptorBudget
) -> tuple[asyncio.Server, ConnectionGate]:
    """Listen on ``host:port`` through a :class:`ConnectionGate` over ``runner``'s server."""
    server = runner.server
    if server is None:
        raise RuntimeError("serve_public needs a runner that is set up")
    gate = ConnectionGate(server, max_connections=budget.max_connections,
                          header_timeout_s=limits.header_timeout_s)
    loop = asyncio.get_running_loop()
    # asyncio accepts up to ``backlog`` sockets per wake-up before the gate can close the
    # ones over the cap, so one burst holds that many descriptors at once: it must fit in
    # the reserve with room left for the store, checkpoints and the provider. With 128 it
    # was the whole reserve, and an idle-connection flood hit EMFILE at accept.
    backlog = max(16, min(128, budget.reserve // 2))
    listener = await loop.create_server(gate, host, port, backlog=backlog, reuse_address=True)
    return listener, gate


async def close_public(listener: asyncio.Server, gate: ConnectionGate) -> None:
    """Stop listening (the runner's cleanup then closes the connections)."""
    listener.close()
    with contextlib.suppress(OSError):
        await listener.wait_closed()
    gate.close()
