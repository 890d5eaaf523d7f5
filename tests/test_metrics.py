"""``GET /metrics``: the Prometheus text format written by hand, scraped with aiohttp's test
client from a database produced by the real ingest pipeline and dispatcher; the counts
behind it read indexes, never whole tables (tests/query_plans.py).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dispatch.health import SourceState
from dispatch.metrics import Family, Histogram, format_value, render
from dispatch.observe import (
    INCIDENT_STATUSES,
    OUTBOX_STATES,
    collect,
    install,
    status_snapshot,
)
from gateway.dedup import DedupPolicy
from gateway.ingest import Ingestor
from gateway.model import PressKind
from store.dispatch_observe import (
    INCIDENTS_BY_STATUS_SQL,
    NOTIFICATIONS_BY_STATE_SQL,
    PENDING_OUTBOX_SQL,
)
from store.sqlite import SqliteStore
from store.sqlite_dispatch import SqliteDispatchStore
from tests import dispatch_world as dw
from tests.pipeline import T0, Collector, Fleet, frame_bytes, make_fleet, rows
from tests.query_plans import traced, whole_reads

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples by (name, labels), checking HELP/TYPE come first for every family."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no TYPE line before it"
        parsed = frozenset((k, _unescape(v)) for k, v in _LABEL.findall(labels or ""))
        samples[name, parsed] = float(value)
    return samples


def test_render_escapes_labels_and_help_and_writes_cumulative_buckets() -> None:
    hist = Histogram(buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        hist.observe(value)
    families = [
        Family("x_total", "counter", 'help with \\ and\nnewline',
               [({"path": 'a"b\\c\nd'}, 3)]),
        Family("lat_seconds", "histogram", "h", histogram=hist),
    ]
    body, content_type = render(families)
    text = body.decode()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert text.splitlines() == [
        "# HELP x_total help with \\\\ and\\nnewline",
        "# TYPE x_total counter",
        'x_total{path="a\\"b\\\\c\\nd"} 3.0',
        "# HELP lat_seconds h",
        "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{le="0.1"} 2.0',
        'lat_seconds_bucket{le="1"} 3.0',
        'lat_seconds_bucket{le="+Inf"} 4.0',
        "lat_seconds_count 4.0",
        "lat_seconds_sum 7.65",
    ]
    assert text.endswith("\n")
    assert parse(text)["x_total", frozenset({("path", 'a"b\\c\nd')})] == 3
    assert [format_value(v) for v in (1.0, 0.25, float("inf"), float("nan"))] == [
        "1", "0.25", "+Inf", "NaN"]


def test_a_scraper_asking_for_openmetrics_gets_it() -> None:
    body, content_type = render([Family("up", "gauge", "u", [({"s": "a"}, 1)])],
                                "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.decode().splitlines()[-1] == "# EOF"


@dataclass
class FakeRuntime:
    """The daemon's in-process state (Runtime Protocol)."""

    ingestor: Ingestor

    def source_states(self) -> list[SourceState]:
        """One broker up, one receiver with an awkward name down."""
        return [SourceState("local", "mqtt", True, T0),
                SourceState('lora "usb0"', "serial", False, T0)]

    def ingest_depth(self) -> int:
        """Delegate."""
        return self.ingestor.depth

    def press_counts(self) -> dict[tuple[str, str], int]:
        """Delegate."""
        return dict(self.ingestor.outcomes)


@dataclass
class Scraped:
    """A scrape of /metrics and what is behind it."""

    fleet: Fleet
    text: str
    content_type: str
    steps_fired: int


@pytest.fixture
async def scraped(tmp_path: Path) -> AsyncIterator[Scraped]:
    """Pipeline presses, planned and fired escalation, a raised health row, one scrape."""
    fleet = make_fleet(tmp_path / "cfg")
    one, two, three = fleet.devices
    with structlog.testing.capture_logs():
        async with (
            SqliteStore(fleet.database) as store,
            Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor,
            SqliteDispatchStore(fleet.database) as dstore,
        ):
            pipe = Collector(ingestor)
            await pipe.send(pipe.item(frame_bytes(one, 1), at=T0),
                            pipe.item(frame_bytes(one, 1), at=T0 + 1, path="mqtt:local:relay"))
            await pipe.send(pipe.item(frame_bytes(two, 1), at=T0 + 10))
            await pipe.send(pipe.item(frame_bytes(two, 2, PressKind.CANCEL), at=T0 + 20))
            await pipe.send(pipe.item(frame_bytes(three, 1, PressKind.HEARTBEAT), at=T0 + 30))
            await pipe.send(pipe.item(b"garbage", at=T0 + 40))
            clock = dw.Clock(T0 + 50)
            dispatcher = dw.dispatcher(dstore, dw.RecordingChannel(), clock)
            await dispatcher.plan_missing()
            clock.advance(3600)
            fired = await dispatcher.fire_due()
            async with dstore.transaction() as db:
                await db.execute("INSERT INTO device_health (subject, condition, raised_at)"
                                 " VALUES ('device:SIM-00002', 'low_battery', ?)", (T0,))
            public, control = web.Application(), web.Application()
            install(public, control, FakeRuntime(ingestor), dispatcher, dstore)
            async with TestClient(TestServer(public)) as client:
                response = await client.get("/metrics")
                assert response.status == 200
                text = await response.text()
                content_type = response.headers["Content-Type"]
    yield Scraped(fleet, text, content_type, fired)


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def test_metrics_is_the_text_format_with_a_type_for_every_family(scraped: Scraped) -> None:
    assert scraped.content_type == "text/plain; version=0.0.4; charset=utf-8"
    helps = [line.split()[2] for line in scraped.text.splitlines() if line.startswith("# HELP")]
    types = [line.split()[2] for line in scraped.text.splitlines() if line.startswith("# TYPE")]
    assert helps == types
    assert len(types) == len(set(types)) == 7
    parse(scraped.text)


def test_presses_are_counted_by_source_and_outcome(scraped: Scraped) -> None:
    samples = parse(scraped.text)
    counts = {dict(labels)["outcome"]: value for (name, labels), value in samples.items()
              if name == "panicd_presses_total"}
    assert counts == {"opened": 2, "duplicate": 1, "cancelled": 1, "heartbeat": 1,
                      "rejected": 1}
    assert {dict(labels)["source"] for (name, labels) in samples
            if name == "panicd_presses_total"} == {"local"}


def test_incidents_notifications_and_queues_match_the_database(scraped: Scraped) -> None:
    samples = parse(scraped.text)
    db = scraped.fleet.database
    for status, count in rows(db, "SELECT status, COUNT(*) FROM incidents GROUP BY status"):
        assert _value(samples, "panicd_incidents", status=str(status)) == count
    assert _value(samples, "panicd_incidents", status="resolved") == 0
    outbox = rows(db, "SELECT channel, state, COUNT(*) FROM outbox GROUP BY 1, 2")
    assert outbox, "the fired steps queued messages"
    for channel, state, count in outbox:
        assert _value(samples, "panicd_notifications", channel=str(channel),
                      state=str(state)) == count
    (pending,) = rows(db, "SELECT COUNT(*) FROM escalation_steps WHERE state = 'pending'")
    assert _value(samples, "panicd_queue_depth", queue="escalation") == pending[0]
    (queued,) = rows(db, "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending')")
    assert _value(samples, "panicd_queue_depth", queue="outbox") == queued[0]
    assert _value(samples, "panicd_queue_depth", queue="ingest") == 0


def test_escalation_latency_health_and_sources(scraped: Scraped) -> None:
    samples = parse(scraped.text)
    assert scraped.steps_fired >= 1
    assert _value(samples, "panicd_escalation_latency_seconds_count") == scraped.steps_fired
    assert _value(samples, "panicd_escalation_latency_seconds_bucket", le="+Inf") == (
        scraped.steps_fired)
    # The steps fired up to an hour late (the clock jumped): all above the 60 s bucket.
    assert _value(samples, "panicd_escalation_latency_seconds_bucket", le="60") == 0
    assert _value(samples, "panicd_device_health_conditions", condition="low_battery") == 1
    assert _value(samples, "panicd_device_health_conditions", condition="offline") == 0
    assert _value(samples, "panicd_source_up", source="local", kind="mqtt") == 1
    assert _value(samples, "panicd_source_up", source='lora "usb0"', kind="serial") == 0
    assert 'source="lora \\"usb0\\""' in scraped.text


# -- the statements behind a scrape ------------------------------------------------------


class IdleRuntime:
    """A Runtime with no sources and nothing in flight: the scrape reads only the database."""

    def source_states(self) -> list[SourceState]:
        """None."""
        return []

    def ingest_depth(self) -> int:
        """Nothing waiting."""
        return 0

    def press_counts(self) -> dict[tuple[str, str], int]:
        """Nothing committed."""
        return {}


async def test_a_scrape_reads_no_whole_table(tmp_path: Path) -> None:
    # Incidents and messages are kept until an operator purges them, so a scan on every
    # scrape grows with history: 71 ms for the outbox counts on 100,000 messages (audit).
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store:
        dispatcher = dw.dispatcher(store, dw.RecordingChannel(), dw.Clock())
        async with traced(store.db) as statements:
            await collect(IdleRuntime(), dispatcher, store)
    selects = [sql for sql in statements if sql.startswith("SELECT")]
    assert len(selects) == 5
    with closing(sqlite3.connect(path)) as db:
        assert {sql: whole_reads(db, sql) for sql in selects} == {sql: [] for sql in selects}


def _checked_values(db: sqlite3.Connection, table: str, column: str) -> list[str]:
    """The values ``column``'s CHECK (column IN (...)) constraint allows, read from the
    live schema so that a value a later migration adds is covered here too."""
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    match = re.search(rf"CHECK \({column} IN \(([^)]*)\)\)", sql)
    assert match, f"{table}.{column} has no CHECK (... IN (...))"
    return re.findall(r"'(\w+)'", match.group(1))


async def test_the_indexed_counts_equal_a_plain_group_by_with_rows_in_every_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path):
        pass  # migrated
    with closing(sqlite3.connect(path)) as db:
        statuses = _checked_values(db, "incidents", "status")
        states = _checked_values(db, "outbox", "state")
        channels = _checked_values(db, "outbox", "channel")
        # /metrics renders a sample for each of them (zero when no row has it).
        assert (tuple(statuses), tuple(states)) == (INCIDENT_STATUSES, OUTBOX_STATES)
        # A different count per value, so a row counted twice or in the wrong group shows.
        incident_id = 0
        for n, status in enumerate(statuses, 1):
            for _ in range(n):
                incident_id += 1
                db.execute(
                    "INSERT INTO incidents (id, device_id, status, test, opened_at, updated_at,"
                    " press_count, last_press_at, location_source, kelurahan_match, address,"
                    " landmark) VALUES (?, 'BTN-1', ?, 0, 1, 1, 1, 1, 'registered', 'inside',"
                    " '', '')",
                    (incident_id, status),
                )
        key = 0
        for n, (state, channel) in enumerate(
            ((s, c) for s in states for c in channels), 1
        ):
            for _ in range(n):
                key += 1
                db.execute(
                    "INSERT INTO outbox (key, incident_id, person_id, phone, channel, purpose,"
                    " body, state, created_at, due_at, updated_at)"
                    " VALUES (?, 1, 'ani', '+62', ?, 'alert', 'b', ?, 1, 1, 1)",
                    (f"k{key}", channel, state),
                )
        db.commit()

        def rows_of(sql: str) -> list[tuple[object, ...]]:
            return sorted(tuple(row) for row in db.execute(sql))

        # The plain statements /metrics ran before the audit define the counts.
        assert rows_of(INCIDENTS_BY_STATUS_SQL) == rows_of(
            "SELECT status, COUNT(*) FROM incidents GROUP BY status")
        assert rows_of(NOTIFICATIONS_BY_STATE_SQL) == rows_of(
            "SELECT channel, state, COUNT(*) FROM outbox GROUP BY 1, 2")
        assert rows_of(PENDING_OUTBOX_SQL) == rows_of(
            "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending')")


async def test_the_status_snapshot_reads_no_whole_table(tmp_path: Path) -> None:
    # panicctl status asks for it; open incidents in id order walked every incident.
    path = tmp_path / "panicd.sqlite3"
    async with SqliteDispatchStore(path) as store, traced(store.db) as statements:
        await status_snapshot(IdleRuntime(), store)
    selects = [sql for sql in statements if sql.startswith("SELECT")]
    assert len(selects) == 4
    with closing(sqlite3.connect(path)) as db:
        assert {sql: whole_reads(db, sql) for sql in selects} == {sql: [] for sql in selects}
