"""``[store] url`` in panicd.toml: the old ``[panicd] database``, the default, one-line
errors naming file and key, and the database password from a credential or the environment.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import structlog

from dispatch.service import shared_ack_secret_missing
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.redact import scrub_event
from panicd.daemon import load
from store.url import PgHost
from tests.test_config import BASE_MAIN, DEMO, _assert_names, _error, _write

PG_URL = "postgresql://panicd@db1.example:5432,db2.example:5432/panicd"
SECRET = "s3cret-Store-pw"


def _with_store(tmp_path: Path, store: str, panicd: str = "") -> Path:
    main = BASE_MAIN
    if panicd:
        main = f"[panicd]\n{panicd}\n" + main
    return _write(tmp_path, main=main + f"\n[store]\n{store}\n")


def test_the_default_is_panicd_sqlite3_next_to_the_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), {})
    assert config.store.backend == "sqlite"
    assert config.database == (tmp_path / "panicd.sqlite3").resolve()
    assert str(config.store) == f"sqlite:///{tmp_path.resolve() / 'panicd.sqlite3'}"


def test_the_old_panicd_database_key_is_a_sqlite_path(tmp_path: Path) -> None:
    path = _write(tmp_path, main='[panicd]\ndatabase = "state/p.sqlite3"\n' + BASE_MAIN)
    config = load_config(path, {})
    assert config.store.backend == "sqlite"
    assert config.database == (tmp_path / "state" / "p.sqlite3").resolve()


def test_a_sqlite_url_gives_the_same_database_as_the_old_key(tmp_path: Path) -> None:
    config = load_config(_with_store(tmp_path, 'url = "sqlite:///state/p.sqlite3"'), {})
    assert config.database == (tmp_path / "state" / "p.sqlite3").resolve()
    absolute = tmp_path / "abs.sqlite3"
    config = load_config(_with_store(tmp_path, f'url = "sqlite:///{absolute}"'), {})
    assert config.database == absolute


def test_a_postgresql_url_parses_and_the_sqlite_paths_refuse_it(tmp_path: Path) -> None:
    path = _with_store(tmp_path, f'url = "{PG_URL}?target_session_attrs=read-write"')
    config = load_config(path, {})
    assert config.store.backend == "postgresql"
    assert config.store.hosts == (PgHost("db1.example", 5432), PgHost("db2.example", 5432))
    assert config.store.options == (("target_session_attrs", "read-write"),)
    assert config.store.password is None
    with pytest.raises(ConfigError) as caught:
        _ = config.database
    _assert_names(caught.value, path, "store.url")
    assert caught.value.problem == "needs a SQLite store, not postgresql"


def test_a_shared_store_with_dispatch_needs_the_ack_link_key_given(tmp_path: Path) -> None:
    # Every instance must sign ack links with one key (any instance answers a link), and
    # a secret is never kept in the database: no random key beside a file as on SQLite.
    dispatch = (f'[dispatch]\nresponders = "{DEMO / "responders.toml"}"\n'
                f'policies = "{DEMO / "policies.toml"}"\n'
                'public_base_url = "https://panicd.example"\n')
    path = _write(tmp_path, main=BASE_MAIN + dispatch + f'\n[store]\nurl = "{PG_URL}"\n')
    config = load_config(path, {})
    assert config.dispatch is not None
    no_dispatch = tmp_path / "no-dispatch"
    no_dispatch.mkdir()
    assert shared_ack_secret_missing(load_config(_with_store(no_dispatch, f'url = "{PG_URL}"'),
                                                 {}), {}) is None  # no dispatch: no links
    error = shared_ack_secret_missing(config, {})
    assert error is not None
    _assert_names(error, path, "store.url")
    assert str(error) == (
        f"{path.resolve()}: store.url: a PostgreSQL store needs the ack-link key, the same "
        "on every instance: credential ack-link-secret or $PANICD_ACK_SECRET"
    )
    assert shared_ack_secret_missing(config, {"PANICD_ACK_SECRET": "k" * 32}) is None
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ack-link-secret").write_text("k" * 32, encoding="utf-8")
    assert shared_ack_secret_missing(config, {"CREDENTIALS_DIRECTORY": str(creds)}) is None
    (creds / "ack-link-secret").write_text("\n", encoding="utf-8")  # a placeholder: absent
    assert shared_ack_secret_missing(config, {"CREDENTIALS_DIRECTORY": str(creds)}) is not None
    # panicd and check-config both load through panicd.daemon.load, which refuses it.
    with pytest.raises(ConfigError, match="needs the ack-link key"):
        load(path)
    # SQLite keeps its own key beside the file.
    (tmp_path / "sqlite").mkdir()
    sqlite = _write(tmp_path / "sqlite", main=BASE_MAIN + dispatch)
    assert shared_ack_secret_missing(load_config(sqlite, {}), {}) is None


@pytest.mark.parametrize(
    ("store", "panicd", "key", "problem"),
    [
        ('url = "sqlite:///x.sqlite3"', 'database = "y.sqlite3"', "panicd.database",
         "set either [store] url or this, its old spelling, not both"),
        ("", 'database = "sqlite:///y.sqlite3"', "panicd.database",
         "must be a file path (a URL goes in [store] url)"),
        ("", 'database = ""', "panicd.database", "must be a file path"),
        ("", "database = 3", "panicd.database", "expected a string, got int"),
        ("url = 5", "", "store.url", "expected a string, got int"),
        ('url = "mysql://panicd@db/panicd"', "", "store.url",
         "must start with sqlite:/// or postgresql:// (postgres:// too)"),
        ('url = "sqlite://host/p.sqlite3"', "", "store.url", "a SQLite URL names no host"),
        ('url = "postgresql://panicd@db:99999/panicd"', "", "store.url",
         "'db:99999': the port must be a number between 1 and 65535"),
        ('url = "postgresql://panicd@db/panicd?sslmode=sometimes"', "", "store.url",
         "sslmode='sometimes' is not one of"),
        ('url = "sqlite:///p.sqlite3"\nurll = 1', "", "store.urll",
         "unknown key (did you mean 'url'?)"),
    ],
)
def test_each_store_error_is_one_line_naming_file_and_key(
    tmp_path: Path, store: str, panicd: str, key: str, problem: str
) -> None:
    path = _with_store(tmp_path, store, panicd)
    error = _error(path, {})
    _assert_names(error, path, key)
    assert error.problem.startswith(problem), error.problem


@pytest.mark.parametrize(
    ("store", "key"),
    [
        (f'url = "postgresql://panicd:{SECRET}@db/panicd"', "store.url"),
        (f'url = "postgresql://panicd@db/panicd?password={SECRET}"', "store.url"),
        (f'url = "{PG_URL}"\npassword = "{SECRET}"', "store.password"),
    ],
)
def test_a_password_in_the_file_is_refused_and_where_it_goes_is_said(
    tmp_path: Path, store: str, key: str
) -> None:
    path = _with_store(tmp_path, store)
    error = _error(path, {})
    _assert_names(error, path, key)
    assert "systemd credential store-password or $PANICD_STORE_PASSWORD" in error.problem
    assert SECRET not in str(error)


def _pg_config(tmp_path: Path, environ: dict[str, str]) -> Config:
    return load_config(_with_store(tmp_path, f'url = "{PG_URL}"'), environ)


def test_the_password_comes_from_the_environment(tmp_path: Path) -> None:
    config = _pg_config(tmp_path, {"PANICD_STORE_PASSWORD": SECRET})
    assert config.store.password == SECRET


def test_the_store_password_credential_wins_over_the_environment(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "store-password").write_text(f"{SECRET}\n", encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "PANICD_STORE_PASSWORD": "from-env"}
    assert _pg_config(tmp_path, env).store.password == SECRET
    # An empty credential (a LoadCredential= placeholder) counts as absent.
    (creds / "store-password").write_text("", encoding="utf-8")
    assert _pg_config(tmp_path, env).store.password == "from-env"
    assert _pg_config(tmp_path, {"CREDENTIALS_DIRECTORY": str(creds)}).store.password is None


def test_a_sqlite_store_reads_no_password(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), {"PANICD_STORE_PASSWORD": SECRET})
    assert config.store.password is None


def test_the_password_is_in_no_repr_str_dsn_or_log_line(tmp_path: Path) -> None:
    config = _pg_config(tmp_path, {"PANICD_STORE_PASSWORD": SECRET})
    assert config.store.password == SECRET
    for shown in (repr(config), str(config.store), config.store.dsn or "", repr(config.store)):
        assert SECRET not in shown
    # Through the daemon's log pipeline, however the URL is handed to it.
    buffer = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(buffer),
        processors=[scrub_event, structlog.processors.JSONRenderer(default=str)],
    )
    logger.info("store.opened", store=config.store, dsn=config.store.dsn, config=config)
    line = buffer.getvalue()
    assert SECRET not in line
    assert json.loads(line)["dsn"] == config.store.dsn


def test_the_instance_name_is_the_host_unless_set_and_must_be_a_plain_name(
    tmp_path: Path,
) -> None:
    assert load_config(_write(tmp_path), {}).instance == socket.gethostname()
    path = _write(tmp_path, main='[panicd]\ninstance = "madiun-a:2"\n' + BASE_MAIN)
    assert load_config(path, {}).instance == "madiun-a:2"
    for bad in ('""', '"two words"', f'"{"x" * 65}"', "7"):
        path = _write(tmp_path, main=f"[panicd]\ninstance = {bad}\n" + BASE_MAIN)
        error = _error(path, {})
        _assert_names(error, path, "panicd.instance")


def test_the_page_lease_defaults_to_30_s_and_stays_above_the_request_timeout(
    tmp_path: Path,
) -> None:
    dispatch = (f'[dispatch]\nresponders = "{DEMO / "responders.toml"}"\n'
                f'policies = "{DEMO / "policies.toml"}"\n'
                'public_base_url = "https://panicd.example"\n')
    config = load_config(_write(tmp_path, main=BASE_MAIN + dispatch), {})
    assert config.dispatch is not None
    assert config.dispatch.lease_s == 30
    path = _write(tmp_path, main=BASE_MAIN + dispatch + "lease_s = 5\n")
    error = _error(path, {})
    _assert_names(error, path, "dispatch.lease_s")
