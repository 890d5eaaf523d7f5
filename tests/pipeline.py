"""Build the real ingest pipeline in-process for tests: fleet config, frames, stores.

Everything here is a real part (config loader, Locator over the bundled GeoJSON, SQLite
files) except the store wrappers, which sit behind the IngestStore Protocol.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware_sim.fleet import SimDevice, write_fleet
from gateway.config import Config, load_config
from gateway.errors import DecodeError
from gateway.formats import native
from gateway.ingest import Inbound, Ingestor, Outcome
from gateway.locate import Locator
from gateway.model import Frame, GeoFix, PressKind, Reception, Trust
from store.ingest import BatchState, BatchWrites
from store.sqlite import SqliteStore

T0 = 1_750_000_000.0


@dataclass(frozen=True, slots=True)
class Fleet:
    """A written fleet: config file, keys file, simulated devices, loaded config."""

    config_path: Path
    keys_path: Path
    devices: list[SimDevice]
    config: Config
    locator: Locator

    @property
    def database(self) -> Path:
        """Where the config puts the SQLite file."""
        return self.config.database

    @property
    def environ(self) -> dict[str, str]:
        """The environment panicd needs to find the device keys."""
        return {"PANICD_DEVICE_KEYS_FILE": str(self.keys_path)}


def make_fleet(
    directory: Path,
    *,
    devices: int = 3,
    mqtt_port: int = 1883,
    client_id: str = "panicd-test",
    extra_toml: str = "",
    extra_registry: str = "",
) -> Fleet:
    """Write a fleet with firmware_sim.fleet and load it exactly as panicd does."""
    config_path, keys_path, sims = write_fleet(
        directory, devices=devices, mqtt_port=mqtt_port, client_id=client_id,
        extra_toml=extra_toml,
    )
    if extra_registry:
        registry = directory / "devices.toml"
        registry.write_text(
            registry.read_text(encoding="utf-8") + "\n" + extra_registry, encoding="utf-8"
        )
    config = load_config(config_path, environ={"PANICD_DEVICE_KEYS_FILE": str(keys_path)})
    locator = Locator.from_geojson(config.kelurahan_file, nearest_within_m=config.nearest_within_m)
    return Fleet(config_path, keys_path, sims, config, locator)


def frame_bytes(
    device: SimDevice,
    counter: int,
    kind: PressKind = PressKind.PANIC,
    *,
    battery: int | None = None,
    fix: GeoFix | None = None,
) -> bytes:
    """A native frame signed with the device's key, as its firmware would send it."""
    return native.encode(
        key=device.key, device_id=device.id, counter=counter, kind=kind, battery=battery, fix=fix
    )


def decode_native(topic: str, payload: bytes) -> Frame | DecodeError:
    """The native decoder's result, with a DecodeError as a value (as sources hand it on)."""
    try:
        return native.decode(topic, payload)
    except DecodeError as exc:
        return exc


def _device_in(payload: bytes) -> str:
    """The frame's own device id, so the topic matches it (or a placeholder for junk)."""
    try:
        body = json.loads(payload)
    except ValueError:
        return "junk"
    dev = body.get("dev") if isinstance(body, dict) else None
    return dev if isinstance(dev, str) and native.DEVICE_ID.fullmatch(dev) else "junk"


class Collector:
    """Submits items and hands back each one's outcome once its batch is committed."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.done: list[Outcome] = []

    def item(
        self,
        payload: bytes,
        *,
        at: float,
        path: str = "mqtt:local:dev",
        topic: str | None = None,
        decoded: Frame | DecodeError | None = None,
        trust: Trust = Trust.SIGNED,
        format_name: str = native.FORMAT,
    ) -> tuple[Inbound, asyncio.Future[Outcome]]:
        """An Inbound for ``payload`` (decoded from the native topic unless given)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def on_done(outcome: Outcome) -> None:
            self.done.append(outcome)
            future.set_result(outcome)

        if decoded is None:
            if topic is None:
                topic = native.uplink_topic(_device_in(payload))
            decoded = decode_native(topic, payload)
        item = Inbound(
            decoded=decoded,
            payload=payload,
            reception=Reception(path=path, received_at=at, source="local"),
            format=format_name,
            trust=trust,
            on_done=on_done,
        )
        return item, future

    async def send(self, *items: tuple[Inbound, asyncio.Future[Outcome]]) -> list[Outcome]:
        """Submit every item back to back (so they can share a batch) and await them all."""
        for item, _ in items:
            await self.ingestor.submit(item)
        return list(await asyncio.gather(*(future for _, future in items)))


class CountingStore:
    """An IngestStore over SqliteStore that lets a test await N committed presses."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.presses = 0
        self.dead_letters = 0
        self._pending = BatchWrites()
        self._changed = asyncio.Condition()

    def allocate_press_id(self) -> int:
        """Delegate."""
        return self.inner.allocate_press_id()

    def allocate_incident_id(self) -> int:
        """Delegate."""
        return self.inner.allocate_incident_id()

    async def begin(self) -> None:
        """Delegate."""
        self._pending = BatchWrites()
        await self.inner.begin()

    async def batch_state(
        self, device_ids: Iterable[str], keys: Iterable[tuple[str, int]]
    ) -> BatchState:
        """Delegate."""
        return await self.inner.batch_state(device_ids, keys)

    async def write(self, writes: BatchWrites) -> None:
        """Delegate, remembering what this batch writes."""
        self._pending = writes
        await self.inner.write(writes)

    async def commit(self) -> None:
        """Delegate, then wake whoever waits for a count."""
        await self.inner.commit()
        async with self._changed:
            self.presses += len(self._pending.presses)
            self.dead_letters += len(self._pending.dead_letters)
            self._changed.notify_all()

    async def rollback(self) -> None:
        """Delegate."""
        await self.inner.rollback()

    async def wait_for(self, *, presses: int = 0, dead_letters: int = 0) -> None:
        """Return once at least this many presses and dead letters are committed."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.presses >= presses and self.dead_letters >= dead_letters
            )


def rows(database: Path, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
    """Rows through a separate read-only connection (what another process would see)."""
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql, tuple(params))]
    finally:
        conn.close()


def scalar(database: Path, sql: str, params: Sequence[object] = ()) -> object:
    """One value through a separate read-only connection."""
    (row,) = rows(database, sql, params)
    return row[0]


class BlockingStore(CountingStore):
    """Holds every COMMIT until ``release`` is set; ``entered`` says a commit is waiting."""

    def __init__(self, inner: SqliteStore) -> None:
        super().__init__(inner)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def commit(self) -> None:
        """Wait for the test's permission, then commit."""
        self.entered.set()
        await self.release.wait()
        await super().commit()
