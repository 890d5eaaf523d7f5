"""panicctl's dispatch commands: ack, resolve (through the daemon's control socket) and
oncall (from the configuration alone)."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime
from typing import Any

import aiohttp

from dispatch.oncall import oncall_report
from dispatch.responders import WIB
from panicd.ctl_format import out, print_json
from panicd.daemon import load


class ControlError(Exception):
    """The daemon could not be reached or refused the request."""


async def _post(socket_path: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=socket_path)
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"http://panicd{path}", json=body,
                         timeout=aiohttp.ClientTimeout(total=15)) as response,
        ):
            text = await response.text()
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise ControlError(f"cannot reach panicd at {socket_path}: {exc} (is it running?)"
                           ) from None
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, {"error": text.strip()}


def _control(args: argparse.Namespace, path: str, body: dict[str, Any]) -> int:
    loaded = load(args.config)
    if loaded.config.dispatch is None:
        out("panicctl: dispatch is not configured ([dispatch] section)")
        return 2
    socket_path = str(loaded.config.dispatch.control_socket)
    try:
        status, reply = asyncio.run(_post(socket_path, path, body))
    except ControlError as exc:
        out(f"panicctl: {exc}")
        return 1
    if args.json:
        print_json(reply)
    elif status == 200:
        out(" ".join(f"{k}={v}" for k, v in sorted(reply.items())))
    else:
        out(f"panicctl: {reply.get('error', reply)}")
    return 0 if status == 200 else 1


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge an incident as an operator or a named responder."""
    return _control(args, f"/ops/incidents/{args.id}/ack", {"by": args.by})


def cmd_resolve(args: argparse.Namespace) -> int:
    """Resolve an incident: escalation stops and everyone paged is told."""
    return _control(args, f"/ops/incidents/{args.id}/resolve", {"note": args.note, "by": args.by})


def cmd_oncall(args: argparse.Namespace) -> int:
    """Who would be paged, level by level, for one kelurahan or all of them."""
    loaded = load(args.config)
    if loaded.dispatch is None:
        out("panicctl: dispatch is not configured ([dispatch] section)")
        return 2
    at = datetime.now(tz=WIB)
    if args.at:
        parsed = datetime.fromisoformat(args.at)
        at = parsed if parsed.tzinfo else parsed.replace(tzinfo=WIB)
    kelurahan = {k.kode: (k.name, k.kecamatan) for k in loaded.locator.kelurahan}
    try:
        rows = oncall_report(loaded.dispatch.routing, loaded.dispatch.responders, at,
                             args.kelurahan, kelurahan)
    except LookupError as exc:
        out(f"panicctl: {exc}")
        return 1
    if args.json:
        print_json([
            {"kelurahan_kode": r.kelurahan_kode, "kelurahan": r.kelurahan,
             "kecamatan": r.kecamatan, "policy": r.policy_id, "route": r.route.value,
             "level": r.level + 1, "after_s": r.after_s,
             "channels": [c.value for c in r.channels], "via": r.via,
             "person": r.person_id, "name": r.name, "phone": r.phone, "role": r.role}
            for r in rows
        ])
        return 0
    out(f"On call at {at.astimezone(WIB):%Y-%m-%d %H:%M} WIB")
    current = None
    for r in rows:
        if r.kelurahan_kode != current:
            current = r.kelurahan_kode
            out("", f"{r.kelurahan} ({r.kecamatan}) — policy {r.policy_id} [{r.route.value}]")
        who = f"{r.name} {r.phone} ({r.role})" if r.person_id else "NOBODY ON CALL"
        channels = "+".join(c.value for c in r.channels)
        out(f"  level {r.level + 1} after {r.after_s:>4}s  {channels:<9} {who}  via {r.via}")
    return 0


def register(add: Any) -> None:
    """Add the dispatch subcommands to panicctl's parser."""
    p = add("ack", cmd_ack, "acknowledge an incident (stops escalation)")
    p.add_argument("id", type=int)
    p.add_argument("--by", required=True, help="who is responding (name or person id)")
    p = add("resolve", cmd_resolve, "resolve an incident and tell everyone paged")
    p.add_argument("id", type=int)
    p.add_argument("--note", required=True)
    p.add_argument("--by", default="operator")
    p = add("oncall", cmd_oncall, "who would be paged now (or --at TIME)")
    p.add_argument("--at", help="local WIB time, ISO format (default: now)")
    p.add_argument("--kelurahan", help="one kelurahan (name or kode)")
