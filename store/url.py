"""``[store] url``: which database panicd uses, parsed once into a :class:`StoreUrl`.

``sqlite:///relative/path`` (relative to the config file's directory), ``sqlite:////abs``
(four slashes: an absolute path, as SQLAlchemy writes it), or
``postgresql://user@host[:port][,host2[:port]]/db[?target_session_attrs=read-write]``
(``postgres://`` too). A password never belongs in the URL: it comes from the
environment or a systemd credential and is attached with :meth:`StoreUrl.with_password`,
kept out of ``repr`` and out of :attr:`StoreUrl.dsn`, so printing a URL cannot leak it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from ipaddress import IPv6Address
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, quote, unquote

Backend = Literal["sqlite", "postgresql"]

PASSWORD_ENV: Final = "PANICD_STORE_PASSWORD"  # noqa: S105  # a variable's name, not a secret
PASSWORD_CREDENTIAL: Final = "store-password"  # noqa: S105  # a credential's name
DEFAULT_PG_PORT: Final = 5432
WHERE_THE_PASSWORD_GOES: Final = (
    f"put it in the systemd credential {PASSWORD_CREDENTIAL} or ${PASSWORD_ENV}"
)

# libpq's values (PostgreSQL 14+ for the primary/standby ones); anything else is a typo.
_SESSION_ATTRS = frozenset({"any", "read-write", "read-only", "primary", "standby",
                            "prefer-standby"})
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
# Query keys passed on to the driver. The password's keys are refused with their own
# message; host/port/user/dbname belong in the URL's own parts, where they are checked.
_OPTIONS: Final[dict[str, frozenset[str] | None]] = {
    "target_session_attrs": _SESSION_ATTRS,
    "sslmode": _SSL_MODES,
    "sslrootcert": None,
    "sslcert": None,
    "sslkey": None,
    "application_name": None,
}
_PASSWORD_OPTIONS = frozenset({"password", "passfile", "sslpassword"})
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?")
_SCHEMES: Final = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}


@dataclass(frozen=True, slots=True)
class PgHost:
    """One PostgreSQL server of a (possibly multi-host) URL."""

    host: str  # a DNS name, an IP literal, or a Unix socket directory ("/run/postgresql")
    port: int

    def __str__(self) -> str:
        if self.host.startswith("/"):
            return f"{quote(self.host, safe='')}:{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """The parsed ``[store] url``: a SQLite file, or PostgreSQL servers and a database."""

    backend: Backend
    path: Path | None = None  # sqlite: the database file, absolute
    hosts: tuple[PgHost, ...] = ()  # postgresql: in the order libpq tries them
    user: str | None = None
    database: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # query parameters passed on, as given
    # From the environment or a credential, never from the URL; not in repr or equality.
    password: str | None = field(default=None, repr=False, compare=False)

    @property
    def dsn(self) -> str | None:
        """The PostgreSQL connection URL without the password (None for SQLite)."""
        if self.backend != "postgresql":
            return None
        hosts = ",".join(str(h) for h in self.hosts)
        query = "&".join(f"{k}={quote(v, safe='/-')}" for k, v in self.options)
        user = quote(self.user or "", safe="")
        url = f"postgresql://{user}@{hosts}/{quote(self.database or '', safe='')}"
        return f"{url}?{query}" if query else url

    def with_password(self, password: str | None) -> StoreUrl:
        """The same URL with the password the driver is to send (PostgreSQL only)."""
        return replace(self, password=password)

    def __str__(self) -> str:
        # What check-config and the logs show: never the password.
        if self.backend == "sqlite":
            return f"sqlite:///{self.path}" if self.path else "sqlite:///"
        return self.dsn or ""


def sqlite_url(path: Path) -> StoreUrl:
    """A SQLite store at ``path`` (the old ``[panicd] database`` spelling, the default)."""
    return StoreUrl("sqlite", path=path)


def parse_store_url(text: str, base_dir: Path) -> StoreUrl:
    """``text`` as a :class:`StoreUrl`; a relative SQLite path is taken from ``base_dir``.

    ValueError says what is wrong in one line and never repeats the URL itself, which
    might hold a password.
    """
    scheme, sep, rest = text.partition("://")
    backend = _SCHEMES.get(scheme.lower()) if sep else None
    if backend is None:
        raise ValueError("must start with sqlite:/// or postgresql:// (postgres:// too)")
    if "#" in rest:
        raise ValueError("a URL fragment ('#…') means nothing here")
    if backend == "sqlite":
        return _sqlite(rest, base_dir)
    return _postgresql(rest)


def _sqlite(rest: str, base_dir: Path) -> StoreUrl:
    if not rest.startswith("/"):
        raise ValueError("a SQLite URL names no host: sqlite:///relative/path or "
                         "sqlite:////absolute/path")
    if "?" in rest:
        raise ValueError("a SQLite URL takes no query parameters")
    path_text = rest[1:]
    if not path_text or path_text.endswith("/"):
        raise ValueError("must name the database file, e.g. sqlite:///panicd.sqlite3")
    if path_text == ":memory:":
        raise ValueError("an in-memory database loses every press on restart; name a file")
    return sqlite_url((base_dir / path_text).resolve())


def _postgresql(rest: str) -> StoreUrl:
    authority, slash, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, host_list = authority.rpartition("@")
    if ":" in userinfo:
        raise ValueError(f"a password does not belong in the URL: {WHERE_THE_PASSWORD_GOES}")
    if not at or not userinfo:
        raise ValueError("must name the user: postgresql://user@host/database")
    if not slash or not path or "/" in path:
        raise ValueError("must name the database: postgresql://user@host/database")
    return StoreUrl(
        "postgresql",
        hosts=_hosts(host_list),
        user=unquote(userinfo),
        database=unquote(path),
        options=_options(query),
    )


def _hosts(text: str) -> tuple[PgHost, ...]:
    if not text:
        raise ValueError("must name a host: postgresql://user@host[:port]/database "
                         "(a socket directory percent-encoded: %2Frun%2Fpostgresql)")
    hosts: list[PgHost] = []
    for part in text.split(","):
        host = _host(part)
        if host in hosts:
            raise ValueError(f"host {host} is listed twice")
        hosts.append(host)
    return tuple(hosts)


def _host(part: str) -> PgHost:
    if part.startswith("["):
        literal, bracket, after = part[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"{part!r} is not [ipv6] or [ipv6]:port")
        try:
            host = str(IPv6Address(literal))
        except ValueError:
            raise ValueError(f"{literal!r} is not an IPv6 address") from None
        port_text = after[1:] if after else None
    else:
        name, colon, port = part.rpartition(":")
        host, port_text = (name, port) if colon else (part, None)
        host = unquote(host)
        if not host.startswith("/") and not _HOST.fullmatch(host):
            raise ValueError(f"{part!r} is not a host name, address or host:port "
                             "(an IPv6 address in brackets: [::1]:5432)")
    if port_text is None:
        return PgHost(host, DEFAULT_PG_PORT)
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{part!r}: the port must be a number between 1 and 65535")
    return PgHost(host, int(port_text))


def _options(query: str) -> tuple[tuple[str, str], ...]:
    if not query:
        return ()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError("the query must be key=value pairs joined by '&'") from None
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key in _PASSWORD_OPTIONS:
            raise ValueError(f"a password does not belong in the URL ({key}=): "
                             f"{WHERE_THE_PASSWORD_GOES}")
        if key not in _OPTIONS:
            known = ", ".join(sorted(_OPTIONS))
            raise ValueError(f"unknown query parameter {key!r} (known: {known})")
        allowed = _OPTIONS[key]
        if allowed is not None and value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(sorted(allowed))}")
        if key in seen:
            raise ValueError(f"query parameter {key!r} is given twice")
        seen[key] = value
    return tuple(seen.items())
