"""asyncpg against psycopg 3 (async, psycopg_pool) on panicd's PostgreSQL hot paths.

Run: ``python -m bench.pgdriver`` (under a minute on 2 cores). It starts a private PostgreSQL
(firmware_sim.pgserver: a temp cluster on a free loopback port, fsync and
synchronous_commit on, as deployed) and measures, for each driver over a pool of four
connections (asyncpg's pool told not to run its reset query on each release, as
psycopg_pool runs none):

* group commit of presses: batches of 1, 32 and 256 rows of
  ``INSERT … ON CONFLICT (device_id, counter) DO NOTHING RETURNING id`` in one
  transaction; every eighth row is a retransmission of a stored press, so RETURNING must
  tell new from known. Three ways to send a batch: ``loop`` (one awaited statement per
  row), ``batch`` (the driver's pipelined batch with results: asyncpg ``fetchmany``,
  psycopg ``executemany(returning=True)``) and ``unnest`` (one statement over arrays).
  Figures: presses/s and the transaction's latency (pool acquire to commit) p50/p99;
* the claim of due outbox rows by two concurrent workers (two instances):
  ``UPDATE … SET state='sending' WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT 50)
  RETURNING …``, one commit per claim: claims/s, rows/s, p50/p99, and a check that no
  row is claimed twice;
* LISTEN/NOTIFY wake latency between two connections, p50/p99 (``pg_notify`` sent on
  one connection to the delivery on the listening one).

Drivers alternate case by case so background load hits both alike. Figures go to stdout
as they come; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import psycopg
import psycopg_pool

from bench.common import cpu_model, percentile
from firmware_sim.pgserver import PostgresServer

POOL_SIZE = 4
BATCHES = (1, 32, 256)
METHODS = ("loop", "batch", "unnest")
DEVICES = 500
RETRANSMIT_EVERY = 8  # one row in eight repeats a stored (device, counter)
CLAIM_LIMIT = 50
CLAIM_WORKERS = 2
OUTBOX_ROWS = 100_000
CHANNEL = "panicd_wake"

SCHEMA = """
DROP TABLE IF EXISTS presses, outbox;
CREATE TABLE presses (
    id           bigserial PRIMARY KEY,
    device_id    text NOT NULL,
    counter      bigint NOT NULL,
    kind         text NOT NULL,
    format       text NOT NULL,
    trust        text NOT NULL,
    received_at  double precision NOT NULL,
    battery      integer,
    lat          double precision,
    lon          double precision,
    outcome      text NOT NULL,
    UNIQUE (device_id, counter)
);
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    incident_id  bigint NOT NULL,
    channel      text NOT NULL,
    recipient    text NOT NULL,
    body         text NOT NULL,
    state        text NOT NULL DEFAULT 'pending',
    due_at       timestamptz NOT NULL DEFAULT now(),
    claimed_by   text,
    lease_until  timestamptz,
    attempts     integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_due ON outbox (due_at) WHERE state = 'pending';
"""
SEED_OUTBOX = """
INSERT INTO outbox (incident_id, channel, recipient, body, due_at)
SELECT n / 4, 'sms', '+6281' || lpad(n::text, 8, '0'), 'DARURAT: tombol ' || n,
       now() - interval '1 minute' + n * interval '1 microsecond'
FROM generate_series(1, %d) AS n
"""
COLUMNS = ("device_id, counter, kind, format, trust, received_at, battery, lat, lon, "
           "outcome")
# Positional placeholders: asyncpg speaks $n, psycopg %s.
INSERT_ROW = (f"INSERT INTO presses ({COLUMNS}) VALUES ({{}}) "
              "ON CONFLICT (device_id, counter) DO NOTHING RETURNING id")
ARRAY_TYPES = ("text", "bigint", "text", "text", "text", "float8", "int", "float8", "float8",
               "text")
INSERT_UNNEST = (f"INSERT INTO presses ({COLUMNS}) SELECT * FROM unnest({{}}) "
                 "ON CONFLICT (device_id, counter) DO NOTHING RETURNING id")
CLAIM = """
UPDATE outbox SET state = 'sending', claimed_by = {0},
       lease_until = now() + interval '30 seconds', attempts = attempts + 1
WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND due_at <= now()
             ORDER BY due_at LIMIT {1} FOR UPDATE SKIP LOCKED)
RETURNING id, incident_id, channel, recipient, body
"""

Row = tuple[str, int, str, str, str, float, int, float, float, str]


def _dollar(count: int) -> str:
    return ", ".join(f"${index}" for index in range(1, count + 1))


def _dollar_arrays() -> str:
    return ", ".join(f"${i}::{kind}[]" for i, kind in enumerate(ARRAY_TYPES, start=1))


def _percent_arrays() -> str:
    return ", ".join(f"%s::{kind}[]" for kind in ARRAY_TYPES)


def _columns(rows: Sequence[Row]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


class Driver(Protocol):
    """One driver's way to run each hot path."""

    name: str

    async def execute(self, sql: str) -> None: ...
    async def insert(self, method: str, rows: Sequence[Row]) -> int: ...
    async def claim(self, worker: str) -> list[int]: ...
    def listener(self) -> contextlib.AbstractAsyncContextManager[asyncio.Queue[str]]: ...
    async def notify(self, payload: str) -> None: ...
    async def close(self) -> None: ...


async def _keep_session(conn: asyncpg.Connection) -> None:
    """asyncpg's default release runs a reset query (UNLISTEN *, RESET ALL, …): one more
    round trip per use that psycopg_pool does not make. The pooled connections here never
    change session state (LISTEN has its own connection), so both return them as they are;
    asyncpg still rolls back a transaction left open."""


class AsyncpgDriver:
    """asyncpg with its own pool; statements are prepared and cached per connection."""

    name = "asyncpg"

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self._row = INSERT_ROW.format(_dollar(10))
        self._unnest = INSERT_UNNEST.format(_dollar_arrays())
        self._claim = CLAIM.format("$1", CLAIM_LIMIT)

    @classmethod
    async def open(cls, dsn: str) -> AsyncpgDriver:
        """A driver over a pool of POOL_SIZE connections."""
        pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                         reset=_keep_session)
        return cls(pool, dsn)

    async def execute(self, sql: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(sql)

    async def insert(self, method: str, rows: Sequence[Row]) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            if method == "loop":
                stored = 0
                for row in rows:
                    if await conn.fetchval(self._row, *row) is not None:
                        stored += 1
                return stored
            if method == "batch":
                return len(await conn.fetchmany(self._row, rows))
            return len(await conn.fetch(self._unnest, *_columns(rows)))

    async def claim(self, worker: str) -> list[int]:
        async with self._pool.acquire() as conn:
            return [int(record["id"]) for record in await conn.fetch(self._claim, worker)]

    @contextlib.asynccontextmanager
    async def listener(self) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()

        def delivered(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            queue.put_nowait(str(payload))

        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.add_listener(CHANNEL, delivered)
            yield queue
        finally:
            await conn.close()

    async def notify(self, payload: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    async def close(self) -> None:
        await self._pool.close()


class PsycopgDriver:
    """psycopg 3 async over psycopg_pool; it prepares a statement on its fifth use."""

    name = "psycopg"

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self._row = INSERT_ROW.format(", ".join(["%s"] * 10))
        self._unnest = INSERT_UNNEST.format(_percent_arrays())
        self._claim = CLAIM.format("%s", CLAIM_LIMIT)

    @classmethod
    async def open(cls, dsn: str) -> PsycopgDriver:
        """A driver over a pool of POOL_SIZE autocommit connections."""
        pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True},
            open=False,
        )
        await pool.open(wait=True)
        return cls(pool, dsn)

    async def execute(self, sql: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.encode())

    async def insert(self, method: str, rows: Sequence[Row]) -> int:
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            if method == "loop":
                stored = 0
                for row in rows:
                    await cur.execute(self._row, row)
                    if await cur.fetchone() is not None:
                        stored += 1
                return stored
            if method == "batch":
                await cur.executemany(self._row, rows, returning=True)
                stored = 0
                while True:
                    stored += len(await cur.fetchall())
                    if not cur.nextset():
                        return stored
            await cur.execute(self._unnest, _columns(rows))
            return len(await cur.fetchall())

    async def claim(self, worker: str) -> list[int]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._claim, (worker,))
            return [int(record[0]) for record in await cur.fetchall()]

    @contextlib.asynccontextmanager
    async def listener(self) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)

        async def receive() -> None:
            # psycopg reads notifications only inside notifies() (or while a query runs).
            async for note in conn.notifies():
                queue.put_nowait(note.payload)

        try:
            await conn.execute(f"LISTEN {CHANNEL}".encode())
            async with asyncio.TaskGroup() as group:
                task = group.create_task(receive(), name="psycopg.notifies")
                try:
                    yield queue
                finally:
                    task.cancel()
        finally:
            await conn.close()

    async def notify(self, payload: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    async def close(self) -> None:
        await self._pool.close()


@dataclass(slots=True)
class Presses:
    """The press stream: new (device, counter) pairs, with a retransmission now and then."""

    slots: int = 0
    stored: int = 0

    @staticmethod
    def _row(number: int) -> Row:
        device = number % DEVICES
        return (f"SIM-{device:05d}", number // DEVICES + 1, "press", "native", "signed",
                time.time(), 87, -7.63 + device * 1e-4, 111.52, "stored")

    def batch(self, size: int) -> tuple[list[Row], int]:
        """``size`` rows and how many of them are new; a retransmission repeats a press
        of an earlier batch."""
        before = self.stored
        rows: list[Row] = []
        for _ in range(size):
            self.slots += 1
            if before > 0 and self.slots % RETRANSMIT_EVERY == 0:
                rows.append(self._row(before // 2))
            else:
                rows.append(self._row(self.stored))
                self.stored += 1
        return rows, self.stored - before


def _ms(sorted_s: Sequence[float], fraction: float) -> float:
    return round(percentile(sorted_s, fraction) * 1000, 3)


async def group_commit(driver: Driver, method: str, size: int, seconds: float) -> dict[str, Any]:
    """Commit batches on one writer for ``seconds``; presses/s and commit latency."""
    await driver.execute("TRUNCATE presses")
    presses = Presses()
    latencies: list[float] = []
    stored = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows, new = presses.batch(size)
        began = time.perf_counter()
        returned = await driver.insert(method, rows)
        latencies.append(time.perf_counter() - began)
        if returned != new:
            raise AssertionError(f"{driver.name} {method}: RETURNING gave {returned}, "
                                 f"expected {new} new of {len(rows)}")
        stored += len(rows)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"presses_per_s": round(stored / elapsed), "commits": len(latencies),
            "commit_p50_ms": _ms(latencies, 0.50), "commit_p99_ms": _ms(latencies, 0.99)}


async def claims(driver: Driver, seconds: float) -> dict[str, Any]:
    """CLAIM_WORKERS workers claim due outbox rows until none is left or time is up."""
    await driver.execute("TRUNCATE outbox")
    await driver.execute(SEED_OUTBOX % OUTBOX_ROWS)
    await driver.execute("VACUUM ANALYZE outbox")
    latencies: list[float] = []
    claimed: list[int] = []
    start = time.perf_counter()

    async def work(worker: str) -> None:
        while time.perf_counter() - start < seconds:
            began = time.perf_counter()
            ids = await driver.claim(worker)
            latencies.append(time.perf_counter() - began)
            if not ids:
                return
            claimed.extend(ids)

    async with asyncio.TaskGroup() as group:
        for index in range(CLAIM_WORKERS):
            group.create_task(work(f"instance-{index}"), name=f"claim.{index}")
    elapsed = time.perf_counter() - start
    if len(set(claimed)) != len(claimed):
        raise AssertionError(f"{driver.name}: a row was claimed twice")
    latencies.sort()
    return {"claims_per_s": round(len(latencies) / elapsed),
            "rows_per_s": round(len(claimed) / elapsed), "claims": len(latencies),
            "claim_p50_ms": _ms(latencies, 0.50), "claim_p99_ms": _ms(latencies, 0.99)}


async def wakes(driver: Driver, count: int) -> dict[str, Any]:
    """Send ``count`` notifications one at a time; the latency to each one's delivery."""
    latencies: list[float] = []
    async with driver.listener() as delivered:
        await driver.notify("warm-up")
        await asyncio.wait_for(delivered.get(), 5)
        for index in range(count):
            began = time.perf_counter()
            await driver.notify(str(index))
            payload = await asyncio.wait_for(delivered.get(), 5)
            latencies.append(time.perf_counter() - began)
            if payload != str(index):
                raise AssertionError(f"{driver.name}: woke with {payload!r}, sent {index}")
    latencies.sort()
    return {"wakes": count, "wake_p50_ms": _ms(latencies, 0.50),
            "wake_p99_ms": _ms(latencies, 0.99)}


def _line(name: str, figures: dict[str, Any]) -> None:
    print(f"  {name:<28} " + "  ".join(f"{key} {value}" for key, value in figures.items()),
          flush=True)


async def run(dsn: str, seconds: float, wake_count: int) -> dict[str, Any]:
    """Every case for both drivers, alternating; the figures keyed ``driver.case``."""
    drivers: list[Driver] = [await AsyncpgDriver.open(dsn), await PsycopgDriver.open(dsn)]
    results: dict[str, Any] = {}
    try:
        await drivers[0].execute(SCHEMA)
        print("group commit of presses (one writer, one transaction per batch):")
        for size in BATCHES:
            for method in METHODS:
                for driver in drivers:
                    key = f"{driver.name}.insert.{method}.{size}"
                    results[key] = await group_commit(driver, method, size, seconds)
                    _line(key, results[key])
        print(f"claims, {CLAIM_WORKERS} workers, LIMIT {CLAIM_LIMIT}, SKIP LOCKED:")
        for driver in drivers:
            key = f"{driver.name}.claim"
            results[key] = await claims(driver, seconds)
            _line(key, results[key])
        print("LISTEN/NOTIFY wake between two connections:")
        for driver in drivers:
            key = f"{driver.name}.notify"
            results[key] = await wakes(driver, wake_count)
            _line(key, results[key])
    finally:
        for driver in drivers:
            await driver.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Start a private PostgreSQL, measure both drivers, print the figures and one JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.pgdriver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="duration of each insert and claim case (%(default)s)")
    parser.add_argument("--wakes", type=int, default=1000,
                        help="notifications per driver (%(default)s)")
    args = parser.parse_args(argv)
    with PostgresServer() as server:
        version = _server_version(server.dsn)
        machine = {"nproc": os.cpu_count(), "cpu": cpu_model(),
                   "python": platform.python_version(), "postgresql": version,
                   "asyncpg": importlib.metadata.version("asyncpg"),
                   "psycopg": importlib.metadata.version("psycopg"),
                   "psycopg_pool": importlib.metadata.version("psycopg-pool")}
        print("machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()),
              flush=True)
        results = asyncio.run(run(server.dsn, args.seconds, args.wakes))
    print(json.dumps({"benchmark": "pgdriver", "machine": machine, "figures": results}))
    return 0


def _server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


if __name__ == "__main__":
    sys.exit(main())
