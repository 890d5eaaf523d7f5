"""Error types shared by every stage."""

from __future__ import annotations

from pathlib import Path


class DecodeError(ValueError):
    """A frame could not be decoded; ``reason`` is a stable snake_case code for dead letters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(Exception):
    """A configuration or data file is invalid.

    ``str()`` is the one line an operator sees: file, key (or row), and what is wrong.
    """

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file = str(file)
        self.key = key
        self.problem = problem
