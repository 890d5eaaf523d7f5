"""What responders read and hear, in Bahasa Indonesia (pure: text and TwiML builders).

An alert SMS must stay one GSM-7 segment (160 septets, 3GPP TS 23.038): a UCS-2 SMS
holds only 70 characters and a split one may arrive out of order on feature phones.
Text is transliterated to the GSM-7 basic set, and the address/landmark is shortened
first when it does not fit (whole parts dropped from the end, then at a word boundary);
the ack link is never cut.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta, timezone

from twilio.twiml.voice_response import Gather, VoiceResponse

SMS_LIMIT = 160

# GSM 03.38 / 3GPP TS 23.038 default alphabet (one septet each); "\x1b" (the escape to
# the extension table) is excluded on purpose.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension-table characters cost two septets; they are mapped to one-septet look-alikes.
_REPLACEMENTS = {
    "[": "(",
    "]": ")",
    "{": "(",
    "}": ")",
    "~": "-",
    "|": "/",
    "\\": "/",
    "^": "",
    "\u20ac": "EUR",
    "\u2018": "'",
    "\u2019": "'",
    "`": "'",
    "\u00b4": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2013": "-",
    "\u2014": "-",
    "\u2026": "...",
    "\t": " ",
    "\u00a0": " ",
}

# WIB is UTC+7 all year (Indonesia has no daylight saving), so no tz database is needed.
WIB = timezone(timedelta(hours=7), "WIB")

ELLIPSIS = ".."


def to_gsm7(text: str) -> str:
    """Return ``text`` using only GSM-7 basic characters, transliterating where possible."""
    out: list[str] = []
    for char in text:
        if char in GSM7_BASIC:
            out.append(char)
        elif char in _REPLACEMENTS:
            out.append(_REPLACEMENTS[char])
        else:
            # Strip accents (ā → a, ş → s); drop what has no Latin base (emoji, CJK).
            base = "".join(
                c
                for c in unicodedata.normalize("NFKD", char)
                if c in GSM7_BASIC and not unicodedata.combining(c)
            )
            out.append(base)
    return "".join(out).replace("\r", "")


def is_single_segment(text: str) -> bool:
    """Return whether ``text`` fits one GSM-7 SMS (all basic characters, at most 160)."""
    return len(text) <= SMS_LIMIT and all(c in GSM7_BASIC for c in text)


def clock_wib(at: float) -> str:
    """Format a Unix time as local Madiun time, e.g. ``14:05 WIB``."""
    return datetime.fromtimestamp(at, UTC).astimezone(WIB).strftime("%H:%M WIB")


def _one_line(text: str) -> str:
    return " ".join(to_gsm7(text).split())


PART_SEPARATOR = ", "
_TRAILING_PUNCTUATION = ",.;:/-"


def _cut_words(words: list[str], head: str, limit: int, *, min_words: int) -> str | None:
    """``head`` plus the longest prefix of ``words`` (at least ``min_words``) that fits
    ``limit`` with the ellipsis, or None."""
    for count in range(len(words), min_words - 1, -1):
        kept = " ".join(words[:count]).rstrip(_TRAILING_PUNCTUATION)
        text = head + kept + ELLIPSIS
        if kept and len(text) <= limit:
            return text
    return None


def shorten(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, cut at a word boundary.

    A place lists its most useful part first ("landmark, address"): the parts that do
    not fit are dropped whole, from the end; a part is cut (marked "..") only where at
    least two of its words still fit, since a stub like "Jl.." says nothing. Only a
    first word longer than the room is cut inside the word, so something is left.
    """
    if len(text) <= limit:
        return text
    if limit <= len(ELLIPSIS):
        return ""
    kept: list[str] = []
    for index, part in enumerate(text.split(PART_SEPARATOR)):
        whole = PART_SEPARATOR.join([*kept, part])
        if len(whole) <= limit:
            kept.append(part)
            continue
        head = PART_SEPARATOR.join(kept) + PART_SEPARATOR if kept else ""
        cut = _cut_words(part.split(" "), head, limit, min_words=1 if index == 0 else 2)
        if cut is not None:
            return cut
        break
    if kept:
        return PART_SEPARATOR.join(kept).rstrip(_TRAILING_PUNCTUATION)
    return text[: limit - len(ELLIPSIS)].rstrip() + ELLIPSIS


def _fit(template: str, ack_url: str, **shrinkable: str) -> str:
    """Fill ``template`` and shorten the named fields, first one first, to fit one SMS."""
    fields = {name: _one_line(value) for name, value in shrinkable.items()}
    fixed = len(template.format(ack_url=ack_url, **dict.fromkeys(fields, "")))
    if fixed > SMS_LIMIT:
        raise ValueError(f"fixed SMS text is {fixed} characters; the limit is {SMS_LIMIT}")
    budget = SMS_LIMIT - fixed
    names = list(fields)
    for index, name in enumerate(names):
        rest = sum(len(fields[n]) for n in names[index + 1 :])
        fields[name] = shorten(fields[name], max(0, budget - rest))
        budget -= len(fields[name])
    return template.format(ack_url=ack_url, **fields)


def _prefix(test: bool) -> str:
    return "TES " if test else ""


def build_alert_sms(
    *,
    incident_code: str,
    kind_label: str,
    kelurahan: str,
    place: str,
    occurred_at: float,
    ack_url: str,
    test: bool = False,
) -> str:
    """Return the one-segment alert SMS: kind, code, kelurahan, place, WIB time, ack link."""
    if not all(c in GSM7_BASIC for c in ack_url):
        raise ValueError("ack_url must be plain ASCII without extension characters")
    head = _one_line(f"{_prefix(test)}{kind_label} #{incident_code}")
    template = head + " Kel. {kelurahan}: {place}. " + clock_wib(occurred_at)
    template += ". Tangani: {ack_url}"
    # The place (address/landmark) gives way before the kelurahan, which routes people.
    return _fit(template, ack_url, place=place, kelurahan=kelurahan)


def build_handled_sms(
    *, incident_code: str, responder_name: str, at: float, test: bool = False
) -> str:
    """Return the follow-up telling the others who is handling the incident."""
    head = _one_line(f"{_prefix(test)}#{incident_code}")
    template = head + " sudah ditangani oleh {name} (" + clock_wib(at) + ")."
    template += " Terima kasih, tidak perlu berangkat.{ack_url}"
    return _fit(template, "", name=responder_name)


def build_cancelled_sms(
    *, incident_code: str, kelurahan: str, at: float, test: bool = False
) -> str:
    """Return the notice that the presser cancelled the alert."""
    head = _one_line(f"{_prefix(test)}#{incident_code} DIBATALKAN")
    template = head + ": panggilan darurat di Kel. {kelurahan} dibatalkan oleh pelapor ("
    template += clock_wib(at) + "). Tidak perlu berangkat.{ack_url}"
    return _fit(template, "", kelurahan=kelurahan)


def spoken_code(incident_code: str) -> str:
    """Spell an incident code character by character so text-to-speech reads it clearly."""
    return " ".join(incident_code)


def build_voice_message(
    *, incident_code: str, kelurahan: str, place: str, test: bool = False
) -> str:
    """Return the sentences the call speaks about the incident."""
    opening = "Ini hanya panggilan uji coba. " if test else ""
    return (
        f"{opening}Perhatian, ini Madiun Siaga. Tombol darurat ditekan di Kelurahan "
        f"{kelurahan}, {place}. Kode kejadian {spoken_code(incident_code)}."
    )


PROMPT = "Tekan 1 jika Anda menangani kejadian ini. Tekan 2 untuk mendengar pesan ini lagi."
LANGUAGE = "id-ID"
# A Google voice for Indonesian (Twilio's classic voices do not speak id-ID).
DEFAULT_VOICE = "Google.id-ID-Standard-A"


def build_alert_twiml(
    *,
    message: str,
    action_url: str,
    repeat_url: str | None,
    voice: str = DEFAULT_VOICE,
    gather_timeout_s: int = 6,
) -> str:
    """Return the call script: message twice and the prompt inside a one-digit Gather.

    Without a key press the call is redirected once to ``repeat_url`` (which serves this
    script again with ``repeat_url=None``); the second time it says goodbye and hangs up,
    so voicemail or silence is never an ack.
    """
    response = VoiceResponse()
    gather = Gather(num_digits=1, action=action_url, method="POST", timeout=gather_timeout_s)
    for _ in range(2):
        gather.say(message, language=LANGUAGE, voice=voice)
        gather.pause(length=1)
    gather.say(PROMPT, language=LANGUAGE, voice=voice)
    response.append(gather)
    if repeat_url is not None:
        response.redirect(repeat_url, method="POST")
    else:
        response.say(
            "Tidak ada tombol yang ditekan. Kami akan menghubungi petugas lain. Terima kasih.",
            language=LANGUAGE,
            voice=voice,
        )
        response.hangup()
    return str(response)


def build_digit_reply_twiml(
    *, digit: str, repeat_url: str, handled: bool, voice: str = DEFAULT_VOICE
) -> str:
    """Return the answer to a Gather: confirm on 1 (if the ack was taken), repeat otherwise."""
    response = VoiceResponse()
    if digit == "1" and handled:
        response.say(
            "Terima kasih. Anda tercatat menangani kejadian ini. Petugas lain akan diberi tahu.",
            language=LANGUAGE,
            voice=voice,
        )
        response.hangup()
    elif digit == "1":
        response.say(
            "Terima kasih. Kejadian ini sudah ditangani petugas lain.",
            language=LANGUAGE,
            voice=voice,
        )
        response.hangup()
    else:
        response.redirect(repeat_url, method="POST")
    return str(response)


def build_machine_hangup_twiml() -> str:
    """Return the script for a call answered by voicemail: hang up without speaking."""
    response = VoiceResponse()
    response.hangup()
    return str(response)
