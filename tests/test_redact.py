"""Redaction and phone masking of log events: the pure processors of gateway.redact."""

from __future__ import annotations

import pytest

from gateway.redact import mask_phone, mask_phone_numbers, redact_secrets, scrub_event

PHONE = "+6281234567890"
MASKED = "+62812****890"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (PHONE, MASKED),
        ("ke +62 812-3456-7890 dan +6285712345678", "ke +62812****890 dan +62857****678"),
        ("081234567890", "0812****890"),
        ("+14155550100", "+1415****100"),
    ],
)
def test_phone_numbers_are_masked_but_distinguishable(text: str, masked: str) -> None:
    assert mask_phone(text) == masked


@pytest.mark.parametrize(
    "text",
    ["2026-08-01T08:30:00Z", "incident 1234567890123", "SM0812345678901abc", "counter=08"],
)
def test_non_phone_numbers_are_left_alone(text: str) -> None:
    assert mask_phone(text) == text


def test_phone_masking_reaches_nested_values() -> None:
    event = mask_phone_numbers(
        None,
        "info",
        {"event": "sms.sent", "to": PHONE, "targets": [{"phone": PHONE}], "pair": (PHONE, 1)},
    )
    assert event == {
        "event": "sms.sent",
        "to": MASKED,
        "targets": [{"phone": MASKED}],
        "pair": (MASKED, 1),
    }


def test_secret_keys_are_redacted_anywhere_in_the_event() -> None:
    event = redact_secrets(
        None,
        "info",
        {
            "event": "config.loaded",
            "twilio_auth_token": "0123abcd",
            "device_key": b"\x01\x02",
            "password": 1234,
            "X-Twilio-Signature": "sig==",
            "twilio": {"account_sid": "AC123", "auth_token": "0123abcd"},
            "headers": [{"Authorization": "Basic QUM6dG9r"}],
            "url": "https://panicd.madiun/ack/42?sig=deadbeef&lang=id",
            "note": "Authorization: Bearer eyJ.abc.def",
            "count": 3,
        },
    )
    assert event == {
        "event": "config.loaded",
        "twilio_auth_token": "***",
        "device_key": "***",
        "password": "***",
        "X-Twilio-Signature": "***",
        "twilio": {"account_sid": "AC123", "auth_token": "***"},
        "headers": [{"Authorization": "***"}],
        "url": "https://panicd.madiun/ack/42?sig=***&lang=id",
        "note": "Authorization: ***",
        "count": 3,
    }


def test_objects_are_rendered_and_scrubbed_before_they_can_leak() -> None:
    class Settings:
        def __repr__(self) -> str:
            return "Settings(account_sid='AC1', auth_token='0123abcd')"

    event = redact_secrets(None, "info", {"event": "config.loaded", "settings": Settings()})
    assert event["settings"] == "Settings(account_sid='AC1', auth_token='***')"


def _sample_events() -> list[dict[str, object]]:
    class Settings:
        def __repr__(self) -> str:
            return f"Settings(auth_token='0123abcd', ops={PHONE!r})"

    return [
        {"event": "press.accepted", "device": "btn-01", "counter": 7, "battery": None,
         "urgent": True, "lat": -7.63},
        {"event": f"call to {PHONE}", "to": PHONE, "targets": [{"phone": PHONE, "pin": 1234}],
         "pair": (PHONE, 1), "auth_token": "abc", "url": "https://u:pw@h/x?sig=beef"},
        {"event": "config.loaded", "settings": Settings(), "note": "Bearer eyJ.a.b " + PHONE,
         "long": ("token=abc " + PHONE + " ") * 40},
    ]


@pytest.mark.parametrize("index", range(3))
def test_one_pass_scrub_equals_redaction_then_masking(index: int) -> None:
    redacted = redact_secrets(None, "info", _sample_events()[index])
    expected = mask_phone_numbers(None, "info", redacted)
    assert scrub_event(None, "info", _sample_events()[index]) == expected
