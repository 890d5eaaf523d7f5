"""panicctl's operations commands: status, devices, reassign, test-press, backup, purge.

``status`` and ``reassign`` go through the daemon's control socket; ``status`` falls back
to the database (exit 1, "daemon not reachable") when the daemon does not answer.
``devices``, ``backup`` and ``purge`` work on the database beside a running daemon
(WAL; purge takes the write lock briefly). Exit codes: 0 ok, 1 not found / unreachable /
no feedback, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any

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
from firmware_sim.button import build_frame, topic_for
from firmware_sim.fleet import SimDevice
from gateway.config import Config, MqttSourceConfig, load_config
from gateway.ctl_format import err, out, print_json, table, when
from gateway.formats import native
from gateway.model import PressKind
from store import queries
from store.dispatch_observe import (
    OPEN_INCIDENTS_SQL,
    PENDING_OUTBOX_SQL,
    PENDING_STEPS_SQL,
    UNHEALTHY_SQL,
)


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


# -- status ----------------------------------------------------------------------------


def _db_status(config: Config) -> dict[str, Any]:
    with queries.read_only(config.database) as conn:
        return {
            "daemon": {"reachable": False, "now": time.time()},
            "sources": [{"name": s.name, "kind": k, "connected": None, "since": None}
                        for k, group in (("mqtt", config.mqtt), ("serial", config.serial))
                        for s in group],
            "queues": {"ingest": None,
                       "outbox": conn.execute(PENDING_OUTBOX_SQL).fetchone()[0],
                       "escalation": conn.execute(PENDING_STEPS_SQL).fetchone()[0]},
            "open_incidents": [dict(r) for r in conn.execute(OPEN_INCIDENTS_SQL)],
            "unhealthy": unhealthy(config, conn, time.time()),
        }


def cmd_status(args: argparse.Namespace) -> int:
    """Sources, queue depths, open incidents, pending steps and unhealthy devices."""
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
        snapshot = _db_status(config)
    else:
        # The daemon lists the conditions its monitor has raised so far; `devices` reads
        # the devices' state now. Both show :func:`unhealthy`, so they cannot disagree.
        with queries.read_only(config.database) as conn:
            snapshot["unhealthy"] = unhealthy(config, conn, time.time())
    if args.json:
        print_json(snapshot)
    else:
        _print_status(snapshot)
    return 0 if snapshot["daemon"]["reachable"] else 1


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


def incident_flags(row: dict[str, Any]) -> str:
    """The FLAGS column of ``incidents`` and ``status``: TES (test) and URGENT."""
    return ",".join(flag for flag, on in (("TES", row["test"]), ("URGENT", row["urgent"]))
                    if on)


# -- devices and health ------------------------------------------------------------------


def _raised(conn: sqlite3.Connection) -> dict[tuple[str, str], float]:
    """The conditions the daemon's health monitor has raised and not cleared, with when."""
    return {(r[0], r[1]): r[2] for r in conn.execute(UNHEALTHY_SQL)}


_CONDITIONS = frozenset(c.value for c in Condition)


def device_rows(config: Config, conn: sqlite3.Connection, now: float,
                raised: dict[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
    """Every registered device with what was last heard and its health state.

    ``conditions`` is the one definition of an unhealthy device, for ``devices`` and
    ``status`` alike: never heard, or offline / low battery by :func:`device_findings`
    with the thresholds of ``[health]`` and the monitor's raised conditions (so a battery
    alert clears with the same margin the monitor uses).
    """
    if raised is None:
        raised = _raised(conn)
    keys: set[Key] = {(s, Condition(c)) for s, c in raised if c in _CONDITIONS}
    seen = {r[0]: r for r in conn.execute(
        "SELECT id, last_seen_at, battery, last_kind, last_path FROM devices")}
    settings = HealthSettings.from_config(config.health)
    out = []
    for device in sorted(config.devices.values(), key=lambda d: d.id):
        _, last_seen, battery, kind, path = seen.get(device.id, (None, None, None, None, None))
        view = DeviceView(device.id, device.heartbeat_interval_s, last_seen, battery)
        found = {f.condition for f in device_findings(view, settings, now, baseline=None,
                                                      raised=keys)}
        states = [c.value for c in (Condition.OFFLINE, Condition.LOW_BATTERY) if c in found]
        if last_seen is None:
            states.insert(0, "never_seen")
        out.append({
            "id": device.id, "hardware": device.hardware, "kelurahan": device.kelurahan_kode,
            "landmark": device.landmark, "last_seen_at": last_seen, "battery": battery,
            "last_kind": kind, "last_path": path, "heartbeat_interval_s":
            device.heartbeat_interval_s, "state": ",".join(states) or "ok",
            "conditions": states,
            "offline": last_seen is None or Condition.OFFLINE in found,
            "low_battery": Condition.LOW_BATTERY in found,
        })
    return out


def unhealthy(config: Config, conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """``status``'s Unhealthy list: each condition of each device whose ``devices`` state is
    not ok, then the source and provider conditions the daemon has raised."""
    raised = _raised(conn)
    rows = []
    for device in device_rows(config, conn, now, raised):
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
    with queries.read_only(config.database) as conn:
        rows = device_rows(config, conn, time.time())
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
    if config.database.exists():
        with queries.read_only(config.database) as conn:
            row = conn.execute("SELECT last_counter FROM devices WHERE id = ?",
                               (device.id,)).fetchone()
        if row is not None and row[0] is not None:
            counter = max(counter, int(row[0]) + 1)
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
    target: Path = args.file
    if target.exists() and not args.force:
        err(f"{target} exists (use --force to overwrite)")
        return 2
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    with queries.read_only(config.database) as source:
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
    counts = purge(config.database, cutoff, dry_run=args.dry_run)
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
    add("status", cmd_status, "sources, queues, open incidents, pending steps, unhealthy devices")
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
