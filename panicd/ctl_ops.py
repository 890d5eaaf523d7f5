"""panicctl's operations commands: status, devices, ack, reassign, test-press, backup, purge.

``status``, ``ack`` and ``reassign`` go through the daemon's control socket; ``status``
falls back to the store (exit 1, "daemon not reachable") when the daemon does not answer,
and ``ack`` on a shared PostgreSQL store records the ack in the database itself, as any
instance would. ``devices`` and ``purge`` work on the store beside running instances
(SQLite: WAL, purge takes the write lock briefly; PostgreSQL: one transaction);
``backup`` copies a SQLite file and sends a PostgreSQL store to pg_dump. Every read goes
through :class:`store.queries.StoreReader`, so both backends print the same. Exit codes:
0 ok, 1 not found / unreachable / no feedback, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiomqtt

from dispatch.health import (
    Condition,
    DeviceView,
    HealthSettings,
    Key,
    device_findings,
    device_subject,
)
from dispatch.messages import build_handled_sms
from dispatch.responders import load_responders
from firmware_sim.button import build_frame, topic_for
from firmware_sim.fleet import SimDevice
from gateway.config import Config, MqttSourceConfig, load_config
from gateway.formats import native
from gateway.model import PressKind
from panicd.ctl_format import err, out, print_json, table, when
from store.dispatch import Notice
from store.queries import DeviceSeen, StoreAccessError, StoreReader, open_reader, read_only
from store.url import StoreUrl

T = TypeVar("T")


class ControlError(Exception):
    """The daemon's control socket did not answer."""


async def _control(socket_path: Path, method: str, path: str,
                   body: dict[str, Any] | None = None) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=str(socket_path))
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, f"http://panicd{path}", json=body,
                            timeout=aiohttp.ClientTimeout(total=15)) as response,
        ):
            text = await response.text()
    except aiohttp.ClientConnectorError as exc:
        # Its str() is written for TCP ("Cannot connect to unix socket … ssl:default
        # [Errno]"); on a Unix socket only the OS error says anything.
        raise ControlError(f"{socket_path}: {exc.os_error.strerror or exc.os_error}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ControlError(f"{socket_path}: {exc}") from None
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, {"error": text.strip()}


# -- reading the store ------------------------------------------------------------------


def read_store(config: Config, view: Callable[[StoreReader], Awaitable[T]]) -> T:
    """``view`` run on a reader of the store ``config`` names (one snapshot on PostgreSQL)."""

    async def run() -> T:
        async with open_reader(config.store) as reader:
            return await view(reader)

    return asyncio.run(run())


# -- status ----------------------------------------------------------------------------


async def _db_status(config: Config, reader: StoreReader, now: float) -> dict[str, Any]:
    outbox, escalation = await reader.queue_depths()
    return {
        "daemon": {"reachable": False, "now": now},
        "sources": [{"name": s.name, "kind": k, "connected": None, "since": None}
                    for k, group in (("mqtt", config.mqtt), ("serial", config.serial))
                    for s in group],
        "queues": {"ingest": None, "outbox": outbox, "escalation": escalation},
        "open_incidents": await reader.open_incidents(),
    }


async def _store_views(config: Config, reader: StoreReader, now: float,
                       snapshot: dict[str, Any] | None) -> dict[str, Any]:
    """The daemon's snapshot (or the store's own when it did not answer) with what only
    the store knows: the unhealthy list and the instances sharing it."""
    snap = snapshot if snapshot is not None else await _db_status(config, reader, now)
    # The daemon lists the conditions its monitor has raised so far; `devices` reads the
    # devices' state now. Both show :func:`unhealthy`, so they cannot disagree.
    snap["unhealthy"] = unhealthy(config, await reader.devices(), await reader.raised(), now)
    snap["instances"] = await reader.instances()
    return snap


def cmd_status(args: argparse.Namespace) -> int:
    """Sources, queue depths, open incidents, pending steps, unhealthy devices, instances."""
    config = load_config(args.config)
    reason = "dispatch is not configured, so there is no control socket"
    snapshot: dict[str, Any] | None = None
    if config.dispatch is not None:
        try:
            code, reply = asyncio.run(_control(config.dispatch.control_socket, "GET",
                                               "/ops/status"))
            if code == 200:
                snapshot = reply
            else:
                reason = f"control socket answered {code}"
        except ControlError as exc:
            reason = str(exc)
    if snapshot is None:
        err(f"daemon not reachable ({reason}); showing the database only")
    now = time.time()
    snap = read_store(config, lambda reader: _store_views(config, reader, now, snapshot))
    if args.json:
        print_json(snap)
    else:
        _print_status(snap)
    return 0 if snap["daemon"]["reachable"] else 1


def _print_status(snap: dict[str, Any]) -> None:
    daemon = snap["daemon"]
    out(f"panicd: running (pid {daemon['pid']})" if daemon["reachable"]
          else "panicd: NOT REACHABLE (database view)")
    sources = [{**s, "state": "?" if s["connected"] is None else
                ("up" if s["connected"] else "DOWN"), "since_at": when(s["since"])}
               for s in snap["sources"]]
    out("", "Sources")
    out(*table(sources, [("name", "NAME"), ("kind", "KIND"), ("state", "STATE"),
                           ("since_at", "SINCE")]))
    q = snap["queues"]
    ingest = "?" if q["ingest"] is None else q["ingest"]
    out("", f"Queues: ingest {ingest}, outbox {q['outbox']}, pending steps {q['escalation']}")
    incidents = [{**r, "opened": when(r["opened_at"]), "flags": incident_flags(r)}
                 for r in snap["open_incidents"]]
    out("", f"Open incidents: {len(incidents)}")
    if incidents:
        out(*table(incidents, [("id", "ID"), ("status", "STATUS"), ("flags", "FLAGS"),
                                 ("opened", "OPENED"), ("device_id", "DEVICE"),
                                 ("kelurahan", "KELURAHAN")]))
    rows = [{**r, "raised": when(r["raised_at"])} for r in snap["unhealthy"]]
    out("", f"Unhealthy: {len(rows)}")
    if rows:
        out(*table(rows, [("subject", "SUBJECT"), ("condition", "CONDITION"),
                            ("raised", "RAISED")]))
    instances = snap.get("instances")
    if instances is None:
        return  # one box (SQLite): the daemon above is the only instance
    rows = [{**r, "started": when(r["started_at"]), "heartbeat": when(r["heartbeat_at"]),
             "leads": "device health" if r["is_leader"] else ""} for r in instances]
    out("", f"Instances: {len(rows)}")
    if rows:
        out(*table(rows, [("instance_id", "INSTANCE"), ("host", "HOST"), ("pid", "PID"),
                            ("started", "STARTED"), ("heartbeat", "LAST HEARTBEAT"),
                            ("leads", "LEADS")]))


def incident_flags(row: dict[str, Any]) -> str:
    """The FLAGS column of ``incidents`` and ``status``: TES (test) and URGENT."""
    return ",".join(flag for flag, on in (("TES", row["test"]), ("URGENT", row["urgent"]))
                    if on)


# -- devices and health ------------------------------------------------------------------


_CONDITIONS = frozenset(c.value for c in Condition)


def device_rows(config: Config, seen: dict[str, DeviceSeen],
                raised: dict[tuple[str, str], float], now: float) -> list[dict[str, Any]]:
    """Every registered device with what was last heard (``seen``, from the store) and its
    health state.

    ``conditions`` is the one definition of an unhealthy device, for ``devices`` and
    ``status`` alike: never heard, or offline / low battery by :func:`device_findings`
    with the thresholds of ``[health]`` and the monitor's raised conditions (so a battery
    alert clears with the same margin the monitor uses).
    """
    keys: set[Key] = {(s, Condition(c)) for s, c in raised if c in _CONDITIONS}
    settings = HealthSettings.from_config(config.health)
    out = []
    for device in sorted(config.devices.values(), key=lambda d: d.id):
        heard = seen.get(device.id)
        last_seen = heard.last_seen_at if heard else None
        battery = heard.battery if heard else None
        view = DeviceView(device.id, device.heartbeat_interval_s, last_seen, battery)
        found = {f.condition for f in device_findings(view, settings, now, baseline=None,
                                                      raised=keys)}
        states = [c.value for c in (Condition.OFFLINE, Condition.LOW_BATTERY) if c in found]
        if last_seen is None:
            states.insert(0, "never_seen")
        out.append({
            "id": device.id, "hardware": device.hardware, "kelurahan": device.kelurahan_kode,
            "landmark": device.landmark, "last_seen_at": last_seen, "battery": battery,
            "last_kind": heard.last_kind if heard else None,
            "last_path": heard.last_path if heard else None, "heartbeat_interval_s":
            device.heartbeat_interval_s, "state": ",".join(states) or "ok",
            "conditions": states,
            "offline": last_seen is None or Condition.OFFLINE in found,
            "low_battery": Condition.LOW_BATTERY in found,
        })
    return out


def unhealthy(config: Config, seen: dict[str, DeviceSeen],
              raised: dict[tuple[str, str], float], now: float) -> list[dict[str, Any]]:
    """``status``'s Unhealthy list: each condition of each device whose ``devices`` state is
    not ok, then the source and provider conditions the daemon has raised."""
    rows = []
    for device in device_rows(config, seen, raised, now):
        subject = device_subject(device["id"])
        rows += [{"subject": subject, "condition": condition,
                  "raised_at": raised.get((subject, condition))}
                 for condition in device["conditions"]]
    rows += [{"subject": subject, "condition": condition, "raised_at": at}
             for (subject, condition), at in sorted(raised.items())
             if not subject.startswith(device_subject(""))]
    return rows


def cmd_devices(args: argparse.Namespace) -> int:
    """Registered devices: last seen, battery, offline / low battery."""
    config = load_config(args.config)
    now = time.time()

    async def view(reader: StoreReader) -> list[dict[str, Any]]:
        return device_rows(config, await reader.devices(), await reader.raised(), now)

    rows = read_store(config, view)
    if args.offline:
        rows = [r for r in rows if r["offline"]]
    if args.low_battery:
        rows = [r for r in rows if r["low_battery"]]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        row["seen"] = when(row["last_seen_at"])
        row["batt"] = "-" if row["battery"] is None else f"{row['battery']}%"
    out(*table(rows, [("id", "DEVICE"), ("state", "STATE"), ("seen", "LAST SEEN"),
                        ("batt", "BATTERY"), ("last_kind", "LAST"), ("hardware", "HARDWARE"),
                        ("landmark", "LANDMARK")]))
    return 0


# -- ack -------------------------------------------------------------------------------


async def ack_in_store(store_url: StoreUrl, incident_id: int, *, person_id: str | None,
                       name: str, now: float) -> dict[str, Any]:
    """Record an operator's ack in a shared PostgreSQL store, as an instance's control API
    would (dispatch/responses.py): one conditional update under the incident's row lock
    (``record_ack``), so of acks at once, on any instance or here, one only is the first;
    it stops escalation and queues "handled by" to those already paged."""
    # Imported here: a SQLite panicctl never loads the PostgreSQL driver.
    from store.pg_dispatch import PgDispatchStore  # noqa: PLC0415
    from store.pg_queries import require_current_schema  # noqa: PLC0415

    reply = {"incident": incident_id, "status": "unknown", "first": False,
             "accepted": False, "repeated": False}
    # Opening the dispatch store migrates; panicctl must not move a schema under the
    # instances, so it acks only on the schema it knows.
    await require_current_schema(store_url)
    async with PgDispatchStore(str(store_url.dsn), password=store_url.password,
                               max_size=1, listen=False) as store:
        incident = await store.incident(incident_id)
        if incident is None:
            return reply
        body = build_handled_sms(incident_code=str(incident_id), responder_name=name, at=now,
                                 test=incident.test)
        recorded = await store.record_ack(
            incident_id, person_id=person_id, name=name, via="cli", now=now,
            handled=Notice(f"{incident_id}:handled", "handled", body))
    accepted = recorded.outcome != "ignored"
    return {**reply, "status": "acknowledged" if recorded.outcome in ("first", "added")
            else recorded.status, "first": recorded.outcome == "first",
            "accepted": accepted, "repeated": recorded.outcome == "repeated"}


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge an incident (stops escalation) and say who handles it.

    Through this machine's instance (its control socket); on a shared PostgreSQL store
    with no instance answering here, in the database itself. Either way the first ack
    wins and a later one is told whose it was.
    """
    config = load_config(args.config)
    if config.dispatch is None:
        err("dispatch is not configured ([dispatch] section)")
        return 2
    path = f"/ops/incidents/{args.id}/ack"
    try:
        code, reply = asyncio.run(_control(config.dispatch.control_socket, "POST", path,
                                           {"by": args.by}))
    except ControlError as exc:
        if config.store.backend != "postgresql":
            err(f"cannot reach panicd: {exc} (is it running?)")
            return 1
        # Named as the control API names them: a known person id acks as that person.
        person = load_responders(config.dispatch.responders_file)[0].people.get(args.by)
        reply = asyncio.run(ack_in_store(
            config.store, args.id, person_id=args.by if person else None,
            name=person.name if person else args.by, now=time.time()))
        code = 404 if reply["status"] == "unknown" else 200
        reply["via"] = "database"
    if code == 200:
        first = read_store(config, lambda reader: reader.first_ack(args.id))
        reply["handled_by"] = first["actor"] if first else None
    if args.json:
        print_json(reply)
    elif code == 200:
        out(" ".join(f"{k}={v}" for k, v in sorted(reply.items())))
        if not reply.get("first") and reply.get("handled_by"):
            out(f"incident {args.id} is handled by {reply['handled_by']}")
    else:
        err(str(reply.get("error", reply)))
    return 0 if code == 200 else 1


# -- reassign --------------------------------------------------------------------------


def cmd_reassign(args: argparse.Namespace) -> int:
    """Page a named person for an open or acknowledged incident."""
    config = load_config(args.config)
    if config.dispatch is None:
        err("dispatch is not configured ([dispatch] section)")
        return 2
    try:
        code, reply = asyncio.run(_control(
            config.dispatch.control_socket, "POST", f"/ops/incidents/{args.id}/reassign",
            {"to": args.to, "by": args.by}))
    except ControlError as exc:
        err(f"cannot reach panicd: {exc} (is it running?)")
        return 1
    if args.json:
        print_json(reply)
    elif code == 200:
        out(f"incident {reply['incident']}: paging {reply['to']} ({reply['messages']} messages)")
    else:
        err(str(reply.get("error", reply)))
    return {200: 0, 400: 2}.get(code, 1)


# -- test-press ------------------------------------------------------------------------


def _native_source(config: Config, name: str | None) -> MqttSourceConfig | None:
    for source in config.mqtt:
        if source.format == "native" and name in (None, source.name):
            return source
    return None


async def send_test_press(source: MqttSourceConfig, device: SimDevice, counter: int,
                          timeout_s: float) -> dict[str, Any] | None:
    """Publish a signed test press like the button does and await its "received" feedback."""
    payload = build_frame(device, PressKind.TEST, counter, battery=None)
    tls = None
    if source.tls:
        tls = ssl.create_default_context(cafile=str(source.ca_file) if source.ca_file else None)
    async with aiomqtt.Client(source.host, source.port, identifier=f"panicctl-{device.id}",
                              clean_session=True, username=source.username,
                              password=source.password, tls_context=tls, timeout=10) as client:
        await client.subscribe(native.command_topic(device.id), qos=1)
        await client.publish(topic_for(device, None), payload, qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    raw = message.payload
                    body = json.loads(raw if isinstance(raw, bytes | str) else b"null")
                    if isinstance(body, dict) and body.get("ctr") == counter \
                            and body.get("state") == "received":
                        return body
        except TimeoutError:
            return None
    return None


def cmd_test_press(args: argparse.Namespace) -> int:
    """Send a signed test press through the broker and wait for "received"."""
    config = load_config(args.config)
    device = config.devices.get(args.device)
    if device is None:
        err(f"unknown device {args.device}")
        return 1
    if device.key is None:
        err(f"no key for {device.id} (device-keys credential or PANICD_DEVICE_KEYS_FILE)")
        return 2
    source = _native_source(config, args.source)
    if source is None:
        err("no native [[mqtt]] source to publish to" + (f" named {args.source}"
                                                           if args.source else ""))
        return 2
    counter = int(time.time())
    try:
        seen = read_store(config, lambda reader: reader.devices()).get(device.id)
    except (FileNotFoundError, StoreAccessError):
        seen = None  # no store yet (or unreachable): the clock's counter is new anyway
    if seen is not None and seen.last_counter is not None:
        counter = max(counter, seen.last_counter + 1)
    sim = SimDevice(device.id, device.key, device.location)
    try:
        feedback = asyncio.run(send_test_press(source, sim, counter, args.timeout))
    except aiomqtt.MqttError as exc:
        err(f"broker {source.host}:{source.port}: {exc}")
        return 1
    result = {"device": device.id, "counter": counter, "source": source.name,
              "received": feedback is not None, "feedback": feedback}
    if args.json:
        print_json(result)
    elif feedback is not None:
        out(f"test press {device.id} ctr={counter}: received by panicd "
            f"(press {feedback.get('press')}, incident {feedback.get('incident', '-')} TES)")
    else:
        err(f"test press {device.id} ctr={counter}: no 'received' feedback within "
            f"{args.timeout:g} s (is panicd running and connected to {source.host}?)")
    return 0 if feedback is not None else 1


# -- backup and purge --------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    """An online, consistent copy of the database (SQLite backup API)."""
    config = load_config(args.config)
    if config.store.path is None:
        # The server's own tools make a consistent copy of a live cluster; a copy by
        # panicctl would be one more, weaker, way to do it.
        err(f"backup copies a SQLite store; {config.store} is PostgreSQL: use pg_dump -Fc "
            "(or the cluster's base backups and WAL archive)")
        return 2
    target: Path = args.file
    if target.exists() and not args.force:
        err(f"{target} exists (use --force to overwrite)")
        return 2
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    with read_only(config.database) as source:
        dest = sqlite3.connect(partial)
        try:
            # One step (pages=-1) under one read transaction: a consistent snapshot even
            # while the daemon commits.
            source.backup(dest)
            counts = {t: dest.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
                      for t in ("incidents", "presses", "outbox", "dead_letters")}
        finally:
            dest.close()
    partial.replace(target)
    result = {"backup": str(target), "bytes": target.stat().st_size, **counts}
    if args.json:
        print_json(result)
    else:
        out(f"backup written to {target} ({result['bytes']} bytes): "
              + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


# {closed} is the fixed subquery below, never user input; the cutoff is a parameter.
_CLOSED = ("SELECT id FROM incidents WHERE status IN ('resolved', 'cancelled')"
           " AND COALESCE(closed_at, updated_at) < :cutoff")
PURGE_STATEMENTS: tuple[tuple[str, str], ...] = (
    ("acks", "DELETE FROM acks WHERE incident_id IN ({closed})"),
    ("outbox", "DELETE FROM outbox WHERE incident_id IN ({closed})"
               " OR (incident_id IS NULL AND created_at < :cutoff)"),
    ("escalation_steps", "DELETE FROM escalation_steps WHERE incident_id IN ({closed})"),
    ("incident_dispatch", "DELETE FROM incident_dispatch WHERE incident_id IN ({closed})"),
    ("incident_events", "DELETE FROM incident_events WHERE incident_id IN ({closed})"),
    ("press_paths", "DELETE FROM press_paths WHERE press_id IN (SELECT id FROM presses WHERE"
                    " incident_id IN ({closed}) OR (incident_id IS NULL"
                    " AND received_at < :cutoff))"),
    ("presses", "DELETE FROM presses WHERE incident_id IN ({closed})"
                " OR (incident_id IS NULL AND received_at < :cutoff)"),
    ("incidents", "DELETE FROM incidents WHERE id IN ({closed})"),
    ("dead_letters", "DELETE FROM dead_letters WHERE received_at < :cutoff"),
    ("device_health", "DELETE FROM device_health WHERE cleared_at < :cutoff"),
)


def purge(database: Path, cutoff: float, *, dry_run: bool) -> dict[str, int]:
    """Delete closed incidents (and everything of theirs) and old rows; returns counts."""
    if not database.exists():
        raise FileNotFoundError(f"no database at {database} (has panicd run yet?)")
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("BEGIN IMMEDIATE")
        counts = {}
        try:
            for table, sql in PURGE_STATEMENTS:
                statement = sql.format(closed=_CLOSED)
                counts[table] = conn.execute(statement, {"cutoff": cutoff}).rowcount
        finally:
            conn.execute("ROLLBACK" if dry_run else "COMMIT")
    finally:
        conn.close()
    return counts


def cmd_purge(args: argparse.Namespace) -> int:
    """Retention: delete closed incidents and old rows older than N days."""
    if args.older_than < 1:
        err("--older-than must be at least 1 day")
        return 2
    config = load_config(args.config)
    cutoff = time.time() - args.older_than * 86400.0
    if config.store.path is not None:
        counts = purge(config.store.path, cutoff, dry_run=args.dry_run)
    else:
        from store import pg_queries  # noqa: PLC0415  # SQLite never loads the driver

        statements = [(table, sql.format(closed=_CLOSED)) for table, sql in PURGE_STATEMENTS]
        counts = asyncio.run(pg_queries.purge(config.store, statements, {"cutoff": cutoff},
                                              dry_run=args.dry_run))
    if args.json:
        print_json({"dry_run": args.dry_run, "cutoff": cutoff, "deleted": counts})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        out(f"purge older than {args.older_than} days ({when(cutoff)}): {verb}")
        for table, count in counts.items():
            out(f"  {table:<18} {count}")
    return 0


def register(add: Any) -> None:
    """Add the operations subcommands to panicctl's parser."""
    add("status", cmd_status,
        "sources, queues, open incidents, pending steps, unhealthy devices, instances")
    p = add("devices", cmd_devices, "registered devices: last seen, battery, offline")
    p.add_argument("--offline", action="store_true", help="only offline or never seen")
    p.add_argument("--low-battery", action="store_true", help="only low battery")
    p = add("reassign", cmd_reassign, "page a named person for an open incident")
    p.add_argument("id", type=int)
    p.add_argument("--to", required=True, help="person id from responders.toml")
    p.add_argument("--by", default="operator")
    p = add("test-press", cmd_test_press, "send a signed test press and wait for 'received'")
    p.add_argument("device")
    p.add_argument("--source", help="the [[mqtt]] source to publish through (default: first)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p = add("backup", cmd_backup, "online copy of the database to FILE")
    p.add_argument("file", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite FILE")
    p = add("purge", cmd_purge, "delete closed incidents and old rows (retention)")
    p.add_argument("--older-than", type=int, required=True, metavar="DAYS")
    p.add_argument("--dry-run", action="store_true", help="count only, delete nothing")
