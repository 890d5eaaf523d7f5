"""``panicctl migrate [--check]`` and the PostgreSQL refusal of panicctl and check-config.

Against real SQLite files at real schema versions: an absent file, one left at an older
version by the shipped migrations themselves, the current one, and one from a newer panicd.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gateway.cli import main
from store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from tests.pipeline import Fleet, make_fleet

SECRET = "pg-Secret-4711"


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "cfg")


def _run(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _version(database: Path) -> int:
    conn = sqlite3.connect(database)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _at_version(database: Path, version: int) -> None:
    """A database as a panicd that knew ``version`` migrations left it."""
    conn = sqlite3.connect(database)
    try:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


def _columns(database: Path, table: str) -> set[str]:
    conn = sqlite3.connect(database)
    try:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def test_check_on_no_database_says_everything_is_pending_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, err = _run(capsys, fleet.config_path, "migrate", "--check")
    assert (code, out, err) == (
        1, f"schema 0 -> {SCHEMA_VERSION} ({SCHEMA_VERSION} pending)\n", ""
    )
    assert not fleet.database.exists()


def test_migrate_creates_the_database_then_finds_it_up_to_date(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    code, out, _ = _run(capsys, fleet.config_path, "migrate")
    assert (code, out) == (0, f"schema 0 -> {SCHEMA_VERSION} ({SCHEMA_VERSION} applied)\n")
    assert _version(fleet.database) == SCHEMA_VERSION
    up_to_date = f"schema {SCHEMA_VERSION} -> {SCHEMA_VERSION} (up to date)\n"
    assert _run(capsys, fleet.config_path, "migrate") == (0, up_to_date, "")
    assert _run(capsys, fleet.config_path, "migrate", "--check") == (0, up_to_date, "")


def test_an_older_database_is_checked_without_change_then_migrated(
    capsys: pytest.CaptureFixture[str], fleet: Fleet
) -> None:
    older = SCHEMA_VERSION - 2
    _at_version(fleet.database, older)
    assert "in_doubt_since" not in _columns(fleet.database, "outbox")  # migration 6's

    code, out, _ = _run(capsys, fleet.config_path, "migrate", "--check")
    assert (code, out) == (1, f"schema {older} -> {SCHEMA_VERSION} (2 pending)\n")
    assert _version(fleet.database) == older, "--check applies nothing"

    code, out, _ = _run(capsys, fleet.config_path, "migrate", "--json")
    assert code == 0
    assert json.loads(out) == {"store": f"sqlite:///{fleet.database}", "from": older,
                               "to": SCHEMA_VERSION, "applied": 2, "pending": 0}
    assert _version(fleet.database) == SCHEMA_VERSION
    assert "in_doubt_since" in _columns(fleet.database, "outbox")


@pytest.mark.parametrize("check", [False, True])
def test_a_database_from_a_newer_panicd_exits_2_with_the_stores_one_line(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, check: bool
) -> None:
    conn = sqlite3.connect(fleet.database)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    code, out, err = _run(capsys, fleet.config_path, "migrate", *(["--check"] if check else []))
    assert (code, out) == (2, "")
    assert err == (
        f"panicctl: database schema version 99 is newer than this panicd ({SCHEMA_VERSION})\n"
    )
    assert _version(fleet.database) == 99, "never downgraded"


def _postgresql(fleet: Fleet) -> Path:
    text = fleet.config_path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("database = ")]
    lines.insert(0, '[store]\nurl = "postgresql://panicd@db1:5432,db2:5432/panicd"\n')
    fleet.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return fleet.config_path


@pytest.mark.parametrize("argv", [["migrate"], ["migrate", "--check"], ["check-config"],
                                  ["incidents"], ["status"]])
def test_a_postgresql_store_is_refused_with_one_line_and_no_password(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    monkeypatch.setenv("PANICD_STORE_PASSWORD", SECRET)
    monkeypatch.setenv("PANICD_DEVICE_KEYS_FILE", str(fleet.keys_path))
    config = _postgresql(fleet)
    code, out, err = _run(capsys, config, *argv)
    assert code == 2
    assert SECRET not in out + err
    refusal = (f"panicctl: {config}: store.url: postgresql is not yet supported by this "
               "panicd (issue 13); use sqlite:///PATH")
    # status first says it cannot reach the daemon (no [dispatch], no control socket).
    lines = err.splitlines()
    if argv == ["status"]:
        lines = lines[-1:]
    assert lines == [refusal]


def test_check_config_shows_the_store_url(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PANICD_DEVICE_KEYS_FILE", str(fleet.keys_path))
    code, out, _ = _run(capsys, fleet.config_path, "check-config", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["store"] == f"sqlite:///{fleet.database}"
    assert summary["database"] == str(fleet.database)
