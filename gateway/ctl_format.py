"""How panicctl prints: WIB local times, plain fixed-width tables, and JSON for scripts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

WIB = ZoneInfo("Asia/Jakarta")


def when(ts: float | None) -> str:
    """A Unix time as local Madiun time (WIB), or "-"."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S WIB")


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table (no dependency, readable over ssh)."""
    cells = [[title for _, title in columns]]
    cells += [["" if row.get(key) is None else str(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip()
        for line in cells
    )


def print_json(value: object) -> None:
    """Pretty, stable JSON on stdout (UTF-8 kept readable)."""
    print(json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True))  # noqa: T201
