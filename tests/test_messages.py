"""Alert texts stay one GSM-7 segment and the call script is a well-formed one-digit Gather."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.messages import (
    GSM7_BASIC,
    SMS_LIMIT,
    build_alert_sms,
    build_alert_twiml,
    build_cancelled_sms,
    build_digit_reply_twiml,
    build_handled_sms,
    build_machine_hangup_twiml,
    build_voice_message,
    clock_wib,
    is_single_segment,
    to_gsm7,
)
from dispatch.webhook_auth import make_ack_token

AT = 1_795_839_240.0  # 04:14 UTC = 11:14 WIB
ACK_URL = "https://siaga.madiunkota.go.id/a/" + make_ack_token(b"k" * 32, "4711", "r-17", 2**31)


def alert(place: str = "Jl. Pahlawan 12", kelurahan: str = "Manguharjo", **kw: bool) -> str:
    return build_alert_sms(
        incident_code="K7Q2",
        kind_label="DARURAT",
        kelurahan=kelurahan,
        place=place,
        occurred_at=AT,
        ack_url=ACK_URL,
        test=kw.get("test", False),
    )


def test_alert_carries_kind_code_kelurahan_place_local_time_and_link() -> None:
    text = alert()
    assert text.startswith("DARURAT #K7Q2 Kel. Manguharjo: Jl. Pahlawan 12. 11:14 WIB.")
    assert text.endswith(ACK_URL)
    assert is_single_segment(text)


def test_test_alerts_are_marked_tes() -> None:
    assert alert(test=True).startswith("TES DARURAT #K7Q2")


def test_wib_is_utc_plus_seven() -> None:
    assert clock_wib(0.0) == "07:00 WIB"


def test_long_address_is_shortened_before_anything_else() -> None:
    text = alert(place="Jl. " + "Panjang Sekali " * 20)
    assert len(text) <= SMS_LIMIT
    assert len(text) + len(" Sekali") > SMS_LIMIT  # cut at the last word that fits
    assert "Kel. Manguharjo: Jl. Panjang Sekali" in text
    assert "Panjang... 11:14 WIB" in text or "Sekali... 11:14 WIB" in text
    assert text.endswith(ACK_URL)


DEMO_PLACE = "Pos kamling RW 02, Jl. Pahlawan Gg. II RT 03/RW 02"
ROOM = SMS_LIMIT - len(alert(place="", kelurahan=""))  # for the place and the kelurahan


def _place_of(text: str) -> str:
    return text.split(": ", 1)[1].rsplit(". 11:14 WIB", 1)[0]


def test_a_place_too_long_drops_the_address_before_cutting_the_landmark() -> None:
    # The demo's alert: room for the landmark and "Jl.", which was cut to "RW 0...".
    kelurahan = "K" * (ROOM - len("Pos kamling RW 02, Jl.."))
    text = alert(place=DEMO_PLACE, kelurahan=kelurahan)
    assert _place_of(text) == "Pos kamling RW 02"
    assert f"Kel. {kelurahan}: " in text
    assert text.endswith(ACK_URL)
    assert is_single_segment(text)


def test_a_cut_address_keeps_whole_words_and_says_it_was_cut() -> None:
    room = ROOM - len("Manguharjo")
    landmark = "L" * (room - len(", Jl. Pahlawan Gg..") + 1)  # one short for "Gg."
    place = _place_of(alert(place=f"{landmark}, Jl. Pahlawan Gg. II RT 03/RW 02"))
    assert place == f"{landmark}, Jl. Pahlawan.."
    # A single-part place is cut at its last whole word too.
    words = " ".join(["Perumahan"] * 30)
    cut = _place_of(alert(place=words))
    assert cut.endswith("Perumahan..")
    assert set(cut.removesuffix("..").split(" ")) == {"Perumahan"}


def test_a_first_word_longer_than_the_room_is_cut_so_something_is_left() -> None:
    place = _place_of(alert(place="X" * 300))
    assert place == "X" * (ROOM - len("Manguharjo") - 2) + ".."


@given(words=st.lists(st.sampled_from(["Jl.", "Pahlawan", "RT", "03/RW", "02,", "Pos",
                                       "kamling", "Masjid", "Al-Ikhlas"]), max_size=40))
def test_a_shortened_place_never_ends_inside_a_word(words: list[str]) -> None:
    place = " ".join(words)
    text = alert(place=place)
    assert is_single_segment(text)
    assert text.endswith(ACK_URL)
    kept = _place_of(text).removesuffix("..").replace(",", " ").split()
    whole = place.replace(",", " ").split()[: len(kept)]
    assert kept[:-1] == whole[:-1]
    if kept:  # the last word whole, perhaps without its trailing punctuation
        assert kept[-1] in {whole[-1], whole[-1].rstrip(",.;:/-")}


def test_non_gsm_characters_are_transliterated_not_sent_as_ucs2() -> None:
    assert to_gsm7("Masjid “Al-Ikhlāṣ” — dekat [pasar] 🚨") == 'Masjid "Al-Ikhlas" - dekat (pasar) '
    assert to_gsm7("café ü") == "café ü"  # é and ü are in the GSM-7 basic set


@given(
    place=st.text(max_size=400),
    kelurahan=st.text(max_size=80),
    test=st.booleans(),
)
def test_any_address_fits_one_gsm7_segment_with_the_link_intact(
    place: str, kelurahan: str, test: bool
) -> None:
    text = alert(place=place, kelurahan=kelurahan, test=test)
    assert len(text) <= SMS_LIMIT
    assert all(c in GSM7_BASIC for c in text)
    assert text.endswith(ACK_URL)


@given(name=st.text(max_size=300))
def test_handled_notice_fits_one_segment_for_any_name(name: str) -> None:
    text = build_handled_sms(incident_code="K7Q2", responder_name=name, at=AT)
    assert is_single_segment(text)
    assert "ditangani oleh" in text


@given(kelurahan=st.text(max_size=300), test=st.booleans())
def test_cancel_notice_fits_one_segment(kelurahan: str, test: bool) -> None:
    text = build_cancelled_sms(incident_code="K7Q2", kelurahan=kelurahan, at=AT, test=test)
    assert is_single_segment(text)
    assert "DIBATALKAN" in text


def test_an_ack_link_too_long_for_any_sms_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        build_alert_sms(
            incident_code="K7Q2",
            kind_label="DARURAT",
            kelurahan="Taman",
            place="x",
            occurred_at=AT,
            ack_url="https://x/" + "a" * 200,
        )


def _twiml(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # our own output, not untrusted input


def test_call_script_repeats_the_message_twice_inside_a_one_digit_gather() -> None:
    message = build_voice_message(
        incident_code="K7Q2", kelurahan="Manguharjo", place="Jl. Pahlawan 12"
    )
    root = _twiml(
        build_alert_twiml(message=message, action_url="https://p/g", repeat_url="https://p/r")
    )
    gather = root.find("Gather")
    assert gather is not None
    assert gather.attrib["numDigits"] == "1"
    assert gather.attrib["action"] == "https://p/g"
    assert gather.attrib["method"] == "POST"
    says = gather.findall("Say")
    assert [s.text for s in says[:2]] == [message, message]
    assert all(s.attrib["language"] == "id-ID" for s in says)
    assert "Tekan 1" in (says[2].text or "")
    assert "Tekan 2" in (says[2].text or "")
    redirect = root.find("Redirect")
    assert redirect is not None
    assert redirect.text == "https://p/r"
    assert root.find("Hangup") is None


def test_second_round_without_input_says_goodbye_and_hangs_up() -> None:
    root = _twiml(build_alert_twiml(message="m", action_url="https://p/g", repeat_url=None))
    assert root.find("Redirect") is None
    assert [child.tag for child in root] == ["Gather", "Say", "Hangup"]


def test_digit_one_confirms_and_hangs_up_other_digits_repeat() -> None:
    ack = _twiml(build_digit_reply_twiml(digit="1", repeat_url="https://p/r", handled=True))
    assert [child.tag for child in ack] == ["Say", "Hangup"]
    assert "menangani" in (ack[0].text or "")
    late = _twiml(build_digit_reply_twiml(digit="1", repeat_url="https://p/r", handled=False))
    assert "petugas lain" in (late[0].text or "")
    again = _twiml(build_digit_reply_twiml(digit="2", repeat_url="https://p/r", handled=False))
    assert [child.tag for child in again] == ["Redirect"]


def test_voicemail_gets_a_silent_hangup() -> None:
    assert [c.tag for c in _twiml(build_machine_hangup_twiml())] == ["Hangup"]


def test_test_calls_say_so_first() -> None:
    text = build_voice_message(incident_code="A1", kelurahan="Taman", place="x", test=True)
    assert text.startswith("Ini hanya panggilan uji coba.")
    assert "A 1" in text
