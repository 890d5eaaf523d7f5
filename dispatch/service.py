"""Compose dispatch for the daemon: store, channel, dispatcher and the web servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dispatch.channel import Channel, ConsoleChannel
from dispatch.engine import Dispatcher, DispatchSettings, Feedback
from dispatch.policy import Routing, load_policies
from dispatch.responders import Responders, load_responders
from dispatch.twilio_channel import TwilioChannel, twilio_credentials_from_env
from gateway.config import Config, DispatchConfig
from gateway.errors import ConfigError
from store.backend import Stores
from store.dispatch import DispatchStore
from store.url import sqlite_url

if TYPE_CHECKING:
    from aiohttp import web

    from dispatch.observe import Runtime
    from gateway.locate import Locator

log = structlog.get_logger("panicd.dispatch")


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """Validated routing and responders, loaded before anything is opened."""

    config: DispatchConfig
    routing: Routing
    responders: Responders


def load_dispatch(config: Config, locator: Locator) -> DispatchPlan | None:
    """Load and validate responders and policies (ConfigError on a bad file)."""
    if config.dispatch is None:
        return None
    responders, warnings = load_responders(config.dispatch.responders_file)
    routing, more = load_policies(config.dispatch.policies_file, responders, locator.kelurahan)
    for warning in [*warnings, *more]:
        log.warning("config.warning", warning=str(warning))
    return DispatchPlan(config.dispatch, routing, responders)


ACK_SECRET_CREDENTIAL = "ack-link-secret"  # noqa: S105  # a credential's name
ACK_SECRET_ENV = "PANICD_ACK_SECRET"  # noqa: S105  # an environment variable's name


def given_ack_secret(environ: Mapping[str, str]) -> bytes | None:
    """The ack-link key from credential ``ack-link-secret`` or $PANICD_ACK_SECRET, if set."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / ACK_SECRET_CREDENTIAL
        if path.exists() and path.read_text(encoding="utf-8").strip():
            return path.read_text(encoding="utf-8").strip().encode()
    if environ.get(ACK_SECRET_ENV):
        return environ[ACK_SECRET_ENV].encode()
    return None


def shared_ack_secret_missing(config: Config, environ: Mapping[str, str]) -> ConfigError | None:
    """Why a shared store cannot sign ack links, or None.

    On one box a random key kept beside the SQLite file does; instances on one
    PostgreSQL must all sign with the same key (a link is answered by any of them), so it
    has to be given, and a secret is never kept in the database.
    """
    if config.dispatch is None or config.store.backend == "sqlite" or given_ack_secret(environ):
        return None
    return ConfigError(config.path, "store.url",
                       f"a PostgreSQL store needs the ack-link key, the same on every instance:"
                       f" credential {ACK_SECRET_CREDENTIAL} or ${ACK_SECRET_ENV}")


def ack_secret(database: Path | None, environ: Mapping[str, str]) -> bytes:
    """The ack-link signing key: credential ``ack-link-secret``, $PANICD_ACK_SECRET, or
    (SQLite only) a random key kept beside the database (mode 0600) so links survive
    restarts."""
    given = given_ack_secret(environ)
    if given is not None:
        return given
    if database is None:
        raise ConfigError("[store]", "url", f"a PostgreSQL store needs credential "
                          f"{ACK_SECRET_CREDENTIAL} or ${ACK_SECRET_ENV}")
    path = database.with_name(database.name + ".ack-secret")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text(encoding="utf-8").strip().encode()


@dataclass(frozen=True, slots=True)
class OpenDispatch:
    """A running dispatcher and what its web servers need (see :func:`open_dispatch`)."""

    plan: DispatchPlan
    dispatcher: Dispatcher
    store: DispatchStore
    auth_token: str | None
    ack_secret: bytes
    overdue: bool

    async def head_start(self, bound_s: float) -> None:
        """Return once the channel has accepted a page, if one was overdue at opening.

        At most ``bound_s``: a slow or unreachable provider must not hold up the rest of
        start-up for long. Only while something was overdue.
        """
        if not self.overdue:
            return
        accepted = self.dispatcher.page_accepted
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound_s):
                await accepted.wait()


@asynccontextmanager
async def open_dispatch(
    plan: DispatchPlan,
    stores: Stores | Path,
    *,
    feedback: Feedback | None,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[OpenDispatch]:
    """Open the dispatch store, the channel and the dispatcher, which starts sending at once.

    Steps that fell due while panicd was down go out from here, before the web servers
    (:func:`serve_dispatch_web`) exist: sending needs only the store and the channel.
    ``stores`` is the process's stores, or a SQLite file's path (tests).
    """
    if isinstance(stores, Path):
        stores = Stores(sqlite_url(stores))
    env = os.environ if environ is None else environ
    cfg = plan.config
    credentials = twilio_credentials_from_env(env)
    async with AsyncExitStack() as stack:
        store = stores.dispatch()
        await stack.enter_async_context(store)
        # Read before the dispatcher starts, which would claim what is due.
        now = time.time()
        overdue = any(due is not None and due <= now
                      for due in (await store.next_step_due(), await store.next_outbox_due()))
        channel: Channel
        if credentials is None:
            channel = ConsoleChannel()
            log.warning("dispatch.console_channel",
                        reason="no Twilio account configured, so SMS and calls are printed here")
        else:
            if cfg.from_number is None:
                raise ConfigError("[dispatch]", "from_number",
                                  "is required when Twilio credentials are set")
            channel = await stack.enter_async_context(
                TwilioChannel(credentials, from_number=cfg.from_number,
                              base_url=cfg.twilio_base_url)
            )
        secret = ack_secret(stores.url.path, env)
        dispatcher = await stack.enter_async_context(
            Dispatcher(store, plan.routing, plan.responders, channel,
                       DispatchSettings(cfg.public_base_url, secret, cfg.ack_ttl_s,
                                        cfg.send_concurrency),
                       feedback=feedback)
        )
        yield OpenDispatch(plan, dispatcher, store,
                           credentials.auth_token if credentials else None, secret, overdue)


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def remove_own_socket(path: Path, identity: tuple[int, int]) -> bool:
    """Remove the control socket file at a clean stop, unless it is no longer the one
    this process bound (another panicd started on the same path meanwhile)."""
    try:
        if _identity(path) != identity:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@asynccontextmanager
async def serve_dispatch_web(
    running: OpenDispatch,
    *,
    runtime: Runtime | None = None,
    mounts: Sequence[tuple[str, web.Application]] = (),
) -> AsyncIterator[None]:
    """Serve the public web server (webhooks, ack links, mounts) and the control socket."""
    # The web stack (aiohttp.web and panicd's apps on it) is imported here, not at the
    # top: a restart sends its overdue escalation steps before it is needed.
    from aiohttp import web  # noqa: PLC0415

    from dispatch.observe import install  # noqa: PLC0415
    from dispatch.web import WebSettings, control_app, public_app  # noqa: PLC0415
    from dispatch.web_limits import (  # noqa: PLC0415
        AcceptErrorFilter,
        WebLimits,
        body_timeout_middleware,
        close_public,
        plan_descriptors,
        serve_public,
    )

    cfg = running.plan.config
    dispatcher, store = running.dispatcher, running.store
    async with AsyncExitStack() as stack:
        settings = WebSettings(cfg.public_base_url, running.auth_token, running.ack_secret)
        public_web = public_app(dispatcher, store, settings)
        for prefix, sub in mounts:
            public_web.add_subapp(prefix, sub)
        control_web = control_app(dispatcher, store)
        if runtime is not None:
            # /metrics, /ops/status and reassign need the daemon's in-process state.
            install(public_web, control_web, runtime, dispatcher, store)
        limits = WebLimits(cfg.max_connections, cfg.header_timeout_s, cfg.body_timeout_s,
                           cfg.fd_reserve)
        # Outermost, so no other middleware reads a body without the deadline.
        public_web.middlewares.insert(0, body_timeout_middleware(limits.body_timeout_s))
        # keepalive_timeout: after the first request, aiohttp closes a connection still
        # without a complete next request this long after its last response.
        public = web.AppRunner(public_web, access_log=None,
                               keepalive_timeout=limits.header_timeout_s)
        await public.setup()
        stack.push_async_callback(public.cleanup)
        accept_errors = AcceptErrorFilter(asyncio.get_running_loop())
        accept_errors.install()
        stack.callback(accept_errors.uninstall)
        budget = plan_descriptors(limits)
        listener, gate = await serve_public(public, cfg.listen_host, cfg.listen_port,
                                            limits, budget)
        stack.push_async_callback(close_public, listener, gate)
        control = web.AppRunner(control_web, access_log=None)
        await control.setup()
        stack.push_async_callback(control.cleanup)
        cfg.control_socket.parent.mkdir(parents=True, exist_ok=True)
        cfg.control_socket.unlink(missing_ok=True)  # a crashed run's socket file
        await web.UnixSite(control, str(cfg.control_socket)).start()
        # Runs before control.cleanup (LIFO): no new client connects while it drains.
        stack.callback(remove_own_socket, cfg.control_socket, _identity(cfg.control_socket))
        # Only the service user (and root) may ack or resolve through the socket.
        cfg.control_socket.chmod(0o660)
        log.info("web.listening", host=cfg.listen_host, port=cfg.listen_port,
                 public_base_url=cfg.public_base_url, control_socket=str(cfg.control_socket))
        yield
