"""Helpers shared by the third-party decoders: strict JSON loading, lenient side fields.

The rule every decoder follows: the press itself (who, what kind) must decode or the
message becomes a dead letter; side fields (battery, GPS) that are malformed are dropped
instead, because losing a panic over a bad battery reading would be the worse failure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.errors import DecodeError
from gateway.model import GeoFix, PressKind

# No real uplink of any supported format comes near this; bigger is abuse or a bug.
MAX_PAYLOAD_BYTES = 64 * 1024
# LoRaWAN frame counters are 32 bits (LoRaWAN 1.0.4 §4.3.1.5 FCnt; ChirpStack's and The
# Things Stack's f_cnt are uint32). A bigger one is forged, and one past 2**63 could not
# even be stored: the batch holding it failed and was retried forever.
MAX_FCNT = 2**32 - 1


class OptionError(ValueError):
    """A decoder option in the config is malformed; raised when the decoder is built."""


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """A device's connectivity as its own network reports it (MQTT LWT / availability)."""

    device_ref: str
    online: bool


def load_json(payload: bytes) -> object:
    """Parse a JSON document, turning every failure into a DecodeError."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DecodeError("too_large", f"{len(payload)} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("not_utf8", str(exc)) from None
    try:
        return without_lone_surrogates(text, json.loads(text))
    # RecursionError: deeply nested arrays; ValueError: JSONDecodeError and the
    # int-digit limit (CVE-2020-10735 guard) both derive from it.
    except (ValueError, RecursionError) as exc:
        raise DecodeError("invalid_json", str(exc)[:200]) from None


# Only a \uD800-\uDFFF escape can put a surrogate into a decoded str: strict UTF-8
# decoding refuses encoded ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _replace_surrogates(value: object) -> object:
    match value:
        case str():
            return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
        case dict():
            return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
        case list():
            return [_replace_surrogates(v) for v in value]
        case _:
            return value


def without_lone_surrogates(text: str, doc: object) -> object:
    """``doc`` (parsed from ``text``) with every unpaired surrogate replaced by U+FFFD.

    json.loads turns an escape such as ``"\\ud800"`` into a lone surrogate, which
    SQLite refuses to store ("surrogates not allowed"): one such device id or gateway id
    in a frame failed its whole batch, and the ingest loop retried that batch forever
    with every press behind it. RFC 8259 §8.2 leaves such strings' behaviour undefined;
    U+FFFD is what Go's encoding/json (ChirpStack, The Things Stack) makes of them.
    """
    if not _SURROGATE_ESCAPE.search(text):
        return doc  # the common case costs one scan of the text
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return _replace_surrogates(doc)
    return doc  # only escaped backslashes, or pairs json.loads already joined


def load_object(payload: bytes) -> dict[str, object]:
    """Parse a JSON document that must be an object."""
    doc = load_json(payload)
    if not isinstance(doc, dict):
        raise DecodeError("not_an_object", type(doc).__name__)
    return doc


def as_object(value: object) -> dict[str, object] | None:
    """The value if it is a JSON object, else None."""
    return value if isinstance(value, dict) else None


def as_str(value: object) -> str | None:
    """The value if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def as_int(value: object) -> int | None:
    """An integer from a JSON number that is integral (bools are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def as_float(value: object) -> float | None:
    """A finite float from a JSON number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def battery_percent(value: object) -> int | None:
    """A battery level 0..100 from a number or numeric string, else None."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    number = as_float(value)
    if number is None or not 0.0 <= number <= 100.0:
        return None
    return round(number)


def geo_fix(lat: object, lon: object, accuracy: object = None) -> GeoFix | None:
    """A GeoFix from JSON numbers, or None when missing, out of range or (0, 0).

    (0, 0) is rejected because proto3 JSON omits zero fields and GPS modules report it
    before their first fix; nothing of ours is in the Gulf of Guinea.
    """
    la, lo = as_float(lat), as_float(lon)
    if la is None or lo is None or not -90.0 <= la <= 90.0 or not -180.0 <= lo <= 180.0:
        return None
    if la == 0.0 and lo == 0.0:
        return None
    acc = as_float(accuracy)
    return GeoFix(lat=la, lon=lo, accuracy_m=acc if acc is not None and acc > 0 else None)


def kind_from_name(name: str) -> PressKind | None:
    """The PressKind for a configured kind name ("panic", "cancel", ...)."""
    try:
        return PressKind(name)
    except ValueError:
        return None


def action_map(
    options: Mapping[str, object],
    key: str,
    defaults: Mapping[str, PressKind],
    *,
    fold: bool,
) -> dict[str, PressKind]:
    """Merge an options mapping of action → kind name over the defaults.

    Raises OptionError on a malformed option so a bad config fails at load, not at the
    first press. ``fold`` lower-cases keys for formats whose action spelling varies.
    """
    merged = {(k.casefold() if fold else k): v for k, v in defaults.items()}
    raw = options.get(key)
    if raw is None:
        return merged
    if not isinstance(raw, Mapping):
        raise OptionError(f"option {key!r} must be a table of action = kind")
    for action, kind_name in raw.items():
        kind = kind_from_name(kind_name) if isinstance(kind_name, str) else None
        if not isinstance(action, str) or kind is None:
            raise OptionError(
                f"option {key!r}: {action!r} = {kind_name!r} is not action = "
                f"one of {', '.join(k.value for k in PressKind)}"
            )
        merged[action.casefold() if fold else action] = kind
    return merged


def name_set(
    options: Mapping[str, object], key: str, defaults: Iterable[str], *, fold: bool
) -> frozenset[str]:
    """An options list of names (e.g. actions to ignore), replacing the defaults if given."""
    raw = options.get(key)
    if raw is None:
        names = list(defaults)
    elif isinstance(raw, list | tuple) and all(isinstance(n, str) for n in raw):
        names = [str(n) for n in raw]
    else:
        raise OptionError(f"option {key!r} must be a list of strings")
    return frozenset(n.casefold() if fold else n for n in names)


def flag(options: Mapping[str, object], key: str, default: bool) -> bool:
    """A boolean option."""
    raw = options.get(key, default)
    if not isinstance(raw, bool):
        raise OptionError(f"option {key!r} must be true or false")
    return raw


def choice(options: Mapping[str, object], key: str, allowed: tuple[str, ...]) -> str:
    """A string option restricted to ``allowed``; the first is the default."""
    raw = options.get(key, allowed[0])
    if raw not in allowed:
        raise OptionError(f"option {key!r} must be one of {', '.join(allowed)}")
    return str(raw)


def text_option(options: Mapping[str, object], key: str, default: str) -> str:
    """A non-empty string option."""
    raw = options.get(key, default)
    if not isinstance(raw, str) or not raw:
        raise OptionError(f"option {key!r} must be a non-empty string")
    return raw


def reject_unknown_options(options: Mapping[str, object], known: Iterable[str]) -> None:
    """Fail on misspelt option names, which would otherwise silently keep a default."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(f"unknown option(s): {', '.join(unknown)}")


def pick_gateway(
    heard: list[tuple[float | None, str, GeoFix | None]],
) -> tuple[str | None, GeoFix | None]:
    """The gateway for the location fallback: best RSSI with a position, else best RSSI."""
    ranked = sorted(heard, key=lambda h: h[0] if h[0] is not None else -math.inf, reverse=True)
    for _, gateway_id, fix in ranked:
        if fix is not None:
            return gateway_id, fix
    return (ranked[0][1], None) if ranked else (None, None)


def location_fix(value: object) -> GeoFix | None:
    """A GeoFix from a ``{"latitude", "longitude", "accuracy"}`` object (ChirpStack, TTS)."""
    loc = as_object(value)
    if loc is None:
        return None
    return geo_fix(loc.get("latitude"), loc.get("longitude"), loc.get("accuracy"))
