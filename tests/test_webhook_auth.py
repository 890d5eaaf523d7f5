"""Twilio webhook signatures and signed ack links accept the genuine and reject everything else."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from dispatch.webhook_auth import (
    MAX_FORM_FIELDS,
    AckClaim,
    AckTokenError,
    FormError,
    cross_origin_refusal,
    make_ack_token,
    parse_twilio_form,
    validate_twilio_signature,
    verify_ack_token,
)

AUTH_TOKEN = "12345678901234567890123456789012"
URL = "https://siaga.madiunkota.go.id/twilio/voice/gather?incident=4711"
PARAMS = {"CallSid": "CA" + "0" * 32, "Digits": "1", "AnsweredBy": "human"}
SECRET = b"ack-secret-for-tests-only-32-byt"
NOW = 1_795_839_240


def twilio_signature(url: str, params: dict[str, str]) -> str:
    """Sign as Twilio does, playing Twilio the way the tests must (Prism sends no webhooks)."""
    return str(RequestValidator(AUTH_TOKEN).compute_signature(url, params))


def test_genuine_twilio_signature_is_accepted() -> None:
    assert validate_twilio_signature(AUTH_TOKEN, URL, PARAMS, twilio_signature(URL, PARAMS))


def test_tampered_params_are_rejected() -> None:
    signature = twilio_signature(URL, PARAMS)
    assert not validate_twilio_signature(AUTH_TOKEN, URL, {**PARAMS, "Digits": "2"}, signature)


def test_signature_for_another_url_is_rejected() -> None:
    signature = twilio_signature(URL, PARAMS)
    other = URL.replace("4711", "4712")
    assert not validate_twilio_signature(AUTH_TOKEN, other, PARAMS, signature)


def test_signature_with_another_token_is_rejected() -> None:
    signature = twilio_signature(URL, PARAMS)
    assert not validate_twilio_signature("0" * 32, URL, PARAMS, signature)


@pytest.mark.parametrize("signature", [None, ""])
def test_unsigned_request_is_rejected(signature: str | None) -> None:
    assert not validate_twilio_signature(AUTH_TOKEN, URL, PARAMS, signature)


def test_ack_token_round_trip() -> None:
    token = make_ack_token(SECRET, "4711", "r-17", NOW + 900)
    assert verify_ack_token(SECRET, token, NOW) == AckClaim("4711", "r-17", NOW + 900)


def test_ack_token_is_short_and_url_safe() -> None:
    token = make_ack_token(SECRET, "4711", "r-17", NOW + 900)
    assert len(token) <= 48
    assert all(c.isalnum() or c in "-_." for c in token)


def test_expired_ack_token_is_rejected() -> None:
    token = make_ack_token(SECRET, "4711", "r-17", NOW)
    with pytest.raises(AckTokenError) as excinfo:
        verify_ack_token(SECRET, token, NOW)
    assert excinfo.value.reason == "expired"


def test_ack_token_signed_with_another_secret_is_rejected() -> None:
    token = make_ack_token(b"another-secret", "4711", "r-17", NOW + 900)
    with pytest.raises(AckTokenError, match="bad_signature"):
        verify_ack_token(SECRET, token, NOW)


def test_ack_token_for_another_responder_cannot_be_forged_by_swapping_payloads() -> None:
    mine = make_ack_token(SECRET, "4711", "r-17", NOW + 900)
    theirs = make_ack_token(SECRET, "4711", "r-99", NOW + 900)
    forged = theirs.split(".")[0] + "." + mine.split(".")[1]
    with pytest.raises(AckTokenError, match="bad_signature"):
        verify_ack_token(SECRET, forged, NOW)


@pytest.mark.parametrize("token", ["", "abc", ".", "abc.", ".abc", "!!!.###", "a.b.c"])
def test_malformed_ack_tokens_are_rejected(token: str) -> None:
    with pytest.raises(AckTokenError):
        verify_ack_token(SECRET, token, NOW)


ids = st.text(min_size=1, max_size=40).filter(lambda s: "\x1f" not in s)


@given(incident=ids, responder=ids, ttl=st.integers(1, 10**6), skew=st.integers(0, 10**6))
def test_round_trip_holds_until_expiry_for_any_ids(
    incident: str, responder: str, ttl: int, skew: int
) -> None:
    token = make_ack_token(SECRET, incident, responder, NOW + ttl)
    if skew < ttl:
        assert verify_ack_token(SECRET, token, NOW + skew) == AckClaim(
            incident, responder, NOW + ttl
        )
    else:
        with pytest.raises(AckTokenError, match="expired"):
            verify_ack_token(SECRET, token, NOW + skew)


@given(data=st.data())
def test_any_single_character_change_is_rejected(data: st.DataObject) -> None:
    token = make_ack_token(SECRET, "4711", "r-17", NOW + 900)
    index = data.draw(st.integers(0, len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    replacement = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[index]))
    tampered = token[:index] + replacement + token[index + 1 :]
    with pytest.raises(AckTokenError):
        verify_ack_token(SECRET, tampered, NOW)


# -- the webhook form: one value per name, or refused ------------------------------------

names = st.text(min_size=1, max_size=20)
values = st.text(max_size=40)


@given(form=st.dictionaries(names, values, max_size=30))
def test_a_form_parses_back_to_exactly_the_parameters_sent(form: dict[str, str]) -> None:
    assert parse_twilio_form(urlencode(form).encode()) == form


@given(form=st.dictionaries(names, values, min_size=1, max_size=10), data=st.data())
def test_a_repeated_name_is_refused_whatever_its_values(
    form: dict[str, str], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(form)))
    extra = urlencode({name: data.draw(values)})
    for body in (f"{urlencode(form)}&{extra}", f"{extra}&{urlencode(form)}"):
        with pytest.raises(FormError, match="repeated"):
            parse_twilio_form(body.encode())


def test_the_digits_splice_of_issue_11_is_refused() -> None:
    with pytest.raises(FormError, match="repeated"):
        parse_twilio_form(b"Digits=1&CallSid=CA" + b"0" * 32 + b"&Digits=2")
    with pytest.raises(FormError, match="repeated"):
        parse_twilio_form(b"Digit%73=1&Digits=2")  # the same name once decoded


@pytest.mark.parametrize("body", [b"Digits=%FF", b"Digits=\xff", b"Digits=%ED%A0%80"])
def test_a_body_that_is_not_utf8_is_refused(body: bytes) -> None:
    with pytest.raises(FormError, match="not_utf8"):
        parse_twilio_form(body)


def test_too_many_fields_are_refused() -> None:
    body = "&".join(f"P{i}=1" for i in range(MAX_FORM_FIELDS + 1)).encode()
    with pytest.raises(FormError, match="too_many_fields"):
        parse_twilio_form(body)


# -- the confirm page's POST: panicd's own page, the user, or an old phone ---------------

PUBLIC = "https://panicd.madiunkota.go.id"


@pytest.mark.parametrize(("origin", "fetch_site"), [
    (None, None),  # an old feature-phone browser
    (PUBLIC, None),
    ("https://PANICD.madiunkota.go.id:443", "same-origin"),
    ("null", "same-origin"),  # our own form under Referrer-Policy: no-referrer
    ("null", None),
    (None, "none"),
])
def test_the_own_page_and_plain_browsers_may_post(
    origin: str | None, fetch_site: str | None
) -> None:
    assert cross_origin_refusal(PUBLIC + "/", origin, fetch_site) is None


@pytest.mark.parametrize(("origin", "fetch_site", "reason"), [
    ("https://evil.example", None, "origin"),
    ("http://panicd.madiunkota.go.id", None, "origin"),
    ("https://panicd.madiunkota.go.id:8443", None, "origin"),
    ("https://panicd.madiunkota.go.id.evil.example", None, "origin"),
    ("not a url", None, "origin"),
    (None, "cross-site", "sec_fetch_site"),
    ("null", "same-site", "sec_fetch_site"),
    (PUBLIC, "cross-site", "sec_fetch_site"),
    ("https://evil.example", "same-origin", "origin"),
])
def test_another_sites_post_is_refused(
    origin: str | None, fetch_site: str | None, reason: str
) -> None:
    assert cross_origin_refusal(PUBLIC, origin, fetch_site) == reason
