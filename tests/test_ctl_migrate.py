"""``panicctl migrate [--check]`` on both backends, and check-config on PostgreSQL.

Against real SQLite files at real schema versions: an absent file, one left at an older
version by the shipped migrations themselves, the current one, and one from a newer panicd;
and against a real PostgreSQL database: empty, migrated, and from a newer panicd.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from panicd.cli import main
from store.pg_schema import SCHEMA_VERSION as PG_SCHEMA_VERSION
from store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from tests.pg import pg_rows
from tests.pipeline import Fleet, make_fleet
from tests.prism import free_port

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
    older = 5  # before migration 6, which adds in_doubt_since
    pending = SCHEMA_VERSION - older
    _at_version(fleet.database, older)
    assert "in_doubt_since" not in _columns(fleet.database, "outbox")

    code, out, _ = _run(capsys, fleet.config_path, "migrate", "--check")
    assert (code, out) == (1, f"schema {older} -> {SCHEMA_VERSION} ({pending} pending)\n")
    assert _version(fleet.database) == older, "--check applies nothing"

    code, out, _ = _run(capsys, fleet.config_path, "migrate", "--json")
    assert code == 0
    assert json.loads(out) == {"store": f"sqlite:///{fleet.database}", "from": older,
                               "to": SCHEMA_VERSION, "applied": pending, "pending": 0}
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


def _postgresql(fleet: Fleet, url: str) -> Path:
    text = fleet.config_path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("database = ")]
    lines.insert(0, f'[store]\nurl = "{url}"\n')
    fleet.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return fleet.config_path


def test_a_postgresql_database_is_checked_migrated_then_up_to_date(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, pg_database: str,
) -> None:
    config = _postgresql(fleet, pg_database)
    pending = f"schema 0 -> {PG_SCHEMA_VERSION} ({PG_SCHEMA_VERSION} pending)\n"
    assert _run(capsys, config, "migrate", "--check") == (1, pending, "")
    assert pg_rows(pg_database, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]
    code, out, _ = _run(capsys, config, "migrate", "--json")
    assert code == 0
    assert json.loads(out) == {"store": pg_database, "from": 0, "to": PG_SCHEMA_VERSION,
                               "applied": PG_SCHEMA_VERSION, "pending": 0}
    assert pg_rows(pg_database, "SELECT version FROM schema_version") == [(PG_SCHEMA_VERSION,)]
    up_to_date = f"schema {PG_SCHEMA_VERSION} -> {PG_SCHEMA_VERSION} (up to date)\n"
    assert _run(capsys, config, "migrate") == (0, up_to_date, "")
    assert _run(capsys, config, "migrate", "--check") == (0, up_to_date, "")


@pytest.mark.parametrize("check", [False, True])
def test_a_postgresql_database_from_a_newer_panicd_exits_2_untouched(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, pg_database: str, check: bool,
) -> None:
    config = _postgresql(fleet, pg_database)
    assert _run(capsys, config, "migrate")[0] == 0
    pg_rows(pg_database, "UPDATE schema_version SET version = 99")
    code, out, err = _run(capsys, config, "migrate", *(["--check"] if check else []))
    assert (code, out) == (2, "")
    assert err == (
        f"panicctl: database schema version 99 is newer than this panicd ({PG_SCHEMA_VERSION})\n"
    )
    assert pg_rows(pg_database, "SELECT version FROM schema_version") == [(99,)]


def test_an_unreachable_postgresql_is_one_line_without_the_password(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PANICD_STORE_PASSWORD", SECRET)
    url = f"postgresql://panicd@127.0.0.1:{free_port()}/panicd"
    config = _postgresql(fleet, url)
    code, out, err = _run(capsys, config, "migrate")
    assert (code, out) == (1, "")
    (line,) = err.splitlines()
    assert line.startswith(f"panicctl: cannot connect to {url}: "), line
    assert SECRET not in out + err


def test_check_config_shows_the_store_url(
    capsys: pytest.CaptureFixture[str], fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PANICD_DEVICE_KEYS_FILE", str(fleet.keys_path))
    code, out, _ = _run(capsys, fleet.config_path, "check-config", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["store"] == f"sqlite:///{fleet.database}"
    assert summary["database"] == str(fleet.database)
