"""Error types shared by every stage."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from pathlib import Path


class DecodeError(ValueError):
    """A frame could not be decoded; ``reason`` is a stable snake_case code for dead letters."""

    def __init__(self, reason: str, detail: str = "", *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        #: The payload fields read to find the press kind (for ``panicctl decode``).
        self.fields = fields
        #: Who and which frame, when the envelope decoded before the press did not.
        self.device_ref: str | None = None
        self.counter: int | None = None

    def about(self, device_ref: str, counter: int | None) -> DecodeError:
        """This error, noting the device and counter the envelope named."""
        self.device_ref, self.counter = device_ref, counter
        return self


# The key of a problem with a whole file (missing, unreadable, not TOML): there is no key
# to name, so the line reads "file: problem". "-" is the older spelling of the same.
WHOLE_FILE = ""


class ConfigError(Exception):
    """A configuration or data file is invalid.

    ``str()`` is the one line an operator sees: file, key (or row), and what is wrong;
    just file and problem when the problem is the whole file (key :data:`WHOLE_FILE`).
    """

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        whole_file = key in (WHOLE_FILE, "-")
        super().__init__(f"{file}: {problem}" if whole_file else f"{file}: {key}: {problem}")
        self.file = str(file)
        self.key = key
        self.problem = problem


def unknown_key(name: str, known: Collection[str]) -> str:
    """The problem text for an unknown key: the nearest known one, or all of them."""
    nearest = difflib.get_close_matches(name, sorted(known), n=1)
    if nearest:
        return f"unknown key (did you mean {nearest[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(sorted(known)) or 'none'})"
