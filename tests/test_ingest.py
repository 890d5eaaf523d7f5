"""The single writer on a real SQLite file, the real Locator and a loaded fleet config.

DESIGN §2 Durability (acknowledge only after COMMIT), Dedup (paths, bursts), Press kinds
(cancel grace, test presses, heartbeats) and dead letters with their reasons.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from firmware_sim.fleet import SimDevice
from firmware_sim.third_party import CHIRPSTACK_APPLICATION, CHIRPSTACK_GATEWAY, chirpstack_uplink
from gateway.config import load_config
from gateway.dedup import DedupPolicy
from gateway.formats import native
from gateway.formats.chirpstack import ChirpstackDecoder
from gateway.ingest import (
    DeadLettered,
    Inbound,
    IncidentEvent,
    Ingestor,
    Outcome,
    Repeated,
    Stored,
)
from gateway.model import Frame, GeoFix, PressKind, Reception, Trust
from gateway.verify import REPLAY_WINDOW
from store.sqlite import SqliteStore
from tests.pipeline import (
    T0,
    BlockingStore,
    Collector,
    Fleet,
    decode_native,
    frame_bytes,
    make_fleet,
    rows,
    scalar,
)

POLICY = DedupPolicy(cancel_grace_s=120.0, burst_urgent_presses=3, test_window_s=600.0)
# Registered, but the device-keys file has no key for it.
KEYLESS = (
    '[[device]]\nid = "KEYLESS-1"\nhardware = "esp32-wifi"\n'
    "location = { lat = -7.62182, lon = 111.53096 }\n"
)


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return make_fleet(tmp_path_factory.mktemp("fleet"), extra_registry=KEYLESS)


@pytest.fixture
async def ingestor(fleet: Fleet) -> AsyncIterator[Ingestor]:
    async with (
        SqliteStore(fleet.database) as store,
        Ingestor(store, fleet.config, fleet.locator, policy=POLICY) as ingestor,
    ):
        yield ingestor


@pytest.fixture
def pipe(ingestor: Ingestor) -> Collector:
    return Collector(ingestor)


def _incident(fleet: Fleet, incident_id: int | None) -> dict[str, object]:
    conn = sqlite3.connect(f"{fleet.database.resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        assert row is not None, f"no incident {incident_id}"
        return dict(row)
    finally:
        conn.close()


def _timeline(fleet: Fleet, incident_id: int | None) -> list[tuple[object, ...]]:
    return rows(
        fleet.database,
        "SELECT event, reason, actor FROM incident_events WHERE incident_id = ? ORDER BY id",
        (incident_id,),
    )


def _stored(outcome: Outcome) -> Stored:
    assert isinstance(outcome, Stored), outcome
    return outcome


async def test_panic_press_opens_an_incident_in_the_kelurahan_of_its_location(
    fleet: Fleet, pipe: Collector
) -> None:
    registered, with_gps = fleet.devices[0], fleet.devices[1]
    gps = GeoFix(-7.63152, 111.50474, accuracy_m=8)  # verified interior point of Manguharjo
    first, second = await pipe.send(
        pipe.item(frame_bytes(registered, 1), at=T0),
        pipe.item(frame_bytes(with_gps, 1, fix=gps), at=T0 + 1),
    )

    opened = _stored(first)
    assert opened.outcome == "opened"
    row = _incident(fleet, opened.incident_id)
    assert row["status"] == "open"
    assert row["test"] == 0
    assert row["device_id"] == registered.id
    assert (row["kelurahan"], row["kecamatan"], row["kelurahan_kode"]) == (
        "Oro-oro Ombo", "Kartoharjo", "35.77.01.1001",
    )
    assert (row["location_source"], row["kelurahan_match"]) == ("registered", "inside")
    assert (row["address"], row["landmark"], row["press_count"]) == (
        "Simulated button 0", "RT 01", 1,
    )
    assert _timeline(fleet, opened.incident_id) == [
        ("incident.opened", "panic_press", f"device:{registered.id}")
    ]

    # A GPS fix wins over the registered location (Sukosari) of the second button.
    gps_row = _incident(fleet, _stored(second).incident_id)
    assert (gps_row["kelurahan"], gps_row["kecamatan"], gps_row["kelurahan_kode"]) == (
        "Manguharjo", "Manguharjo", "35.77.02.1001",
    )
    assert gps_row["location_source"] == "gps"
    assert (gps_row["lat"], gps_row["lon"]) == (gps.lat, gps.lon)


async def test_a_copy_heard_in_the_same_batch_or_a_later_one_becomes_a_path_of_one_press(
    fleet: Fleet, ingestor: Ingestor, pipe: Collector
) -> None:
    device = fleet.devices[0]
    payload = frame_bytes(device, 7)
    direct = f"mqtt:local:{native.uplink_topic(device.id)}"
    relay_topic = f"{native.TOPIC_PREFIX}gw/gw-sim/up"
    relay = f"mqtt:local:{relay_topic}"

    batches = ingestor.committed_batches
    first, same_batch, retry = await pipe.send(
        pipe.item(payload, at=T0, path=direct),
        pipe.item(payload, at=T0 + 0.05, path=relay, topic=relay_topic),
        pipe.item(payload, at=T0 + 0.1, path=direct),
    )
    assert ingestor.committed_batches == batches + 1, "the copies should share one batch"
    (later,) = await pipe.send(pipe.item(payload, at=T0 + 2, path=direct))

    stored = _stored(first)
    assert same_batch == Repeated(stored.press_id, device.id, 7)
    assert retry == Repeated(stored.press_id, device.id, 7)
    assert later == Repeated(stored.press_id, device.id, 7)
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1
    assert rows(
        fleet.database,
        "SELECT path, heard, first_heard_at, last_heard_at FROM press_paths"
        " WHERE press_id = ? ORDER BY path",
        (stored.press_id,),
    ) == [(direct, 3, T0, T0 + 2), (relay, 1, T0 + 0.05, T0 + 0.05)]
    assert _incident(fleet, stored.incident_id)["press_count"] == 1


async def test_repeated_presses_attach_and_mark_the_incident_urgent_at_the_threshold(
    fleet: Fleet, pipe: Collector
) -> None:
    device = fleet.devices[0]
    outcomes = []
    for counter in (1, 2):
        outcomes += await pipe.send(pipe.item(frame_bytes(device, counter), at=T0 + counter))
    incident_id = _stored(outcomes[0]).incident_id
    second = _stored(outcomes[1])
    assert (second.counter, second.incident_id, second.outcome) == (2, incident_id, "attached")
    assert _incident(fleet, incident_id)["urgent"] == 0

    for counter in (3, 4):
        outcomes += await pipe.send(pipe.item(frame_bytes(device, counter), at=T0 + counter))
    row = _incident(fleet, incident_id)
    assert (row["urgent"], row["press_count"], row["status"]) == (1, 4, "open")
    assert {_stored(o).incident_id for o in outcomes} == {incident_id}
    events = [event for event, _, _ in _timeline(fleet, incident_id)]
    assert events == [
        "incident.opened", "press.attached", "press.attached", "incident.urgent", "press.attached"
    ]
    assert scalar(fleet.database, "SELECT COUNT(*) FROM incidents") == 1


async def test_cancel_within_the_grace_window_cancels_and_the_next_panic_opens_anew(
    fleet: Fleet, pipe: Collector
) -> None:
    device = fleet.devices[0]
    (opened,) = await pipe.send(pipe.item(frame_bytes(device, 1), at=T0))
    (cancel,) = await pipe.send(
        pipe.item(frame_bytes(device, 2, PressKind.CANCEL), at=T0 + POLICY.cancel_grace_s - 1)
    )
    incident_id = _stored(opened).incident_id
    assert _stored(cancel).outcome == "cancelled"
    row = _incident(fleet, incident_id)
    assert (row["status"], row["closed_at"]) == ("cancelled", T0 + POLICY.cancel_grace_s - 1)
    assert _timeline(fleet, incident_id)[-1] == (
        "incident.cancelled", "cancel_press_in_grace", f"device:{device.id}"
    )

    (again,) = await pipe.send(pipe.item(frame_bytes(device, 3), at=T0 + 300))
    assert _stored(again).outcome == "opened"
    assert _stored(again).incident_id != incident_id


async def test_cancel_after_the_grace_window_is_refused_and_the_incident_stays_open(
    fleet: Fleet, pipe: Collector
) -> None:
    device = fleet.devices[0]
    (opened,) = await pipe.send(pipe.item(frame_bytes(device, 1), at=T0))
    (late,) = await pipe.send(
        pipe.item(frame_bytes(device, 2, PressKind.CANCEL), at=T0 + POLICY.cancel_grace_s + 1)
    )
    incident_id = _stored(opened).incident_id
    refused = _stored(late)
    assert (refused.device_id, refused.incident_id, refused.outcome) == (
        device.id, _stored(opened).incident_id, "cancel_refused",
    )
    row = _incident(fleet, incident_id)
    assert (row["status"], row["closed_at"], row["press_count"]) == ("open", None, 2)
    assert _timeline(fleet, incident_id)[-1] == (
        "incident.cancel_refused", "grace_expired", f"device:{device.id}"
    )


async def test_a_test_press_after_the_test_window_resolves_the_old_test_incident(
    fleet: Fleet, pipe: Collector
) -> None:
    device = fleet.devices[0]
    (first,) = await pipe.send(pipe.item(frame_bytes(device, 1, PressKind.TEST), at=T0))
    (within,) = await pipe.send(pipe.item(frame_bytes(device, 2, PressKind.TEST), at=T0 + 60))
    old_id = _stored(first).incident_id
    assert _stored(first).outcome == "opened"
    assert (_stored(within).outcome, _stored(within).incident_id) == ("attached", old_id)
    old = _incident(fleet, old_id)
    assert (old["test"], old["status"], old["press_count"]) == (1, "open", 2)
    assert _timeline(fleet, old_id)[0] == ("incident.opened", "test_press", f"device:{device.id}")

    later = T0 + POLICY.test_window_s + 1
    (after,) = await pipe.send(pipe.item(frame_bytes(device, 3, PressKind.TEST), at=later))
    new_id = _stored(after).incident_id
    assert _stored(after).outcome == "opened"
    assert new_id != old_id
    old = _incident(fleet, old_id)
    assert (old["status"], old["closed_at"]) == ("resolved", later)
    (detail,) = rows(
        fleet.database,
        "SELECT detail FROM incident_events WHERE incident_id = ? AND event = 'incident.resolved'"
        " AND reason = 'test_window_over' AND actor = 'panicd'",
        (old_id,),
    )
    assert json.loads(str(detail[0])) == {"replaced_by": new_id}
    new = _incident(fleet, new_id)
    assert (new["test"], new["status"]) == (1, "open")
    # A test press never counts as a real panic: no non-test incident exists.
    assert scalar(fleet.database, "SELECT COUNT(*) FROM incidents WHERE test = 0") == 0


async def test_heartbeat_updates_the_device_battery_and_opens_nothing(
    fleet: Fleet, pipe: Collector
) -> None:
    device = fleet.devices[2]
    (beat,) = await pipe.send(
        pipe.item(frame_bytes(device, 1, PressKind.HEARTBEAT, battery=42), at=T0)
    )
    heartbeat = _stored(beat)
    assert (heartbeat.counter, heartbeat.incident_id, heartbeat.outcome) == (1, None, "heartbeat")
    assert rows(
        fleet.database, "SELECT last_counter, last_seen_at, last_kind, battery FROM devices"
    ) == [(1, T0, "heartbeat", 42)]
    (low,) = await pipe.send(
        pipe.item(frame_bytes(device, 2, PressKind.HEARTBEAT, battery=17), at=T0 + 3600)
    )
    assert _stored(low).incident_id is None
    assert scalar(fleet.database, "SELECT battery FROM devices WHERE id = ?", (device.id,)) == 17
    assert scalar(fleet.database, "SELECT COUNT(*) FROM incidents") == 0
    assert scalar(fleet.database, "SELECT COUNT(*) FROM incident_events") == 0


def _signed_without_counter(device: SimDevice) -> Frame:
    signed = f"panicd/1|{device.id}||panic|||||".encode()
    return Frame(
        format=native.FORMAT,
        device_ref=device.id,
        kind=PressKind.PANIC,
        tag=native.sign(device.key, signed),
        signed_bytes=signed,
    )


async def test_every_rejection_reason_is_kept_as_a_dead_letter_with_its_payload(
    fleet: Fleet, pipe: Collector
) -> None:
    one, two, three = fleet.devices
    ghost = SimDevice("GHOST-1", hashlib.sha256(b"ghost").digest(), None)
    keyless = SimDevice("KEYLESS-1", hashlib.sha256(b"keyless").digest(), None)
    (accepted,) = await pipe.send(pipe.item(frame_bytes(three, 100), at=T0))
    _stored(accepted)

    wrong_key = native.encode(key=b"k" * 32, device_id=one.id, counter=1, kind=PressKind.PANIC)
    huge = b'{"v":1,"pad":"' + b"x" * native.MAX_FRAME_BYTES + b'"}'
    bad_tag_format = frame_bytes(one, 2).replace(b'"tag":"', b'"tag":"AB')
    cases: list[tuple[str, bytes, dict[str, object]]] = [
        ("bad_json", b"{not json", {}),
        ("too_large", huge, {}),
        ("bad_tag_format", bad_tag_format, {}),
        ("topic_mismatch", frame_bytes(one, 3), {"topic": native.uplink_topic(two.id)}),
        ("unknown_device", frame_bytes(ghost, 1), {}),
        ("no_key", frame_bytes(keyless, 1), {}),
        ("bad_tag", wrong_key, {}),
        ("unsigned", b"unsigned-frame",
         {"decoded": Frame(format=native.FORMAT, device_ref=two.id, kind=PressKind.PANIC,
                           counter=5)}),
        ("no_counter", b"no-counter-frame", {"decoded": _signed_without_counter(two)}),
        ("stale_counter", frame_bytes(three, 100 - REPLAY_WINDOW), {}),
        ("counter_reused", frame_bytes(three, 100, PressKind.CANCEL), {}),
    ]
    items = []
    for index, (_, payload, extra) in enumerate(cases):
        topic = extra.get("topic")
        decoded = extra.get("decoded")
        assert topic is None or isinstance(topic, str)
        assert decoded is None or isinstance(decoded, Frame)
        items.append(pipe.item(payload, at=T0 + 1 + index, topic=topic, decoded=decoded))
    outcomes = await pipe.send(*items)

    assert outcomes == [DeadLettered(reason) for reason, _, _ in cases]
    stored = rows(
        fleet.database,
        "SELECT reason, payload, received_at, source, format FROM dead_letters ORDER BY id",
    )
    assert stored == [
        (reason, payload, T0 + 1 + index, "local", "native")
        for index, (reason, payload, _) in enumerate(cases)
    ]
    refs = {r[0]: r[1] for r in rows(fleet.database, "SELECT reason, device_ref FROM dead_letters")}
    assert refs["unknown_device"] == ghost.id
    assert refs["bad_json"] is None
    # Nothing rejected touched the accepted press, its device state or any incident.
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1
    last = scalar(fleet.database, "SELECT last_counter FROM devices WHERE id = ?", (three.id,))
    assert last == 100
    assert scalar(fleet.database, "SELECT COUNT(*) FROM incidents") == 1


async def test_on_done_runs_only_after_the_batch_is_visible_to_other_connections(
    fleet: Fleet, ingestor: Ingestor
) -> None:
    seen: list[tuple[Outcome, int]] = []
    finished = asyncio.Event()

    def on_done(outcome: Outcome) -> None:
        # What another process (panicctl, a restarted panicd) sees at the moment of the ack.
        if isinstance(outcome, Stored):
            count = scalar(fleet.database, "SELECT COUNT(*) FROM presses WHERE id = ?",
                           (outcome.press_id,))
        else:
            count = scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters")
        assert isinstance(count, int)
        seen.append((outcome, count))
        if len(seen) == 3:
            finished.set()

    device = fleet.devices[0]
    for index, payload in enumerate((frame_bytes(device, 1), frame_bytes(device, 2), b"junk")):
        topic = native.uplink_topic(device.id)
        await ingestor.submit(
            Inbound(
                decoded=decode_native(topic, payload),
                payload=payload,
                reception=Reception("mqtt:local:x", T0 + index, "local"),
                format=native.FORMAT,
                trust=Trust.SIGNED,
                on_done=on_done,
            )
        )
    await finished.wait()
    assert [count for _, count in seen] == [1, 1, 1]
    assert [type(outcome) for outcome, _ in seen] == [Stored, Stored, DeadLettered]


class FlakyStore(BlockingStore):
    """COMMIT fails ``failures`` times (disk I/O error), then works."""

    def __init__(self, inner: SqliteStore, failures: int) -> None:
        super().__init__(inner)
        self.release.set()
        self.failures = failures
        self.commit_calls = 0
        self.rollback_calls = 0
        self.committed = False

    async def commit(self) -> None:
        """Fail before touching the database while failures remain."""
        self.commit_calls += 1
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        await super().commit()
        self.committed = True

    async def rollback(self) -> None:
        """Count, then delegate."""
        self.rollback_calls += 1
        await super().rollback()


async def test_a_failing_commit_is_retried_and_nothing_is_acknowledged_before_it_succeeds(
    fleet: Fleet,
) -> None:
    one, two = fleet.devices[0], fleet.devices[1]
    async with SqliteStore(fleet.database) as inner:
        store = FlakyStore(inner, failures=2)
        acked_after_commit: list[bool] = []
        with structlog.testing.capture_logs() as logs:
            async with Ingestor(store, fleet.config, fleet.locator, policy=POLICY) as ingestor:
                pipe = Collector(ingestor)
                original = pipe.item

                def item(payload: bytes, *, at: float) -> tuple[Inbound, asyncio.Future[Outcome]]:
                    inbound, future = original(payload, at=at)
                    inner_done = inbound.on_done

                    def on_done(outcome: Outcome) -> None:
                        acked_after_commit.append(store.committed)
                        inner_done(outcome)

                    inbound.on_done = on_done
                    return inbound, future

                outcomes = await pipe.send(
                    item(frame_bytes(one, 1), at=T0),
                    item(frame_bytes(two, 1), at=T0 + 1),
                    item(b"garbage", at=T0 + 2),
                )
    assert store.commit_calls == 3
    assert store.rollback_calls == 2
    assert acked_after_commit == [True, True, True]
    assert len(pipe.done) == 3, "each item acknowledged exactly once"
    press_ids = sorted(_stored(o).press_id for o in outcomes[:2])
    incident_ids = sorted(_stored(o).incident_id or 0 for o in outcomes[:2])
    assert outcomes[2] == DeadLettered("bad_json")
    assert [r[0] for r in rows(fleet.database, "SELECT id FROM presses ORDER BY id")] == press_ids
    assert [r[0] for r in rows(fleet.database, "SELECT id FROM incidents ORDER BY id")] == (
        incident_ids
    )
    assert scalar(fleet.database, "SELECT COUNT(*) FROM incident_events") == 2
    assert scalar(fleet.database, "SELECT COUNT(*) FROM press_paths") == 2
    assert scalar(fleet.database, "SELECT COUNT(*) FROM dead_letters") == 1
    failures = [e for e in logs if e["event"] == "store.commit_failed"]
    assert [e["attempt"] for e in failures] == [1, 2]
    assert all(e["log_level"] == "error" for e in failures)


async def test_listeners_get_opened_urgent_and_cancelled_after_commit(
    fleet: Fleet, ingestor: Ingestor, pipe: Collector
) -> None:
    events: list[IncidentEvent] = []
    visible: list[object] = []

    def listener(event: IncidentEvent) -> None:
        events.append(event)
        visible.append(
            scalar(fleet.database, "SELECT status FROM incidents WHERE id = ?",
                   (event.incident_id,))
        )

    ingestor.add_listener(listener)
    device = fleet.devices[0]
    outcomes = await pipe.send(*(pipe.item(frame_bytes(device, c), at=T0 + c) for c in (1, 2, 3)))
    await pipe.send(pipe.item(frame_bytes(device, 4, PressKind.CANCEL), at=T0 + 30))
    (test,) = await pipe.send(pipe.item(frame_bytes(device, 5, PressKind.TEST), at=T0 + 40))
    incident_id = _stored(outcomes[0]).incident_id
    assert incident_id is not None
    test_id = _stored(test).incident_id
    assert test_id is not None
    assert events == [
        IncidentEvent(incident_id, device.id, "opened", T0 + 1, test=False),
        IncidentEvent(incident_id, device.id, "urgent", T0 + 3, test=False),
        IncidentEvent(incident_id, device.id, "cancelled", T0 + 30, test=False),
        IncidentEvent(test_id, device.id, "opened", T0 + 40, test=True),
    ]
    assert visible == ["open", "open", "cancelled", "open"]


async def test_drain_returns_true_once_idle_and_false_while_a_commit_is_held(
    fleet: Fleet,
) -> None:
    async with SqliteStore(fleet.database) as inner:
        store = BlockingStore(inner)
        async with Ingestor(store, fleet.config, fleet.locator, policy=POLICY) as ingestor:
            assert await ingestor.drain(1.0) is True
            pipe = Collector(ingestor)
            item, future = pipe.item(frame_bytes(fleet.devices[0], 1), at=T0)
            await ingestor.submit(item)
            await store.entered.wait()
            assert ingestor.depth == 1
            assert await ingestor.drain(0.05) is False
            assert not future.done()
            store.release.set()
            assert await ingestor.drain(10.0) is True
            assert future.done()
            assert ingestor.depth == 0
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1


LORA_EUI = "0004a30b001c0530"
LORA_DEVICE = (
    '[[device]]\nid = "L0001A2B3"\nhardware = "lora-button"\n'
    "location = { lat = -7.62182, lon = 111.53096 }\n"
    f'external_ids = {{ chirpstack = "{LORA_EUI}" }}\n'
)


async def test_an_unsigned_network_uplink_cannot_fake_or_silence_a_keyed_button(
    tmp_path: Path,
) -> None:
    """Issue 11 case 1: an unsigned ChirpStack uplink (codec object, fCnt 2**32-1) naming a
    keyed button is refused, and the button's signed presses are accepted afterwards."""
    fleet = make_fleet(tmp_path, extra_registry=LORA_DEVICE)
    lora = SimDevice("L0001A2B3", hashlib.sha256(b"l0001a2b3").digest(), None)
    with fleet.keys_path.open("a", encoding="utf-8") as keys:
        keys.write(f'\n"L0001A2B3" = "{lora.key.hex()}"\n')
    config = load_config(fleet.config_path, environ=fleet.environ)
    assert config.devices["L0001A2B3"].key == lora.key
    decoder = ChirpstackDecoder()
    forged = {
        "deviceInfo": {"devEui": LORA_EUI, "deviceName": "L0001A2B3"},
        "fCnt": 4294967295,
        "object": {"event": "panic"},
        "rxInfo": [{"gatewayId": CHIRPSTACK_GATEWAY, "rssi": -90, "snr": 7.0}],
    }
    topic = f"application/{CHIRPSTACK_APPLICATION}/device/{LORA_EUI}/event/up"
    payload = json.dumps(forged).encode()
    _, signed_uplink = chirpstack_uplink(lora, LORA_EUI, counter=3, f_cnt=12, kind=PressKind.PANIC)
    async with (
        SqliteStore(fleet.database) as store,
        Ingestor(store, config, fleet.locator, policy=POLICY) as ingestor,
    ):
        pipe = Collector(ingestor)

        def uplink(body: bytes, at: float) -> tuple[Inbound, asyncio.Future[Outcome]]:
            decoded = decoder.decode(topic, body)
            assert isinstance(decoded, Frame)
            return pipe.item(body, at=at, decoded=decoded, trust=Trust.NETWORK,
                             format_name="chirpstack", path="mqtt:lns")

        (refused,) = await pipe.send(uplink(payload, T0))
        native_press, wrapped = await pipe.send(
            pipe.item(frame_bytes(lora, 2), at=T0 + 1), uplink(signed_uplink, T0 + 2)
        )
    assert refused == DeadLettered("unsigned")
    assert _stored(native_press).counter == 2
    assert _stored(wrapped).counter == 3
    assert rows(fleet.database, "SELECT counter, trust FROM presses ORDER BY id") == [
        (2, "signed"), (3, "signed")
    ]
    assert rows(
        fleet.database,
        "SELECT last_counter, last_network_counter FROM devices WHERE id = 'L0001A2B3'",
    ) == [(3, None)]
    assert rows(fleet.database, "SELECT reason, detail FROM dead_letters") == [
        ("unsigned", "device has a key: only its signed frames are trusted")
    ]


async def test_a_press_lost_before_a_later_one_is_accepted_when_retransmitted(
    fleet: Fleet, pipe: Collector
) -> None:
    """Issue 12: counter 101 got through while 100 was lost at the broker; 100's
    retransmission is a new press, and a second copy of it is a duplicate."""
    button = fleet.devices[0]
    first, later = await pipe.send(
        pipe.item(frame_bytes(button, 101), at=T0),
        pipe.item(frame_bytes(button, 100, PressKind.PANIC), at=T0 + 5),
    )
    again = await pipe.send(pipe.item(frame_bytes(button, 100), at=T0 + 6))
    assert _stored(first).counter == 101
    assert _stored(later).counter == 100
    assert again == [Repeated(_stored(later).press_id, button.id, 100)]
    stale = await pipe.send(pipe.item(frame_bytes(button, 101 - REPLAY_WINDOW), at=T0 + 7))
    assert stale == [DeadLettered("stale_counter")]


async def test_a_press_the_database_cannot_store_is_isolated_and_the_rest_committed(
    fleet: Fleet, pipe: Collector
) -> None:
    """One value SQLite refuses (a lone surrogate) used to fail its whole batch on every
    retry, forever, and every press behind it waited: now it alone is a dead letter."""
    one, two = fleet.devices[0], fleet.devices[1]
    poison = Frame(format=native.FORMAT, device_ref="ghost-\ud800", kind=PressKind.PANIC,
                   counter=1)
    with structlog.testing.capture_logs() as logs:
        outcomes = await asyncio.wait_for(
            pipe.send(
                pipe.item(frame_bytes(one, 5), at=T0),
                pipe.item(b"poison-payload", at=T0 + 1, decoded=poison),
                pipe.item(frame_bytes(two, 7), at=T0 + 2),
            ),
            timeout=20,
        )
    assert _stored(outcomes[0]).counter == 5
    assert outcomes[1] == DeadLettered("unstorable")
    assert _stored(outcomes[2]).counter == 7
    assert rows(fleet.database, "SELECT reason, device_ref, payload FROM dead_letters") == [
        ("unstorable", None, b"poison-payload")
    ]
    assert rows(fleet.database, "SELECT counter FROM presses ORDER BY counter") == [(5,), (7,)]
    assert [e for e in logs if e["event"] == "store.unavailable"] == []
