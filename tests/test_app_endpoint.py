"""The city app endpoint: signed frames over HTTP, answered only after commit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.dedup import DedupPolicy
from gateway.ingest import Ingestor
from gateway.model import GeoFix, PressKind
from gateway.sources.app import (
    AppSettings,
    FreshCounters,
    RateLimiter,
    address_bucket,
    app_api,
    client_address,
)
from store.sqlite import SqliteStore
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
        server = TestServer(app_api(ingestor, AppSettings(per_minute=600, burst=50),
                                    fleet.config))
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
        app = app_api(ingestor, AppSettings(per_minute=1, burst=1), fleet.config, clock=clock)
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
            app = app_api(ingestor, AppSettings(commit_timeout_s=0.2), fleet.config)
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


# -- rate limiting never refuses a signed panic for someone else's traffic (issue 11 case 3)

PROXY = (ip_network("127.0.0.0/8"),)  # the test client connects from 127.0.0.1


@asynccontextmanager
async def limited_app(
    fleet: Fleet, settings: AppSettings
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    """The endpoint with a clock that never moves, so no bucket refills during a test."""
    clock = Clock()
    async with SqliteStore(fleet.database) as store, Ingestor(
        store, fleet.config, fleet.locator, policy=DedupPolicy()
    ) as ingestor:
        app = app_api(ingestor, settings, fleet.config, clock=clock)
        async with TestClient(TestServer(app)) as client:
            yield client


async def _junk(client: TestClient, times: int,  # type: ignore[type-arg]
                forwarded_for: str | None = None) -> list[int]:
    headers = dict(JSON)
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return [(await client.post("/v1/panic", data=b"{}", headers=headers)).status
            for _ in range(times)]


async def test_ten_junk_requests_then_a_valid_signed_panic_is_stored(fleet: Fleet) -> None:
    async with limited_app(fleet, AppSettings(per_minute=30, burst=10)) as client:
        statuses = await _junk(client, 12)
        assert statuses[:10] == [400] * 10
        assert statuses[10:] == [429, 429]  # the junk itself is still limited
        response = await client.post("/v1/panic", data=frame_bytes(fleet.devices[0], 1),
                                     headers=JSON)
        assert response.status == 200
        assert (await response.json())["status"] == "stored"
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 1


async def test_through_a_trusted_proxy_one_clients_junk_does_not_limit_another(
    fleet: Fleet,
) -> None:
    settings = AppSettings(per_minute=30, burst=10, trusted_proxies=PROXY)
    async with limited_app(fleet, settings) as client:
        assert (await _junk(client, 11, "203.0.113.7"))[-1] == 429
        # What the client wrote left of the proxy's entry is its own choice: no escape.
        assert await _junk(client, 2, "198.51.100.1, 203.0.113.7") == [429, 429]
        assert await _junk(client, 1, "198.51.100.9") == [400]


async def test_an_untrusted_peers_forwarded_for_is_ignored(fleet: Fleet) -> None:
    settings = AppSettings(per_minute=30, burst=10,
                           trusted_proxies=(ip_network("10.0.0.0/8"),))
    async with limited_app(fleet, settings) as client:
        statuses = [status for index in range(11)
                    for status in await _junk(client, 1, f"198.51.100.{index}")]
    assert statuses == [400] * 10 + [429]


async def test_replaying_a_captured_frame_does_not_use_up_the_next_real_panic(
    fleet: Fleet,
) -> None:
    device = fleet.devices[0]
    captured = frame_bytes(device, 1)
    async with limited_app(fleet, AppSettings(per_minute=30, burst=10)) as client:
        statuses = [(await client.post("/v1/panic", data=captured, headers=JSON)).status
                    for _ in range(12)]
        assert statuses[0] == 200
        assert statuses[-1] == 429
        fresh = await client.post("/v1/panic", data=frame_bytes(device, 2), headers=JSON)
        assert fresh.status == 200
    assert scalar(fleet.database, "SELECT COUNT(*) FROM presses") == 2


def test_a_flood_from_many_addresses_keeps_a_bounded_number_of_buckets() -> None:
    limiter = RateLimiter(per_minute=30, burst=10, clock=Clock(), max_keys=100)
    for index in range(10_000):
        limiter.allow(f"addr:10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}")
    assert len(limiter) == 100
    # The most recently charged are the ones kept.
    for _ in range(9):
        assert limiter.allow("addr:10.0.39.15") is None
    assert limiter.allow("addr:10.0.39.15") is not None


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("127.0.0.1", [], "127.0.0.1"),
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: header ignored
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # rightmost hop counts
        ("127.0.0.1", ["198.51.100.1, 127.0.0.2"], "198.51.100.1"),  # proxies chained
        ("127.0.0.1", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # repeated header
        ("127.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
        ("127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("127.0.0.1", ["not-an-address"], "127.0.0.1"),  # garbage: the proxy is charged
        ("::ffff:127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
    ],
)
def test_the_client_address_is_the_peer_or_what_a_trusted_proxy_saw(
    peer: str, forwarded: list[str], expected: str
) -> None:
    assert str(client_address(peer, forwarded, PROXY)) == expected


def test_an_ipv6_client_is_charged_for_its_whole_slash_64() -> None:
    one = client_address("2001:db8:0:1::5", [], ())
    other = client_address("2001:db8:0:1:ffff::9", [], ())
    assert address_bucket(one) == address_bucket(other) == "addr:2001:db8:0:1::/64"


def test_fresh_counters_are_new_once_and_retries_are_not() -> None:
    counters = FreshCounters()
    assert counters.fresh("APP-1", 5) is True
    assert counters.fresh("APP-1", 5) is False
    assert counters.fresh("APP-1", 4) is True  # out of order but never sent: still new
    assert counters.fresh("APP-2", 5) is True
