"""How panicctl prints: WIB local times, plain fixed-width tables, and JSON for scripts.

Everything panicctl prints passes through :func:`out` or :func:`print_json`, the one
output boundary. Much of it comes from the wire (device ids, frame payloads, decoder
details) or from the database it was stored in, so an attacker chooses those strings: a
raw ESC can clear the operator's screen or draw a fake status line, a CR or LF can forge
a table row, a bidi override can make one text display as another. :func:`escaped` turns
every such character into a visible escape (``\\x1b``, ``\\u202e``) before it reaches the
terminal.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from datetime import UTC, datetime
from typing import Any, TextIO
from zoneinfo import ZoneInfo

WIB = ZoneInfo("Asia/Jakarta")

# Unicode categories a terminal acts on instead of showing as a glyph: Cc (C0, DEL, C1),
# Cf (bidi embeddings, overrides and isolates U+202A-202E / U+2066-2069, LRM/RLM,
# zero-width and invisible format characters), Cs (lone surrogates, which cannot even be
# encoded for the terminal), Zl/Zp (U+2028/U+2029, line breaks to some terminals), Co/Cn
# (private and unassigned code points, whose effect is unknowable here). Zs (spaces such
# as U+00A0) is shown as the space it is.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"})


def _unsafe(char: str) -> bool:
    return not char.isprintable() and unicodedata.category(char) in _UNSAFE_CATEGORIES


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _visible(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escaped(value: object) -> str:
    """``str(value)`` with every control, format or line-breaking character as a visible escape.

    Backslashes are kept as they are, so escaping is idempotent: a cell escaped by
    :func:`table` passes :func:`out` unchanged, and the escapes are only ever printable
    ASCII. (A literal ``\\x1b`` typed into a payload therefore reads the same as an
    escaped ESC; both are harmless text.)
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(_visible(c) if _unsafe(c) else c for c in text)


def out(*lines: object, file: TextIO | None = None) -> None:
    """Print each argument as one escaped line (a newline inside one shows as ``\\n``)."""
    stream = sys.stdout if file is None else file
    for line in lines:
        stream.write(escaped(line) + "\n")


def err(message: object) -> None:
    """One escaped ``panicctl: …`` line on stderr (messages quote files, ids and replies)."""
    out(f"panicctl: {message}", file=sys.stderr)


def when(ts: float | None) -> str:
    """A Unix time as local Madiun time (WIB), or "-"."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S WIB")


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    """A plain fixed-width table, one string per line (no dependency, readable over ssh).

    Cells are escaped before the widths are measured, so the columns stay aligned.
    """
    cells = [[title for _, title in columns]]
    cells += [["" if row.get(key) is None else escaped(row[key]) for key, _ in columns]
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return [
        "  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip()
        for line in cells
    ]


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    # RFC 8259 §7: a character outside the BMP is escaped as its UTF-16 surrogate pair.
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_text(value: object, *, indent: int | None = 2) -> str:
    """Stable JSON with UTF-8 kept readable but no character a terminal would act on.

    ``json.dumps`` escapes only C0, ``"`` and ``\\``; with ``ensure_ascii=False`` DEL, C1,
    bidi overrides and lone surrogates would pass raw. Outside strings it emits ASCII only,
    so each such character is inside a string and its ``\\uXXXX`` escape is valid JSON.
    """
    text = json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=True)
    if text.replace("\n", "").isprintable():
        return text
    # indent puts real newlines between tokens; they are JSON whitespace, not content.
    return "".join(_json_escape(c) if c != "\n" and _unsafe(c) else c for c in text)


# SQLite stores these flags as 0/1 and every time as Unix seconds; scripts reading
# panicctl's JSON get booleans and RFC 3339 times (the epoch kept under KEY_epoch).
BOOLEAN_KEYS = frozenset({"test", "urgent"})
_TIME_NAMES = frozenset({"at", "since", "now", "cutoff"})


def _is_time_key(key: str) -> bool:
    return key in _TIME_NAMES or key.endswith("_at")


def rfc3339(ts: float) -> str:
    """A Unix time as RFC 3339 local Madiun time with its offset (``…T10:15:00.250+07:00``)."""
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(WIB).isoformat(timespec="milliseconds")


def json_ready(value: object) -> object:
    """``value`` with 0/1 flags as JSON booleans and each time ``k`` as RFC 3339 plus
    ``k_epoch`` (the Unix seconds as stored), in every nested object."""
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if not isinstance(value, dict):
        return value
    ready: dict[object, object] = {}
    for key, item in value.items():
        is_number = isinstance(item, int | float) and not isinstance(item, bool)
        if key in BOOLEAN_KEYS and is_number and item in (0, 1):
            ready[key] = bool(item)
        elif isinstance(key, str) and _is_time_key(key) and (is_number or item is None):
            ready[key] = None if item is None else rfc3339(float(item))
            ready[f"{key}_epoch"] = item
        else:
            ready[key] = json_ready(item)
    return ready


def print_json(value: object) -> None:
    """Pretty, stable JSON on stdout (UTF-8 kept readable, control characters escaped;
    flags as booleans and times as RFC 3339, see :func:`json_ready`)."""
    sys.stdout.write(json_text(json_ready(value)) + "\n")
