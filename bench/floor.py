"""The durable floor: the least any ack-after-commit MQTT subscriber in one process does.

``bench.ingest`` compares panicd with a bare aiomqtt subscriber that only counts. Part
of the gap is not panicd's pipeline at all but durability itself: acknowledging each
message only after an fsync'd commit, and telling each button its press is stored. This
subscriber does exactly that and nothing else — no decoding, HMAC, dedup, location or
logging — on the same broker, backlog and machine: it stores each message as one row
(topic, payload, time) in SQLite (WAL, ``synchronous=FULL``, grouped commits of up to
256 through aiosqlite, as panicd does), then sends the PUBACK (paho manual ack) and a
QoS 1 "received" message to the button's command topic.

Its throughput bounds what panicd's ratio can reach on this machine: whatever panicd
adds per press comes on top of it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt
import aiosqlite

from gateway.formats import native, payload_bytes
from gateway.sources.mqtt_seam import Seam, open_seam

FLOOR_CLIENT_ID = "bench-durable-floor"
BATCH_MAX = 256


async def drain_floor(
    host: str, port: int, expected: int, database: Path, timeout_s: float
) -> float:
    """Reconnect the floor's session and store its backlog; seconds first→last commit."""
    queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
    client = aiomqtt.Client(host, port, identifier=FLOOR_CLIENT_ID, clean_session=False)
    # The same seam panicd uses: PUBACK only once the message is committed.
    seam = open_seam(client)
    async with aiosqlite.connect(database, isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, received_at REAL NOT NULL)"
        )
        async with client, asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
            pump = group.create_task(_pump(client, queue), name="floor.pump")
            first, last = await _store_and_ack(seam, db, queue, expected)
            pump.cancel()
    return last - first


async def _pump(client: aiomqtt.Client, queue: asyncio.Queue[tuple[int, str, bytes]]) -> None:
    async for message in client.messages:
        await queue.put((message.mid, message.topic.value, payload_bytes(message.payload)))


async def _store_and_ack(
    seam: Seam,
    db: aiosqlite.Connection,
    queue: asyncio.Queue[tuple[int, str, bytes]],
    expected: int,
) -> tuple[float, float]:
    stored = 0
    first = 0.0
    while stored < expected:
        batch = [await queue.get()]
        while len(batch) < BATCH_MAX and not queue.empty():
            batch.append(queue.get_nowait())
        now = time.time()
        first = first or now
        await db.execute("BEGIN IMMEDIATE")
        await db.executemany(
            "INSERT INTO messages (topic, payload, received_at) VALUES (?, ?, ?)",
            [(topic, payload, now) for _mid, topic, payload in batch],
        )
        await db.execute("COMMIT")
        for mid, topic, _payload in batch:
            seam.ack(mid, 1)
            device = topic.split("/")[3]
            body = json.dumps({"state": "received"}, separators=(",", ":"))
            seam.queue_publish(native.command_topic(device), body, qos=1)
        stored += len(batch)
    return first, time.time()
