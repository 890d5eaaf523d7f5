"""Who may ack: Twilio webhook signatures and the signed ack link in the SMS (pure helpers).

DESIGN §2: webhooks from Twilio are accepted only with a valid ``X-Twilio-Signature``;
an SMS carries a short signed link that opens panicd's confirm page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"

_TOKEN_DOMAIN = b"panicd-ack-v1\x00"
_FIELD_SEP = "\x1f"
# 96 bits of HMAC-SHA256: forging needs ~2**95 online guesses before the short expiry,
# and the whole token stays short enough for the link to fit a 160-character SMS.
_MAC_BYTES = 12


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
