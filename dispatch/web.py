"""panicd's web server: Twilio webhooks, the ack-link page, and the operator control API.

Public routes (behind the configured ``public_base_url``):

* ``POST /twilio/voice/{outbox}`` — the call script (TwiML, ``<Say language="id-ID">``
  inside a one-digit ``<Gather>``); a call answered by a machine hangs up, never an ack.
* ``POST /twilio/gather/{outbox}`` — the key press: 1 = "saya tangani" (ack), 2 = repeat.
* ``POST /twilio/status/sms/{outbox}`` / ``/twilio/status/call/{outbox}`` — delivery
  status callbacks into the outbox.
* ``GET /a/{token}`` shows the incident with one "Saya tangani" button; ``POST`` acks.

What each boundary checks:

* Every ``/twilio/`` request (middleware ``twilio_signature``): an ``X-Twilio-Signature``
  (403 without), a ``application/x-www-form-urlencoded`` UTF-8 body (415 otherwise) of
  at most 64 KiB (413) that parses to one value per name (400 for a repeated name, bad
  UTF-8 or over 200 fields), and a valid signature over the public URL and exactly those
  parameters (403). Handlers read only that verified dict, never the raw body.
* The row: ``{outbox}`` is 1-18 ASCII digits naming a row of the route's channel (404).
  A status callback's MessageSid/CallSid, and a voice or gather webhook's CallSid, must
  be the SID recorded on the row (409, ``webhook.sid_mismatch``), so a captured request
  cannot be aimed at another row; a status callback that beats the recording of its
  send binds its SID to the row, unless another row holds it.
* Replays (Twilio's scheme has no nonce): a status callback is applied once and forward
  only, a final state is never undone (``DispatchStore.record_status_callback``); an ack
  by someone already recorded changes nothing and tells them they are recorded
  (``Responses.ack``).
* ``/a/{token}``: the token's HMAC and expiry (403); a POST from another site's page is
  refused (403, ``ack_link.cross_origin``) by ``Sec-Fetch-Site`` and ``Origin``, while a
  POST with neither header (an old feature-phone browser) or ``Origin: null`` (our own
  form under ``Referrer-Policy: no-referrer``) still acks — see ``cross_origin_refusal``.
* Every public response: ``Cache-Control: no-store``, ``X-Frame-Options: DENY``, a CSP of
  ``default-src 'none'`` with ``frame-ancestors 'none'``, ``Referrer-Policy: no-referrer``
  and ``X-Content-Type-Options: nosniff``.

The control API (``/ops/…``) is served only on a Unix socket whose file permissions are
the access control.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import structlog
from aiohttp import web

from dispatch.channel import CALL_STATES, SMS_STATES
from dispatch.engine import Dispatcher
from dispatch.messages import (
    build_alert_twiml,
    build_digit_reply_twiml,
    build_machine_hangup_twiml,
    build_voice_message,
)
from dispatch.webhook_auth import (
    SIGNATURE_HEADER,
    AckTokenError,
    FormError,
    cross_origin_refusal,
    parse_twilio_form,
    validate_twilio_signature,
    verify_ack_token,
)
from gateway.locate import map_link
from gateway.model import GeoFix
from store.dispatch import DispatchStore, OutboxRow

log = structlog.get_logger("panicd.web")

# Twilio's AnsweredBy values for answering machines and fax (AMD, MachineDetection=Enable).
MACHINE_ANSWERS = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebSettings:
    """The public URL, the Twilio auth token (None: webhooks refused) and the ack secret."""

    def __init__(
        self,
        public_base_url: str,
        twilio_auth_token: str | None,
        ack_secret: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_base_url = public_base_url.rstrip("/")
        self.twilio_auth_token = twilio_auth_token
        self.ack_secret = ack_secret
        self.clock = clock


DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher", Dispatcher)
STORE: web.AppKey[DispatchStore] = web.AppKey("store", DispatchStore)
SETTINGS: web.AppKey[WebSettings] = web.AppKey("settings", WebSettings)


def _twiml(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/xml")


TWILIO_FORM: web.RequestKey[dict[str, str]] = web.RequestKey("twilio_form", dict)
FORM_TYPE = "application/x-www-form-urlencoded"


def _refuse_webhook(request: web.Request, status: type[web.HTTPError], reason: str,
                    **fields: object) -> NoReturn:
    log.warning("webhook.refused", path=request.path, reason=reason, remote=request.remote,
                **fields)
    raise status(text=f"refused: {reason}")


@web.middleware
async def twilio_signature(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit a /twilio/ request only as a form whose every parameter Twilio signed.

    The body is parsed once, here (one value per name, see ``parse_twilio_form``), the
    signature is checked over exactly that dict, and the dict is what handlers read
    (``request[TWILIO_FORM]``): nothing a handler uses is unsigned. 403 without a valid
    signature, 415 for anything but a UTF-8 form, 400 for a malformed or repeated one.
    """
    if not request.path.startswith("/twilio/"):
        return await handler(request)
    settings = request.app[SETTINGS]
    token = settings.twilio_auth_token
    signature = request.headers.get(SIGNATURE_HEADER)
    if token is None or not signature:
        log.warning("webhook.bad_signature", path=request.path, signed=signature is not None,
                    remote=request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    # Twilio posts its voice and status webhooks as forms; a JSON webhook (bodySHA256 in
    # the URL) is another product's and is not accepted here.
    if request.content_type != FORM_TYPE or (request.charset or "utf-8").lower() != "utf-8":
        _refuse_webhook(request, web.HTTPUnsupportedMediaType, "content_type",
                        content_type=request.headers.get("Content-Type"))
    body = await request.read()  # bounded by client_max_size: 413 beyond it
    try:
        form = parse_twilio_form(body)
    except FormError as exc:
        _refuse_webhook(request, web.HTTPBadRequest, exc.reason)
    url = settings.public_base_url + request.path_qs
    if not validate_twilio_signature(token, url, form, signature):
        log.warning("webhook.bad_signature", path=request.path, signed=True,
                    remote=request.remote)
        raise web.HTTPForbidden(text="invalid Twilio signature")
    request[TWILIO_FORM] = form
    return await handler(request)


def _form(request: web.Request) -> dict[str, str]:
    """The verified webhook parameters (the middleware's); never ``request.post()``."""
    try:
        return request[TWILIO_FORM]
    except KeyError:  # a route outside /twilio/ or the middleware: fail closed
        raise web.HTTPForbidden(text="invalid Twilio signature") from None


async def _outbox(request: web.Request, channel: str) -> OutboxRow:
    outbox_id = int(request.match_info["outbox"])  # the route admits 1-18 ASCII digits
    row = await request.app[STORE].outbox_row(outbox_id)
    if row is None or row.channel != channel:
        raise web.HTTPNotFound
    return row


def _call_row_matches(request: web.Request, row: OutboxRow) -> None:
    """Refuse a call webhook whose CallSid is not the call recorded on the row (409).

    A row with no SID yet is admitted: Twilio may fetch the script before the answer to
    create_async is recorded. (A row placed twice — its first answer lost to a crash or a
    stalled request — keeps the later SID, and the earlier call's webhooks are refused.)
    """
    sid = _form(request).get("CallSid", "")
    if row.provider_sid is not None and sid != row.provider_sid:
        _sid_mismatch(request, row, sid)


async def voice(request: web.Request) -> web.Response:
    """The call script, or a hang-up for voicemail and closed incidents."""
    row = await _outbox(request, "voice")
    _call_row_matches(request, row)
    form = _form(request)
    base = request.app[SETTINGS].public_base_url
    answered_by = form.get("AnsweredBy", "")
    if answered_by in MACHINE_ANSWERS:
        log.info(
            "call.machine_answered",
            incident=row.incident_id,
            person=row.person_id,
            answered_by=answered_by,
        )
        return _twiml(build_machine_hangup_twiml())
    if row.incident_id is None:
        raise web.HTTPNotFound  # operations messages are SMS only
    incident = await request.app[STORE].incident(row.incident_id)
    if incident is None or incident.status != "open":
        # Acknowledged, cancelled or resolved: no Gather, and never "you are recorded as
        # handling it" to someone who pressed nothing.
        return _twiml(build_digit_reply_twiml(digit="1", repeat_url="", handled=False))
    repeat = request.query.get("repeat") == "1"
    message = build_voice_message(
        incident_code=str(incident.id),
        kelurahan=incident.kelurahan or "di luar Kota Madiun",
        place=", ".join(p for p in (incident.landmark, incident.address) if p) or "-",
        test=incident.test,
    )
    return _twiml(
        build_alert_twiml(
            message=message,
            action_url=f"{base}/twilio/gather/{row.id}",
            repeat_url=None if repeat else f"{base}/twilio/voice/{row.id}?repeat=1",
        )
    )


async def gather(request: web.Request) -> web.Response:
    """A key press in the call: 1 acks (if the incident is still open), else repeat."""
    row = await _outbox(request, "voice")
    _call_row_matches(request, row)
    digit = _form(request).get("Digits", "")
    base = request.app[SETTINGS].public_base_url
    if digit != "1":
        return _twiml(
            build_digit_reply_twiml(
                digit=digit, repeat_url=f"{base}/twilio/voice/{row.id}?repeat=1", handled=False
            )
        )
    if row.incident_id is None:
        raise web.HTTPNotFound
    result = await request.app[DISPATCHER].ack(
        row.incident_id, person_id=row.person_id, actor=row.person_id, via="voice"
    )
    # A second press by the same person (or a replayed request) is "you are recorded".
    handled = result.first or result.repeated
    return _twiml(build_digit_reply_twiml(digit="1", repeat_url="", handled=handled))


async def sms_status(request: web.Request) -> web.Response:
    """Twilio's MessageStatus callback."""
    return await _status(request, "MessageStatus", "MessageSid", SMS_STATES, "sms")


async def call_status(request: web.Request) -> web.Response:
    """Twilio's CallStatus callback."""
    return await _status(request, "CallStatus", "CallSid", CALL_STATES, "call")


async def _status(
    request: web.Request,
    field: str,
    sid_field: str,
    states: dict[str, tuple[str, int]],
    kind: str,
) -> web.Response:
    row = await _outbox(request, "sms" if kind == "sms" else "voice")
    form = _form(request)
    provider = form.get(field, "")
    known = states.get(provider)
    if known is None:
        return web.Response(status=204)
    state, rank = known
    sid = form.get(sid_field, "")
    code_text = form.get("ErrorCode", "") or None
    error_code = int(code_text) if code_text and code_text.isdigit() else None
    settings = request.app[SETTINGS]
    event = "sms.status" if kind == "sms" else "call.status"
    outcome = await request.app[STORE].record_status_callback(
        row.id,
        sid=sid,
        state=state,
        rank=rank,
        now=settings.clock(),
        error_code=error_code,
        event=event,
        detail={"to": row.person_id, "provider_status": provider, "error_code": error_code},
    )
    if outcome == "unknown":
        raise web.HTTPNotFound
    if outcome == "sid_mismatch":
        _sid_mismatch(request, row, sid)
    log.info(
        event,
        incident=row.incident_id,
        person=row.person_id,
        status=provider,
        error_code=error_code,
        sid=sid,
        replayed=outcome == "replayed",
    )
    return web.Response(status=204)


def _sid_mismatch(request: web.Request, row: OutboxRow, sid: str) -> NoReturn:
    """Refuse a signed webhook about another message than this outbox row's (409)."""
    log.warning(
        "webhook.sid_mismatch",
        path=request.path,
        outbox=row.id,
        sid=sid or None,
        recorded=row.provider_sid,
        remote=request.remote,
    )
    raise web.HTTPConflict(text="not this message's SID")


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:30em}"
    "button{font-size:1.6em;padding:.6em 1.2em;background:#c00;color:#fff;border:0;"
    "border-radius:.3em}"
)
_PAGE = """<!doctype html>
<html lang="id"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kejadian #{code}</title>
<style>{style}</style></head><body>
<h1>{title}</h1>
<p><b>Kelurahan:</b> {kelurahan} ({kecamatan})<br><b>Lokasi:</b> {place}<br>
<b>Status:</b> {status}</p>
{map}
{action}
</body></html>"""
# The page loads nothing, runs nothing, and may be framed by nobody: its one inline style
# is allowed by hash (CSP 2+; 'unsafe-inline' is then ignored, and only a CSP 1 browser
# falls back to it), its one form posts to itself.
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'unsafe-inline' 'sha256-{_STYLE_HASH}';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# On every public response (the page, webhook answers, errors). The ack link's token is
# in the URL: never cached on a shared phone or proxy, never sent on as a Referer.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value


async def _claim(request: web.Request) -> tuple[Any, Any]:
    settings = request.app[SETTINGS]
    try:
        claim = verify_ack_token(settings.ack_secret, request.match_info["token"], settings.clock())
    except AckTokenError as exc:
        log.warning("ack_link.rejected", reason=exc.reason, remote=request.remote)
        raise web.HTTPForbidden(text="Tautan tidak berlaku atau sudah kedaluwarsa.") from None
    incident = await request.app[STORE].incident(int(claim.incident_id))
    if incident is None:
        raise web.HTTPNotFound
    return claim, incident


def _page(incident: Any, token: str, message: str | None) -> web.Response:
    place = ", ".join(p for p in (incident.landmark, incident.address) if p) or "-"
    map_html = ""
    if incident.lat is not None and incident.lon is not None:
        link = map_link(GeoFix(incident.lat, incident.lon))
        map_html = f'<p><a href="{html.escape(link)}">Buka peta</a></p>'
    if message is not None:
        action = f"<p><b>{html.escape(message)}</b></p>"
    elif incident.status == "open":
        action = (
            f'<form method="post" action="/a/{html.escape(token)}">'
            '<button type="submit">Saya tangani</button></form>'
        )
    else:
        action = "<p>Kejadian ini sudah ditangani atau ditutup.</p>"
    title = ("TES " if incident.test else "") + f"Kejadian darurat #{incident.id}"
    return web.Response(
        content_type="text/html",
        text=_PAGE.format(
            style=_STYLE,
            code=incident.id,
            title=html.escape(title),
            kelurahan=html.escape(incident.kelurahan or "-"),
            kecamatan=html.escape(incident.kecamatan or "-"),
            place=html.escape(place),
            status=html.escape(incident.status),
            map=map_html,
            action=action,
        ),
    )


async def ack_page(request: web.Request) -> web.Response:
    """GET shows the incident with one "Saya tangani" button (no state change)."""
    _, incident = await _claim(request)
    return _page(incident, request.match_info["token"], None)


async def ack_submit(request: web.Request) -> web.Response:
    """POST acks as the responder the token was issued to (from panicd's own page only)."""
    refusal = cross_origin_refusal(
        request.app[SETTINGS].public_base_url,
        request.headers.get("Origin"),
        request.headers.get("Sec-Fetch-Site"),
    )
    if refusal is not None:
        log.warning("ack_link.cross_origin", reason=refusal, origin=request.headers.get("Origin"),
                    fetch_site=request.headers.get("Sec-Fetch-Site"), remote=request.remote)
        raise web.HTTPForbidden(text="Permintaan dari situs lain ditolak.")
    claim, incident = await _claim(request)
    result = await request.app[DISPATCHER].ack(
        incident.id, person_id=claim.responder_id, actor=claim.responder_id, via="link"
    )
    incident = await request.app[STORE].incident(incident.id)
    message = (
        "Terima kasih, Anda tercatat menangani kejadian ini."
        if result.first or result.repeated
        else "Tercatat. Kejadian ini sudah ditangani petugas lain."
        if result.accepted
        else "Kejadian ini sudah ditutup."
    )
    return _page(incident, request.match_info["token"], message)


def public_app(
    dispatcher: Dispatcher, store: DispatchStore, settings: WebSettings
) -> web.Application:
    """The public web application (webhooks and the ack page)."""
    app = web.Application(middlewares=[twilio_signature], client_max_size=64 * 1024)
    app[DISPATCHER] = dispatcher
    app[STORE] = store
    app[SETTINGS] = settings
    app.on_response_prepare.append(_security_headers)
    # ASCII digits only, and few enough for SQLite's 64-bit INTEGER (int() would also
    # take "١٢" or "1_2", and a 20-digit id overflows the binding).
    outbox = "{outbox:[0-9]{1,18}}"
    app.router.add_post(f"/twilio/voice/{outbox}", voice)
    app.router.add_post(f"/twilio/gather/{outbox}", gather)
    app.router.add_post(f"/twilio/status/sms/{outbox}", sms_status)
    app.router.add_post(f"/twilio/status/call/{outbox}", call_status)
    app.router.add_get("/a/{token}", ack_page)
    app.router.add_post("/a/{token}", ack_submit)
    return app


async def ops_ack(request: web.Request) -> web.Response:
    """Operator ack (``panicctl ack ID --by NAME``)."""
    body = await request.json()
    dispatcher = request.app[DISPATCHER]
    by = str(body.get("by", "")).strip()
    if not by:
        raise web.HTTPBadRequest(text="'by' is required")
    person = by if dispatcher.person_name(by) else None
    result = await dispatcher.ack(
        int(request.match_info["id"]), person_id=person, actor=by, via="cli"
    )
    status = 404 if result.status == "unknown" else 200
    return web.json_response(
        {
            "incident": result.incident_id,
            "status": result.status,
            "first": result.first,
            "accepted": result.accepted,
            "repeated": result.repeated,
        },
        status=status,
    )


async def ops_resolve(request: web.Request) -> web.Response:
    """Operator resolve (``panicctl resolve ID --note TEXT``)."""
    body = await request.json()
    incident_id = int(request.match_info["id"])
    store = request.app[STORE]
    if await store.incident(incident_id) is None:
        raise web.HTTPNotFound(text=f"no incident {incident_id}")
    closed = await request.app[DISPATCHER].close(
        incident_id,
        reason="resolved",
        actor=str(body.get("by", "operator")),
        note=str(body.get("note", "")),
    )
    incident = await store.incident(incident_id)
    assert incident is not None
    return web.json_response(
        {"incident": incident_id, "status": incident.status, "changed": closed}
    )


def control_app(dispatcher: Dispatcher, store: DispatchStore) -> web.Application:
    """The operator control API (served on a Unix socket only)."""
    app = web.Application(client_max_size=64 * 1024)
    app[DISPATCHER] = dispatcher
    app[STORE] = store
    app.router.add_post("/ops/incidents/{id:\\d+}/ack", ops_ack)
    app.router.add_post("/ops/incidents/{id:\\d+}/resolve", ops_resolve)
    return app
