"""``panic-sim``: simulated buttons and traffic for demos, tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from firmware_sim import button, demo, lora_cmds, third_party
from firmware_sim.fleet import CounterState, SimDevice, default_state_path, load_keys
from firmware_sim.storm import publish_all, storm
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.model import GeoFix, PressKind


def _parse_gps(text: str) -> GeoFix:
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LAT,LON") from None
    return GeoFix(lat, lon, accuracy_m=10)


def _fleet(config: Config, keys_file: Path) -> dict[str, SimDevice]:
    keys = load_keys(keys_file)
    return {
        device.id: SimDevice(device.id, keys[device.id], device.location)
        for device in config.devices.values()
        if device.id in keys
    }


def _broker(config: Config, args: argparse.Namespace) -> tuple[str, int]:
    source = config.mqtt[0] if config.mqtt else None
    host = args.host or (source.host if source else "127.0.0.1")
    port = args.port or (source.port if source else 1883)
    return host, port


def _fallbacks(config: Config, args: argparse.Namespace) -> list[tuple[str, int]]:
    """The first source's other brokers (``[[mqtt]] brokers``), which the buttons move to
    when theirs is gone, as panicd does; none when ``--host``/``--port`` name one."""
    if args.host or args.port or not config.mqtt:
        return []
    return [(b.host, b.port) for b in config.mqtt[0].fallback_brokers]


def _keys_file(args: argparse.Namespace) -> Path:
    path = args.keys or os.environ.get("PANICD_DEVICE_KEYS_FILE")
    if not path:
        raise ConfigError("-", "--keys", "give --keys FILE or set PANICD_DEVICE_KEYS_FILE")
    return Path(path)


def cmd_button(args: argparse.Namespace) -> int:
    """Press one simulated button."""
    config = load_config(args.config)
    fleet = _fleet(config, _keys_file(args))
    if args.device not in fleet:
        print(f"panic-sim: no key for device {args.device}", file=sys.stderr)
        return 2
    device = fleet[args.device]
    state = CounterState(args.state)
    counter = args.counter if args.counter is not None else state.next(device.id)
    state.save()
    if args.lora:
        if not lora_cmds.is_lora_button(device.id):
            print(f"panic-sim: {device.id} is not a LoRa button id (L + 8 hex)", file=sys.stderr)
            return 2
        tries = asyncio.run(lora_cmds.button_via_lora(
            Path(args.lora), device, PressKind(args.kind), counter, battery=args.battery,
            gps=args.gps, tamper=args.tamper, retry_s=max(args.wait, 0.5) / 4, max_tries=4))
        print(json.dumps({"device": device.id, "counter": counter, "kind": args.kind,
                          "via": "lora", "tries": tries}))
        return 0 if tries is not None else 1
    host, port = _broker(config, args)
    sent, feedback = asyncio.run(
        button.press(
            host, port, device, PressKind(args.kind), counter,
            battery=args.battery, gps=args.gps, via_gateway=args.via_gateway,
            tamper=args.tamper, repeat=args.repeat, feedback_timeout_s=args.wait,
            retransmit=args.retransmit, fallback_brokers=_fallbacks(config, args),
        )
    )
    print(json.dumps({"device": sent.device_id, "counter": sent.counter, "kind": sent.kind.value,
                      "topic": sent.topic, "feedback": feedback,
                      "retransmissions": sent.retransmissions}))
    return 0 if feedback is not None or args.wait <= 0 else 1


def _zigbee_sender(name: str) -> Callable[[int], tuple[str, bytes]]:
    return lambda _n: third_party.zigbee_press(name)


def _chirpstack_sender(
    sim: SimDevice, dev_eui: str, counter_base: int
) -> Callable[[int], tuple[str, bytes]]:
    return lambda n: third_party.chirpstack_uplink(
        sim, dev_eui, counter_base + n, n, kind=PressKind.PANIC
    )


def third_party_messages(
    config: Config, keyed: dict[str, SimDevice], count: int, counter_base: int
) -> list[tuple[str, bytes]]:
    """Presses as Zigbee2MQTT and ChirpStack publish them, round-robin over the devices
    registered with those external ids (ChirpStack carries our signed frame, so it needs
    the device's key)."""
    senders: list[Callable[[int], tuple[str, bytes]]] = []
    for device in config.devices.values():
        name = device.external_ids.get("zigbee2mqtt")
        if name is not None:
            senders.append(_zigbee_sender(name))
        dev_eui = device.external_ids.get("chirpstack")
        if dev_eui is not None and device.id in keyed:
            senders.append(_chirpstack_sender(keyed[device.id], dev_eui, counter_base))
    if not senders:
        return []
    return [senders[i % len(senders)](i // len(senders)) for i in range(count)]


def cmd_storm(args: argparse.Namespace) -> int:
    """Publish many presses at a fixed rate."""
    config = load_config(args.config)
    keyed = _fleet(config, _keys_file(args))
    fleet = list(keyed.values())[: args.devices]
    if not fleet:
        print("panic-sim: no devices with keys in the registry", file=sys.stderr)
        return 2
    state = CounterState(args.state)
    base = max(state.next(device.id) for device in fleet)
    host, port = _broker(config, args)
    lora_fleet = [d for d in fleet if args.lora and lora_cmds.is_lora_button(d.id)]
    fleet = [d for d in fleet if d not in lora_fleet]
    lora_count = round(args.count * len(lora_fleet) / (len(lora_fleet) + len(fleet)))
    if lora_fleet:
        lora_result = asyncio.run(lora_cmds.lora_storm(
            Path(args.lora), lora_fleet, count=lora_count, rate=args.rate, counter_base=base,
            heard_twice_ratio=args.duplicates, broker=(host, port)))
        for device_id, counter in lora_result.sent:
            state.bump_to(device_id, counter)
        state.save()
        print(json.dumps({"lora_sent": len(lora_result.sent), "lora_acked": lora_result.acked,
                          "heard_twice": lora_result.heard_twice}))
    if args.third_party:
        messages = third_party_messages(config, keyed, args.third_party, base)
        if not messages:
            print("panic-sim: no registered device has a zigbee2mqtt or chirpstack external id",
                  file=sys.stderr)
            return 2
        sent = asyncio.run(publish_all(host, port, messages, rate=args.rate))
        print(json.dumps({"third_party_sent": sent}))
    if not fleet:
        return 0
    result = asyncio.run(
        storm(host, port, fleet, count=args.count - lora_count, rate=args.rate,
              counter_base=base, duplicate_ratio=args.duplicates, via_gateway=args.via_gateway,
              watch_feedback=args.feedback, retransmit=args.retransmit,
              feedback_grace_s=args.grace, fallback_brokers=_fallbacks(config, args))
    )
    # Persist the highest counter used per device, so the next run starts above it.
    for device_id, counter in result.sent:
        state.bump_to(device_id, counter)
    state.save()
    latencies = result.latencies_ms()
    summary: dict[str, object] = {
        "sent": len(result.sent),
        "duplicates": result.duplicates,
        "seconds": round(result.finished_at - result.started_at, 3),
        "pubacked": len(result.pubacked),
        "retransmissions": result.retransmissions,
        "reconnects": result.reconnects,
    }
    if args.feedback or args.retransmit:
        summary["feedback"] = len(result.feedback)
        summary["unconfirmed"] = len(result.unconfirmed())
        if latencies:
            summary["p50_ms"] = round(latencies[len(latencies) // 2], 2)
            summary["p99_ms"] = round(latencies[int(len(latencies) * 0.99) - 1], 2)
    if args.out:
        with Path(args.out).open("w", encoding="utf-8") as handle:
            for (device_id, counter), at in sorted(result.sent.items()):
                handle.write(json.dumps({"device": device_id, "counter": counter, "at": at}) + "\n")
    print(json.dumps(summary))
    return 0


def cmd_lora_rx(args: argparse.Namespace) -> int:
    """Serve a simulated REYAX receiver on a pty (prints its path first)."""
    config = load_config(args.config)
    fleet = _fleet(config, _keys_file(args))
    if args.presses and not any(lora_cmds.is_lora_button(d) for d in fleet):
        return lora_cmds.no_lora_buttons()
    return lora_cmds.run_lora_rx(args, config, fleet, CounterState(args.state))


def _common(p: argparse.ArgumentParser) -> None:
    """Options every MQTT-publishing command takes."""
    p.add_argument("--config", type=Path, required=True, help="panicd's TOML configuration")
    p.add_argument("--keys", help="device keys (default: $PANICD_DEVICE_KEYS_FILE)")
    p.add_argument("--host", help="broker host (default: the config's first source, moving"
                   " on to its other brokers when one is gone)")
    p.add_argument("--port", type=int, help="broker port (default: the config's)")
    p.add_argument("--state", type=Path, default=default_state_path(),
                   help="counter state file (default: %(default)s)")
    p.add_argument("--via-gateway", help="publish through this relay gateway's topic")


def _button_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``panic-sim button``."""
    p = sub.add_parser("button", help="press one simulated button")
    _common(p)
    p.add_argument("--device", required=True)
    p.add_argument("--kind", choices=[k.value for k in PressKind], default="panic")
    p.add_argument("--gps", type=_parse_gps, help="LAT,LON fix to include")
    p.add_argument("--battery", type=int, default=90)
    p.add_argument("--counter", type=int, help="force a counter (to demo replays)")
    p.add_argument("--repeat", type=int, default=1, help="publish the same frame N times")
    p.add_argument("--tamper", action="store_true", help="corrupt the tag (must be rejected)")
    p.add_argument("--wait", type=float, default=5.0,
                   help="seconds to wait for panicd's feedback (0: do not wait)")
    p.add_argument("--no-retransmit", dest="retransmit", action="store_false",
                   help="send the press once; by default it is sent again with backoff"
                        " until panicd's feedback arrives (within --wait)")
    p.add_argument("--lora", metavar="LINK",
                   help="transmit as a LoRa button to the `panic-sim lora-rx` serving LINK")
    p.set_defaults(func=cmd_button)


def _storm_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``panic-sim storm``."""
    p = sub.add_parser("storm", help="many presses at a fixed rate, with duplicates")
    _common(p)
    p.add_argument("--devices", type=int, default=1000, help="use at most N registered devices")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--rate", type=float, default=200.0, help="presses per second")
    p.add_argument("--duplicates", type=float, default=0.1, help="share heard twice")
    p.add_argument("--feedback", action="store_true", help="time panicd's feedback per press")
    p.add_argument("--retransmit", action="store_true",
                   help="each button keeps its press until panicd's feedback, sending it again"
                        " with backoff (1 s doubling, cap 8 s) across reconnects; implies"
                        " --feedback. Without it a press ends at the broker's PUBACK")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds after the last press to wait for feedback (default: 5)")
    p.add_argument("--third-party", type=int, default=0, metavar="N",
                   help="also publish N presses as Zigbee2MQTT / ChirpStack would")
    p.add_argument("--out", help="write sent presses as JSON lines")
    p.add_argument("--lora", metavar="LINK",
                   help="LoRa buttons (L…) press through the `panic-sim lora-rx` serving LINK;"
                        " --duplicates of them are also published over MQTT (heard twice)")
    p.set_defaults(func=cmd_storm)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog="panic-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _button_parser(sub)
    _storm_parser(sub)

    p = sub.add_parser("lora-rx", help="a REYAX LoRa receiver on a pty, with simulated buttons")
    p.add_argument("--config", type=Path, required=True, help="panicd's TOML configuration")
    p.add_argument("--keys", help="device keys (default: $PANICD_DEVICE_KEYS_FILE)")
    p.add_argument("--state", type=Path, default=default_state_path(),
                   help="counter state file (default: %(default)s)")
    p.add_argument("--link", help="symlink to the pty (default: the config's first rylr port)")
    p.add_argument("--buttons", type=int, default=10, help="simulate at most N LoRa buttons")
    p.add_argument("--presses", type=int, default=0, help="press N times, then exit (0: serve)")
    p.add_argument("--every", type=float, default=2.0, help="mean seconds between presses")
    p.add_argument("--kind", choices=[k.value for k in PressKind], default="panic")
    p.add_argument("--noise-every", type=float, default=0.0, help="mean seconds between noise")
    p.add_argument("--retry", type=float, default=2.0, help="seconds a button waits for an ACK")
    p.add_argument("--max-tries", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_lora_rx)

    p = sub.add_parser("demo", help="run the end-to-end demo (broker, panicd, buttons)")
    p.add_argument("--config", type=Path, default=demo.DEMO_CONFIG)
    p.set_defaults(func=demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``panic-sim``."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"panic-sim: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
