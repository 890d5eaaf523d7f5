"""The public web app: Twilio webhooks (signed or refused), the call script and the ack page.

Tests play Twilio and sign with twilio's own RequestValidator (DESIGN §4); the database
is real SQLite, the Channel a recording fake, the clock injected.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from dispatch.engine import Dispatcher
from dispatch.web import WebSettings, public_app
from dispatch.webhook_auth import make_ack_token
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_world import (
    ACK_SECRET,
    KODE_LADDER,
    PUBLIC_URL,
    T0,
    Clock,
    RecordingChannel,
    cancel_incident,
    dispatcher,
    open_incident,
    outbox,
    query,
    timeline,
)

AUTH_TOKEN = "web-test-auth-token"


@dataclass
class Web:
    client: TestClient  # type: ignore[type-arg]
    engine: Dispatcher
    store: SqliteDispatchStore
    clock: Clock
    channel: RecordingChannel
    database: Path
    incident: int

    def row(self, person: str, channel: str) -> int:
        (row,) = [
            r.id
            for r in outbox(self.database, self.incident)
            if (r.person_id, r.channel, r.purpose) == (person, channel, "alert")
        ]
        return row

    async def twilio_raw(
        self, path: str, body: bytes, signed_form: Mapping[str, str], *,
        content_type: str = "application/x-www-form-urlencoded",
    ) -> ClientResponse:
        """POST these exact bytes with a genuine signature over ``signed_form``."""
        signature = RequestValidator(AUTH_TOKEN).compute_signature(
            PUBLIC_URL + path, dict(signed_form)
        )
        return await self.client.post(path, data=body, headers={
            "X-Twilio-Signature": signature, "Content-Type": content_type})

    async def twilio(
        self,
        path: str,
        form: Mapping[str, str],
        *,
        token: str = AUTH_TOKEN,
        signed_form: Mapping[str, str] | None = None,
        signed_path: str | None = None,
    ) -> ClientResponse:
        """POST as Twilio would: the signature covers the public URL and the form."""
        signature = RequestValidator(token).compute_signature(
            PUBLIC_URL + (signed_path or path), dict(signed_form or form)
        )
        return await self.client.post(path, data=dict(form),
                                      headers={"X-Twilio-Signature": signature})

    def sid(self, outbox_id: int) -> str:
        """The provider SID the send recorded on this outbox row."""
        return str(query(self.database, "SELECT provider_sid FROM outbox WHERE id = ?",
                         (outbox_id,))[0][0])

    def on_call(self, outbox_id: int, **form: str) -> dict[str, str]:
        """A call webhook's form: Twilio names the call (CallSid) on every one."""
        return {"CallSid": self.sid(outbox_id), **form}

    async def sms_status(self, outbox_id: int, status: str, **more: str) -> ClientResponse:
        """Twilio's MessageStatus callback for this row's message."""
        return await self.twilio(f"/twilio/status/sms/{outbox_id}",
                                 {"MessageSid": self.sid(outbox_id), "MessageStatus": status,
                                  **more})

    async def call_status(self, outbox_id: int, status: str) -> ClientResponse:
        """Twilio's CallStatus callback for this row's call."""
        return await self.twilio(f"/twilio/status/call/{outbox_id}",
                                 {"CallSid": self.sid(outbox_id), "CallStatus": status})

    def status(self, outbox_id: int) -> str:
        return str(query(self.database, "SELECT state FROM outbox WHERE id = ?",
                         (outbox_id,))[0][0])

    def incident_status(self, incident: int | None = None) -> str:
        return str(query(self.database, "SELECT status FROM incidents WHERE id = ?",
                         (incident or self.incident,))[0][0])


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[Web]:
    database = tmp_path / "panicd.sqlite3"
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0 + 1), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()  # ani and budi: sms + voice
        app = public_app(engine, store, WebSettings(PUBLIC_URL, AUTH_TOKEN, ACK_SECRET, clock))
        async with TestClient(TestServer(app)) as client:
            yield Web(client, engine, store, clock, channel, database, incident)


def ack_link_token(web: Web, person: str) -> str:
    (sms,) = web.channel.to(person, "sms")
    return sms.body.rsplit("/a/", 1)[1]


async def test_an_unsigned_webhook_is_refused(web: Web) -> None:
    row = web.row("ani", "voice")
    response = await web.client.post(f"/twilio/gather/{row}", data={"Digits": "1"})
    assert response.status == 403
    assert web.incident_status() == "open"


async def test_a_tampered_webhook_is_refused(web: Web) -> None:
    row = web.row("ani", "voice")
    path = f"/twilio/gather/{row}"
    tampered = await web.twilio(path, {"Digits": "1"}, signed_form={"Digits": "2"})
    other_path = await web.twilio(path, {"Digits": "1"},
                                  signed_path=f"/twilio/gather/{web.row('budi', 'voice')}")
    wrong_key = await web.twilio(path, {"Digits": "1"}, token="not-the-auth-token")
    assert [tampered.status, other_path.status, wrong_key.status] == [403, 403, 403]
    assert web.incident_status() == "open"
    assert query(web.database, "SELECT COUNT(*) FROM acks") == [(0,)]


async def test_the_signed_voice_webhook_serves_the_id_id_gather_script(web: Web) -> None:
    row = web.row("ani", "voice")
    response = await web.twilio(f"/twilio/voice/{row}",
                                web.on_call(row, CallStatus="in-progress", AnsweredBy="human"))
    assert response.status == 200
    assert response.content_type == "text/xml"
    twiml = await response.text()
    assert '<Say language="id-ID"' in twiml
    assert '<Gather action="' in twiml and 'numDigits="1"' in twiml
    assert f"{PUBLIC_URL}/twilio/gather/{row}" in twiml
    assert f"Kode kejadian {web.incident}" in twiml
    assert twiml.count("Tombol darurat ditekan") == 2  # the message is repeated
    assert f"{PUBLIC_URL}/twilio/voice/{row}?repeat=1" in twiml


async def test_the_repeated_script_is_signed_over_its_query_and_hangs_up_after(web: Web) -> None:
    row = web.row("ani", "voice")
    response = await web.twilio(f"/twilio/voice/{row}?repeat=1",
                                web.on_call(row, CallStatus="in-progress"))
    assert response.status == 200
    twiml = await response.text()
    assert "<Redirect" not in twiml and "<Hangup" in twiml


async def test_a_machine_answer_hangs_up_and_is_never_an_ack(web: Web) -> None:
    row = web.row("ani", "voice")
    response = await web.twilio(f"/twilio/voice/{row}",
                                web.on_call(row, AnsweredBy="machine_start"))
    assert response.status == 200
    twiml = await response.text()
    assert "<Hangup" in twiml and "<Gather" not in twiml and "<Say" not in twiml
    assert web.incident_status() == "open"
    assert query(web.database, "SELECT COUNT(*) FROM acks") == [(0,)]


async def test_digit_1_acknowledges_the_incident_for_the_called_person(web: Web) -> None:
    row = web.row("budi", "voice")
    response = await web.twilio(f"/twilio/gather/{row}", web.on_call(row, Digits="1"))
    assert response.status == 200
    twiml = await response.text()
    assert "Anda tercatat menangani" in twiml and "<Hangup" in twiml
    assert web.incident_status() == "acknowledged"
    assert query(web.database, "SELECT person_id, via, first FROM acks") == [("budi", "voice", 1)]
    assert ("incident.acknowledged", "voice", "Budi Santoso") in timeline(web.database,
                                                                            web.incident)
    # A second person pressing 1 is an additional responder, not a second "first".
    ani = web.row("ani", "voice")
    again = await web.twilio(f"/twilio/gather/{ani}", web.on_call(ani, Digits="1"))
    assert "sudah ditangani petugas lain" in await again.text()


async def test_digit_2_redirects_to_the_script_again(web: Web) -> None:
    row = web.row("ani", "voice")
    response = await web.twilio(f"/twilio/gather/{row}", web.on_call(row, Digits="2"))
    twiml = await response.text()
    assert f"<Redirect method=\"POST\">{PUBLIC_URL}/twilio/voice/{row}?repeat=1</Redirect>" in twiml
    assert web.incident_status() == "open"


async def test_a_call_reaching_a_cancelled_incident_does_not_claim_the_listener_handles_it(
    web: Web,
) -> None:
    await cancel_incident(web.database, web.incident, at=web.clock())
    row = web.row("ani", "voice")
    twiml = await (await web.twilio(f"/twilio/voice/{row}",
                                     web.on_call(row, AnsweredBy="human"))).text()
    assert "<Gather" not in twiml
    assert "Anda tercatat menangani" not in twiml


async def test_status_callbacks_update_the_outbox(web: Web) -> None:
    sms, call = web.row("ani", "sms"), web.row("ani", "voice")
    assert (await web.sms_status(sms, "delivered")).status == 204
    assert web.status(sms) == "delivered"
    await web.call_status(call, "no-answer")
    assert web.status(call) == "no_answer"
    budi = web.row("budi", "sms")
    await web.sms_status(budi, "undelivered", ErrorCode="30003")
    assert web.status(budi) == "failed"
    assert query(web.database, "SELECT error_code FROM outbox WHERE id = ?", (budi,)) == [
        (30003,)
    ]
    assert ("sms.status", "delivered", None) in timeline(web.database, web.incident)
    unsigned = await web.client.post(f"/twilio/status/sms/{sms}", data={"MessageStatus": "failed"})
    assert unsigned.status == 403
    assert web.status(sms) == "delivered"


async def test_a_late_sent_callback_does_not_undo_delivered(web: Web) -> None:
    # Twilio does not promise status callbacks arrive in order.
    sms = web.row("ani", "sms")
    await web.sms_status(sms, "delivered")
    await web.sms_status(sms, "sent")
    assert web.status(sms) == "delivered"


def status_lines(web: Web, event: str) -> list[str]:
    return [reason for name, reason, _actor in timeline(web.database, web.incident)
            if name == event]


async def test_a_replayed_status_callback_adds_no_line_and_a_final_state_stays(web: Web) -> None:
    # Twilio's signature has no nonce: anyone who captured a callback can post it again.
    call = web.row("ani", "voice")
    for status in ("initiated", "ringing", "in-progress", "completed"):
        assert (await web.call_status(call, status)).status == 204
    lines = status_lines(web, "call.status")
    for status in ("completed", "ringing", "busy", "failed"):
        assert (await web.call_status(call, status)).status == 204  # idempotent, not an error
    assert status_lines(web, "call.status") == lines == ["sent", "sent", "sent", "delivered"]
    assert web.status(call) == "delivered"


async def test_a_status_callback_for_another_message_than_the_rows_is_refused(web: Web) -> None:
    ani, budi = web.row("ani", "sms"), web.row("budi", "sms")
    path = f"/twilio/status/sms/{ani}"
    with capture_logs() as logs:
        other = await web.twilio(path, {"MessageSid": web.sid(budi), "MessageStatus": "failed"})
        missing = await web.twilio(path, {"MessageStatus": "failed"})
    assert [other.status, missing.status] == [409, 409]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "webhook.sid_mismatch"
    ] * 2
    assert web.status(ani) == "sent"
    assert status_lines(web, "sms.status") == []


async def test_the_ack_link_get_shows_the_page_without_acking(web: Web) -> None:
    token = ack_link_token(web, "ani")
    response = await web.client.get(f"/a/{token}")
    assert response.status == 200
    page = await response.text()
    assert f"Kejadian darurat #{web.incident}" in page
    assert "Saya tangani</button>" in page and 'method="post"' in page
    assert "Kuncen" in page
    assert web.incident_status() == "open"
    assert query(web.database, "SELECT COUNT(*) FROM acks") == [(0,)]


async def test_the_ack_link_post_acks_as_the_linked_responder(web: Web) -> None:
    token = ack_link_token(web, "ani")
    response = await web.client.post(f"/a/{token}")
    assert response.status == 200
    assert "Anda tercatat menangani" in await response.text()
    assert web.incident_status() == "acknowledged"
    assert query(web.database, "SELECT person_id, via, first FROM acks") == [("ani", "link", 1)]
    # The others already paged are told who handles it.
    assert await web.engine.send_due() == 1
    (told,) = web.channel.sent[4:]
    assert told.to == web.channel.to("budi", "sms")[0].to
    assert "ditangani oleh Ani Rahayu" in told.body


async def test_an_expired_ack_link_is_refused(web: Web) -> None:
    token = ack_link_token(web, "ani")
    web.clock.advance(3600)  # the test world's ack_ttl_s
    assert (await web.client.get(f"/a/{token}")).status == 403
    assert (await web.client.post(f"/a/{token}")).status == 403
    assert web.incident_status() == "open"


async def test_a_tampered_ack_link_is_refused(web: Web) -> None:
    token = ack_link_token(web, "ani")
    body, tag = token.split(".")
    flipped = tag[:-1] + ("A" if tag[-1] != "A" else "B")
    forged = make_ack_token(b"some-other-secret", str(web.incident), "ani", int(T0 + 600))
    for bad in (f"{body}.{flipped}", forged, "not-a-token"):
        assert (await web.client.post(f"/a/{bad}")).status == 403
    assert web.incident_status() == "open"


async def test_a_token_for_one_incident_cannot_ack_another(web: Web) -> None:
    other = await open_incident(web.database, KODE_LADDER, at=web.clock(), device="BTN-2")
    await web.engine.plan_missing()
    token_a = ack_link_token(web, "ani")
    # Re-pointing token A's payload at incident B keeps A's MAC: it no longer verifies.
    payload_a, tag_a = token_a.split(".")
    payload_b = make_ack_token(ACK_SECRET, str(other), "ani", int(T0 + 600)).split(".")[0]
    assert (await web.client.post(f"/a/{payload_b}.{tag_a}")).status == 403
    # Token A itself acks A only.
    assert (await web.client.post(f"/a/{payload_a}.{tag_a}")).status == 200
    assert web.incident_status() == "acknowledged"
    assert web.incident_status(other) == "open"


def acks(web: Web) -> list[tuple[str | None, str, int]]:
    rows = query(web.database, "SELECT person_id, via, first FROM acks ORDER BY id")
    return [(None if p is None else str(p), str(v), int(str(f))) for p, v, f in rows]


async def test_a_repeated_parameter_cannot_ride_on_a_genuine_signature(web: Web) -> None:
    # Issue 11 case 2: "Digits=1&" before a body Twilio signed with Digits=2 passed a check
    # that read the last Digits, and acked through a handler that read the first.
    row = web.row("ani", "voice")
    path = f"/twilio/gather/{row}"
    signed = web.on_call(row, Digits="2")
    genuine = urlencode(signed).encode()
    for body in (b"Digits=1&" + genuine, genuine + b"&Digits=1", b"Digit%73=1&" + genuine,
                 genuine + b"&Digits=2"):
        response = await web.twilio_raw(path, body, signed)
        assert response.status == 400, body
    assert acks(web) == []
    assert web.incident_status() == "open"
    # The genuine body alone is still served.
    assert (await web.twilio_raw(path, genuine, signed)).status == 200


async def test_a_webhook_body_that_is_not_a_utf8_form_is_refused(web: Web) -> None:
    row = web.row("ani", "voice")
    path = f"/twilio/gather/{row}"
    # Signed over no parameters at all: a body the form parser does not read must not be
    # verified as "empty" and then served.
    json_body = await web.twilio_raw(path, b'{"Digits": "1"}', {},
                                     content_type="application/json")
    latin = await web.twilio_raw(path, b"", {},
                                 content_type="application/x-www-form-urlencoded; charset=latin-1")
    multipart = await web.twilio_raw(path, b"--x--\r\n", {},
                                     content_type="multipart/form-data; boundary=x")
    bad_utf8 = await web.twilio_raw(path, b"Digits=%FF", {"Digits": "\ufffd"})
    raw_bad_utf8 = await web.twilio_raw(path, b"Digits=\xff", {"Digits": "\ufffd"})
    assert [json_body.status, latin.status, multipart.status, bad_utf8.status,
            raw_bad_utf8.status] == [415, 415, 415, 400, 400]
    assert acks(web) == []


async def test_a_call_webhook_for_another_call_than_the_rows_is_refused(web: Web) -> None:
    ani, budi = web.row("ani", "voice"), web.row("budi", "voice")
    with capture_logs() as logs:
        pressed = await web.twilio(f"/twilio/gather/{ani}", {"CallSid": web.sid(budi),
                                                             "Digits": "1"})
        script = await web.twilio(f"/twilio/voice/{ani}", {"CallSid": web.sid(budi)})
        nameless = await web.twilio(f"/twilio/gather/{ani}", {"Digits": "1"})
    assert [pressed.status, script.status, nameless.status] == [409, 409, 409]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "webhook.sid_mismatch"
    ] * 3
    assert acks(web) == []
    # An SMS row is not a call, whatever the form says.
    sms = web.row("ani", "sms")
    assert (await web.twilio(f"/twilio/gather/{sms}", {"CallSid": web.sid(ani),
                                                        "Digits": "1"})).status == 404
    assert acks(web) == []


async def test_a_call_webhook_before_the_calls_sid_is_recorded_is_served(web: Web) -> None:
    # Twilio may fetch the script before the answer to create_async is recorded.
    row = web.row("budi", "voice")
    sid = web.sid(row)
    with closing(sqlite3.connect(web.database)) as db:
        db.execute("UPDATE outbox SET provider_sid = NULL WHERE id = ?", (row,))
        db.commit()
    response = await web.twilio(f"/twilio/gather/{row}", {"CallSid": sid, "Digits": "1"})
    assert response.status == 200
    assert acks(web) == [("budi", "voice", 1)]


async def test_a_replayed_ack_by_the_same_responder_is_recorded_once(web: Web) -> None:
    token = ack_link_token(web, "ani")
    first = await web.client.post(f"/a/{token}")
    again = await web.client.post(f"/a/{token}")
    assert "Anda tercatat menangani" in await first.text()
    assert "Anda tercatat menangani" in await again.text()
    assert "petugas lain" not in await again.text()
    # Budi is an additional responder once, however often he presses 1.
    budi = web.row("budi", "voice")
    for _ in range(2):
        twiml = await (await web.twilio(f"/twilio/gather/{budi}",
                                        web.on_call(budi, Digits="1"))).text()
    assert "Anda tercatat menangani" in twiml
    # The CLI's actor without a responder id is one person by name.
    for _ in range(2):
        cli = await web.engine.ack(web.incident, person_id=None, actor="Pak Joko", via="cli")
    assert (cli.accepted, cli.first, cli.repeated) == (True, False, True)
    assert acks(web) == [("ani", "link", 1), ("budi", "voice", 0), (None, "cli", 0)]
    events = [e for e, _r, _a in timeline(web.database, web.incident)]
    assert events.count("incident.acknowledged") == 1
    assert events.count("responder.added") == 2
    assert await web.engine.send_due() == 1  # budi is told once who handles it


async def test_a_cross_origin_ack_post_is_refused(web: Web) -> None:
    token = ack_link_token(web, "ani")
    refused = [
        {"Origin": "https://evil.example"},
        {"Origin": "http://panicd.madiunkota.go.id"},  # another scheme is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "null"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"},
    ]
    with capture_logs() as logs:
        for headers in refused:
            assert (await web.client.post(f"/a/{token}", headers=headers)).status == 403
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "ack_link.cross_origin"
    ] * len(refused)
    assert acks(web) == []
    assert web.incident_status() == "open"


@pytest.mark.parametrize("headers", [
    {},  # an old feature-phone browser sends neither header
    {"Origin": PUBLIC_URL},
    {"Origin": PUBLIC_URL + ":443", "Sec-Fetch-Site": "same-origin"},
    # Our page says Referrer-Policy: no-referrer, so a browser posts our own form with
    # Origin: null (Fetch standard, "append a request Origin header").
    {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},
])
async def test_an_ack_post_from_panicds_own_page_or_a_plain_browser_acks(
    web: Web, headers: dict[str, str]
) -> None:
    response = await web.client.post(f"/a/{ack_link_token(web, 'ani')}", headers=headers)
    assert response.status == 200
    assert acks(web) == [("ani", "link", 1)]


async def test_every_public_response_forbids_caching_framing_and_referrers(web: Web) -> None:
    token = ack_link_token(web, "ani")
    page = await web.client.get(f"/a/{token}")
    responses = [
        page,
        await web.client.get("/a/not-a-token"),
        await web.client.get("/nowhere"),
        await web.client.post(f"/twilio/gather/{web.row('ani', 'voice')}", data={"Digits": "1"}),
        await web.sms_status(web.row("ani", "sms"), "delivered"),
    ]
    assert [r.status for r in responses] == [200, 403, 404, 403, 204]
    for response in responses:
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    # The page's one inline style is the one the policy's hash allows.
    style = (await page.text()).split("<style>", 1)[1].split("</style>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page.headers["Content-Security-Policy"]
