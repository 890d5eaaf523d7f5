"""A small dispatch world for in-process tests: people, policies, a fake Channel, a clock.

The database is real (SQLite through :class:`SqliteStore` and :class:`SqliteDispatchStore`);
the channel is a recording fake behind the :class:`dispatch.channel.Channel` Protocol and
time is an injected clock the test advances.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo

from dispatch.channel import Channel, DeliveryResult, DeliveryStatus, ProviderRecord
from dispatch.engine import Dispatcher, DispatchSettings
from dispatch.policy import CommandCentre, Level, Medium, Policy, Routing, Targets
from dispatch.responders import Group, Person, Responders, Roster, Shift
from store.dispatch import Delivery
from store.ingest import BatchWrites, IncidentChange, IncidentRow
from store.sqlite import SqliteStore
from store.sqlite_dispatch import SqliteDispatchStore

PUBLIC_URL = "https://panicd.madiunkota.go.id"
ACK_SECRET = b"test-ack-secret-0123456789abcdef"
# Wednesday 5 March 2025, 10:00 WIB: a day shift, so the night roster is a gap.
T0 = datetime(2025, 3, 5, 10, 0, tzinfo=ZoneInfo("Asia/Jakarta")).timestamp()

KODE_LADDER = "35.77.03.1004"  # Kuncen: three levels, sms + voice
KODE_GAP = "35.77.03.1001"  # a night-only roster first: a gap in the daytime
KODE_TOGETHER = "35.77.03.1002"  # a level with wait 0: two steps due together

SMS_VOICE = (Medium.SMS, Medium.VOICE)

PEOPLE = {
    "ani": Person("ani", "Ani Rahayu", "+628120001001", "linmas"),
    "budi": Person("budi", "Budi Santoso", "+628120001002", "linmas"),
    "citra": Person("citra", "Citra Lestari", "+628120001003", "lurah"),
    "dewi": Person("dewi", "Dewi Siaga", "+628120009901", "siaga112"),
    "eko": Person("eko", "Eko Malam", "+628120001005", "linmas"),
}
RESPONDERS = Responders(
    people=MappingProxyType(PEOPLE),
    groups=MappingProxyType({"kantor": Group("kantor", ("citra",))}),
    rosters=MappingProxyType(
        {
            # 19:00-07:00 WIB every day: nobody on call at 10:00.
            "malam": Roster("malam", (Shift(frozenset(range(7)), 19 * 3600, 12 * 3600, ("eko",)),)),
            "siaga112": Roster("siaga112", (Shift(frozenset(range(7)), 0, 86_400, ("dewi",)),)),
        }
    ),
)
CENTRE = Targets(rosters=("siaga112",))
LADDER = Policy(
    "kel-kuncen",
    (
        Level(Targets(people=("ani", "budi")), SMS_VOICE, 60),
        Level(Targets(groups=("kantor",)), SMS_VOICE, 120),
        Level(CENTRE, SMS_VOICE, 120),
    ),
)
GAP = Policy(
    "kel-gap",
    (
        Level(Targets(rosters=("malam",)), (Medium.SMS,), 300),
        Level(CENTRE, (Medium.SMS,), 120),
    ),
)
TOGETHER = Policy(
    "kel-together",
    (
        Level(Targets(people=("ani",)), (Medium.SMS,), 0),
        Level(Targets(people=("budi",)), (Medium.SMS,), 60),
        Level(CENTRE, (Medium.SMS,), 60),
    ),
)
ROUTING = Routing(
    policies=MappingProxyType({p.id: p for p in (LADDER, GAP, TOGETHER)}),
    by_kelurahan=MappingProxyType(
        {KODE_LADDER: LADDER.id, KODE_GAP: GAP.id, KODE_TOGETHER: TOGETHER.id}
    ),
    by_kecamatan=MappingProxyType({}),
    city=LADDER.id,
    operations=Policy("operations", (Level(Targets(people=("dewi",)), (Medium.SMS,), 600),)),
    command_centre=CommandCentre("Madiun Siaga 112", CENTRE),
)


class Clock:
    """The injected clock: Unix seconds that move only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@dataclass(frozen=True, slots=True)
class Sent:
    """One hand-over to the fake provider."""

    kind: str  # "sms" or "call"
    to: str
    body: str
    url: str
    status_callback: str | None
    machine_detection: bool


@dataclass
class RecordingChannel:
    """A Channel that records every send; numbers in ``permanent`` fail like Twilio 21211."""

    permanent: set[str] = field(default_factory=set)
    sent: list[Sent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # What it accepted, as a provider's list endpoint would tell it (Channel.recent).
    accepted: list[tuple[Sent, ProviderRecord]] = field(default_factory=list)
    clock: Callable[[], float] = time.time

    def _result(self, kind: str, to: str) -> DeliveryResult:
        if to in self.permanent:
            return DeliveryResult(
                DeliveryStatus.FAILED_PERMANENT,
                error_code=21211,
                error_message="The 'To' number is not a valid phone number.",
            )
        prefix = "SM" if kind == "sms" else "CA"
        # Unique across channels, like Twilio's: the outbox keeps sids UNIQUE.
        return DeliveryResult(DeliveryStatus.SENT, provider_sid=f"{prefix}{uuid.uuid4().hex}")

    def _record(self, sent: Sent) -> DeliveryResult:
        result = self._result(sent.kind, sent.to)
        self.sent.append(sent)
        if result.provider_sid is not None:
            self.accepted.append((sent, ProviderRecord(
                result.provider_sid, "queued", self.clock(),
                sent.body if sent.kind == "sms" else None)))
        self.changed.set()
        return result

    async def recent(self, kind: str, to: str, *, since: float) -> list[ProviderRecord]:
        """What it accepted for ``to`` since ``since``, newest first."""
        return [record for sent, record in reversed(self.accepted)
                if sent.kind == kind and sent.to == to and record.created_at >= since]

    async def send_sms(self, to: str, body: str, *, status_callback: str | None) -> DeliveryResult:
        """Record an SMS."""
        return self._record(Sent("sms", to, body, "", status_callback, machine_detection=False))

    async def place_call(
        self,
        to: str,
        *,
        twiml_url: str,
        status_callback: str | None,
        machine_detection: bool = True,
    ) -> DeliveryResult:
        """Record a call."""
        return self._record(Sent("call", to, "", twiml_url, status_callback, machine_detection))

    def to(self, person: str, kind: str | None = None) -> list[Sent]:
        """What was handed over for one person (optionally one kind)."""
        phone = PEOPLE[person].phone
        return [s for s in self.sent if s.to == phone and (kind is None or s.kind == kind)]

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until at least ``count`` sends happened (the deadline only guards a hang)."""
        async with asyncio.timeout(timeout_s):
            while len(self.sent) < count:
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Feedbacks:
    """Records presser feedback calls."""

    calls: list[tuple[str, int, str]] = field(default_factory=list)

    def __call__(self, device_id: str, incident_id: int, state: str) -> None:
        self.calls.append((device_id, incident_id, state))


async def open_incident(
    database: Path, kode: str, *, at: float, test: bool = False, device: str = "BTN-1"
) -> int:
    """Commit an open incident through the ingest store, as the pipeline would."""
    async with SqliteStore(database) as store:
        await store.begin()
        incident_id = store.allocate_incident_id()
        await store.write(
            BatchWrites(
                incidents=[
                    IncidentRow(
                        id=incident_id,
                        device_id=device,
                        test=test,
                        opened_at=at,
                        lat=-7.6343,
                        lon=111.5054,
                        location_source="registered",
                        kelurahan_kode=kode,
                        kelurahan="Kuncen",
                        kecamatan="Taman",
                        kelurahan_match="inside",
                        address="Jl. Kuncen No. 5",
                        landmark="depan masjid",
                    )
                ]
            )
        )
        await store.commit()
    return incident_id


async def cancel_incident(database: Path, incident_id: int, *, at: float) -> None:
    """Mark an incident cancelled through the ingest store (a cancel press)."""
    async with SqliteStore(database) as store:
        await store.begin()
        await store.write(
            BatchWrites(incident_changes=[IncidentChange(incident_id, at, status="cancelled")])
        )
        await store.commit()


class WatchedStore(SqliteDispatchStore):
    """The real SqliteDispatchStore, telling the test when a send's outcome is committed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.recorded = 0
        self._changed = asyncio.Event()

    async def record_deliveries(self, deliveries: Sequence[Delivery]) -> list[int]:
        """Commit the outcomes, then count them."""
        cancelled = await super().record_deliveries(deliveries)
        self.recorded += len(deliveries)
        self._changed.set()
        return cancelled

    async def wait_recorded(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until ``count`` outcomes are committed (the deadline only guards a hang)."""
        async with asyncio.timeout(timeout_s):
            while self.recorded < count:
                self._changed.clear()
                await self._changed.wait()


def dispatcher(
    store: SqliteDispatchStore,
    channel: Channel,
    clock: Clock,
    feedback: Feedbacks | None = None,
) -> Dispatcher:
    """A Dispatcher over the test world."""
    return Dispatcher(
        store,
        ROUTING,
        RESPONDERS,
        channel,
        DispatchSettings(PUBLIC_URL, ACK_SECRET, ack_ttl_s=3600.0),
        clock=clock,
        feedback=feedback,
    )


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An outbox row as the tests read it."""

    id: int
    key: str
    person_id: str
    channel: str
    purpose: str
    level: int | None
    state: str
    attempts: int
    provider_sid: str | None
    error_code: int | None
    body: str


def query(database: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows from the database through a separate plain sqlite3 connection."""
    with closing(sqlite3.connect(database)) as conn:
        return list(conn.execute(sql, params))


def outbox(database: Path, incident_id: int) -> list[OutboxEntry]:
    """The incident's outbox rows in insertion order."""
    with closing(sqlite3.connect(database)) as conn:
        return [
            OutboxEntry(*row)
            for row in conn.execute(
                "SELECT id, key, person_id, channel, purpose, level, state, attempts,"
                " provider_sid, error_code, body FROM outbox WHERE incident_id = ? ORDER BY id",
                (incident_id,),
            )
        ]


def steps(database: Path, incident_id: int) -> list[tuple[int, int, str, float, float | None]]:
    """``(round, level, state, due_at, fired_at)`` of the incident's steps."""
    with closing(sqlite3.connect(database)) as conn:
        return list(
            conn.execute(
                "SELECT round, level, state, due_at, fired_at FROM escalation_steps"
                " WHERE incident_id = ? ORDER BY round, level",
                (incident_id,),
            )
        )


def timeline(database: Path, incident_id: int) -> list[tuple[str, str, str | None]]:
    """``(event, reason, actor)`` of the incident's timeline in order."""
    with closing(sqlite3.connect(database)) as conn:
        return list(
            conn.execute(
                "SELECT event, reason, actor FROM incident_events WHERE incident_id = ?"
                " ORDER BY id",
                (incident_id,),
            )
        )


def events(database: Path, incident_id: int) -> Iterator[str]:
    """Just the event names of the timeline."""
    return (event for event, _, _ in timeline(database, incident_id))
