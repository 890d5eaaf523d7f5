"""Strict, typed reading of TOML configuration that names the file and key of every problem.

Keys are written the way an operator would find them in the file: ``people[3].phone`` is
the ``phone`` of the fourth ``[[people]]`` entry (indexes are 0-based), and table keys
that are not bare TOML keys are quoted, as in ``kelurahan."35.77.01.1001"``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import WHOLE_FILE, ConfigError, unknown_key

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A problem that does not stop loading (for example a gap in a roster)."""

    file: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.problem}"


def load_toml(path: Path) -> dict[str, object]:
    """Read and parse a TOML file, turning I/O and syntax errors into one ConfigError line."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, WHOLE_FILE, "file not found") from None
    except OSError as exc:
        raise ConfigError(path, WHOLE_FILE, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, WHOLE_FILE, f"not valid TOML: {exc}") from None


def child_key(parent: str, name: str) -> str:
    """The key path of table entry ``name`` under ``parent``."""
    part = name if _BARE_KEY.match(name) else '"' + name.replace('"', '\\"') + '"'
    return f"{parent}.{part}" if parent else part


@dataclass(frozen=True, slots=True)
class Node:
    """A value from a TOML document together with where it came from."""

    file: str
    key: str
    value: object

    def error(self, problem: str) -> ConfigError:
        """A ConfigError pointing at this value."""
        return ConfigError(self.file, self.key or WHOLE_FILE, problem)

    def table(self, allowed: Collection[str], required: Collection[str] = ()) -> dict[str, Node]:
        """This value as a table whose keys are all in ``allowed``; unknown keys are errors."""
        if not isinstance(self.value, dict):
            raise self.error("expected a table")
        # Unknown keys are rejected because a misspelt key (``wait`` for ``wait_s``)
        # would otherwise silently fall back to a default on a panic path.
        for name in self.value:
            if name not in allowed:
                raise ConfigError(self.file, child_key(self.key, name), unknown_key(name, allowed))
        for name in required:
            if name not in self.value:
                raise ConfigError(self.file, child_key(self.key, name), "missing")
        return {
            name: Node(self.file, child_key(self.key, name), value)
            for name, value in self.value.items()
        }

    def mapping(self) -> dict[str, Node]:
        """This value as a table with arbitrary keys (for example kode → policy)."""
        if not isinstance(self.value, dict):
            raise self.error("expected a table")
        return {
            name: Node(self.file, child_key(self.key, name), value)
            for name, value in self.value.items()
        }

    def items(self) -> list[Node]:
        """This value as an array, each element keyed ``key[i]``."""
        if not isinstance(self.value, list):
            raise self.error("expected an array")
        return [Node(self.file, f"{self.key}[{i}]", v) for i, v in enumerate(self.value)]

    def text(self, pattern: re.Pattern[str] | None = None, problem: str = "") -> str:
        """This value as a non-empty string, optionally matching ``pattern``."""
        if not isinstance(self.value, str):
            raise self.error("expected a string")
        if not self.value.strip():
            raise self.error("must not be empty")
        if pattern is not None and not pattern.fullmatch(self.value):
            raise self.error(f"{problem or 'invalid value'}: {self.value!r}")
        return self.value

    def integer(self, minimum: int, maximum: int) -> int:
        """This value as an integer within ``[minimum, maximum]``."""
        # bool is a subclass of int; ``wait_s = true`` must not read as 1 second.
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error("expected an integer")
        if not minimum <= self.value <= maximum:
            raise self.error(f"must be between {minimum} and {maximum}, got {self.value}")
        return self.value

    def boolean(self) -> bool:
        """This value as a boolean."""
        if not isinstance(self.value, bool):
            raise self.error("expected true or false")
        return self.value

    def texts(self, pattern: re.Pattern[str] | None = None, problem: str = "") -> list[str]:
        """This value as an array of unique non-empty strings."""
        out: list[str] = []
        for item in self.items():
            value = item.text(pattern, problem)
            if value in out:
                raise item.error(f"duplicate entry {value!r}")
            out.append(value)
        return out


def root(file: Path | str, data: dict[str, object]) -> Node:
    """The document root as a Node."""
    return Node(str(file), "", data)
