"""Who may ack: Twilio webhook signatures and the signed ack link in the SMS (pure helpers).

DESIGN §2: webhooks from Twilio are accepted only with a valid ``X-Twilio-Signature``;
an SMS carries a short signed link that opens panicd's confirm page. Also here: the one
parser of a webhook's form (so that what is verified is exactly what is used) and the
origin rule for the confirm page's POST.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"

_TOKEN_DOMAIN = b"panicd-ack-v1\x00"
_FIELD_SEP = "\x1f"
# 96 bits of HMAC-SHA256: forging needs ~2**95 online guesses before the short expiry,
# and the whole token stays short enough for the link to fit a 160-character SMS.
_MAC_BYTES = 12
# Twilio's voice webhooks carry about 40 parameters, its status callbacks fewer.
MAX_FORM_FIELDS = 200


def validate_twilio_signature(
    auth_token: str, url: str, params: Mapping[str, str], signature: str | None
) -> bool:
    """Return whether ``signature`` is Twilio's signature of ``url`` + form ``params``.

    ``url`` must be the public URL Twilio requested (scheme, host, path and query as
    configured in the callback), not the address panicd sees behind a proxy.
    """
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


class FormError(ValueError):
    """A webhook body refused unread; ``reason`` is not_utf8, too_many_fields or repeated."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"webhook form refused: {reason}")
        self.reason = reason


def parse_twilio_form(body: bytes) -> dict[str, str]:
    """Return the parameters of an ``application/x-www-form-urlencoded`` webhook body.

    One value per name, or FormError: Twilio never repeats a parameter on its voice and
    status webhooks, and a repeated one is how a forged value rides on a genuine
    signature (``Digits=1&`` + a body signed with ``Digits=2``: a check that reads one copy
    and a handler that reads the other disagree). The body and its percent-escapes must be
    UTF-8, as Twilio sends them. The signature is then checked over exactly this dict, and
    handlers read only this dict.
    """
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except UnicodeDecodeError:  # before ValueError: it is one
        raise FormError("not_utf8") from None
    except ValueError:
        raise FormError("too_many_fields") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise FormError("repeated")
        form[name] = value
    return form


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) origin or base URL, None if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        return None
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def cross_origin_refusal(
    public_base_url: str, origin: str | None, fetch_site: str | None
) -> str | None:
    """Why a browser POST to the confirm page is refused as cross-origin, or None.

    ``Sec-Fetch-Site`` (every current browser, over HTTPS) is decided first: only
    ``same-origin`` (our own form) or ``none`` (the user's own action) pass. An ``Origin``
    must be panicd's public origin, except the literal ``null``: the page is served with
    ``Referrer-Policy: no-referrer``, and under that policy the Fetch standard has a
    browser send ``Origin: null`` for a same-origin form POST. No Origin at all is what an
    old feature-phone browser sends, and it must still ack. Neither header proves
    anything against a client that is not a browser; the token in the URL is the
    capability, and this check only keeps another site from using a responder's browser.
    """
    if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
        return "sec_fetch_site"
    if origin is not None and origin.strip() != "null":
        own = _origin_of(public_base_url)
        if own is None or _origin_of(origin.strip()) != own:
            return "origin"
    return None


@dataclass(frozen=True, slots=True)
class AckClaim:
    """What a valid ack link proves: this responder may ack this incident until expiry."""

    incident_id: str
    responder_id: str
    expires_at: int


class AckTokenError(ValueError):
    """An ack token was rejected; ``reason`` is malformed, bad_signature or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"ack token rejected: {reason}")
        self.reason = reason


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, _TOKEN_DOMAIN + payload, hashlib.sha256).digest()[:_MAC_BYTES]


def make_ack_token(secret: bytes, incident_id: str, responder_id: str, expires_at: int) -> str:
    """Return a compact base64url token binding incident, responder and expiry (Unix s)."""
    if not secret:
        raise ValueError("ack secret must not be empty")
    for name, value in (("incident_id", incident_id), ("responder_id", responder_id)):
        if not value or _FIELD_SEP in value:
            raise ValueError(f"{name} must be non-empty and free of \\x1f")
    if expires_at < 0:
        raise ValueError("expires_at must be a Unix time")
    payload = _FIELD_SEP.join((incident_id, responder_id, format(expires_at, "x"))).encode()
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def verify_ack_token(secret: bytes, token: str, now: float) -> AckClaim:
    """Return the claim a token carries, or raise AckTokenError if bad, tampered or expired."""
    body, dot, tag = token.partition(".")
    if not dot or not body or not tag:
        raise AckTokenError("malformed")
    try:
        payload = _unb64(body)
        mac = _unb64(tag)
    except (binascii.Error, ValueError):
        raise AckTokenError("malformed") from None
    if _b64(payload) != body or _b64(mac) != tag:
        # Non-canonical base64 (stray padding bits): one claim, one spelling.
        raise AckTokenError("malformed")
    # Check the MAC before parsing anything else, so a forger learns nothing from errors.
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        raise AckTokenError("bad_signature")
    try:
        incident_id, responder_id, expires_hex = payload.decode("utf-8").split(_FIELD_SEP)
        expires_at = int(expires_hex, 16)
    except ValueError:
        raise AckTokenError("malformed") from None
    if now >= expires_at:
        raise AckTokenError("expired")
    return AckClaim(incident_id, responder_id, expires_at)
