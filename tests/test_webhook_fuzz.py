"""The public web app under fire: random, malformed, oversized and spliced requests.

Raw HTTP/1.1 bytes over a real TCP socket to the real aiohttp app (aiohttp's TestServer on
127.0.0.1), so that bad encodings, repeated keys, huge headers and missing or misplaced
signatures reach the server exactly as written. Whatever arrives, the answer is a 4xx,
or 2xx for a genuinely signed form, never a 5xx; and nothing acks an incident unless
Twilio's signature covers every parameter of a key press 1 on the row's own call.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from dispatch.web import WebSettings, public_app
from store.sqlite_dispatch import SqliteDispatchStore
from tests.dispatch_world import (
    ACK_SECRET,
    KODE_LADDER,
    PUBLIC_URL,
    T0,
    Clock,
    RecordingChannel,
    dispatcher,
    open_incident,
    outbox,
    query,
)

AUTH_TOKEN = "fuzz-test-auth-token"
FORM = "application/x-www-form-urlencoded"
# Rows of the fixture's incident (ani and budi, SMS and voice), set up before any example.
ROWS = {"sms": 1, "sms_budi": 2, "voice": 3, "voice_budi": 4}


@dataclass
class Site:
    host: str
    port: int
    database: Path
    sids: dict[int, str]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    database = tmp_path / "panicd.sqlite3"
    incident = await open_incident(database, KODE_LADDER, at=T0)
    clock, channel = Clock(T0 + 1), RecordingChannel()
    async with SqliteDispatchStore(database) as store:
        engine = dispatcher(store, channel, clock)
        await engine.plan_missing()
        await engine.fire_due()
        await engine.send_due()
        rows = outbox(database, incident)
        assert {(r.person_id, r.channel): r.id for r in rows} == {
            ("ani", "sms"): ROWS["sms"], ("budi", "sms"): ROWS["sms_budi"],
            ("ani", "voice"): ROWS["voice"], ("budi", "voice"): ROWS["voice_budi"],
        }
        app = public_app(engine, store, WebSettings(PUBLIC_URL, AUTH_TOKEN, ACK_SECRET, clock))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            assert server.port is not None
            yield Site("127.0.0.1", server.port, database,
                       {r.id: str(r.provider_sid) for r in rows})
        finally:
            await server.close()


async def exchange(site: Site, request: bytes) -> int | None:
    """Send raw bytes, return the response's status code (None if there was none)."""
    reader, writer = await asyncio.open_connection(site.host, site.port)
    try:
        # A request refused before its body was read may reset the rest of the write;
        # the answer is still in the socket.
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
    except ConnectionError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    parts = status_line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


NAMES = st.sampled_from(
    ["Digits", "CallSid", "MessageSid", "CallStatus", "MessageStatus", "AnsweredBy",
     "ErrorCode", "AccountSid", ""]
) | st.text(max_size=12)
VALUES = st.sampled_from(
    ["1", "2", "", "completed", "delivered", "failed", "ringing", "human", "machine_start",
     "30003", "9" * 40]
) | st.text(max_size=30)


@st.composite
def requests(draw: st.DrawFn, sids: dict[int, str]) -> tuple[bytes, dict[str, object]]:
    """One request as raw bytes, and what the oracle needs to know about it.

    ``<sid>`` among the drawn values stands for the addressed row's own SID (the one
    value a signed press must name), so genuine requests are drawn too.
    """
    # Half the requests are shaped as Twilio's (signed forms to real rows) so that they
    # reach the handlers; the other half are anything at all.
    shaped = draw(st.booleans())
    kind = draw(st.sampled_from(["gather", "voice", "status/sms", "status/call"]
                                + ([] if shaped else ["ack", "odd"])))
    own = [ROWS["sms"], ROWS["sms_budi"]] if kind == "status/sms" else [
        ROWS["voice"], ROWS["voice_budi"]]
    row = draw(st.sampled_from(own if shaped else [*ROWS.values(), 0, 99, 10**30]))
    match kind:
        case "ack":
            path = "/a/" + quote(draw(st.text(max_size=60)), safe="")
        case "odd":
            path = draw(st.sampled_from([
                "/twilio/gather/\u0661", "/twilio/gather/1_0", "/twilio/gather/-1",
                "/twilio/", "/twilio/voice/3/../1", "/twilio/gather/3?repeat=1&repeat=0",
                "/", "/ops/incidents/1/ack", "/twilio/gather/%33", "/a/",
            ]))
        case _:
            path = f"/twilio/{kind}/{row}" + draw(st.sampled_from(["", "", "?repeat=1"]))
    # Twilio-like parameters, then random extra ones, then (sometimes) a name repeated.
    twilio_like = draw(st.fixed_dictionaries({}, optional={
        "CallSid": st.just("<sid>") | VALUES, "MessageSid": st.just("<sid>") | VALUES,
        "Digits": st.sampled_from(["1", "2", "*"]),
        "CallStatus": st.sampled_from(["initiated", "ringing", "in-progress", "completed",
                                       "busy", "no-answer", "canceled", "failed"]),
        "MessageStatus": st.sampled_from(["queued", "sent", "delivered", "undelivered"]),
        "AnsweredBy": st.sampled_from(["human", "machine_start", "fax"]),
        "ErrorCode": st.sampled_from(["30003", "", "x"]),
    }))
    extra_pairs = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6,
                                unique_by=lambda pair: pair[0]))
    pairs = list(twilio_like.items()) + [p for p in extra_pairs if p[0] not in twilio_like]
    if pairs and draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from([n for n, _ in pairs]))
        pairs.insert(draw(st.integers(0, len(pairs))), (name, draw(VALUES)))
    body_kind = "form" if shaped else draw(st.sampled_from(["form", "bytes", "huge"]))
    if body_kind == "bytes":
        body = draw(st.binary(max_size=512))
    elif body_kind == "huge":
        body = b"Digits=" + b"1" * (70 * 1024)  # past client_max_size (64 KiB)
    else:
        pairs = [(n, sids.get(row, "") if v == "<sid>" else v) for n, v in pairs]
        body = urlencode(pairs).encode()
    content_type = FORM if shaped else draw(st.sampled_from([
        FORM, FORM, FORM + "; charset=UTF-8", FORM + "; charset=latin-1", "application/json",
        "multipart/form-data; boundary=x", "text/plain", None,
    ]))
    signature_kind = "valid" if shaped else draw(
        st.sampled_from(["valid", "none", "junk", "other_url"]))
    method = "POST" if shaped else draw(st.sampled_from(["POST", "GET", "PUT"]))
    headers: list[tuple[str, str]] = [("Host", "127.0.0.1")]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    signed = dict(pairs)  # last value wins: a splice signs one copy and repeats the name
    if signature_kind == "valid":
        headers.append(("X-Twilio-Signature",
                        RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, signed)))
    elif signature_kind == "other_url":
        headers.append(("X-Twilio-Signature", RequestValidator(AUTH_TOKEN).compute_signature(
            PUBLIC_URL + "/twilio/gather/4", signed)))
    elif signature_kind == "junk":
        headers.append(("X-Twilio-Signature", draw(st.text(
            st.characters(min_codepoint=33, max_codepoint=126), max_size=40))))
    extra = "" if shaped else draw(
        st.sampled_from(["", "huge_header", "many_headers", "origin"]))
    if extra == "huge_header":
        headers.append(("X-Filler", "x" * 9000))  # past aiohttp's 8190-byte field limit
    elif extra == "many_headers":
        headers += [(f"X-H{i}", "y") for i in range(150)]
    elif extra == "origin":
        headers += [("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")]
    headers += [("Content-Length", str(len(body))), ("Connection", "close")]
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = head.encode("utf-8") + b"\r\n" + body
    facts: dict[str, object] = {
        "path": path,
        "twilio": path.startswith("/twilio/"),
        "signed": signature_kind == "valid",
        "repeated": body_kind == "form" and len({n for n, _ in pairs}) < len(pairs),
        "form_ok": body_kind == "form" and content_type in (FORM, FORM + "; charset=UTF-8"),
        "huge_header": extra == "huge_header",
        "press": dict(pairs).get("Digits") == "1",
        "post": method == "POST",
    }
    return raw, facts


def acks(database: Path) -> int:
    return int(str(query(database, "SELECT COUNT(*) FROM acks")[0][0]))


# 300 examples take about 3 s here; deadline=None because a shared 2-core machine stalls.
@settings(max_examples=300, deadline=None,
          # One site for every example, on purpose: the invariants hold across the whole
          # sequence (no ack may slip in at any step), and a site per example costs 100 ms.
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_no_request_gets_a_5xx_or_acks_without_a_genuine_signed_press(
    site: Site, data: st.DataObject
) -> None:
    raw, facts = data.draw(requests(site.sids))
    before = acks(site.database)
    status = await exchange(site, raw)
    assert status is not None, raw[:200]
    event(f"{'signed ' if facts['signed'] else ''}{status}")  # --hypothesis-show-statistics
    assert status < 500, raw[:300]
    if facts["twilio"] and not facts["signed"]:
        assert 400 <= status < 500, raw[:300]
    if (facts["twilio"] and facts["signed"] and facts["repeated"] and facts["form_ok"]
            and not facts["huge_header"]):
        assert status == 400, raw[:300]  # a repeated name never reaches a handler
    if acks(site.database) > before:
        # Only a POST signed over every parameter, none repeated, pressing 1, acks.
        assert facts["signed"] and facts["form_ok"] and not facts["repeated"], raw[:300]
        assert facts["post"] and facts["press"], raw[:300]
        assert str(facts["path"]).startswith("/twilio/gather/"), raw[:300]


async def test_the_splice_of_issue_11_over_a_real_socket_is_refused(site: Site) -> None:
    # The exact attack, as a fixed case beside the random ones.
    path = f"/twilio/gather/{ROWS['voice']}"
    signed = {"CallSid": site.sids[ROWS["voice"]], "Digits": "2"}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, signed)
    body = b"Digits=1&" + urlencode(signed).encode()
    raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM}\r\n"
           f"X-Twilio-Signature: {signature}\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n\r\n").encode() + body
    assert await exchange(site, raw) == 400
    assert acks(site.database) == 0


# -- coverage-guided: atheris on the parsers (tests/fuzz_webhooks.py) -------------------

ATHERIS_SECONDS = 5


def test_atheris_finds_no_crash_in_the_webhook_and_ack_link_parsers(tmp_path: Path) -> None:
    try:
        importlib.import_module("atheris")
    except ImportError as exc:
        pytest.skip(f"COVERAGE-GUIDED FUZZING NOT RUN: atheris is not installed ({exc});"
                    " `make test` installs it from the dev extras")
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_webhooks", "-runs=2000000",
         f"-max_total_time={ATHERIS_SECONDS}", f"-artifact_prefix={tmp_path}/",
         str(tmp_path / "corpus")],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=120, check=False,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("crash-"))
    assert (result.returncode, crashes) == (0, []), result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None, result.stderr[-2000:]
    assert int(done[1]) > 10_000, f"only {done[1]} inputs ran"
