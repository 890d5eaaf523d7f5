"""The city app endpoint: signed frames over HTTP, answered only after commit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.dedup import DedupPolicy
from gateway.ingest import Ingestor
from gateway.model import GeoFix, PressKind
from gateway.sources.app import AppSettings, RateLimiter, app_api
from gateway.store import SqliteStore
from tests.pipeline import BlockingStore, Fleet, frame_bytes, make_fleet, scalar

JSON = {"Content-Type": "application/json"}


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "fleet", devices=2)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with SqliteStore(fleet.database) as store, Ingestor(
        store, fleet.config, fleet.locator, policy=DedupPolicy()
    ) as ingestor:
        server = TestServer(app_api(ingestor, AppSettings(per_minute=600, burst=50)))
        async with TestClient(server) as test_client:
            yield test_client


async def test_a_signed_panic_with_gps_is_stored_and_answered_with_its_incident(
    client: TestClient, fleet: Fleet  # type: ignore[type-arg]
) -> None:
    device = fleet.devices[0]
    body = frame_bytes(device, 7, fix=GeoFix(-7.65557, 111.51877, 8))
    response = await client.post("/v1/panic", data=body, headers=JSON)
    reply = await response.json()
    assert response.status == 200
    assert reply["status"] == "stored"
    assert reply["outcome"] == "opened"
    # Answered after COMMIT: another connection already sees the incident, located by GPS.
    assert scalar(fleet.database, "SELECT kelurahan FROM incidents WHERE id = ?",
                  (reply["incident"],)) == "Josenan"
    assert scalar(fleet.database, "SELECT path FROM press_paths") == "app:127.0.0.1"


async def test_a_retried_request_is_the_same_press_not_a_second_one(
    client: TestClient, fleet: Fleet  # type: ignore[type-arg]
) -> None:
    body = frame_bytes(fleet.devices[0], 7)
    first = await (await client.post("/v1/panic", data=body, headers=JSON)).json()
    again = await client.post("/v1/panic", data=body, headers=JSON)
    assert again.status == 200
    assert (await again.json()) == {"status": "duplicate", "press": first["press"]}
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1


@pytest.mark.parametrize(
    ("tamper", "status", "reason"),
    [
        ("bad_tag", 401, "bad_tag"),
        ("unknown", 401, "unknown_device"),
        ("garbage", 400, "bad_json"),
    ],
)
async def test_bad_requests_get_a_clear_status_and_become_dead_letters(
    client: TestClient, fleet: Fleet, tamper: str, status: int, reason: str  # type: ignore[type-arg]
) -> None:
    body = frame_bytes(fleet.devices[0], 7)
    if tamper == "bad_tag":
        frame = json.loads(body)
        frame["tag"] = "0" * 64
        body = json.dumps(frame).encode()
    elif tamper == "unknown":
        frame = json.loads(body)
        frame["dev"] = "NOT-REGISTERED"
        body = json.dumps(frame).encode()
    else:
        body = b'{"v":1,'
    response = await client.post("/v1/panic", data=body, headers=JSON)
    assert response.status == status
    assert (await response.json())["error"] == reason
    assert scalar(fleet.database, "SELECT reason FROM dead_letters") == reason


async def test_a_replayed_older_counter_is_a_conflict(
    client: TestClient, fleet: Fleet  # type: ignore[type-arg]
) -> None:
    device = fleet.devices[0]
    await client.post("/v1/panic", data=frame_bytes(device, 900), headers=JSON)
    response = await client.post("/v1/panic", data=frame_bytes(device, 3), headers=JSON)
    assert response.status == 409
    assert (await response.json())["error"] == "stale_counter"


async def test_a_cancel_from_the_app_cancels_within_the_grace_window(
    client: TestClient, fleet: Fleet  # type: ignore[type-arg]
) -> None:
    device = fleet.devices[1]
    await client.post("/v1/panic", data=frame_bytes(device, 1), headers=JSON)
    response = await client.post(
        "/v1/panic", data=frame_bytes(device, 2, PressKind.CANCEL), headers=JSON
    )
    assert (await response.json())["outcome"] == "cancelled"
    assert scalar(fleet.database, "SELECT status FROM incidents") == "cancelled"


async def test_a_form_post_is_refused_as_the_wrong_media_type(
    client: TestClient, fleet: Fleet  # type: ignore[type-arg]
) -> None:
    response = await client.post("/v1/panic", data={"dev": "x"})
    assert response.status == 415
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 0


def test_rate_limiter_allows_a_burst_then_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)
    assert limiter.allow("10.0.0.1") is None
    assert limiter.allow("10.0.0.1") is None
    wait = limiter.allow("10.0.0.1")
    assert wait is not None
    assert wait == pytest.approx(10.0)
    # Another address has its own bucket.
    assert limiter.allow("10.0.0.2") is None
    clock.now += 10.0
    assert limiter.allow("10.0.0.1") is None


async def test_over_the_rate_limit_the_app_gets_429_with_retry_after(fleet: Fleet) -> None:
    clock = Clock()
    async with SqliteStore(fleet.database) as store, Ingestor(
        store, fleet.config, fleet.locator, policy=DedupPolicy()
    ) as ingestor:
        app = app_api(ingestor, AppSettings(per_minute=1, burst=1), clock=clock)
        async with TestClient(TestServer(app)) as client:
            ok = await client.post("/v1/panic", data=frame_bytes(fleet.devices[0], 1),
                                   headers=JSON)
            limited = await client.post("/v1/panic", data=frame_bytes(fleet.devices[0], 2),
                                        headers=JSON)
            assert ok.status == 200
            assert limited.status == 429
            assert int(limited.headers["Retry-After"]) == 60
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1


async def test_without_a_commit_in_time_the_app_is_told_to_retry_and_nothing_is_lost(
    fleet: Fleet,
) -> None:
    async with SqliteStore(fleet.database) as inner:
        store = BlockingStore(inner)
        async with Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor:
            app = app_api(ingestor, AppSettings(commit_timeout_s=0.2))
            async with TestClient(TestServer(app)) as client:
                body = frame_bytes(fleet.devices[0], 5)
                response = await client.post("/v1/panic", data=body, headers=JSON)
                assert response.status == 503
                assert (await response.json())["error"] == "not_committed_yet"
                store.release.set()
                retry = await client.post("/v1/panic", data=body, headers=JSON)
                # The first request's press committed meanwhile: the retry is the same press.
                assert (await retry.json())["status"] == "duplicate"
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1
