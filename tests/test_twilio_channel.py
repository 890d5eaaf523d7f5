"""TwilioChannel against Prism serving Twilio's own spec: real library requests, real validation."""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from dispatch.channel import Channel, DeliveryStatus
from dispatch.retry import (
    AttemptFailure,
    FailureKind,
    Outcome,
    ProviderChange,
    ProviderWatch,
    RequeuePolicy,
    RetryPolicy,
)
from dispatch.twilio_channel import (
    TwilioApiHttpClient,
    TwilioChannel,
    TwilioCredentials,
    _form_fields,
    parse_retry_after,
    twilio_credentials_from_env,
)
from gateway.errors import ConfigError
from tests.peers.prepare_twilio_spec import RETRY_AFTER_S

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "test-auth-token-never-logged"
CREDENTIALS = TwilioCredentials(ACCOUNT_SID, TOKEN)
TO = "+6281234567890"
FROM = "+15005550006"
CALLBACK = "https://panicd.example.id/twilio/status"


class PreferringHttpClient(TwilioApiHttpClient):
    """Sends Prism's ``Prefer`` header on the first requests only and records spec violations."""

    def __init__(self, base_url: str, prefer: list[str]) -> None:
        super().__init__(base_url, timeout_s=5.0)
        self.prefer = list(prefer)
        self.requests = 0
        self.violations: list[str] = []

    def extra_headers(self) -> Mapping[str, str]:
        self.requests += 1
        return {"Prefer": self.prefer.pop(0)} if self.prefer else {}

    async def request(self, method: str, uri: str, *args: Any, **kwargs: Any) -> Any:
        response = await super().request(method, uri, *args, **kwargs)
        # Prism names what was wrong with a request in this header (only on violations).
        violation = {k.lower(): v for k, v in response.headers.items()}.get("sl-violations")
        if violation is not None:
            self.violations.append(violation)
        return response


class RecordingSleep:
    """An injected sleep that returns at once and remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@asynccontextmanager
async def twilio_channel(
    base_url: str,
    *,
    prefer: list[str] | None = None,
    policy: RetryPolicy | None = None,
    rand: Callable[[], float] = lambda: 0.0,
    credentials: TwilioCredentials = CREDENTIALS,
) -> AsyncIterator[tuple[TwilioChannel, PreferringHttpClient, RecordingSleep]]:
    http = PreferringHttpClient(base_url, prefer or [])
    sleep = RecordingSleep()
    channel = TwilioChannel(
        credentials,
        from_number=FROM,
        policy=policy,
        http_client=http,
        sleep=sleep,
        rand=rand,
    )
    async with channel:
        yield channel, http, sleep


def test_twilio_channel_satisfies_the_channel_protocol() -> None:
    channel: Channel = TwilioChannel(CREDENTIALS, from_number=FROM)
    assert channel is not None


async def test_sms_request_validates_against_twilios_spec(prism: str) -> None:
    async with twilio_channel(prism) as (channel, http, sleep):
        result = await channel.send_sms(TO, "TES DARURAT Taman", status_callback=CALLBACK)
    assert result.status is DeliveryStatus.SENT
    assert result.provider_sid is not None
    assert result.provider_sid.startswith("SM")
    assert result.attempts == 1
    assert http.violations == []
    assert sleep.delays == []


async def test_call_with_status_events_and_machine_detection_validates(prism: str) -> None:
    # StatusCallbackEvent is a repeated form field: this is the request Prism rejected
    # before the spec patch for stoplightio/prism#2473.
    async with twilio_channel(prism) as (channel, http, _):
        result = await channel.place_call(
            TO, twiml_url="https://panicd.example.id/twilio/voice/INC1", status_callback=CALLBACK
        )
    assert result.status is DeliveryStatus.SENT
    assert result.provider_sid is not None
    assert result.provider_sid.startswith("CA")
    assert http.violations == []


async def test_call_without_callback_or_detection_validates(prism: str) -> None:
    async with twilio_channel(prism) as (channel, http, _):
        result = await channel.place_call(
            TO,
            twiml_url="https://panicd.example.id/twilio/voice/INC1",
            status_callback=None,
            machine_detection=False,
        )
    assert result.status is DeliveryStatus.SENT
    assert http.violations == []


async def test_request_the_spec_rejects_is_a_permanent_failure_not_a_fake_success(
    prism: str,
) -> None:
    bad = TwilioCredentials("AC-not-a-sid", TOKEN)
    async with twilio_channel(prism, credentials=bad) as (channel, http, sleep):
        result = await channel.send_sms(TO, "x", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_PERMANENT
    assert result.error_code == 422
    assert len(http.violations) == 1
    assert "AccountSid" in http.violations[0] or "path" in http.violations[0]
    assert sleep.delays == []


async def test_throttled_sms_waits_retry_after_then_succeeds(prism: str) -> None:
    async with twilio_channel(prism, prefer=["code=429"]) as (channel, http, sleep):
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.SENT
    assert result.attempts == 2
    assert http.requests == 2
    assert sleep.delays == [float(RETRY_AFTER_S)]


async def test_retry_after_gets_jitter_on_top(prism: str) -> None:
    policy = RetryPolicy(base_delay_s=1.0, deadline_s=60.0)
    async with twilio_channel(prism, prefer=["code=429"], policy=policy, rand=lambda: 0.5) as (
        channel,
        _,
        sleep,
    ):
        await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert sleep.delays == [RETRY_AFTER_S + 0.5]


async def test_throttling_past_the_attempt_budget_gives_up_as_transient(prism: str) -> None:
    policy = RetryPolicy(max_attempts=3, deadline_s=60.0)
    async with twilio_channel(prism, prefer=["code=429"] * 5, policy=policy) as (
        channel,
        http,
        sleep,
    ):
        result = await channel.place_call(
            TO, twiml_url="https://panicd.example.id/v", status_callback=CALLBACK
        )
    assert result.status is DeliveryStatus.FAILED_TRANSIENT
    assert result.attempts == 3
    assert result.error_code == 20429
    assert http.requests == 3
    assert len(sleep.delays) == 2


async def test_retry_after_beyond_the_deadline_gives_up_without_waiting(prism: str) -> None:
    policy = RetryPolicy(deadline_s=RETRY_AFTER_S - 1)
    async with twilio_channel(prism, prefer=["code=429"], policy=policy) as (channel, _, sleep):
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_TRANSIENT
    assert result.attempts == 1
    assert sleep.delays == []


async def test_server_errors_back_off_exponentially_with_full_jitter(prism: str) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=8.0)
    async with twilio_channel(prism, prefer=["code=503"] * 2, policy=policy, rand=lambda: 0.5) as (
        channel,
        http,
        sleep,
    ):
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.SENT
    assert result.attempts == 3
    assert sleep.delays == [0.25, 0.5]
    assert http.violations == []


# Prism answers these from the 400 examples prepare_twilio_spec adds (Twilio's real codes
# and bodies), so the library parses a genuine Twilio error; no hand-written server needed.
@pytest.mark.parametrize("code", [21211, 21614, 21610, 21408])
async def test_permanent_sms_errors_are_not_retried(prism: str, code: int) -> None:
    async with twilio_channel(prism, prefer=[f"code=400, example=e{code}"]) as (
        channel,
        http,
        sleep,
    ):
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_PERMANENT
    assert result.error_code == code
    assert result.attempts == 1
    assert http.requests == 1
    assert sleep.delays == []


async def test_call_blocked_by_geo_permissions_is_permanent(prism: str) -> None:
    async with twilio_channel(prism, prefer=["code=400, example=e21215"]) as (channel, _, sleep):
        result = await channel.place_call(TO, twiml_url="https://x.example/v", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_PERMANENT
    assert result.error_code == 21215
    assert sleep.delays == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_transient_and_retried() -> None:
    closed = f"http://127.0.0.1:{closed_port()}"
    policy = RetryPolicy(max_attempts=2)
    async with twilio_channel(closed, policy=policy) as (channel, _, sleep):
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_TRANSIENT
    assert result.attempts == 2
    assert result.error_code is None
    assert result.error_message is not None
    assert "Connect" in result.error_message
    assert len(sleep.delays) == 1


async def test_retry_logs_never_carry_the_auth_token(prism: str) -> None:
    with capture_logs() as logs:
        async with twilio_channel(prism, prefer=["code=429", "code=503"]) as (channel, _, _):
            await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert [entry["event"] for entry in logs] == ["twilio.retrying", "twilio.retrying"]
    assert TOKEN not in repr(logs)
    assert TOKEN not in repr(CREDENTIALS)


async def test_rebased_client_refuses_hosts_other_than_the_api() -> None:
    client = TwilioApiHttpClient("http://127.0.0.1:1")
    assert client.rebase("https://api.twilio.com/2010-04-01/x") == "http://127.0.0.1:1/2010-04-01/x"
    with pytest.raises(ValueError, match="refusing"):
        client.rebase("https://messaging.twilio.com/v1/Services")


def test_list_params_become_repeated_form_fields() -> None:
    fields = _form_fields({"To": "+62", "StatusCallbackEvent": ["initiated", "answered"]})
    assert fields == [
        ("To", "+62"),
        ("StatusCallbackEvent", "initiated"),
        ("StatusCallbackEvent", "answered"),
    ]


# --- retry policy (pure) ---


@given(attempt=st.integers(1, 30), rand=st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_is_full_jitter_under_the_cap(attempt: int, rand: float) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=8.0)
    delay = policy.backoff_s(attempt, rand)
    assert 0.0 <= delay < min(8.0, 0.5 * 2 ** (attempt - 1))


def test_permanent_failure_is_never_retried() -> None:
    failure = AttemptFailure(FailureKind.PERMANENT, "landline", 400, 21614)
    assert RetryPolicy().delay_before_retry(failure, 1, 0.0, 0.5) is None


@given(elapsed=st.floats(0.0, 100.0), rand=st.floats(0.0, 1.0, exclude_max=True))
def test_no_retry_is_scheduled_past_the_deadline(elapsed: float, rand: float) -> None:
    policy = RetryPolicy(deadline_s=30.0)
    failure = AttemptFailure(FailureKind.TRANSIENT, "503", 503)
    delay = policy.delay_before_retry(failure, 1, elapsed, rand)
    assert delay is None or elapsed + delay < 30.0


def test_retry_policy_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("7", now=0.0) == 7.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:30 GMT", now=10.0) == 20.0
    assert parse_retry_after("soon", now=0.0) is None
    assert parse_retry_after(None, now=0.0) is None


# --- credentials ---


def test_no_twilio_variables_means_no_credentials() -> None:
    assert twilio_credentials_from_env({}) is None


def test_credentials_from_environment() -> None:
    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TOKEN}
    assert twilio_credentials_from_env(env) == CREDENTIALS


def test_systemd_credential_file_wins_over_environment(tmp_path: Path) -> None:
    (tmp_path / "twilio-auth-token").write_text("from-credential-file\n")
    env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": "from-env",
        "CREDENTIALS_DIRECTORY": str(tmp_path),
    }
    creds = twilio_credentials_from_env(env)
    assert creds == TwilioCredentials(ACCOUNT_SID, "from-credential-file")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"TWILIO_ACCOUNT_SID": ACCOUNT_SID}, "TWILIO_AUTH_TOKEN"),
        ({"TWILIO_AUTH_TOKEN": TOKEN}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": TOKEN}, "TWILIO_ACCOUNT_SID"),
    ],
)
def test_half_or_malformed_credentials_are_a_config_error(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        twilio_credentials_from_env(env)
    assert excinfo.value.key == key
    assert TOKEN not in str(excinfo.value)


# --- transient local errors and the outbox's requeue (issue 11 case 4, issue 12 item 2) ---


class OutOfDescriptorsHttpClient(TwilioApiHttpClient):
    """Fails every request the way the idle-connection attack made it fail."""

    async def request(self, method: str, uri: str, *_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, f"Too many open files ({method} {self.rebase(uri)})")


async def test_running_out_of_descriptors_is_a_transient_failure_not_an_escaping_error() -> None:
    sleep = RecordingSleep()
    channel = TwilioChannel(CREDENTIALS, from_number=FROM, sleep=sleep,
                            http_client=OutOfDescriptorsHttpClient("http://127.0.0.1:1"),
                            policy=RetryPolicy(max_attempts=2), rand=lambda: 0.0)
    async with channel:
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_TRANSIENT
    assert result.attempts == 2
    assert result.error_message is not None
    assert "Too many open files" in result.error_message


async def test_a_throttled_give_up_carries_retry_after_to_the_outbox(prism: str) -> None:
    policy = RetryPolicy(deadline_s=RETRY_AFTER_S - 1)
    async with twilio_channel(prism, prefer=["code=429"], policy=policy) as (channel, _, _):
        result = await channel.send_sms(TO, "DARURAT", status_callback=None)
    assert result.status is DeliveryStatus.FAILED_TRANSIENT
    assert result.retry_after_s == RETRY_AFTER_S


@given(failures=st.integers(1, 200), rand=st.floats(0.0, 1.0))
def test_requeue_backoff_is_equal_jitter_under_the_cap(failures: int, rand: float) -> None:
    policy = RequeuePolicy(base_delay_s=2.0, max_delay_s=60.0)
    ceiling = min(60.0, 2.0 * 2 ** (failures - 1))
    assert ceiling / 2 <= policy.delay_s(failures, None, rand) <= ceiling


@given(retry_after=st.floats(0.0, 10_000.0), rand=st.floats(0.0, 1.0))
def test_requeue_honours_retry_after_as_a_bounded_floor(retry_after: float, rand: float) -> None:
    policy = RequeuePolicy(base_delay_s=2.0, max_delay_s=60.0, max_retry_after_s=300.0)
    delay = policy.delay_s(1, retry_after, rand)
    assert delay >= min(retry_after, 300.0)
    assert delay <= max(2.0, min(retry_after, 300.0) + 2.0)


def test_an_outage_is_declared_once_after_a_minute_of_only_transient_failures() -> None:
    watch = ProviderWatch(alert_after_s=60.0)
    changes = [watch.observe(Outcome.TRANSIENT, t) for t in (0.0, 20.0, 59.9, 60.0, 90.0)]
    assert changes[:3] == [None, None, None]
    assert changes[3] == ProviderChange(down=True, since=0.0, failures=4)
    assert changes[4] is None  # once per outage, not per page
    assert watch.observe(Outcome.ANSWERED, 95.0) == ProviderChange(False, 0.0, 5)
    assert watch.observe(Outcome.ANSWERED, 96.0) is None


def test_any_answer_from_the_provider_ends_a_run_before_it_is_an_outage() -> None:
    watch = ProviderWatch(alert_after_s=60.0)
    for t in range(0, 300, 10):
        # 429s and 503s between answers (a flaky provider) are not an outage.
        assert watch.observe(Outcome.TRANSIENT if t % 50 else Outcome.ANSWERED, t) is None
