"""No page twice after a crash or a dropped connection (issue 12 item 3).

The real TwilioChannel and outbox over a real SQLite file, against Prism serving Twilio's
spec behind the recording peer, which remembers what it accepted and answers the
Messages and Calls lists from that memory. A request the provider accepted whose answer
panicd never recorded (a crash mid-send, a connection dropped after the request went
out) is found at the provider and recorded, not sent again; one it never got is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatch.channel import ProviderLookupError, ProviderRecord
from dispatch.outbox import IN_DOUBT_MAX_S
from dispatch.twilio_channel import TwilioApiHttpClient, TwilioChannel, TwilioCredentials
from store.dispatch import Delivery
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_e2e import Fault, RecordingPeer
from tests.dispatch_world import (
    KODE_LADDER,
    Clock,
    RecordingChannel,
    dispatcher,
    open_incident,
    query,
)

CREDENTIALS = TwilioCredentials("AC0123456789abcdef0123456789abcdef", "never-logged")
FROM = "+15005550006"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "panicd.sqlite3"


@pytest.fixture
def peer(prism: str) -> Iterator[RecordingPeer]:
    with RecordingPeer(prism) as recording:
        yield recording


@asynccontextmanager
async def twilio(peer: RecordingPeer) -> AsyncIterator[TwilioChannel]:
    channel = TwilioChannel(CREDENTIALS, from_number=FROM,
                            http_client=TwilioApiHttpClient(peer.url, timeout_s=5.0))
    async with channel:
        yield channel


def creates(peer: RecordingPeer) -> dict[str, int]:
    """Accepted creates per outbox row (its status callback URL), SMS and calls."""
    return {**peer.creates("Messages.json"), **peer.creates("Calls.json")}


def posted(peer: RecordingPeer) -> int:
    return sum(1 for r in peer.requests if r.method == "POST" and r.status == 201)


def outbox_rows(database: Path) -> list[tuple[int, str, str, str | None]]:
    return [(int(str(i)), str(c), str(s), None if sid is None else str(sid)) for i, c, s, sid
            in query(database, "SELECT id, channel, state, provider_sid FROM outbox"
                               " WHERE purpose = 'alert' ORDER BY id")]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def crash_mid_send(database: Path, peer: RecordingPeer, clock: Clock,
                         incidents: int = 1) -> int:
    """Open incidents, fire level 1 and kill the sends once the provider accepted every
    page but before any answer came back: the rows are left 'sending'. Returns how many."""
    for n in range(incidents):
        await open_incident(database, KODE_LADDER, at=clock(), device=f"BTN-{n + 1}")
    peer.fault = lambda method, _path, _form: Fault("hold") if method == "POST" else None
    async with SqliteDispatchStore(database) as store, twilio(peer) as channel:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        pages = len(query(database, "SELECT 1 FROM outbox"))
        assert pages >= 2 * incidents
        sending = asyncio.create_task(engine.send_due())
        await wait_for(lambda: posted(peer) > 0 and posted(peer) == in_state(database, "sending"))
        sending.cancel()  # SIGKILL, as far as the database can tell
        with pytest.raises(asyncio.CancelledError):
            await sending
    peer.fault = None
    peer.release()
    # A number's second call waits for its first to settle: it was not even claimed.
    calls_waiting = incidents - 1
    assert in_state(database, "sending") == pages - 2 * calls_waiting
    assert in_state(database, "pending") == 2 * calls_waiting
    return pages


def in_state(database: Path, state: str) -> int:
    return sum(1 for row in outbox_rows(database) if row[2] == state)


async def restart_and_send(database: Path, peer: RecordingPeer, clock: Clock,
                           ) -> list[tuple[int, str, str, str | None]]:
    async with SqliteDispatchStore(database) as store, twilio(peer) as channel:
        engine = dispatcher(store, channel, clock)
        # What a start does first: rows a crash left 'sending' are requeued, in doubt.
        assert await store.requeue_interrupted(clock()) > 0
        while await engine.send_due():
            pass  # a number's next call is claimed once its previous one settled
    return outbox_rows(database)


@pytest.mark.parametrize("incidents", [1, 3])
async def test_pages_the_provider_accepted_before_a_crash_are_found_not_sent_again(
    database: Path, peer: RecordingPeer, incidents: int,
) -> None:
    """With 3 incidents each responder has 3 calls due, indistinguishable at the
    provider: only one per number is ever unsettled, so the one in doubt adopts its own
    call, and the others are sent once after it."""
    clock = Clock(time.time())
    pages = await crash_mid_send(database, peer, clock, incidents)
    with capture_logs() as logs:
        rows = await restart_and_send(database, peer, clock)
    accepted = {str(d["sid"]) for d in peer.accepted}
    # Every SMS and call the provider accepted was found and recorded: none sent twice.
    assert set(creates(peer).values()) == {1}
    assert posted(peer) == pages
    assert {sid for *_, sid in rows} == accepted
    assert {state for _, _, state, _ in rows} == {"sent"}
    assert sum(1 for e in logs if e["event"] == "outbox.found") == pages - 2 * (incidents - 1)
    lists = [r for r in peer.requests if r.method == "GET"]
    assert lists and all(r.status == 200 and r.violations is None for r in lists)


async def test_pages_the_provider_never_got_before_a_crash_are_sent_once(
    database: Path, peer: RecordingPeer,
) -> None:
    clock = Clock(time.time())
    await open_incident(database, KODE_LADDER, at=clock())
    async with SqliteDispatchStore(database) as store, twilio(peer) as channel:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        claimed = await store.claim_outbox(clock(), 100)  # then the crash, before any request
    rows = await restart_and_send(database, peer, clock)
    assert len(creates(peer)) == len(claimed) and set(creates(peer).values()) == {1}
    assert {state for _, _, state, _ in rows} == {"sent"}


async def test_a_connection_dropped_after_the_provider_accepted_does_not_page_twice(
    database: Path, peer: RecordingPeer,
) -> None:
    clock = Clock(time.time())
    await open_incident(database, KODE_LADDER, at=clock())
    dropped: set[str] = set()

    def drop_first(method: str, path: str, form: Mapping[str, str]) -> Fault | None:
        callback = form.get("StatusCallback", "")
        if method != "POST" or callback in dropped:
            return None
        dropped.add(callback)
        return Fault("drop")

    peer.fault = drop_first
    async with SqliteDispatchStore(database) as store, twilio(peer) as channel:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        pages = await engine.send_due()
        assert {state for _, _, state, _ in outbox_rows(database)} == {"pending"}
        assert set(creates(peer).values()) == {1}  # accepted, the answers lost on the way
        clock.advance(5)  # the requeue's backoff
        assert await engine.send_due() == pages
    rows = outbox_rows(database)
    assert set(creates(peer).values()) == {1}, "a dropped connection paged twice"
    assert {state for _, _, state, _ in rows} == {"sent"}
    assert {sid for *_, sid in rows} == {str(d["sid"]) for d in peer.accepted}


async def test_a_call_found_at_the_provider_is_never_one_another_row_holds(
    database: Path, peer: RecordingPeer,
) -> None:
    """A call carries nothing of panicd's: the oldest call to that number since the
    doubtful request that no other row holds is adopted, never a recorded one."""
    clock = Clock(time.time())
    pages = await crash_mid_send(database, peer, clock)
    calls = [(i, sid) for i, channel, _, sid in outbox_rows(database) if channel == "voice"]
    assert calls
    # An earlier, recorded call to the same number: an older incident's page.
    older = await open_incident(database, KODE_LADDER, at=clock() - 10, device="BTN-2")
    async with SqliteDispatchStore(database) as store:
        recorded = peer.accepted[[str(d["sid"]).startswith("CA")
                                  for d in peer.accepted].index(True)]
        async with store.transaction() as db:
            await db.execute(
                "INSERT INTO outbox (key, incident_id, person_id, phone, channel, purpose,"
                " body, state, provider_sid, created_at, due_at, updated_at)"
                " VALUES ('older', ?, 'x', ?, 'voice', 'alert', '', 'sent', ?, ?, ?, ?)",
                (older, recorded["to"], recorded["sid"], clock(), clock(), clock()))
    rows = await restart_and_send(database, peer, clock)
    # The call whose SID another row holds was not adopted: that row's call is sent.
    by_id = {i: (state, sid) for i, _, state, sid in rows}
    assert all(by_id[i][0] == "sent" for i, _ in calls)
    holders = [sid for _, _, _, sid in rows]
    assert len(holders) == len(set(holders))
    assert posted(peer) == pages + 1


class UnaskableChannel(RecordingChannel):
    """A provider whose list cannot be read: for a while, or ever (no right to list)."""

    permanent_lookup: bool = False
    lookups: int = 0

    async def recent(
        self, kind: str, to: str, *, since: float  # noqa: ARG002 -- the protocol's
    ) -> list[ProviderRecord]:
        self.lookups += 1
        raise ProviderLookupError("HTTP 503", permanent=self.permanent_lookup)


@pytest.mark.parametrize("permanent", [False, True])
async def test_a_page_in_doubt_waits_for_the_provider_to_answer_but_not_for_ever(
    database: Path, permanent: bool,
) -> None:
    clock = Clock(time.time())
    await open_incident(database, KODE_LADDER, at=clock())
    channel = UnaskableChannel(clock=clock)
    channel.permanent_lookup = permanent
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        pages = len(await store.claim_outbox(clock(), 100))
        await store.requeue_interrupted(clock())
        with capture_logs() as logs:
            await engine.send_due()
            if not permanent:
                # It cannot know whether the page went out: it waits and asks again ...
                assert channel.sent == []
                assert {s for _, _, s, _ in outbox_rows(database)} == {"pending"}
                clock.advance(IN_DOUBT_MAX_S + 1)
                while await engine.send_due() == 0:
                    clock.advance(5)
        # ... but a page never sent is worse than one sent twice: it goes out, once.
        assert len(channel.sent) == pages
        assert {s for _, _, s, _ in outbox_rows(database)} == {"sent"}
        assert sum(1 for e in logs if e["event"] == "outbox.sent_unverified") == pages


async def test_an_outcome_with_a_sid_another_row_holds_does_not_fail_its_batch(
    database: Path,
) -> None:
    """SIDs are UNIQUE: one conflicting outcome (a call adopted by the wrong row) used to
    fail the recorder's whole batch, again at every retry — a stalled outbox."""
    clock = Clock(time.time())
    await open_incident(database, KODE_LADDER, at=clock())
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, RecordingChannel(clock=clock), clock)
        await engine.plan_missing()
        await engine.fire_due()
        first, second, *_ = await store.claim_outbox(clock(), 100)
        deliveries = [Delivery(outbox_id=row.id, incident_id=row.incident_id, state="sent",
                               at=clock(), sid="CA" + "0" * 32, error_code=None, error=None,
                               event="call.placed", reason="alert", detail={})
                      for row in (first, second)]
        await store.record_deliveries(deliveries)
    sids = {i: sid for i, _, _, sid in outbox_rows(database)}
    assert sids[first.id] == "CA" + "0" * 32 and sids[second.id] is None
