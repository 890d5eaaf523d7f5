"""``store.url.parse_store_url``: SQLite paths, PostgreSQL servers, and no password, ever.

The PostgreSQL forms are checked against the private server too: the DSN a parsed URL
gives is what the driver connects with, several hosts and ``target_session_attrs`` included.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from firmware_sim.pgserver import PostgresServer, free_port
from store.url import PgHost, StoreUrl, parse_store_url

BASE = Path("/etc/panicd")


def test_a_relative_sqlite_path_is_taken_from_the_config_directory() -> None:
    url = parse_store_url("sqlite:///state/panicd.sqlite3", BASE)
    assert url == StoreUrl("sqlite", path=BASE / "state" / "panicd.sqlite3")
    assert (url.dsn, url.hosts) == (None, ())


def test_four_slashes_make_an_absolute_sqlite_path() -> None:
    url = parse_store_url("sqlite:////var/lib/panicd/panicd.sqlite3", BASE)
    assert url.path == Path("/var/lib/panicd/panicd.sqlite3")
    assert str(url) == "sqlite:////var/lib/panicd/panicd.sqlite3"


def test_a_postgresql_url_keeps_user_hosts_database_and_options() -> None:
    url = parse_store_url(
        "postgresql://panicd@db1.example:5433,db2.example/panicd?target_session_attrs=read-write",
        BASE,
    )
    assert url.backend == "postgresql"
    assert url.path is None
    assert url.hosts == (PgHost("db1.example", 5433), PgHost("db2.example", 5432))
    assert (url.user, url.database) == ("panicd", "panicd")
    assert url.options == (("target_session_attrs", "read-write"),)
    assert url.dsn == ("postgresql://panicd@db1.example:5433,db2.example:5432/panicd"
                       "?target_session_attrs=read-write")
    assert str(url) == url.dsn


def test_postgres_is_the_same_scheme_and_ipv6_and_socket_hosts_are_accepted() -> None:
    url = parse_store_url("postgres://panicd@[::1]:5432,%2Frun%2Fpostgresql/panicd", BASE)
    assert url.backend == "postgresql"
    assert url.hosts == (PgHost("::1", 5432), PgHost("/run/postgresql", 5432))
    assert url.dsn == "postgresql://panicd@[::1]:5432,%2Frun%2Fpostgresql:5432/panicd"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("panicd.sqlite3", "must start with sqlite:/// or postgresql://"),
        ("mysql://panicd@db/panicd", "must start with sqlite:/// or postgresql://"),
        ("sqlite://host/panicd.sqlite3", "a SQLite URL names no host"),
        ("sqlite:///", "must name the database file"),
        ("sqlite:///state/", "must name the database file"),
        ("sqlite:///:memory:", "an in-memory database loses every press"),
        ("sqlite:///p.sqlite3?mode=ro", "a SQLite URL takes no query parameters"),
        ("postgresql://db.example/panicd", "must name the user"),
        ("postgresql://panicd@db.example", "must name the database"),
        ("postgresql://panicd@db.example/", "must name the database"),
        ("postgresql://panicd@db.example/a/b", "must name the database"),
        ("postgresql://panicd@/panicd", "must name a host"),
        ("postgresql://panicd@db.example:0/panicd", "the port must be a number between"),
        ("postgresql://panicd@db.example:5432x/panicd", "the port must be a number between"),
        ("postgresql://panicd@db one/panicd", "is not a host name"),
        ("postgresql://panicd@[::g]/panicd", "is not an IPv6 address"),
        ("postgresql://panicd@a:5432,a/panicd", "host a:5432 is listed twice"),
        ("postgresql://panicd@db/panicd?sslmode=sometimes", "sslmode='sometimes' is not one"),
        ("postgresql://panicd@db/panicd?target_session_attrs=rw", "is not one of any,"),
        ("postgresql://panicd@db/panicd?connect_timeout=3", "unknown query parameter"),
        ("postgresql://panicd@db/panicd?sslmode=require&sslmode=disable", "given twice"),
        ("postgresql://panicd@db/panicd?sslmode", "key=value pairs"),
        ("postgresql://panicd@db/panicd#x", "a URL fragment"),
    ],
)
def test_each_malformed_url_says_precisely_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_store_url(text, BASE)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://panicd:hunter2@db.example/panicd",
        "postgres://panicd:hunter2@db1,db2/panicd",
        "postgresql://panicd:hun@ter2@db.example/panicd",  # an unescaped @ in the password
        "postgresql://panicd@db.example/panicd?password=hunter2",
        "postgresql://panicd@db.example/panicd?passfile=/root/hunter2",
        "postgresql://panicd@db.example/panicd?sslpassword=hunter2",
    ],
)
def test_a_password_in_the_url_is_refused_without_being_repeated(text: str) -> None:
    with pytest.raises(ValueError, match="a password does not belong in the URL") as caught:
        parse_store_url(text, BASE)
    message = str(caught.value)
    assert "store-password" in message
    assert "PANICD_STORE_PASSWORD" in message
    assert "hunter2" not in message
    assert "ter2" not in message


def test_a_password_attached_later_is_in_no_printed_form() -> None:
    url = parse_store_url("postgresql://panicd@db.example/panicd", BASE).with_password("hunter2")
    assert url.password == "hunter2"
    for shown in (repr(url), str(url), url.dsn or ""):
        assert "hunter2" not in shown
    # The password is not part of equality: the same URL is the same store.
    assert url == parse_store_url("postgresql://panicd@db.example/panicd", BASE)


async def _server_version(url: StoreUrl) -> int:
    conn = await asyncpg.connect(url.dsn, password=url.password, timeout=10)
    try:
        version: int = await conn.fetchval("SELECT current_setting('server_version_num')::int")
        read_only: str = await conn.fetchval("SHOW transaction_read_only")
    finally:
        await conn.close()
    assert read_only == "off"
    return version


async def test_the_dsn_connects_with_the_driver_past_a_dead_first_host(
    postgres: PostgresServer,
) -> None:
    # Nothing listens on the first host: the driver tries the next, as libpq would, and
    # target_session_attrs reaches it (a read-write session is asked for and given).
    dead = free_port()
    url = parse_store_url(
        f"postgresql://{postgres.user}@127.0.0.1:{dead},{postgres.host}:{postgres.port}"
        f"/{postgres.database}?target_session_attrs=read-write&application_name=panicd-test",
        BASE,
    ).with_password("unused-with-trust-auth")
    assert await _server_version(url) >= 100000


async def test_the_dsn_connects_through_a_percent_encoded_socket_directory(
    postgres: PostgresServer,
) -> None:
    socket = str(postgres.socket_dir).replace("/", "%2F")
    url = parse_store_url(
        f"postgresql://{postgres.user}@{socket}:{postgres.port}/{postgres.database}", BASE
    )
    assert url.hosts == (PgHost(str(postgres.socket_dir), postgres.port),)
    assert await _server_version(url) >= 100000
