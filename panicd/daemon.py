"""``panicd``: the daemon. Named lifecycle phases: load → open → start → ready → drain → stop.

Shutdown (SIGTERM/SIGINT): the stop event makes every source stop taking messages while
keeping its connection open until the pipeline has committed (and so acknowledged) what
it already holds, within ``ingest.drain_timeout_s``; whatever is still unacknowledged
then is redelivered by the broker after the restart. Exit code 0 on a clean stop, 2 for
a bad configuration, 1 for a fatal runtime error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dispatch.service import (
    DispatchPlan,
    OpenDispatch,
    load_dispatch,
    open_dispatch,
    serve_dispatch_web,
    shared_ack_secret_missing,
)
from gateway.config import Config, load_config, unheard_devices
from gateway.dedup import DedupPolicy
from gateway.errors import ConfigError
from gateway.ingest import Ingestor
from gateway.locate import Locator
from gateway.logs import configure_logging
from gateway.sdnotify import Notifier, watchdog_loop
from gateway.sources import Source
from store.backend import PG_HEALTH_POOL, Stores
from store.errors import StoreError

if TYPE_CHECKING:
    from aiohttp import web

    from dispatch.health import SourceState
    from dispatch.health_monitor import HealthMonitor
    from gateway.sources.mqtt import MqttSource
    from gateway.sources.serial import SerialSource

log = structlog.get_logger("panicd")

DEFAULT_CONFIG = Path("/etc/panicd/panicd.toml")
STATUS_EVERY_S = 10.0
# How many keyless device ids the start-up warning names (the count is always whole).
KEYLESS_NAMED = 10
# How long a restart with overdue escalation steps waits for the provider to accept the
# first one before loading the rest (and so before READY); Twilio answers well within it.
CATCH_UP_HEAD_START_S = 0.5


@dataclass(frozen=True, slots=True)
class Loaded:
    """Everything validated before the daemon opens anything."""

    config: Config
    locator: Locator
    dispatch: DispatchPlan | None


def load(path: Path, *, defer_geometry: bool = False) -> Loaded:
    """Load and validate everything the daemon needs before it opens anything.

    With ``defer_geometry`` (the daemon), the kelurahan polygons are checked and indexed
    later by :meth:`Locator.build`, which :meth:`Daemon.run` awaits before any source or
    web server can take a press; everything else is still validated here.
    """
    config = load_config(path)
    missing = shared_ack_secret_missing(config, os.environ)
    if missing is not None:
        raise missing
    from_file = Locator.deferred if defer_geometry else Locator.from_geojson
    locator = from_file(config.kelurahan_file, nearest_within_m=config.nearest_within_m)
    for device in config.devices.values():
        if device.kelurahan_kode is not None and locator.by_kode(device.kelurahan_kode) is None:
            raise ConfigError(
                config.devices_file, f"device {device.id}.kelurahan", "unknown kelurahan kode"
            )
    return Loaded(config, locator, load_dispatch(config, locator))


# Allocations between young-generation collections (CPython's default is 700). A press
# allocates a few dozen tracked objects that live for one batch (a few ms); at 700, most
# of them were walked and promoted before they died. At 10,000 the in-process pipeline
# (decode, dedup, locate, commit, log) used 11% less CPU per press (75 -> 67 us, the
# same as with the collector off); the garbage it lets wait is a few MB at most.
GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> int:
    """Tune the cyclic GC for serving, once start-up is done; returns objects frozen.

    The libraries, config and kelurahan geometry are about 61,000 objects that live as
    long as the process. Every full (generation 2) collection walked them all, stopping
    the event loop for 15-19 ms each time (the demo config, measured with gc.collect):
    most of a press's 20 ms latency budget. Frozen (gc.freeze), a full collection only
    walks what came after start-up.
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    return gc.get_freeze_count()


class Daemon:
    """The running daemon: store, pipeline and sources under one TaskGroup."""

    def __init__(self, loaded: Loaded, notifier: Notifier) -> None:
        self.config = loaded.config
        self.locator = loaded.locator
        self.dispatch_plan = loaded.dispatch
        self.notifier = notifier
        self.stop = asyncio.Event()
        # A reception's time: this host's clock, or the database's on a shared store.
        self._stamp: Callable[[], float] = time.time
        self.sources: list[Source] = []
        self._mqtt: list[MqttSource] = []
        self._serial: list[SerialSource] = []
        self.ingestor: Ingestor | None = None
        self.health: HealthMonitor | None = None
        # device id -> when its network (LWT / availability) reported it offline.
        self.reported_offline: dict[str, float] = {}
        self._counts = (0, 0)  # open incidents, pending steps (for STATUS=)

    def request_stop(self, reason: str) -> None:
        """Begin a graceful shutdown (idempotent)."""
        if not self.stop.is_set():
            log.info("daemon.stopping", reason=reason)
            self.notifier.stopping("draining in-flight presses")
            self.stop.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; returns after a graceful drain."""
        config = self.config
        async with AsyncExitStack() as stack:
            stores = Stores(config.store, instance=config.instance,
                            lease_s=config.dispatch.lease_s if config.dispatch else None)
            # SQLite's checkpoints run on a connection of their own, never inside a
            # commit; entered first, so it closes last and leaves no WAL behind.
            await stack.enter_async_context(stores.checkpointer())
            ingest = config.ingest
            store = stores.ingest(batch_max=ingest.batch_max)
            await stack.enter_async_context(store)
            log.info("store.opened", store=str(stores), shared=stores.shared,
                     instance=config.instance)
            ingestor = await stack.enter_async_context(
                Ingestor(
                    store,
                    config,
                    self.locator,
                    policy=DedupPolicy(
                        cancel_grace_s=ingest.cancel_grace_s,
                        burst_urgent_presses=ingest.burst_urgent_presses,
                    ),
                    batch_max=ingest.batch_max,
                    batch_window_s=ingest.batch_window_ms / 1000,
                    queue_max=ingest.queue_max,
                )
            )
            self.ingestor = ingestor
            # Dispatch first: steps that fell due while panicd was down are sent from
            # here, while the rest starts (docs/PERFORMANCE.md, restart → first step).
            running: OpenDispatch | None = None
            if self.dispatch_plan is not None:
                running = await stack.enter_async_context(
                    open_dispatch(self.dispatch_plan, stores, feedback=self._feedback)
                )
                ingestor.add_listener(running.dispatcher.on_incident)
                # Loading the rest competes with that send for the CPU and the GIL: let
                # the first overdue page reach the provider first, for a bounded time.
                await running.head_start(CATCH_UP_HEAD_START_S)
            # The kelurahan index and the modules only sources, web servers and health
            # need, in a thread so the event loop keeps sending meanwhile. No press can
            # arrive before this returns: nothing that takes one exists yet.
            await asyncio.to_thread(_finish_loading, self.locator)
            # On a shared store a reception is stamped in the database's clock, as due
            # times are, so instances whose clocks differ still merge bursts alike.
            shared = running.dispatcher.shared_clock if running is not None else None
            if shared is not None:
                self._stamp = shared
            self._make_sources(ingestor)
            if running is not None:
                await stack.enter_async_context(
                    serve_dispatch_web(running, runtime=self, mounts=self._mounts(ingestor))
                )
            from dispatch.health import HealthSettings  # noqa: PLC0415  # see _finish_loading
            from dispatch.health_monitor import HealthMonitor  # noqa: PLC0415

            # Device health runs once for the cluster: on the instance that leads.
            leader = stores.leader()
            await stack.enter_async_context(leader)
            self.health = await stack.enter_async_context(
                HealthMonitor(stores.dispatch(pool=PG_HEALTH_POOL, listen=False), config.devices,
                              self._source_flags, HealthSettings.from_config(config.health),
                              ops=running.dispatcher if running else None,
                              reported_offline=lambda: self.reported_offline,
                              source_alarms=self._source_alarms, leader=leader)
            )
            frozen = settle_gc()
            log.debug("daemon.gc_settled", frozen=frozen, thresholds=gc.get_threshold())
            async with asyncio.TaskGroup() as group:
                for source in self.sources:
                    group.create_task(source.run(self.stop), name=f"source.{source.name}")
                group.create_task(watchdog_loop(self.notifier, self.stop), name="sdnotify.watchdog")
                ready = group.create_task(self._announce_ready(), name="daemon.ready")
                status = group.create_task(self._status_loop(), name="daemon.status")
                await self.stop.wait()
                # Sources drain and return by themselves; these two only wait.
                ready.cancel()
                status.cancel()
            log.info(
                "daemon.stopped",
                committed=ingestor.committed_items,
                pending=ingestor.depth,
            )

    def _make_sources(self, ingestor: Ingestor) -> None:
        """Construct (not run) the MQTT and serial sources."""
        from gateway.sources.mqtt import MqttSource  # noqa: PLC0415  # see _finish_loading
        from gateway.sources.serial import SerialSource  # noqa: PLC0415

        config, ingest = self.config, self.config.ingest
        self._mqtt = [
            MqttSource(source, ingestor, drain_timeout_s=ingest.drain_timeout_s,
                       on_availability=self._availability, clock=self._stamp)
            for source in config.mqtt
        ]
        self._serial = [
            SerialSource(receiver, ingestor, devices=config.devices,
                         drain_timeout_s=ingest.drain_timeout_s, clock=self._stamp)
            for receiver in config.serial
        ]
        self.sources = [*self._mqtt, *self._serial]

    def _availability(self, format_name: str, ref: str, online: bool, at: float) -> None:
        """A third-party device's own network says it went offline or came back."""
        device_id = self.config.external_index.get((format_name, ref))
        if device_id is None:
            return
        if online:
            if self.reported_offline.pop(device_id, None) is not None:
                log.info("device.reported_online", device=device_id, via=format_name)
        elif device_id not in self.reported_offline:
            self.reported_offline[device_id] = at
            log.warning("device.reported_offline", device=device_id, via=format_name)

    def _mounts(self, ingestor: Ingestor) -> list[tuple[str, web.Application]]:
        """Extra applications on the public web server (the city app endpoint)."""
        app = self.config.app
        if app is None:
            return []
        from gateway.sources.app import AppSettings, app_api  # noqa: PLC0415  # _finish_loading

        settings = AppSettings(app.rate_per_minute, app.burst, app.commit_timeout_s,
                               trusted_proxies=app.trusted_proxies)
        return [("/app", app_api(ingestor, settings, self.config, stamp=self._stamp))]

    def _feedback(self, device_id: str, incident_id: int, state: str) -> None:
        """Presser feedback after an ack or closure: MQTT command topics and LoRa downlinks."""
        body: dict[str, object] = {"incident": incident_id, "state": state}
        # A list, not any(): every source that can reach the button gets it.
        reach: list[MqttSource | SerialSource] = [*self._mqtt, *self._serial]
        sent = [source.send_feedback(device_id, body) for source in reach]
        log.info("device.feedback", device=device_id, incident=incident_id, state=state,
                 sent=any(sent))

    async def _announce_ready(self) -> None:
        """READY=1 once the database is open and every source has connected.

        If a source is still down after ``ready_timeout_s`` (a receiver unplugged at boot,
        a broker away), READY is sent anyway, degraded and loudly: refusing it would make
        systemd kill and restart panicd in a loop, taking every working source down too.
        The down source keeps reconnecting and device health raises an operations alert.
        """
        try:
            async with asyncio.timeout(self.config.ready_timeout_s):
                for source in self.sources:
                    await source.wait_connected()
        except TimeoutError:
            down = [s.name for s in self.sources if not s.connected]
            log.error("daemon.ready_degraded", down=down,  # noqa: TRY400 -- not an exception
                      waited_s=self.config.ready_timeout_s)
        await self._refresh_counts()
        self.notifier.ready(self._summary())
        log.info("daemon.ready", sources=[s.name for s in self.sources],
                 up=[s.name for s in self.sources if s.connected], pid=os.getpid())

    def _source_flags(self) -> list[tuple[str, str, bool]]:
        return ([(s.name, "mqtt", s.connected) for s in self._mqtt]
                + [(s.name, "serial", s.connected) for s in self._serial])

    def _source_alarms(self) -> dict[str, tuple[str, float]]:
        return {s.name: (s.alarm.reason, s.alarm.at) for s in self._mqtt
                if s.alarm is not None}

    def source_states(self) -> list[SourceState]:
        """Every source with since when it has been up or down (dispatch.observe.Runtime)."""
        return self.health.source_states() if self.health else []

    def ingest_depth(self) -> int:
        """Items submitted but not yet committed."""
        return self.ingestor.depth if self.ingestor else 0

    def press_counts(self) -> dict[tuple[str, str], int]:
        """Committed items by (source, outcome) since start."""
        return dict(self.ingestor.outcomes) if self.ingestor else {}

    def _summary(self) -> str:
        up = sum(1 for s in self.sources if s.connected)
        depth = self.ingestor.depth if self.ingestor else 0
        open_incidents, pending = self._counts
        return (f"{open_incidents} open incidents; {pending} pending steps;"
                f" sources {up}/{len(self.sources)} up; queue {depth}")

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            await self._refresh_counts()
            self.notifier.status(self._summary())

    async def _refresh_counts(self) -> None:
        if self.health is None:
            return
        try:
            self._counts = await self.health.counts()
        except Exception as exc:  # noqa: BLE001 -- a status line never stops the daemon
            log.warning("daemon.status_failed", error=str(exc))


def _finish_loading(locator: Locator) -> None:
    """Build the kelurahan index and import what only comes after dispatch has started.

    Run in a thread by :meth:`Daemon.run`. numpy and shapely (the index), aiohttp.web and
    the web apps, the MQTT and serial sources and the health monitor cost several hundred
    ms to import on a small machine; a restart with overdue escalation steps sends those
    first. ConfigError if a polygon is bad (exit 2, as any other configuration error).
    """
    locator.build()
    # Imported for their side effect on sys.modules; the callers import them again.
    import aiohttp.web  # noqa: F401, PLC0415

    import dispatch.health_monitor  # noqa: PLC0415
    import dispatch.observe  # noqa: PLC0415
    import dispatch.web  # noqa: PLC0415
    import dispatch.web_limits  # noqa: F401, PLC0415
    import gateway.sources.app  # noqa: PLC0415
    import gateway.sources.mqtt  # noqa: PLC0415
    import gateway.sources.serial  # noqa: F401, PLC0415


async def serve(loaded: Loaded) -> int:
    """Run the daemon with signal handling owned here; returns the exit code."""
    config = loaded.config
    with Notifier() as notifier:
        daemon = Daemon(loaded, notifier)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, daemon.request_stop, signal.Signals(signum).name)
        # except*: an error raised while the dispatcher or the ingest writer is open (a
        # bad polygon found by the deferred geometry check, a taken web port) reaches here
        # wrapped in their task groups' ExceptionGroup.
        code = 0
        try:
            await daemon.run()
        except* StoreError as group:
            log.critical("store.unusable", error=_first(group), store=str(config.store))
            code = 1
        except* ConfigError as group:
            log.critical("config.invalid", error=_first(group))
            code = code or 2
        except* OSError as group:
            # e.g. the web port is taken or the control socket directory is not writable.
            log.critical("daemon.start_failed", error=_first(group))
            code = code or 1
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    return code


def _first(group: BaseExceptionGroup[Exception]) -> str:
    """The first leaf error of ``group``, as text (one error is the usual case)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return str(leaf)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``panicd``."""
    parser = argparse.ArgumentParser(prog="panicd", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("PANICD_CONFIG", DEFAULT_CONFIG)),
        help="the TOML configuration file (default: $PANICD_CONFIG or %(default)s)",
    )
    parser.add_argument(
        "--log-format", choices=("auto", "console", "json", "journal"), default="auto"
    )
    parser.add_argument("--log-level", default=os.environ.get("PANICD_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    try:
        configure_logging(mode=args.log_format, level=args.log_level)
    except ValueError as exc:
        print(f"panicd: --log-level: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        loaded = load(args.config, defer_geometry=True)
    except ConfigError as exc:
        print(f"panicd: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    config = loaded.config
    log.info(
        "daemon.starting",
        config=str(config.path),
        store=str(config.store),
        devices=len(config.devices),
        sources=[s.name for s in config.mqtt] + [s.name for s in config.serial],
    )
    # A device with no key and no third-party id can only be heard through signed frames,
    # and every one of them is refused (dead letter no_key): say so, but keep running,
    # since the other devices are heard.
    keyless = unheard_devices(config)
    if keyless:
        log.warning("daemon.devices_without_key", count=len(keyless), of=len(config.devices),
                    devices=keyless[:KEYLESS_NAMED], refused="every signed press (no_key)")
    return asyncio.run(serve(loaded))


if __name__ == "__main__":
    sys.exit(main())
