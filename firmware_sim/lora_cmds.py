"""``panic-sim lora-rx``, ``button --lora`` and the LoRa share of ``storm``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from firmware_sim.fleet import CounterState, SimDevice
from firmware_sim.lora import AirClient, ReyaxSim, lora_payload, press_until_acked
from gateway.config import Config
from gateway.formats import lora_frame, native
from gateway.model import GeoFix, PressKind


def is_lora_button(device_id: str) -> bool:
    """Whether a registry id is a LoRa button's ("L" + 8 upper-case hex digits)."""
    try:
        lora_frame.device_number(device_id)
    except ValueError:
        return False
    return True


def default_link(config: Config) -> Path:
    """The first REYAX receiver's port in the config, else a per-user runtime path."""
    for receiver in config.serial:
        if receiver.mode == "rylr":
            return Path(receiver.port)
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"  # noqa: S108 -- a link, not data
    return Path(base) / "panic-sim" / "ttyLORA0"


def run_lora_rx(
    args: argparse.Namespace, config: Config, fleet: dict[str, SimDevice], state: CounterState
) -> int:
    """Serve a simulated REYAX module on a pty until SIGINT/SIGTERM (or ``--presses`` done)."""
    link = Path(args.link) if args.link else default_link(config)
    link.parent.mkdir(parents=True, exist_ok=True)
    buttons = [d for d in fleet.values() if is_lora_button(d.id)][: args.buttons]
    sim = ReyaxSim(link=link, noise_every_s=args.noise_every, rng=random.Random(args.seed))
    pty = sim.open()
    try:
        print(json.dumps({"pty": pty, "link": str(link), "air": str(link) + ".air",
                          "buttons": [b.id for b in buttons]}), flush=True)
        asyncio.run(_serve(sim, args, buttons, state))
    finally:
        sim.close()
        state.save()
    print(json.dumps({"transmitted": sim.stats.transmitted, "acks": len(sim.stats.acks),
                      "noise": sim.stats.noise, "dropped": sim.stats.dropped}), flush=True)
    return 0


async def _serve(
    sim: ReyaxSim, args: argparse.Namespace, buttons: Sequence[SimDevice], state: CounterState
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    rng = random.Random(args.seed)
    air = Path(str(sim.link) + ".air") if sim.link else None
    if air is not None and air.exists():
        air.unlink()
    async with asyncio.TaskGroup() as group:
        group.create_task(sim.serve(stop, air=air), name="lora-rx.module")
        if buttons and args.presses:
            group.create_task(_presses(sim, args, buttons, state, rng, stop),
                              name="lora-rx.buttons")
        await stop.wait()


async def _presses(  # noqa: PLR0917 -- private step of _serve
    sim: ReyaxSim, args: argparse.Namespace, buttons: Sequence[SimDevice],
    state: CounterState, rng: random.Random, stop: asyncio.Event,
) -> None:
    """Simulated buttons press now and then; each retries until acknowledged."""
    # A button handles one press at a time: a retry of an older counter sent after a newer
    # press was stored would be refused as stale, as real firmware must know.
    busy = {device.id: asyncio.Lock() for device in buttons}

    async def one(device: SimDevice) -> None:
        async with busy[device.id]:
            counter = state.next(device.id)
            state.save()
            payload = lora_payload(device, PressKind(args.kind), counter,
                                   battery=rng.randint(20, 100))
            tries = await press_until_acked(sim, device, payload, counter, retry_s=args.retry,
                                            max_tries=args.max_tries)
        print(json.dumps({"device": device.id, "counter": counter, "tries": tries}), flush=True)

    async with asyncio.TaskGroup() as group:
        for index in range(args.presses):
            device = rng.choice(buttons)
            group.create_task(one(device), name=f"lora-rx.press.{index}")
            await asyncio.sleep(rng.expovariate(1 / args.every))
    stop.set()


async def button_via_lora(
    link: Path, device: SimDevice, kind: PressKind, counter: int, *,
    battery: int | None, gps: GeoFix | None, tamper: bool, retry_s: float, max_tries: int,
) -> int | None:
    """Press a LoRa button heard by the ``lora-rx`` module behind ``link``; tries or None."""
    payload = lora_payload(device, kind, counter, battery=battery, gps=gps, tamper=tamper)
    async with AirClient(link) as air:
        return await press_until_acked(air, device, payload, counter, retry_s=retry_s,
                                       max_tries=max_tries)


@dataclass(slots=True)
class LoraStormResult:
    """What the LoRa share of a storm sent and got acknowledged."""

    sent: dict[tuple[str, int], int | None] = field(default_factory=dict)
    heard_twice: int = 0

    @property
    def acked(self) -> int:
        """Presses whose ACK came back."""
        return sum(1 for tries in self.sent.values() if tries is not None)


async def lora_storm(
    link: Path,
    devices: Sequence[SimDevice],
    *,
    count: int,
    rate: float,
    counter_base: int,
    heard_twice_ratio: float = 0.0,
    broker: tuple[str, int] | None = None,
    retry_s: float = 2.0,
    max_tries: int = 5,
    seed: int = 1,
) -> LoraStormResult:
    """``count`` LoRa presses round-robin over ``devices``; a share also sent over MQTT.

    A "heard twice" press is the same button, counter and kind published as a native
    frame too (a dual-radio button): panicd must store it once with two paths.
    """
    rng = random.Random(seed)
    result = LoraStormResult()
    per_device: dict[str, int] = {}
    # One press at a time per button (FIFO locks keep its counters in order).
    locks: dict[str, asyncio.Lock] = {}
    async with AsyncExitStack() as stack:
        air = await stack.enter_async_context(AirClient(link))
        mqtt = None
        if broker is not None and heard_twice_ratio > 0:
            mqtt = await stack.enter_async_context(
                aiomqtt.Client(broker[0], broker[1], identifier=f"panic-sim-lora-{os.getpid()}"))
        async with asyncio.TaskGroup() as group:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for index in range(count):
                delay = start + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                device = devices[index % len(devices)]
                n = per_device.get(device.id, 0)
                per_device[device.id] = n + 1
                counter = counter_base + n
                twin = mqtt if mqtt is not None and rng.random() < heard_twice_ratio else None
                result.heard_twice += twin is not None
                busy = locks.setdefault(device.id, asyncio.Lock())
                group.create_task(
                    _one_lora(air, twin, device, counter, result, busy, (retry_s, max_tries)),
                    name=f"storm.lora.{index}",
                )
    return result


async def _one_lora(  # noqa: PLR0917 -- private task body
    air: AirClient, twin: aiomqtt.Client | None, device: SimDevice, counter: int,
    result: LoraStormResult, busy: asyncio.Lock, retry: tuple[float, int],
) -> None:
    payload = lora_payload(device, PressKind.PANIC, counter)
    result.sent[device.id, counter] = None
    async with busy:
        if twin is not None:
            # The dual-radio button sends the same press over Wi-Fi as it keys the radio.
            frame = native.encode(key=device.key, device_id=device.id, counter=counter,
                                  kind=PressKind.PANIC, device_time=int(time.time()))
            await twin.publish(native.uplink_topic(device.id), frame, qos=1)
        result.sent[device.id, counter] = await press_until_acked(
            air, device, payload, counter, retry_s=retry[0], max_tries=retry[1])


def no_lora_buttons() -> int:
    """The error exit when the fleet has no LoRa buttons."""
    print("panic-sim: no LoRa buttons (ids L + 8 hex digits) with keys", file=sys.stderr)
    return 2
