"""The public web server's limits (issue 11 case 4): a connection cap sized under the
descriptor limit, header and body timeouts, and repeated errors logged once per interval.

The last test repeats the attack at a small scale against the real daemon: panicd
started with a low descriptor limit, hundreds of idle half-sent connections held open
against its web server, a real signed press, and Prism as Twilio behind a recording
proxy: the page must go out within its level's wait, unhastened.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import resource
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from dispatch.web_limits import (
    ACCEPT_OUT_OF_RESOURCES,
    AcceptErrorFilter,
    ConnectionGate,
    DescriptorBudget,
    WebLimits,
    body_timeout_middleware,
    close_public,
    connection_cap,
    serve_public,
)
from firmware_sim.broker import Mosquitto
from tests.daemon_proc import DaemonProcess, wait_until
from tests.dispatch_e2e import (
    RecordingPeer,
    client_id,
    deploy,
    policies_toml,
    press_panic,
    rows,
    twilio_env,
    twilio_peer,
)
from tests.prism import free_port

__all__ = ["client_id", "twilio_env", "twilio_peer"]  # fixtures used by name

HALF_REQUEST = b"POST /twilio/status/sms/1 HTTP/1.1\r\nHost: panicd\r\nX-Slow: "


async def _echo(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


@asynccontextmanager
async def limited_server(
    limits: WebLimits, cap: int
) -> AsyncIterator[tuple[int, ConnectionGate]]:
    """An aiohttp app behind the gate on a free port; yields (port, gate)."""
    app = web.Application()
    app.middlewares.insert(0, body_timeout_middleware(limits.body_timeout_s))
    app.router.add_post("/echo", _echo)
    app.router.add_get("/", _echo)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.header_timeout_s)
    await runner.setup()
    port = free_port()
    budget = DescriptorBudget(1024, 1024, 1024, 10, limits.fd_reserve, cap)
    listener, gate = await serve_public(runner, "127.0.0.1", port, limits, budget)
    try:
        yield port, gate
    finally:
        await close_public(listener, gate)
        await runner.cleanup()


async def _half_sent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HALF_REQUEST)
    await writer.drain()
    return reader, writer


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed the connection within ``seconds``, and what it said."""
    try:
        async with asyncio.timeout(seconds):
            data = await reader.read()
    except TimeoutError:
        return False, b""
    except ConnectionResetError:
        return True, b""
    return True, data


def test_the_cap_keeps_the_descriptor_reserve_free() -> None:
    assert connection_cap(soft=1024, in_use=40, reserve=128, wanted=256) == 256
    assert connection_cap(soft=256, in_use=40, reserve=128, wanted=256) == 88
    assert connection_cap(soft=100, in_use=40, reserve=128, wanted=256) == 8  # a floor


async def test_connections_over_the_cap_are_answered_503_and_closed_at_once() -> None:
    limits = WebLimits(max_connections=4, header_timeout_s=30.0)
    with capture_logs() as logs:
        async with limited_server(limits, cap=4) as (port, _gate):
            held = [await _half_sent(port) for _ in range(4)]
            extra = [await _half_sent(port) for _ in range(6)]
            answers = [await _closed_within(reader, 2.0) for reader, _ in extra]
            assert all(closed for closed, _ in answers)
            assert all(data.startswith(b"HTTP/1.1 503") for _, data in answers)
            assert [await _closed_within(reader, 0.2) for reader, _ in held] == [
                (False, b"")
            ] * 4
            for _, writer in held + extra:
                writer.close()
    capped = [e for e in logs if e["event"] == "web.connections_capped"]
    # The first in full; the other five counted, and the count said when the server stops.
    assert [e.get("suppressed") for e in capped] == [None, 5]
    assert capped[0]["max_connections"] == 4


async def test_a_half_sent_request_is_closed_after_the_header_timeout() -> None:
    limits = WebLimits(max_connections=64, header_timeout_s=0.5)
    async with limited_server(limits, cap=64) as (port, gate):
        started = time.monotonic()
        idle = [await _half_sent(port) for _ in range(20)]
        trickle_reader, trickle = await _half_sent(port)
        for _ in range(4):  # a byte now and then does not extend the deadline
            await asyncio.sleep(0.15)
            trickle.write(b"x")
        closed = [await _closed_within(reader, 3.0) for reader, _ in idle]
        assert all(was for was, _ in closed)
        assert (await _closed_within(trickle_reader, 3.0))[0]
        assert time.monotonic() - started < 2.5
        assert gate.open == 0
        # A real request still gets its answer afterwards.
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/"
        ) as response:
            assert response.status == 200


async def test_once_the_head_is_complete_the_header_timeout_no_longer_applies() -> None:
    limits = WebLimits(max_connections=8, header_timeout_s=0.3, body_timeout_s=5.0)
    async with limited_server(limits, cap=8) as (port, _gate):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        await asyncio.sleep(0.6)  # twice the header timeout, within the body timeout
        writer.write(b"cd")
        async with asyncio.timeout(3):
            answer = await reader.readuntil(b"\r\n\r\n4")
        assert answer.startswith(b"HTTP/1.1 200")
        writer.close()


async def test_a_body_that_does_not_arrive_in_time_closes_the_connection() -> None:
    limits = WebLimits(max_connections=8, header_timeout_s=5.0, body_timeout_s=0.4)
    async with limited_server(limits, cap=8) as (port, _gate):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        await writer.drain()
        started = time.monotonic()
        closed, _ = await _closed_within(reader, 3.0)
        assert closed
        assert time.monotonic() - started < 2.0
        writer.close()


async def test_accept_out_of_descriptors_is_logged_once_then_counted_per_interval() -> None:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    others: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    accept_errors = AcceptErrorFilter(loop, interval_s=0.2)
    accept_errors.install()
    try:
        with capture_logs() as logs:
            for _ in range(500):  # asyncio calls the handler once per failed accept()
                loop.call_exception_handler({
                    "message": ACCEPT_OUT_OF_RESOURCES,
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                })
            loop.call_exception_handler({"message": "something else"})
            await asyncio.sleep(0.3)
            loop.call_exception_handler({"message": ACCEPT_OUT_OF_RESOURCES,
                                         "exception": OSError(errno.EMFILE, "x")})
            await asyncio.sleep(0.3)
    finally:
        accept_errors.uninstall()
        loop.set_exception_handler(previous)
    lines = [e for e in logs if e["event"] == "web.accept_failed"]
    assert lines[0]["errno"] == errno.EMFILE  # the first occurrence, in full
    assert lines[0]["log_level"] == "error"
    assert lines[1]["suppressed"] == 499
    assert lines[2]["suppressed"] == 1
    assert len(lines) == 3
    assert [c["message"] for c in others] == ["something else"]  # not swallowed
    assert loop.get_exception_handler() is not accept_errors


# --- the attack, small: the real daemon, a low descriptor limit, idle connections ----

NOFILE = 256
HOLD = 300  # idle half-sent connections kept open, more than the descriptor limit
LEVEL_WAIT_S = 60
SENT_ALERTS = "SELECT COUNT(*) FROM outbox WHERE purpose = 'alert' AND state = 'sent'"


class IdleConnections:
    """Keeps ``count`` half-sent connections open against a port, reopening any the
    server closes, from a thread of its own (as an outside attacker would)."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.opened = 0
        self.closed_by_server = 0  # closed without a word: the header timeout
        self.answered = 0  # answered (503) and closed: over the cap
        self.refused = 0
        self.peak_open = 0
        self.lifetimes: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-attack", daemon=True)

    def _open(self) -> tuple[socket.socket, float] | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
            sock.sendall(HALF_REQUEST)
        except OSError:
            self.refused += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock, time.monotonic()

    def _run(self) -> None:
        live: list[tuple[socket.socket, float]] = []
        while not self._stop.is_set():
            for _ in range(min(50, self.count - len(live))):
                opened = self._open()
                if opened is None:
                    break
                live.append(opened)
            self.peak_open = max(self.peak_open, len(live))
            still = []
            for sock, since in live:
                try:
                    data: bytes | None = sock.recv(4096, socket.MSG_PEEK)
                except BlockingIOError:
                    still.append((sock, since))
                    continue
                except OSError:
                    data = None  # reset: aborted by the server
                if data:
                    self.answered += 1
                else:
                    self.closed_by_server += 1
                    self.lifetimes.append(time.monotonic() - since)
                sock.close()
            live = still
            self._stop.wait(0.05)
        for sock, _ in live:
            sock.close()

    def __enter__(self) -> IdleConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _daemon_fds(pid: int) -> int:
    with contextlib.suppress(OSError):
        return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return -1


@pytest.mark.slow
def test_under_idle_connections_a_stored_panic_is_paged_within_its_level_unhastened(
    mosquitto: Mosquitto, twilio_peer: RecordingPeer, tmp_path: Path, client_id: str,
    twilio_env: None,
) -> None:
    site = deploy(tmp_path / "cfg", mosquitto=mosquitto, client_id=client_id,
                  twilio_base_url=twilio_peer.url, policies=policies_toml(LEVEL_WAIT_S))
    # [dispatch] is the last table deploy() writes: a short header timeout for the test.
    with site.config.open("a", encoding="utf-8") as config:
        config.write("header_timeout_s = 2\n")
    port = int(site.public_url.rsplit(":", 1)[1])
    daemon = DaemonProcess(site.config, site.keys, tmp_path / "run")
    with contextlib.ExitStack() as stack:
        stack.callback(daemon.__exit__, None, None, None)
        daemon.start(wait_ready=False)
        assert daemon.process is not None
        pid = daemon.process.pid
        # The soft and the hard limit, set while the interpreter is still starting (long
        # before the web server sizes its budget): panicd cannot raise its way out.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        daemon.wait_for(b"READY=1", 30)
        with IdleConnections(port, HOLD) as attack:
            deadline = time.monotonic() + 20
            while attack.opened < HOLD and time.monotonic() < deadline:
                time.sleep(0.1)
            fds_under_attack = _daemon_fds(pid)
            pressed = time.time()
            press_panic(mosquitto, site.devices[0])
            assert wait_until(SENT_ALERTS, site.database, 4, LEVEL_WAIT_S - 10) == 4, (
                daemon.log()
            )
            fds_peak = max(fds_under_attack, _daemon_fds(pid))
            time.sleep(3)  # longer than the header timeout
        log = daemon.log()
    incident, opened_at = rows(site.database, "SELECT id, opened_at FROM incidents")[0]
    assert isinstance(opened_at, float)
    sent_at = [float(str(at)) for (at,) in rows(
        site.database, "SELECT at FROM incident_events WHERE event IN ('sms.sent',"
        " 'call.placed') AND incident_id = ? ORDER BY at", (incident,))]
    events = [str(e) for (e,) in rows(
        site.database, "SELECT event FROM incident_events WHERE incident_id = ?", (incident,))]
    fired = rows(site.database, "SELECT level FROM escalation_steps WHERE incident_id = ?"
                                " AND state = 'fired'", (incident,))
    failed = rows(site.database, "SELECT COUNT(*) FROM outbox WHERE state = 'failed'")
    budget = json.loads(next(line for line in log.splitlines() if "web.fd_budget" in line))
    figures = {
        "budget": {k: budget[k] for k in ("soft", "in_use", "reserve", "max_connections")},
        "nofile": NOFILE, "held": HOLD, "opened": attack.opened,
        "timed_out": attack.closed_by_server, "answered_503": attack.answered,
        "daemon_fds": fds_peak,
        "first_page_s": round(sent_at[0] - opened_at, 3),
        "all_pages_s": round(sent_at[3] - opened_at, 3),
        "press_to_first_page_s": round(sent_at[0] - pressed, 3),
        "idle_lifetime_s": [round(min(attack.lifetimes), 2), round(max(attack.lifetimes), 2)]
        if attack.lifetimes else None,
    }
    print("idle-connection attack figures:", figures)  # noqa: T201 -- the report's figures
    assert "escalation.hastened" not in events, figures
    assert fired == [(0,)], figures  # level 2 waits its 60 s
    assert failed == [(0,)], figures
    assert sent_at[3] - opened_at < LEVEL_WAIT_S, figures
    assert fds_peak < NOFILE, figures
    # What the cap admitted was closed by the header timeout (2 s); the rest got a 503.
    assert attack.closed_by_server >= budget["max_connections"], figures
    assert max(attack.lifetimes) < 2 + 1.5, figures
    assert attack.answered > 0, figures
    # Before: 2,674 accept() error lines in 8 s, and the WAL checkpoint could not open
    # its connection (store.checkpoint_failed): the database was starved too.
    assert "Too many open files" not in log
    assert "socket.accept() out of system resource" not in log
    assert "web.accept_failed" not in log
    assert "store.checkpoint_failed" not in log
