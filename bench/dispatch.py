"""Dispatch latency: MQTT publish → the first Twilio API request arriving at the peer.

Everything runs on loopback and stops by itself:

* a private Mosquitto with the project's own config (``firmware_sim.broker``);
* Stoplight Prism serving Twilio's API 2010-04-01 spec, patched as the tests patch it
  (``tests/peers/prepare_twilio_spec.py``; install with ``scripts/ensure-peers.sh``);
* a small recording proxy (aiohttp, its own process so the storm cannot delay its
  clock) between panicd and Prism: it timestamps every request as it arrives and
  forwards it (``--peer prism``), or answers with a Twilio-shaped 201 itself
  (``--peer self``) to tell panicd's own latency from Prism's;
* the real ``panicd`` subprocess (READY handshake) with Twilio credentials in its
  environment, so it sends through ``TwilioChannel`` to ``[dispatch].twilio_base_url``.

A steady storm (``--rate`` presses/s for ``--duration`` s) comes from distinct devices,
so every press opens an incident; a city-wide policy pages one person at level 1
(``--channels``, SMS by default). Each request is mapped to its press through its
``StatusCallback`` path (``/twilio/status/sms/OUTBOX_ID``) → outbox → incident → device,
read from panicd's database after the run. Latency = first request of the incident minus
publish time; ``lost`` = presses without a request. The database's own timestamps split
it into stages (publish→received, →planned, →step fired, →request).

The baseline is Prism alone: the round trip of a direct Message create. The store is
SQLite in the run's temp dir, or what ``--store-url`` names; ``--both`` runs SQLite and
PostgreSQL in turn and prints them side by side with the ratio PostgreSQL/SQLite
(``bench.stores``). The last line of output is one JSON object with the figures (the
median over ``--runs``; with ``--both`` one object per backend and the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import aiohttp
from aiohttp import web

from bench.common import (
    Panicd,
    add_run_options,
    add_store_options,
    chosen_backends,
    labelled_runs,
    percentile,
    profiled,
    side_by_side,
)
from bench.stores import Backend, BenchStore, Reader, Stores, server_cpu_s
from firmware_sim.broker import Mosquitto, free_port
from firmware_sim.fleet import write_fleet
from firmware_sim.storm import storm

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "tests" / "peers"
PRISM_BIN = PEERS / "node_modules" / ".bin" / "prism"
SPEC_TOOL = PEERS / "prepare_twilio_spec.py"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "bench-auth-token"  # a fake token for a local mock
FROM_NUMBER = "+628110000001"
RESPONDER_PHONE = "+628120009901"
PANICD_CLIENT_ID = "panicd-bench-dispatch"
COUNTER_BASE = 1_000
POLL_S = 0.05
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                        "content-encoding", "host"})

RESPONDERS_TOML = f"""\
people = [
  {{ id = "siaga-1", name = "Operator Siaga", phone = "{RESPONDER_PHONE}", role = "operator" }},
]
"""


def policies_toml(channels: Sequence[str]) -> str:
    """A city policy whose level 1 pages the command-centre operator (round 2 stays pending,
    as a real ladder's next level would)."""
    media = ", ".join(f'"{c}"' for c in channels)
    return f"""\
[command_centre]
name = "Madiun Siaga 112"
people = ["siaga-1"]

[operations]
levels = [{{ people = ["siaga-1"], channels = ["sms"], wait_s = 600 }}]

[[policies]]
id = "kota"
city = true
repeat = 2
levels = [{{ people = ["siaga-1"], channels = [{media}], wait_s = 3600 }}]
"""


@dataclass(frozen=True, slots=True)
class RunFigures:
    """The figures of one run."""

    rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    sent: int
    lost: int
    incidents: int
    requests: int
    non_2xx: int
    inbound_p50_ms: float
    inbound_p99_ms: float
    plan_p50_ms: float
    plan_p99_ms: float
    fire_p50_ms: float
    fire_p99_ms: float
    send_p50_ms: float
    send_p99_ms: float
    peer_p50_ms: float
    peer_p99_ms: float
    baseline_p50_ms: float
    baseline_p99_ms: float
    cpu: float
    store_cpu: float
    rss_mb: float


def p50_p99(values: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) of unsorted values, rounded to 0.01."""
    ordered = sorted(values)
    return round(percentile(ordered, 0.50), 2), round(percentile(ordered, 0.99), 2)


# -- the recording proxy (runs as a child process: ``dispatch.py --serve-proxy``) -----


def twilio_created(path: str, number: int) -> dict[str, object]:
    """A Twilio-shaped 201 body for a Message or Call create."""
    prefix = "CA" if path.endswith("/Calls.json") else "SM"
    return {
        "sid": f"{prefix}{number:032x}",
        "account_sid": ACCOUNT_SID,
        "status": "queued",
        "date_created": time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()),
    }


def unique_sid(payload: bytes, path: str, number: int) -> bytes:
    """Give a mocked 201 a sid of its own.

    Prism answers every create with the spec's single example sid; real Twilio sids are
    unique and panicd's outbox keeps them UNIQUE, so a repeated one is a mock artefact.
    """
    try:
        body = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(body, dict) or "sid" not in body:
        return payload
    body["sid"] = twilio_created(path, number)["sid"]
    return json.dumps(body).encode()


async def serve_proxy(upstream: str | None, records_path: Path) -> None:
    """Record (arrived, answered, status, path, body) per request until SIGTERM."""
    records: list[tuple[float, float, int, str, str]] = []
    session = (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        if upstream else None
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        body = await request.read()
        if session is None or upstream is None:
            status = 201
            payload = json.dumps(twilio_created(request.path, len(records) + 1)).encode()
            headers = {"Content-Type": "application/json"}
        else:
            forward = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            async with session.request(request.method, upstream + request.path_qs, data=body,
                                       headers=forward) as resp:
                status = resp.status
                payload = unique_sid(await resp.read(), request.path, len(records) + 1)
                headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        records.append((arrived, time.time(), status, request.path,
                        body.decode("utf-8", errors="replace")))
        return web.Response(status=status, body=payload, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here so the port is known without a race
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"LISTENING {port}", flush=True)
    await stop.wait()
    await runner.cleanup()
    if session is not None:
        await session.close()
    tmp = records_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records), encoding="utf-8")
    tmp.replace(records_path)


class RecordingProxy:
    """The proxy child process; a context manager yielding its base URL."""

    def __init__(self, upstream: str | None, workdir: Path) -> None:
        self._upstream = upstream
        self.records_path = workdir / "proxy-records.json"
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Self:
        argv = [sys.executable, "-m", "bench.dispatch", "--serve-proxy", self._upstream or "self",
                "--records", str(self.records_path)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "LISTENING":
            self.__exit__(None, None, None)
            raise RuntimeError(f"recording proxy did not start: {line!r}")
        self.url = f"http://127.0.0.1:{line[1]}"
        return self

    def records(self) -> list[tuple[float, float, int, str, str]]:
        """Stop the proxy and return what it recorded."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        raw = json.loads(self.records_path.read_text(encoding="utf-8"))
        return [(float(a), float(b), int(c), str(d), str(e)) for a, b, c, d, e in raw]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


# -- Prism ----------------------------------------------------------------------------


@contextlib.contextmanager
def prism(workdir: Path, timeout_s: float) -> Iterator[str]:
    """Prism on a free port with the patched Twilio spec; yields its base URL."""
    if not PRISM_BIN.exists():
        raise RuntimeError(f"Prism is not installed under {PEERS}: run scripts/ensure-peers.sh")
    spec = workdir / "twilio_api_v2010.patched.json"
    subprocess.run([sys.executable, str(SPEC_TOOL), str(spec)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    port = free_port()
    log: IO[bytes]
    with (workdir / "prism.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(PRISM_BIN), "mock", "--errors", "-h", "127.0.0.1", "-p", str(port), str(spec)],
            cwd=PEERS, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # node may fork: stop the whole group
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prism exited with {proc.returncode}; see {workdir}/prism.log")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prism did not listen in {timeout_s}s") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def peer_baseline(base_url: str, rate: float, count: int) -> list[float]:
    """Round trips (ms) of direct Message creates at ``rate``/s, as panicd would send them."""
    url = f"{base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    auth = {"Authorization": aiohttp.encode_basic_auth(ACCOUNT_SID, AUTH_TOKEN)}
    form = {"To": RESPONDER_PHONE, "From": FROM_NUMBER, "Body": "BENCH baseline",
            "StatusCallback": "http://127.0.0.1:9/baseline"}
    times: list[float] = []

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with session.post(url, data=form, headers=auth) as resp:
            await resp.read()
            if resp.status != 201:
                raise RuntimeError(f"peer answered {resp.status} to a valid Message create")
        times.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as group:
        await one(session)  # warm up the connection and Prism's first validation
        times.clear()
        start = time.perf_counter()
        for index in range(count):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(one(session), name=f"baseline.{index}")
    return times


# -- panicd ---------------------------------------------------------------------------


def wait_dispatched(store: BenchStore, expected: int, timeout_s: float) -> int:
    """Poll (read-only) until ``expected`` alert messages left the outbox; returns the count."""
    deadline = time.monotonic() + timeout_s
    done = 0
    with store.reader(timeout_s) as reader:
        while time.monotonic() < deadline:
            done = int(reader.scalar(
                "SELECT COUNT(*) FROM outbox WHERE purpose = 'alert'"
                " AND state NOT IN ('pending', 'sending')"
            ))
            if done >= expected:
                break
            time.sleep(POLL_S)
    return done


# -- one run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timings:
    """Per-incident timestamps read back from panicd's database."""

    device: str
    received_at: float
    planned_at: float | None
    fired_at: float | None


def incident_timings(reader: Reader) -> dict[int, Timings]:
    """Incident id → its device and the database's stage timestamps."""
    # One incident_dispatch row per incident: MIN only satisfies PostgreSQL's GROUP BY.
    rows = reader.rows(
        "SELECT i.id, i.device_id, MIN(p.received_at), MIN(d.planned_at), MIN(s.fired_at)"
        " FROM incidents i JOIN presses p ON p.incident_id = i.id"
        " LEFT JOIN incident_dispatch d ON d.incident_id = i.id"
        " LEFT JOIN escalation_steps s ON s.incident_id = i.id AND s.state = 'fired'"
        " GROUP BY i.id, i.device_id"
    )
    return {int(r[0]): Timings(str(r[1]), float(r[2]), r[3], r[4]) for r in rows}


def outbox_incidents(reader: Reader) -> dict[int, int]:
    """Outbox id → incident id."""
    return {int(a): int(b) for a, b in reader.rows(
        "SELECT id, incident_id FROM outbox WHERE incident_id IS NOT NULL")}


@dataclass(frozen=True, slots=True)
class Measured:
    """What one run produced, before the join."""

    published: dict[str, float]
    records: list[tuple[float, float, int, str, str]]
    baseline_ms: list[float]
    cpu: float
    store_cpu: float
    rss_mb: float


def measure(
    args: argparse.Namespace, workdir: Path, store: BenchStore, stores: Stores
) -> Measured:
    """Peers, panicd and the storm; returns publish times and the peer's records."""
    count = int(args.rate * args.duration)
    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(workdir / "broker"))
        upstream = (stack.enter_context(prism(workdir, args.timeout))
                    if args.peer == "prism" else None)
        baseline = (asyncio.run(peer_baseline(upstream, args.rate, args.baseline_requests))
                    if upstream else [])
        proxy = stack.enter_context(RecordingProxy(upstream, workdir))
        cfg = workdir / "cfg"
        cfg.mkdir()
        (cfg / "responders.toml").write_text(RESPONDERS_TOML, encoding="utf-8")
        (cfg / "policies.toml").write_text(policies_toml(channels), encoding="utf-8")
        listen = free_port()
        dispatch_toml = (
            f'\n[dispatch]\npublic_base_url = "http://127.0.0.1:{listen}"\n'
            f'listen_port = {listen}\ncontrol_socket = "{cfg}/control.sock"\n'
            f'from_number = "{FROM_NUMBER}"\ntwilio_base_url = "{proxy.url}"\n' + args.extra_toml
        )
        registered = max(count, args.registered)
        config, keys, devices = write_fleet(
            cfg, devices=registered, mqtt_port=broker.port, client_id=PANICD_CLIENT_ID,
            extra_toml=dispatch_toml, database=store.sqlite_path,
            store_url=None if store.sqlite_path is not None else store.url,
        )
        twilio_env = {"PANICD_ACK_SECRET": "bench-ack-secret",
                      "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
        panicd = stack.enter_context(
            Panicd(config, keys, workdir / "run", args.log_level, extra_env=twilio_env)
        )
        panicd.wait_ready(args.timeout)
        assert panicd.process is not None
        cpu_before = panicd.cpu_s()
        server_before = server_cpu_s(stores.server)
        with profiled(panicd.process.pid, args.profile):
            started = time.monotonic()
            result = asyncio.run(storm(broker.host, broker.port, devices[:count], count=count,
                                       rate=args.rate, counter_base=COUNTER_BASE))
            done = wait_dispatched(store, count * len(channels), args.grace)
            busy_s = time.monotonic() - started
        cpu = (panicd.cpu_s() - cpu_before) / busy_s
        # The private PostgreSQL's processes (0 for SQLite, which runs in panicd).
        store_cpu = (server_cpu_s(stores.server) - server_before) / busy_s
        rss_mb = panicd.peak_rss_mb()
        records = proxy.records()
        print(f"storm: {len(result.sent)} presses at {args.rate:.0f}/s; {done} alerts sent; "
              f"{len(records)} requests at the peer", file=sys.stderr)
        if args.keep_log:
            args.keep_log.write_bytes(panicd.log_path.read_bytes())
    published = {device: at for (device, _counter), at in result.sent.items()}
    return Measured(published, records, baseline, cpu, store_cpu, rss_mb)


def analyse(args: argparse.Namespace, measured: Measured, store: BenchStore) -> RunFigures:
    """Join each press to the first request of its incident; split it into stages."""
    with store.reader(args.timeout) as reader:
        timings = incident_timings(reader)
        by_outbox = outbox_incidents(reader)
    first_request: dict[int, float] = {}
    peer_ms: list[float] = []
    non_2xx = 0
    for arrived, answered, status, _path, body in measured.records:
        callback = urllib.parse.parse_qs(body).get("StatusCallback", [""])[0]
        outbox_id = callback.rpartition("/")[2]
        if "/twilio/status/" not in callback or not outbox_id.isdigit():
            continue
        peer_ms.append((answered - arrived) * 1000)
        non_2xx += not 200 <= status < 300
        incident = by_outbox.get(int(outbox_id))
        if incident is not None:
            first_request[incident] = min(first_request.get(incident, arrived), arrived)
    total, inbound, plan, fire, send = [], [], [], [], []
    for incident, t in timings.items():
        arrived_at = first_request.get(incident)
        pub = measured.published.get(t.device)
        if arrived_at is None or pub is None or t.planned_at is None or t.fired_at is None:
            continue
        total.append((arrived_at - pub) * 1000)
        inbound.append((t.received_at - pub) * 1000)
        plan.append((t.planned_at - t.received_at) * 1000)
        fire.append((t.fired_at - t.planned_at) * 1000)
        send.append((arrived_at - t.fired_at) * 1000)
    total.sort()
    p50, p99 = p50_p99(total)
    p95 = round(percentile(total, 0.95), 2)
    stages = [p50_p99(v) for v in (inbound, plan, fire, send, peer_ms, measured.baseline_ms)]
    sent = len(measured.published)
    return RunFigures(
        rate=args.rate, p50_ms=p50, p95_ms=p95, p99_ms=p99,
        max_ms=round(total[-1], 2) if total else float("nan"),
        sent=sent, lost=sent - len(total), incidents=len(timings),
        requests=len(peer_ms), non_2xx=non_2xx,
        inbound_p50_ms=stages[0][0], inbound_p99_ms=stages[0][1],
        plan_p50_ms=stages[1][0], plan_p99_ms=stages[1][1],
        fire_p50_ms=stages[2][0], fire_p99_ms=stages[2][1],
        send_p50_ms=stages[3][0], send_p99_ms=stages[3][1],
        peer_p50_ms=stages[4][0], peer_p99_ms=stages[4][1],
        baseline_p50_ms=stages[5][0], baseline_p99_ms=stages[5][1],
        cpu=round(measured.cpu, 2), store_cpu=round(measured.store_cpu, 2),
        rss_mb=round(measured.rss_mb, 1),
    )


def one_run(
    args: argparse.Namespace, workdir: Path, stores: Stores, backend: Backend
) -> RunFigures:
    """One measured storm on a fresh store of ``backend`` and its figures."""
    with stores.fresh(backend, workdir) as store:
        measured = measure(args, workdir, store, stores)
        return analyse(args, measured, store)




def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark, print one JSON line of figures last."""
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="presses/s (%(default)s)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="storm seconds (%(default)s)")
    parser.add_argument("--channels", default="sms",
                        help="level 1 channels, comma-separated (%(default)s)")
    parser.add_argument("--peer", choices=("prism", "self"), default="prism",
                        help="forward to Prism, or let the proxy answer 201 itself")
    parser.add_argument("--baseline-requests", type=int, default=1000,
                        help="direct Prism requests for the baseline (%(default)s)")
    parser.add_argument("--registered", type=int, default=0,
                        help="register this many buttons in all; the first rate*duration press"
                             " (a city's registry, most of it idle)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="wait this long after the storm for the last alerts (%(default)s)")
    add_run_options(
        parser, timeout_s=60.0, timeout_help="bound on start-up waits",
        extra_toml_help="appended to [dispatch], e.g. 'send_concurrency = 32\\n'",
        profile_help="write py-spy raw stacks of panicd during the storm here",
    )
    add_store_options(parser)
    parser.add_argument("--serve-proxy", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_proxy is not None:
        if args.records is None:
            parser.error("--serve-proxy needs --records")
        upstream = None if args.serve_proxy == "self" else args.serve_proxy
        asyncio.run(serve_proxy(upstream, args.records))
        return 0
    args.extra_toml = args.extra_toml.replace("\\n", "\n")
    if args.rate <= 0 or args.duration <= 0 or args.runs < 1:
        parser.error("--rate, --duration and --runs must be positive")
    # aiomqtt warns per publish once many are pending.
    logging.getLogger("mqtt").setLevel(logging.ERROR)

    with Stores(args.store_url) as stores:
        backends = chosen_backends(args.store, stores.given)
        if stores.given and stores.given not in backends:
            parser.error(f"--store-url names a {stores.given} store, not {args.store}")
        by_backend = labelled_runs(
            args.runs, "panicd-bench-dispatch-", backends,
            lambda tmp, backend: one_run(args, tmp, stores, backend),
        )
    summaries = {b: summary_of(args, *by_backend[b]) for b in backends}
    ok = all(r["lost"] == 0 for _, runs in by_backend.values() for r in runs)
    if len(backends) == 1:
        print(json.dumps({**summaries[backends[0]], "store": backends[0]}))
        return 0 if ok else 1
    ratios = side_by_side({b: by_backend[b][0] for b in backends}, COMPARED)
    print(json.dumps({**summaries, "pg_over_sqlite": ratios, "runs": args.runs}))
    return 0 if ok else 1


# The figures --both prints side by side (and whose ratio PostgreSQL/SQLite it gives).
COMPARED = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "inbound_p99_ms", "plan_p50_ms",
            "plan_p99_ms", "fire_p99_ms", "send_p99_ms", "cpu", "store_cpu", "rss_mb")


def summary_of(
    args: argparse.Namespace, summary: dict[str, float], runs: Sequence[dict[str, float]]
) -> dict[str, object]:
    """The JSON summary of one backend's runs (medians; lost: the worst run)."""
    return {
        "rate": summary["rate"],
        "p50_ms": summary["p50_ms"],
        "p95_ms": summary["p95_ms"],
        "p99_ms": summary["p99_ms"],
        "sent": int(summary["sent"]),
        "lost": int(max(r["lost"] for r in runs)),
        "max_ms": summary["max_ms"],
        "baseline_p50_ms": summary["baseline_p50_ms"],
        "baseline_p99_ms": summary["baseline_p99_ms"],
        "peer": args.peer,
        "channels": args.channels,
        "cpu": summary["cpu"],
        "store_cpu": summary["store_cpu"],
        "rss_mb": summary["rss_mb"],
        "runs": len(runs),
    }


if __name__ == "__main__":
    sys.exit(main())
