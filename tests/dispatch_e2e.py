"""Shared set-up for the end-to-end dispatch tests: the real panicd subprocess with a
[dispatch] table, Twilio credentials in its environment and Prism as the Twilio API."""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import aiomqtt
import pytest
from aiohttp import web

from firmware_sim.broker import Mosquitto
from firmware_sim.button import press
from firmware_sim.fleet import SimDevice, write_fleet
from firmware_sim.fleet import instance_configs as fleet_instance_configs
from gateway.model import PressKind
from tests.daemon_proc import store_rows
from tests.prism import free_port

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "e2e-auth-token-never-logged"
FROM_NUMBER = "+15005550006"

RESPONDERS_TOML = """
people = [
  { id = "ani", name = "Ani Rahayu", phone = "+628120001001", role = "linmas" },
  { id = "budi", name = "Budi Santoso", phone = "+628120001002", role = "linmas" },
  { id = "dewi", name = "Dewi Siaga", phone = "+628120009901", role = "siaga112" },
]
"""


def policies_toml(first_wait_s: int, first_channels: str = '"sms", "voice"') -> str:
    """Level 1 (ani, budi) waits ``first_wait_s``; level 2 is the command centre (dewi)."""
    return f"""
[command_centre]
name = "Madiun Siaga 112"
people = ["dewi"]

[operations]
levels = [{{ people = ["dewi"], channels = ["sms"], wait_s = 600 }}]

[[policies]]
id = "kota"
city = true
levels = [
  {{ people = ["ani", "budi"], channels = [{first_channels}], wait_s = {first_wait_s} }},
  {{ people = ["dewi"], channels = ["sms", "voice"], wait_s = 600 }},
]
"""


@dataclass(frozen=True, slots=True)
class Deployment:
    """A written configuration for one panicd with dispatch."""

    config: Path
    keys: Path
    database: Path | str  # the SQLite file, or the PostgreSQL database's URL
    devices: list[SimDevice]
    public_url: str


@pytest.fixture
def client_id(mosquitto: Mosquitto) -> Iterator[str]:
    """A fresh persistent-session client id, forgotten by the broker afterwards."""
    name = f"panicd-dispatch-{uuid.uuid4().hex[:10]}"
    yield name

    async def forget() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                                  clean_session=True):
            pass

    asyncio.run(forget())


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The daemon's store, both backends: None (its SQLite file) or a new PostgreSQL
    database's URL, with the ack-link key every instance on it must be given."""
    if request.param == "sqlite":
        return None
    monkeypatch.setenv("PANICD_ACK_SECRET", "e2e-ack-link-key-" + "7" * 32)
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
def twilio_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twilio credentials for the daemon's environment (never in its TOML file)."""
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)


@pytest.fixture
def shared_store(pg_database: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new PostgreSQL database (tests/pg.py), and the ack-link key that every instance
    on it shares (a PostgreSQL store refuses to start without one)."""
    monkeypatch.setenv("PANICD_ACK_SECRET", "instances-ack-link-key-" + "5" * 32)
    return pg_database


def deploy(
    directory: Path, *, mosquitto: Mosquitto, client_id: str, twilio_base_url: str,
    policies: str, buttons: int = 1, store_url: str | None = None,
) -> Deployment:
    """Write the fleet, responders, policies and a [dispatch] table on a free port; the
    store is ``panicd.sqlite3`` in ``directory`` or the PostgreSQL ``store_url``."""
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "responders.toml").write_text(RESPONDERS_TOML, encoding="utf-8")
    (directory / "policies.toml").write_text(policies, encoding="utf-8")
    extra = (
        "\n[dispatch]\n"
        'responders = "responders.toml"\npolicies = "policies.toml"\n'
        f'public_base_url = "{public_url}"\nlisten_host = "127.0.0.1"\nlisten_port = {port}\n'
        f'control_socket = "{directory / "control.sock"}"\n'
        f'from_number = "{FROM_NUMBER}"\ntwilio_base_url = "{twilio_base_url}"\n'
    )
    config, keys, devices = write_fleet(
        directory, devices=buttons, mqtt_port=mosquitto.port, client_id=client_id,
        store_url=store_url, extra_toml=extra,
    )
    database = directory / "panicd.sqlite3" if store_url is None else store_url
    return Deployment(config, keys, database, devices, public_url)


def instance_configs(site: Deployment, count: int, client_id: str) -> list[Path]:
    """``count`` instances of ``site`` on its one store (firmware_sim.fleet)."""
    return fleet_instance_configs(site.config, count, client_id)


def forget_sessions(mosquitto: Mosquitto, client_ids: Iterable[str]) -> None:
    """End the persistent sessions of ``client_ids`` (clean_session connects)."""

    async def forget() -> None:
        for name in client_ids:
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=name,
                                      clean_session=True):
                pass

    asyncio.run(forget())


def press_panic(mosquitto: Mosquitto, device: SimDevice) -> None:
    """One signed panic press over MQTT (QoS 1)."""
    asyncio.run(press(mosquitto.host, mosquitto.port, device, PressKind.PANIC,
                      int(time.time())))


def rows(database: Path | str, sql: str,
         params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows from the daemon's store (read-only, beside the running daemon): a SQLite
    file or a PostgreSQL URL."""
    return store_rows(database, sql, params)


def duplicated_outbox_keys(database: Path | str) -> list[tuple[object, ...]]:
    """Alert pages sent more than once per (incident, round, level, person, channel)."""
    return rows(
        database,
        "SELECT incident_id, round, level, person_id, channel, COUNT(*) FROM outbox"
        " WHERE purpose = 'alert' GROUP BY incident_id, round, level, person_id, channel"
        " HAVING COUNT(*) > 1",
    )


@dataclass(frozen=True, slots=True)
class PeerRequest:
    """One request that reached Prism through the proxy, and Prism's answer."""

    method: str
    path: str
    form: dict[str, str]
    status: int
    violations: str | None
    # The proxy cut the connection instead of answering (a Fault), the answer unseen.
    answered: bool = True


@dataclass(frozen=True, slots=True)
class Fault:
    """What the peer does to one request, as a test's ``fault`` hook decides.

    ``kind``: "code" — Prism answers ``code`` instead (``Prefer: code=…``: 429 with
    Retry-After, 5xx; ``example`` picks one of the spec's examples, e.g. "e21211"),
    nothing is accepted; "bare" — the peer itself answers ``code`` with Twilio's error
    body and no Retry-After (a 429 without one), nothing is accepted; "refuse" — the
    connection is cut before the request is looked at, nothing is accepted; "slow" —
    answered after ``seconds``;
    "drop" — accepted (remembered, listed), then the connection is cut before the answer;
    "hold" — accepted, the answer withheld until :meth:`RecordingPeer.release`.
    """

    kind: str
    code: int = 0
    seconds: float = 0.0
    example: str = ""


FaultHook = Callable[[str, str, Mapping[str, str]], "Fault | None"]
LISTS = {"Messages.json": "messages", "Calls.json": "calls"}


class RecordingPeer:
    """A tiny recording proxy in front of Prism, in its own thread and event loop.

    Prism validates each request and answers from the spec's static example, so every
    message would carry the same sid; Twilio's sids are unique, so the proxy stamps a
    fresh one with the example's prefix (SM…, CA…) and the spec's 32 hex digits.

    It also remembers what it accepted, as Twilio does: a list request (GET
    Messages.json / Calls.json, validated by Prism) is answered with the accepted
    messages or calls to its ``To`` from its ``From``, newest first, instead of Prism's
    static example — so panicd can ask what the provider holds (issue 12 item 3). A
    ``fault`` hook injects a provider's trouble per request (:class:`Fault`).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[PeerRequest] = []
        # Resources accepted (201), newest last, as the list endpoints give them back.
        self.accepted: list[dict[str, Any]] = []
        self.fault: FaultHook | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="peer-proxy",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._released: asyncio.Event | None = None

    def release(self) -> None:
        """Answer the requests held by a "hold" fault (their clients may be gone)."""
        def set_released() -> None:
            assert self._released is not None
            self._released.set()
            self._released = asyncio.Event()
        self._loop.call_soon_threadsafe(set_released)

    def creates(self, resource: str = "Messages.json") -> dict[str, int]:
        """Accepted creates of ``resource`` per StatusCallback URL (one per outbox row)."""
        counts: dict[str, int] = {}
        for r in self.requests:
            if r.method == "POST" and r.path.endswith("/" + resource) and r.status == 201:
                key = r.form.get("StatusCallback", "")
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        form = dict(urllib.parse.parse_qsl(body.decode()))
        fault = self.fault(request.method, request.path, form) if self.fault else None
        if fault is not None and fault.kind == "refuse":
            self.requests.append(PeerRequest(request.method, request.path, form, 0, None,
                                             answered=False))
            return self._cut(request)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")}
        if fault is not None and fault.kind == "bare":
            self.requests.append(PeerRequest(request.method, request.path, form, fault.code,
                                             None))
            return web.json_response({"code": 20000 + fault.code, "status": fault.code,
                                      "message": "injected by the test peer"},
                                     status=fault.code)
        if fault is not None and fault.kind == "code":
            headers["Prefer"] = f"code={fault.code}" + (
                f", example={fault.example}" if fault.example else "")
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body, headers=headers) as upstream:
            payload = await upstream.read()
            status = upstream.status
            content_type = upstream.content_type
            violations = upstream.headers.get("sl-violations")
            passed = {k: v for k, v in upstream.headers.items() if k == "Retry-After"}
        resource = request.path.rsplit("/", 1)[-1]
        if status == 201 and content_type == "application/json":
            document = json.loads(payload)
            if isinstance(document, dict) and isinstance(document.get("sid"), str):
                document["sid"] = document["sid"][:2] + uuid.uuid4().hex
                document.update(to=form.get("To"), status="queued",
                                date_created=email.utils.formatdate(usegmt=True))
                document["from"] = form.get("From")
                if "Body" in form:
                    document["body"] = form["Body"]
                self.accepted.append(document)
                payload = json.dumps(document).encode()
        elif (request.method == "GET" and resource in LISTS and status == 200
              and content_type == "application/json"):
            payload = self._listed(resource, request.query, payload)
        answered = fault is None or fault.kind not in ("drop", "hold")
        self.requests.append(PeerRequest(request.method, request.path, form, status,
                                         violations, answered=answered))
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.kind == "hold":
            assert self._released is not None
            await self._released.wait()
        elif fault is not None and fault.kind == "drop":
            return self._cut(request)
        return web.Response(body=payload, status=status, content_type=content_type,
                            headers=passed)

    @staticmethod
    def _cut(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the peer cut this connection (a Fault)")

    def _listed(self, resource: str, query: Mapping[str, str], payload: bytes) -> bytes:
        document = json.loads(payload)
        key = LISTS[resource]
        prefix = "SM" if key == "messages" else "CA"
        matching = [d for d in reversed(self.accepted) if str(d["sid"]).startswith(prefix)
                    and d.get("to") == query.get("To")
                    and ("From" not in query or d.get("from") == query.get("From"))]
        size = int(query.get("PageSize", "50"))
        document[key] = matching[:size]
        document["next_page_uri"] = None
        return json.dumps(document).encode()

    async def _start(self) -> str:
        self._session = aiohttp.ClientSession()
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        # Requests held by a "hold" fault wait for a release that a test killed mid-way
        # never sent; the runner's cleanup waits for every handler (60 s by default), which
        # outlasted __exit__'s 30 s and failed a passing test at teardown.
        if self._released is not None:
            self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def __enter__(self) -> Self:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def to(self, phone: str, resource: str) -> list[PeerRequest]:
        """Requests creating ``resource`` ("Messages.json", "Calls.json") for ``phone``."""
        return [r for r in self.requests
                if r.path.endswith("/" + resource) and r.form.get("To") == phone]


@pytest.fixture
def twilio_peer(prism: str) -> Iterator[RecordingPeer]:
    """Prism behind a recording proxy; its ``url`` is panicd's twilio_base_url."""
    with RecordingPeer(prism) as peer:
        yield peer


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a storm against several instances left, counted in the store, at the
    provider and in the buttons' and instances' own records (tests/faults)."""

    sent: int
    stored: int
    lost: int
    stored_twice: int
    unconfirmed: int
    retransmissions: int
    incidents: list[tuple[str, int]]
    alerts: int
    pages_twice: int
    pages_twice_in_window: int
    pages_in_doubt: int
    pages_never: int
    steps_fired_twice: int

    @property
    def incidents_twice(self) -> int:
        """Buttons with more than one incident."""
        return sum(1 for _, n in self.incidents if n > 1)

    def report(self) -> str:
        """The figures, as the fault report prints them."""
        return (
            f"presses {self.sent}, stored {self.stored}, lost {self.lost}, stored twice"
            f" {self.stored_twice}, unconfirmed {self.unconfirmed}, retransmissions"
            f" {self.retransmissions}; incidents {sum(n for _, n in self.incidents)}, twice"
            f" {self.incidents_twice}; steps fired twice {self.steps_fired_twice}; pages"
            f" {self.alerts}, twice {self.pages_twice}, twice in the accept-record window"
            f" {self.pages_twice_in_window} (in doubt {self.pages_in_doubt}), never"
            f" {self.pages_never}"
        )


def steps_fired(journals: Iterable[Any]) -> dict[tuple[object, object], int]:
    """How often each escalation step (incident, level) fired, over every journal
    (tests.daemon_proc.DaemonProcess) of every run of every instance."""
    fired: dict[tuple[object, object], int] = {}
    for journal in journals:
        for entry in journal.events("escalation.step_due"):
            if entry.get("incident") is not None:
                key = (entry["incident"], entry["level"])
                fired[key] = fired.get(key, 0) + 1
    return fired


def count_outcome(database: Path | str, storms: Iterable[Any], peer: RecordingPeer,
                  public_url: str, journals: Iterable[Any]) -> Outcome:
    """Count a storm's outcome: ``storms`` are the buttons' StormResults, ``journals``
    every run of every instance (tests.daemon_proc.DaemonProcess)."""
    results = list(storms)
    sent = {key: at for result in results for key, at in result.sent.items()}
    feedback = {key for result in results for key in result.feedback}
    stored = rows(database, "SELECT device_id, counter, COUNT(*) FROM presses"
                            " GROUP BY device_id, counter")
    incidents = rows(database, "SELECT device_id, COUNT(*) FROM incidents GROUP BY device_id")
    alerts = rows(database, "SELECT id, channel, in_doubt_since FROM outbox"
                            " WHERE purpose = 'alert'")
    accepted = {**peer.creates("Messages.json"), **peer.creates("Calls.json")}

    def callback(outbox_id: object, channel: object) -> str:
        kind = "sms" if channel == "sms" else "call"
        return f"{public_url}/twilio/status/{kind}/{outbox_id}"

    twice = [doubt for i, ch, doubt in alerts if accepted.get(callback(i, ch), 0) > 1]
    fired = steps_fired(journals)
    return Outcome(
        sent=len(sent), stored=len(stored),
        lost=len(set(sent) - {(str(d), int(str(c))) for d, c, _ in stored}),
        stored_twice=sum(1 for *_, n in stored if int(str(n)) > 1),
        unconfirmed=len(set(sent) - feedback),
        retransmissions=sum(result.retransmissions for result in results),
        incidents=sorted((str(d), int(str(n))) for d, n in incidents),
        alerts=len(alerts),
        pages_twice=sum(1 for doubt in twice if doubt is None),
        pages_twice_in_window=sum(1 for doubt in twice if doubt is not None),
        pages_in_doubt=sum(1 for *_, doubt in alerts if doubt is not None),
        pages_never=sum(1 for i, ch, _ in alerts if callback(i, ch) not in accepted),
        steps_fired_twice=sum(1 for n in fired.values() if n > 1),
    )
