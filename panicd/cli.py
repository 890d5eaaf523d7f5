"""``panicctl``: the operator's command line.

Human-readable tables by default, ``--json`` for scripts. Exit codes: 0 success, 1 not
found / nothing to show where something was expected, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from gateway.config import Config, load_config, unheard_devices
from gateway.errors import ConfigError
from gateway.explain import FORMATS, UnsupportedFormatError, explain
from gateway.locate import Locator, map_link
from gateway.model import GeoFix
from panicd import ctl_dispatch as dispatch_ctl
from panicd import ctl_migrate, ctl_ops
from panicd.ctl_format import WIB, err, out, print_json, table, when
from panicd.daemon import DEFAULT_CONFIG, load
from store import queries
from store.errors import StoreError


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def config_warnings(config: Config) -> list[str]:
    """What loads but will not work as an operator expects (``check-config``'s warnings)."""
    warnings = []
    keyless = unheard_devices(config)
    if keyless:
        warnings.append(
            f"{len(keyless)} of {len(config.devices)} devices have no key (device-keys "
            f"credential or PANICD_DEVICE_KEYS_FILE) and no third-party id: every press "
            f"from them will be refused: {', '.join(keyless)}"
        )
    return warnings


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and every data file it names.

    Exit 0 when it loads (1 with ``--strict`` if there are warnings), 2 when it does not.
    """
    loaded = load(args.config)
    config, locator = loaded.config, loaded.locator
    keyless = sorted(d.id for d in config.devices.values() if d.key is None)
    warnings = config_warnings(config)
    summary: dict[str, object] = {
        "config": str(config.path),
        "store": str(config.store),
        "database": None if config.store.path is None else str(config.store.path),
        "devices": len(config.devices),
        "devices_without_key": keyless,
        "gateways": len(config.gateways),
        "kelurahan": len(locator.kelurahan),
        "mqtt_sources": [s.name for s in config.mqtt],
        "serial_sources": [f"{s.name} ({s.mode} on {s.port})" for s in config.serial],
        "warnings": warnings,
    }
    if args.json:
        print_json(summary)
    else:
        verdict = f"OK with {len(warnings)} warning(s)" if warnings else "OK"
        out(f"{config.path}: {verdict}")
        for key, value in summary.items():
            if key != "warnings":
                out(f"  {key}: {value}")
        if warnings:
            out("warnings:", *(f"  warning: {w}" for w in warnings))
    return 1 if args.strict and warnings else 0


def cmd_incidents(args: argparse.Namespace) -> int:
    """List incidents, newest first."""
    config = _config(args)
    since = None
    if args.since:
        since = datetime.fromisoformat(args.since).replace(tzinfo=WIB).timestamp()
    rows = ctl_ops.read_store(config, lambda reader: reader.incidents(
        active_only=args.open, kelurahan=args.kelurahan, since=since, limit=args.limit))
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        row["opened"] = when(row["opened_at"])
        row["flags"] = ctl_ops.incident_flags(row)
    out(
        *table(
            rows,
            [("id", "ID"), ("status", "STATUS"), ("flags", "FLAGS"), ("opened", "OPENED"),
             ("device_id", "DEVICE"), ("press_count", "PRESSES"), ("kelurahan", "KELURAHAN"),
             ("kecamatan", "KECAMATAN"), ("landmark", "LANDMARK")],
        )
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """One incident: location, presses with their paths, and the timeline."""
    config = _config(args)
    try:
        row = ctl_ops.read_store(config, lambda reader: reader.incident(args.id))
    except queries.NotFoundError as exc:
        err(exc)
        return 1
    if args.json:
        print_json(row)
        return 0
    flags = "".join(f" {flag}" for flag in ctl_ops.incident_flags(row).split(",") if flag)
    out(f"Incident {row['id']}{flags}  status={row['status']}  presses={row['press_count']}")
    out(f"  device     {row['device_id']}")
    out(f"  opened     {when(row['opened_at'])}")
    where = row["kelurahan"] or "(outside Kota Madiun / unknown)"
    out(f"  kelurahan  {where} ({row['kecamatan'] or '-'}; {row['kelurahan_match']})")
    out(f"  address    {row['address']} — {row['landmark']}")
    if row["lat"] is not None:
        link = map_link(GeoFix(row["lat"], row["lon"]))
        out(f"  location   {row['lat']:.5f}, {row['lon']:.5f} ({row['location_source']}) {link}")
    out("  presses:")
    for press in row["presses"]:
        paths = ", ".join(f"{p['path']} x{p['heard']}" for p in press["paths"])
        out(f"    #{press['id']} ctr={press['counter']} {press['kind']} "
            f"{when(press['received_at'])} {press['outcome']} via {paths}")
    out("  timeline:")
    for entry in row["timeline"]:
        actor = f" by {entry['actor']}" if entry["actor"] else ""
        out(f"    {when(entry['at'])}  {entry['event']} ({entry['reason']}){actor}")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """The newest rejected frames with their reasons."""
    config = _config(args)
    rows = ctl_ops.read_store(config, lambda reader: reader.dead_letters(limit=args.limit))
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        row["received"] = when(row["received_at"])
    out(
        *table(
            rows,
            [("id", "ID"), ("received", "RECEIVED"), ("reason", "REASON"),
             ("device_ref", "DEVICE"), ("path", "PATH"), ("detail", "DETAIL")],
        )
    )
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    """Which kelurahan/kecamatan a position falls in, as JSON."""
    # `not low <= x <= high` also refuses nan, which argparse's float() accepts.
    for name, value, limit in (("latitude", args.lat, 90), ("longitude", args.lon, 180)):
        if not -limit <= value <= limit:
            err(f"locate: {name} {value:g} is outside -{limit}..{limit} (give LAT LON in "
                f"decimal degrees, latitude first)")
            return 2
    if args.config.exists():
        config = _config(args)
        locator = Locator.from_geojson(
            config.kelurahan_file, nearest_within_m=config.nearest_within_m
        )
    else:
        bundled = Path(__file__).resolve().parent.parent / "config" / "geo" / "kelurahan.geojson"
        locator = Locator.from_geojson(bundled)
    fix = GeoFix(args.lat, args.lon)
    kelurahan, match, distance = locator.kelurahan_at(fix)
    print_json(
        {
            "lat": args.lat,
            "lon": args.lon,
            "kelurahan": kelurahan.name if kelurahan else None,
            "kode": kelurahan.kode if kelurahan else None,
            "kecamatan": kelurahan.kecamatan if kelurahan else None,
            "match": match.value,
            "distance_m": None if distance is None else round(distance, 1),
            "map": map_link(fix),
        }
    )
    return 0 if kelurahan is not None else 1


def cmd_decode(args: argparse.Namespace) -> int:
    """Decode one frame and verify it against the registry: why was a button ignored?"""
    config = _config(args)
    payload = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    try:
        result = explain(config, args.format, payload, topic=args.topic or "", now=time.time())
    except UnsupportedFormatError as exc:
        err(f"decode --format {args.format}: not yet supported ({exc})")
        return 2
    print_json(result)
    return 0 if result.get("verdict") == "accepted" else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and shell completion)."""
    parser = argparse.ArgumentParser(prog="panicctl", description="Operate panicd.")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("PANICD_CONFIG", DEFAULT_CONFIG)),
        help="panicd's TOML configuration (default: $PANICD_CONFIG or %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("check-config", cmd_check_config, "validate the configuration and its data files")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when there are warnings (devices without a key, ...)")
    p = add("incidents", cmd_incidents, "list incidents, newest first")
    p.add_argument("--open", action="store_true", help="only open or acknowledged incidents")
    p.add_argument("--kelurahan", help="only this kelurahan (name or kode)")
    p.add_argument("--since", help="only opened since this local (WIB) time, ISO format")
    p.add_argument("--limit", type=int, default=100)
    p = add("show", cmd_show, "one incident with its presses and timeline")
    p.add_argument("id", type=int)
    p = add("dead-letters", cmd_dead_letters, "rejected frames and why")
    p.add_argument("--limit", type=int, default=50)
    dispatch_ctl.register(add)
    # ack also works on a shared PostgreSQL store with no instance answering here: the
    # one of panicd/ctl_ops.py, which needs the store (panicd/ctl_dispatch.py's needs the socket).
    sub.choices["ack"].set_defaults(func=ctl_ops.cmd_ack)
    ctl_ops.register(add)
    ctl_migrate.register(add)
    p = add("decode", cmd_decode, "decode and verify one frame; print press and verdict",
            json_flag=False)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--topic", help="the MQTT topic the frame arrived on (third-party formats)")
    p.add_argument("file", help="the frame (raw payload, hex for lora-frame, or - for stdin)")
    p = add("locate", cmd_locate, "which kelurahan a position is in", json_flag=False)
    p.add_argument("lat", type=float)
    p.add_argument("lon", type=float)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``panicctl``."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        err(exc)
        return 2
    except (FileNotFoundError, queries.StoreAccessError, StoreError) as exc:
        # No store yet, or a server away or refusing: one line, and try again later.
        err(exc)
        return 1
    except sqlite3.DatabaseError as exc:
        err(f"database error: {exc}")
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
