"""Secrets and phone numbers out of log events, before any renderer sees them.

Two structlog processors and the text functions behind them: values under secret-looking
keys (token, password, signature, …) and secrets written inside strings (``token=…``,
``Bearer …``, ``https://user:pw@host``) become ``***``; full phone numbers are masked so
staff can still tell two responders apart (+6281234567890 → +62812****890).
:func:`scrub_event` does both in one pass and is the one panicd configures.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Final

from structlog.typing import EventDict, WrappedLogger

REDACTED: Final = "***"

_SENSITIVE_WORDS = (
    r"token|secret|passw(?:or)?d|passphrase|pwd|key|auth|signature|credential|cookie"
    r"|(?:^|[_-])(?:sig|pin|otp)(?:$|[_-])"
)
_SECRET_KEY = re.compile(_SENSITIVE_WORDS, re.IGNORECASE)

# `auth_token=abc`, `"password": "abc"`, `?signature=abc&`, `Authorization: Bearer abc`.
# The key may only start where a word starts and its affixes are bounded: an unanchored
# `[\w.-]*` is quadratic on a long run of word characters (a 4 MB blob took minutes).
_INLINE_SECRET = re.compile(
    r"(?P<key>(?<![\w.-])[\w.-]{0,40}?(?:token|secret|passw(?:or)?d|passphrase|key|auth"
    r"|signature|credential|cookie|(?:sig|pin|otp)(?![a-z0-9]))[\w.-]{0,40})"
    r"(?P<sep>[\"']?\s*[=:]\s*)(?P<quote>[\"']?)"
    r"(?P<value>(?:(?:bearer|basic|digest)\s+)?[^\s\"'&,;)}\]]+)",
    re.IGNORECASE,
)
_AUTH_SCHEME = re.compile(r"\b(?P<scheme>bearer|basic|digest)\s+[\w.~+/=-]+", re.IGNORECASE)
# mqtt://user:password@broker, https://AC…:token@api.twilio.com
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^/\s:@]+):[^/\s@]+@", re.I)

# E.164 (+ and 8 to 15 digits, optionally grouped with spaces or hyphens) and the
# Indonesian national form 08xx…; Twilio and the roster both use these.
_E164 = re.compile(r"(?<![\w+])\+[1-9](?:[ -]?\d){7,14}(?!\d)")
_NATIONAL_ID = re.compile(r"(?<![\w+])08\d(?:[ -]?\d){6,10}(?!\d)")


def _mask_digits(digits: str, keep_head: int) -> str:
    # Keep the operator prefix and the last three digits: enough for staff to tell two
    # responders apart, not enough to call anyone.
    head = max(1, min(keep_head, len(digits) - 7))
    return digits[:head] + "****" + digits[-3:]


# The same short strings (device ids, paths, kinds, event names) recur on every press; at
# 1,000 presses/s the regexes were a quarter of the event loop, so results are memoised.
# Only strings up to MEMO_MAX characters are cached, so memory stays bounded.
MEMO_MAX = 256


def memoised_for_short(func: Callable[[str], str]) -> Callable[[str], str]:
    """``func`` with its results cached for strings of up to ``MEMO_MAX`` characters."""
    cached = functools.lru_cache(maxsize=8192)(func)

    @functools.wraps(func)
    def call(text: str) -> str:
        return cached(text) if len(text) <= MEMO_MAX else func(text)

    return call


@memoised_for_short
def mask_phone(text: str) -> str:
    """Mask every full phone number in ``text`` (+6281234567890 becomes +62812****890)."""
    text = _E164.sub(lambda m: "+" + _mask_digits(re.sub(r"\D", "", m[0]), 5), text)
    return _NATIONAL_ID.sub(lambda m: _mask_digits(re.sub(r"\D", "", m[0]), 4), text)


@memoised_for_short
def redact_text(text: str) -> str:
    """Replace secrets written inline in ``text``: ``token=…``, ``Bearer …``, URL passwords."""
    text = _INLINE_SECRET.sub(lambda m: f"{m['key']}{m['sep']}{m['quote']}{REDACTED}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m['scheme']} {REDACTED}", text)
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def is_secret_key(key: object) -> bool:
    """Whether a key's name says its value is a secret (token, key, password, auth, signature…)."""
    return isinstance(key, str) and _is_secret_name(key)


@functools.lru_cache(maxsize=1024)
def _is_secret_name(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


def _scrub(value: object, text: Callable[[str], str], keys: bool) -> object:
    match value:
        case str():
            return text(value)
        case bool() | int() | float() | None:
            return value
        case Mapping():
            return {
                k: REDACTED if keys and is_secret_key(k) else _scrub(v, text, keys)
                for k, v in value.items()
            }
        case list() | tuple() | set() | frozenset():
            return type(value)(_scrub(v, text, keys) for v in value)
        case _:
            # An arbitrary object renders through str()/repr() later; a config dataclass
            # or URL object would carry its secrets into the line, so render it here.
            return text(str(value))


def redact_secrets(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """Replace values of secret-looking keys, and secrets written inside strings, with ``***``."""
    for key, value in event_dict.items():
        if key != "event" and is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(value, redact_text, keys=True)
    return event_dict


def mask_phone_numbers(
    _logger: WrappedLogger, _method_name: str, event_dict: EventDict
) -> EventDict:
    """Mask full phone numbers anywhere in the event, nested values included."""
    for key, value in event_dict.items():
        event_dict[key] = _scrub(value, mask_phone, keys=False)
    return event_dict


@memoised_for_short
def _clean_text(text: str) -> str:
    return mask_phone(redact_text(text))


_PLAIN_TYPES: Final = frozenset({int, float, bool, type(None)})


def scrub_event(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """:func:`redact_secrets` then :func:`mask_phone_numbers`, in one pass over the event.

    Every press logs a line, so this runs thousands of times a second in a storm: the
    common values (numbers, short recurring strings) take the cheapest path.
    """
    for key, value in event_dict.items():
        if key != "event" and is_secret_key(key):
            event_dict[key] = REDACTED
        elif type(value) is str:
            event_dict[key] = _clean_text(value)
        elif type(value) not in _PLAIN_TYPES:
            event_dict[key] = _scrub(value, _clean_text, keys=True)
    return event_dict
