"""Load and validate panicd's TOML configuration and its data files.

Every problem becomes one :class:`ConfigError` naming the file, the key (or row) and what
is wrong, so ``panicd`` and ``panicctl check-config`` can print one line and exit non-zero.
Secrets are never read from the TOML file: device keys come from the systemd credential
``device-keys`` or the file named by ``PANICD_DEVICE_KEYS_FILE``, broker and database
passwords from the environment or a credential (see :func:`_secret`).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from gateway.errors import WHOLE_FILE, ConfigError, unknown_key
from gateway.formats import DECODERS, OptionError
from gateway.model import Device, Frame, Gateway, GeoFix, Trust
from store.url import (
    PASSWORD_CREDENTIAL,
    PASSWORD_ENV,
    WHERE_THE_PASSWORD_GOES,
    StoreUrl,
    parse_store_url,
    sqlite_url,
)

_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KODE = re.compile(r"\d\d\.\d\d\.\d\d\.\d{4}")
_SIGNED_FORMATS = frozenset({"native", "lora-frame"})
_HEX_KEY = re.compile(r"(?:[0-9a-fA-F]{2}){16,64}")
# A DNS name or an IPv4 literal; an IPv6 literal is written in brackets ("[::1]:1883").
_BROKER_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """One broker a source may connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        # RFC 3986 §3.2.2: an IPv6 literal is bracketed, so its colons are not the port's.
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_broker(text: str) -> BrokerAddress:
    """``host:port`` or ``[ipv6]:port`` as a :class:`BrokerAddress`; ValueError says why."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"{text!r} is not host:port (an IPv6 address as \"[::1]:1883\")")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: the port must be between 1 and 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    elif not _BROKER_HOST.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address"
                         " (an IPv6 address goes in brackets: \"[::1]:1883\")")
    return BrokerAddress(host, port)


@dataclass(frozen=True, slots=True)
class MqttSourceConfig:
    """One MQTT subscription set on one or more brokers (the first preferred)."""

    name: str
    host: str  # the preferred broker (``host``/``port``, or the first of ``brokers``)
    port: int
    client_id: str
    topics: tuple[str, ...]
    format: str
    trust: Trust
    keepalive_s: int
    tls: bool
    ca_file: Path | None
    username: str | None
    password: str | None = field(repr=False)
    reconnect_min_s: float
    reconnect_max_s: float
    format_options: Mapping[str, object] = field(default_factory=dict)
    # The rest of ``brokers``, in failover order after the preferred one.
    fallback_brokers: tuple[BrokerAddress, ...] = ()

    @property
    def brokers(self) -> tuple[BrokerAddress, ...]:
        """Every broker of the source, the preferred first."""
        return (BrokerAddress(self.host, self.port), *self.fallback_brokers)


SERIAL_MODES = ("rylr", "rak3172", "jsonl")
_BAUDS = frozenset({9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600})


@dataclass(frozen=True, slots=True)
class SerialSourceConfig:
    """One serial LoRa receiver (REYAX, RAK3172 P2P) or JSON-lines receiver."""

    name: str
    port: str
    baud: int
    mode: str
    trust: Trust
    reconnect_min_s: float
    reconnect_max_s: float


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Tuning and semantics of the ingest pipeline."""

    batch_max: int = 256
    batch_window_ms: float = 0.0
    queue_max: int = 10_000
    cancel_grace_s: float = 120.0
    burst_urgent_presses: int = 3
    drain_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Device and source health: alert thresholds and the daily ops summary ([health])."""

    low_battery_percent: int = 20
    offline_grace_factor: float = 1.5
    source_down_alert_s: float = 60.0
    daily_summary_at: str = "07:00"  # local WIB time, HH:MM
    check_every_s: float = 30.0


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Routing, responders, the web server and the delivery channel (no secrets here)."""

    responders_file: Path
    policies_file: Path
    public_base_url: str
    listen_host: str
    listen_port: int
    control_socket: Path
    from_number: str | None
    twilio_base_url: str
    ack_ttl_s: float
    send_concurrency: int
    # How long a claimed page is this instance's (a shared store): past it, a peer takes
    # the row back in doubt. Above the provider request timeout (10 s), so a live
    # instance never loses a send it is making.
    lease_s: float = 30.0
    # The public web server's limits (issue 11 case 4, dispatch/web_limits.py).
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    fd_reserve: int = 128


@dataclass(frozen=True, slots=True)
class AppConfig:
    """The city app endpoint (POST /app/v1/panic on the dispatch web server)."""

    rate_per_minute: float
    burst: int
    commit_timeout_s: float
    # Reverse proxies whose X-Forwarded-For entry names the client (none: the peer is).
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """Everything panicd needs to start, validated."""

    path: Path
    site: str
    # This process's name among the instances on one store (claims, heartbeats); the
    # host name unless [panicd] instance says otherwise (two instances on one box).
    instance: str
    ready_timeout_s: float
    store: StoreUrl
    kelurahan_file: Path
    nearest_within_m: float
    devices_file: Path
    devices: Mapping[str, Device]
    gateways: Mapping[str, Gateway]
    ingest: IngestConfig
    mqtt: tuple[MqttSourceConfig, ...]
    external_index: Mapping[tuple[str, str], str] = field(default_factory=dict)
    serial: tuple[SerialSourceConfig, ...] = ()
    dispatch: DispatchConfig | None = None
    app: AppConfig | None = None
    health: HealthConfig = field(default_factory=HealthConfig)

    @property
    def database(self) -> Path:
        """The SQLite database file, for the SQLite code paths; ConfigError for PostgreSQL."""
        if self.store.path is None:
            raise ConfigError(self.path, "store.url",
                              f"needs a SQLite store, not {self.store.backend}")
        return self.store.path

    def device_for(self, frame: Frame) -> Device | None:
        """The registered device a frame's identity refers to, for any format.

        A frame carrying our own tag names the registry id itself (native, or our binary
        frame inside a ChirpStack/TTN uplink); any other third-party frame is looked up
        by the identity that network gives it (devEui, friendly name, …), never by
        registry id, so a device cannot claim another one's id by its name.
        """
        if self.names_registry_id(frame):
            return self.devices.get(frame.device_ref)
        return self.external_device(frame.format, frame.device_ref)

    @staticmethod
    def names_registry_id(frame: Frame) -> bool:
        """Whether the frame's identity is a registry id (our own signed frames), not the
        identity its network gives it."""
        return frame.format in _SIGNED_FORMATS or frame.tag is not None

    def external_device(self, format_name: str, device_ref: str) -> Device | None:
        """The device registered with ``external_ids.<format_name> = device_ref``."""
        device_id = self.external_index.get((format_name, device_ref))
        return None if device_id is None else self.devices.get(device_id)


class _Table:
    """A TOML table with the file and key path it came from, for error messages.

    Every key the loader asks for is recorded in ``asked`` (shared by a document's
    tables, array indexes dropped: ``mqtt.port``), so the set of keys the loader knows is
    read off the loader itself (:func:`config_keys`) instead of being listed by hand.
    """

    def __init__(self, file: Path, where: str, data: Mapping[str, Any],
                 asked: set[str] | None = None) -> None:
        self.file = file
        self.where = where
        self.data = data
        self.asked: set[str] = set() if asked is None else asked
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self._used.add(name)
        self.asked.add(re.sub(r"\[\d+\]", "", self.key(name)))
        if name not in self.data:
            return default
        value = self.data[name]
        # bool is an int in Python; a TOML `true` where a number belongs is an error.
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(name, f"expected {_kind_name(kind)}, got a boolean")
        # `port = 18830.5` must not quietly become port 18830.
        if kind is int and isinstance(value, float):
            raise self.error(name, f"expected an integer, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def require(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.data:
            raise self.error(name, "is required")
        return self.get(name, kind)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = float(self.get(name, (int, float), default))
        if not low <= value <= high:
            raise self.error(name, f"must be between {low:g} and {high:g}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        """A TOML integer within ``[low, high]`` (a float, even 8883.0, is an error)."""
        value: int = self.get(name, int, default)
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}")
        return value

    def alias(self, name: str, kind: type) -> Any:
        """An old spelling of a key: read as :meth:`get`, but not a key the loader shows."""
        self._used.add(name)
        if name not in self.data:
            return None
        if not isinstance(self.data[name], kind):
            raise self.error(name, f"expected {_kind_name(kind)}, got "
                                   f"{type(self.data[name]).__name__}")
        return self.data[name]

    def table(self, name: str) -> _Table:
        return _Table(self.file, self.key(name), self.get(name, dict, {}), self.asked)

    def tables(self, name: str) -> list[_Table]:
        rows = self.get(name, list, [])
        out = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(self.file, f"{self.key(name)}[{index}]", "expected a table")
            out.append(_Table(self.file, f"{self.key(name)}[{index}]", row, self.asked))
        return out

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise self.error(unknown[0], unknown_key(unknown[0], self._used))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a table",
        list: "an array",
    }
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(path, WHOLE_FILE, "file not found") from None
    except PermissionError:
        raise ConfigError(path, WHOLE_FILE, "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, WHOLE_FILE, f"not valid TOML: {exc}") from None


def _fix(table: _Table, name: str) -> GeoFix | None:
    raw = table.get(name, dict)
    if raw is None:
        return None
    sub = _Table(table.file, table.key(name), raw, table.asked)
    lat = sub.require("lat", (int, float))
    lon = sub.require("lon", (int, float))
    sub.check_unknown()
    if not -90 <= lat <= 90:
        raise sub.error("lat", "must be between -90 and 90")
    if not -180 <= lon <= 180:
        raise sub.error("lon", "must be between -180 and 180")
    return GeoFix(lat=float(lat), lon=float(lon))


def _credential(name: str, environ: Mapping[str, str]) -> str | None:
    """A systemd credential (LoadCredential=) by name, if the service has one."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    # An empty placeholder (LoadCredential= needs every file to exist) means "not set".
    return value or None


def _secret(env_name: str, credential: str, environ: Mapping[str, str]) -> str | None:
    """A secret from systemd credentials first, then the environment."""
    value = _credential(credential, environ)
    if value is not None:
        return value
    return environ.get(env_name) or None


def load_device_keys(environ: Mapping[str, str]) -> tuple[Path | None, dict[str, bytes]]:
    """Device HMAC keys from the ``device-keys`` credential or ``PANICD_DEVICE_KEYS_FILE``.

    The file is TOML: ``DEVICE_ID = "hex key"`` (16 to 64 bytes).
    """
    path: Path | None = None
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / "device-keys").exists():
        path = Path(directory) / "device-keys"
    elif environ.get("PANICD_DEVICE_KEYS_FILE"):
        path = Path(environ["PANICD_DEVICE_KEYS_FILE"])
    if path is None:
        return None, {}
    keys: dict[str, bytes] = {}
    for device_id, value in _read_toml(path).items():
        if not isinstance(value, str) or not _HEX_KEY.fullmatch(value):
            # Never echo the value: it is (or was meant to be) a secret.
            raise ConfigError(path, device_id, "key must be 32 to 128 hex digits")
        keys[device_id] = bytes.fromhex(value)
    return path, keys


def load_registry(
    path: Path, keys: Mapping[str, bytes], keys_path: Path | None
) -> tuple[dict[str, Device], dict[str, Gateway]]:
    """The device and gateway registry (devices.toml), joined with the device keys."""
    root = _Table(path, "", _read_toml(path))
    gateways: dict[str, Gateway] = {}
    for row in root.tables("gateway"):
        gateway_id = row.require("id", str)
        if not _DEVICE_ID.fullmatch(gateway_id):
            raise row.error("id", "must be letters, digits, '.', '_' or '-' (max 64)")
        if gateway_id in gateways:
            raise row.error("id", f"duplicate gateway id {gateway_id}")
        location = _fix(row, "location")
        if location is None:
            raise row.error("location", "is required")
        gateways[gateway_id] = Gateway(
            id=gateway_id, location=location, description=row.get("description", str, "")
        )
        row.check_unknown()
    devices: dict[str, Device] = {}
    external: dict[tuple[str, str], str] = {}
    for row in root.tables("device"):
        device_id = row.require("id", str)
        if not _DEVICE_ID.fullmatch(device_id):
            raise row.error("id", "must be letters, digits, '.', '_' or '-' (max 64)")
        if device_id in devices:
            raise row.error("id", f"duplicate device id {device_id}")
        mobile = row.get("mobile", bool, False)
        location = _fix(row, "location")
        if location is None and not mobile:
            raise row.error("location", "is required unless mobile = true")
        kode = row.get("kelurahan", str)
        if kode is not None and not _KODE.fullmatch(kode):
            raise row.error("kelurahan", "must be a kode like 35.77.01.1001")
        ext_raw = row.get("external_ids", dict, {})
        ext: dict[str, str] = {}
        for fmt, ref in ext_raw.items():
            if not isinstance(ref, str) or not ref:
                raise row.error(f"external_ids.{fmt}", "must be a non-empty string")
            if (fmt, ref) in external:
                raise row.error(f"external_ids.{fmt}", f"{ref} is already {external[fmt, ref]}")
            external[fmt, ref] = device_id
            ext[fmt] = ref
        heartbeat = row.integer("heartbeat_interval_s", 3600, 60, 7 * 86400)
        devices[device_id] = Device(
            id=device_id,
            hardware=row.require("hardware", str),
            key=keys.get(device_id),
            location=location,
            mobile=mobile,
            address=row.get("address", str, ""),
            landmark=row.get("landmark", str, ""),
            kelurahan_kode=kode,
            heartbeat_interval_s=heartbeat,
            external_ids=ext,
        )
        row.check_unknown()
    root.check_unknown()
    for device_id in keys:
        if device_id not in devices:
            where = keys_path or "device-keys"
            raise ConfigError(where, device_id, "key for an unregistered device")
    return devices, gateways


def _mqtt(row: _Table, environ: Mapping[str, str], base: Path) -> MqttSourceConfig:
    name = row.require("name", str)
    if not _NAME.fullmatch(name):
        raise row.error("name", "must be lowercase letters, digits and '-'")
    fmt = row.get("format", str, "native")
    topics = row.get("topics", list, ["panicd/v1/dev/+/up", "panicd/v1/gw/+/up"])
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise row.error("topics", "must be a non-empty array of topic filters")
    try:
        trust = Trust(row.get("trust", str, "signed" if fmt == "native" else "network"))
    except ValueError:
        raise row.error("trust", "must be 'signed' or 'network'") from None
    if fmt == "native" and trust is not Trust.SIGNED:
        raise row.error("trust", "native frames are always verified: use 'signed'")
    ca = row.get("ca_file", str)
    ca_file = (base / ca) if ca else None
    if ca_file is not None and not ca_file.exists():
        raise row.error("ca_file", f"{ca_file} does not exist")
    if fmt != "native" and fmt not in DECODERS:
        known = ", ".join(["native", *sorted(DECODERS)])
        raise row.error("format", f"unknown format {fmt!r} (known: {known})")
    options = row.get("format_options", dict, {})
    if fmt != "native":
        try:
            DECODERS[fmt](options)
        except OptionError as exc:
            raise row.error("format_options", str(exc)) from None
    elif options:
        raise row.error("format_options", "the native format takes no options")
    env_key = f"PANICD_MQTT_{name.upper().replace('-', '_')}_PASSWORD"
    password = _secret(env_key, f"mqtt-{name}-password", environ)
    if "password" in row.data:
        raise row.error("password", f"secrets do not belong in the config file: use {env_key}")
    low = row.number("reconnect_min_s", 0.5, 0.05, 60)
    username = row.get("username", str)
    # The shipped broker binds client ids to accounts (mosquitto.conf,
    # use_username_as_clientid): the session is the username's whatever id is sent, so the
    # id defaults to the username. Other brokers (TTN, a ChirpStack broker) may key
    # sessions by a client id of their own: an explicit client_id is kept as given.
    client_id = row.get("client_id", str, username)
    if client_id is None:
        raise row.error("client_id", "is required (or set username: it is the default)")
    preferred, *fallbacks = _brokers(row)
    cfg = MqttSourceConfig(
        name=name,
        host=preferred.host,
        port=preferred.port,
        client_id=client_id,
        topics=tuple(topics),
        format=fmt,
        trust=trust,
        keepalive_s=row.integer("keepalive_s", 30, 5, 3600),
        tls=row.get("tls", bool, False),
        ca_file=ca_file,
        username=username,
        password=password,
        reconnect_min_s=low,
        reconnect_max_s=row.number("reconnect_max_s", 30, low, 3600),
        format_options=dict(options),
        fallback_brokers=tuple(fallbacks),
    )
    row.check_unknown()
    return cfg


def _store(table: _Table, panicd: _Table, base: Path, environ: Mapping[str, str]) -> StoreUrl:
    """``[store] url``, or the old ``[panicd] database`` file path, or panicd.sqlite3."""
    url = table.get("url", str)
    old = panicd.alias("database", str)
    if "password" in table.data:
        raise table.error("password", f"secrets do not belong in the config file: "
                                      f"{WHERE_THE_PASSWORD_GOES}")
    table.check_unknown()
    if url is not None and old is not None:
        raise panicd.error("database", "set either [store] url or this, its old spelling, "
                                       "not both")
    if url is None:
        if old is not None and (not old or "://" in old):
            raise panicd.error("database", "must be a file path (a URL goes in [store] url)")
        return sqlite_url((base / (old or "panicd.sqlite3")).resolve())
    try:
        store = parse_store_url(url, base)
    except ValueError as exc:
        raise table.error("url", str(exc)) from None
    if store.backend == "sqlite":
        return store
    return store.with_password(_secret(PASSWORD_ENV, PASSWORD_CREDENTIAL, environ))


def _brokers(row: _Table) -> tuple[BrokerAddress, ...]:
    """``host``/``port`` (one broker), or ``brokers = ["host:port", …]`` (failover order)."""
    single = BrokerAddress(row.get("host", str, "127.0.0.1"), row.integer("port", 1883, 1, 65535))
    raw = row.get("brokers", list)
    if raw is None:
        return (single,)
    if "host" in row.data or "port" in row.data:
        raise row.error("brokers", "set either brokers or host/port, not both")
    if not raw:
        raise row.error("brokers", "must name at least one broker as \"host:port\"")
    brokers: list[BrokerAddress] = []
    for index, value in enumerate(raw):
        where = f"{row.key('brokers')}[{index}]"
        if not isinstance(value, str):
            raise ConfigError(row.file, where, "expected a string like \"mqtt1.example:1883\"")
        try:
            broker = parse_broker(value)
        except ValueError as exc:
            raise ConfigError(row.file, where, str(exc)) from None
        if broker in brokers:
            raise ConfigError(row.file, where, f"{broker} is listed twice")
        brokers.append(broker)
    return tuple(brokers)


def _serial(row: _Table) -> SerialSourceConfig:
    name = row.require("name", str)
    if not _NAME.fullmatch(name):
        raise row.error("name", "must be lowercase letters, digits and '-'")
    port = row.require("port", str)
    if not port:
        raise row.error("port", "must name a device, e.g. /dev/ttyUSB0")
    mode = row.require("mode", str)
    if mode not in SERIAL_MODES:
        raise row.error("mode", f"unknown mode {mode!r} (known: {', '.join(SERIAL_MODES)})")
    baud = row.integer("baud", 115200, 1200, 921600)
    if baud not in _BAUDS:
        raise row.error("baud", f"unsupported rate {baud} (use one of {sorted(_BAUDS)})")
    # Only our own signed frames travel over serial receivers: there is no network server
    # whose authentication could vouch for an unsigned one.
    if row.get("trust", str, "signed") != "signed":
        raise row.error("trust", "serial receivers carry only signed frames: use 'signed'")
    low = row.number("reconnect_min_s", 0.5, 0.05, 60)
    cfg = SerialSourceConfig(
        name=name,
        port=port,
        baud=baud,
        mode=mode,
        trust=Trust.SIGNED,
        reconnect_min_s=low,
        reconnect_max_s=row.number("reconnect_max_s", 30, low, 3600),
    )
    row.check_unknown()
    return cfg


_E164 = re.compile(r"\+[1-9]\d{6,14}")
_INSTANCE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _dispatch(table: _Table, base: Path) -> DispatchConfig | None:
    if not table.data:
        return None
    public = table.require("public_base_url", str).rstrip("/")
    if not public.startswith(("https://", "http://")):
        raise table.error("public_base_url", "must be an http(s) URL Twilio can reach")
    responders = base / table.get("responders", str, "responders.toml")
    policies = base / table.get("policies", str, "policies.toml")
    for key, file in (("responders", responders), ("policies", policies)):
        if not file.exists():
            raise table.error(key, f"{file} does not exist")
    from_number = table.get("from_number", str)
    if from_number is not None and not _E164.fullmatch(from_number):
        raise table.error("from_number", "must be an E.164 number like +62811...")
    cfg = DispatchConfig(
        responders_file=responders,
        policies_file=policies,
        public_base_url=public,
        listen_host=table.get("listen_host", str, "127.0.0.1"),
        listen_port=table.integer("listen_port", 8080, 0, 65535),
        control_socket=(
            base / table.get("control_socket", str, "/run/panicd/control.sock")
        ).resolve(),
        from_number=from_number,
        twilio_base_url=table.get("twilio_base_url", str, "https://api.twilio.com").rstrip("/"),
        ack_ttl_s=table.number("ack_link_ttl_s", 6 * 3600, 60, 7 * 86400),
        send_concurrency=table.integer("send_concurrency", 16, 1, 256),
        max_connections=table.integer("max_connections", 256, 8, 65536),
        header_timeout_s=table.number("header_timeout_s", 10, 0.5, 300),
        body_timeout_s=table.number("body_timeout_s", 10, 0.5, 300),
        fd_reserve=table.integer("fd_reserve", 128, 32, 65536),
        lease_s=table.number("lease_s", 30, 15, 3600),
    )
    table.check_unknown()
    return cfg


_HH_MM = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def _health(table: _Table) -> HealthConfig:
    at = table.get("daily_summary_at", str, "07:00")
    if not _HH_MM.fullmatch(at):
        raise table.error("daily_summary_at", "must be a local WIB time like \"07:00\"")
    cfg = HealthConfig(
        low_battery_percent=table.integer("low_battery_percent", 20, 1, 99),
        offline_grace_factor=table.number("offline_grace_factor", 1.5, 1, 10),
        source_down_alert_s=table.number("source_down_alert_s", 60, 1, 86400),
        daily_summary_at=at,
        check_every_s=table.number("check_every_s", 30, 1, 3600),
    )
    table.check_unknown()
    return cfg


def _networks(table: _Table, name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """An array of CIDR strings ("127.0.0.1/32", "10.0.0.0/8", "::1/128")."""
    raw = table.get(name, list, [])
    networks = []
    for index, value in enumerate(raw):
        where = f"{table.key(name)}[{index}]"
        if not isinstance(value, str):
            raise ConfigError(table.file, where, "expected a CIDR string like \"127.0.0.1/32\"")
        try:
            networks.append(ip_network(value, strict=True))
        except ValueError as exc:
            raise ConfigError(table.file, where, f"not a CIDR network: {exc}") from None
    return tuple(networks)


def _app(table: _Table, has_web: bool) -> AppConfig | None:
    if not table.data:
        return None
    if not has_web:
        raise table.error("enabled", "the app endpoint is served by the [dispatch] web server")
    enabled = table.get("enabled", bool, True)
    cfg = AppConfig(
        rate_per_minute=table.number("rate_per_minute", 30, 1, 6000),
        burst=table.integer("burst", 10, 1, 1000),
        commit_timeout_s=table.number("commit_timeout_s", 10, 1, 120),
        trusted_proxies=_networks(table, "trusted_proxies"),
    )
    table.check_unknown()
    return cfg if enabled else None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Load, validate and join the TOML file, the device registry and the device keys."""
    return _load(path, environ, set())


def config_keys(path: Path, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Every key of panicd.toml the loader asked for while loading ``path`` (``mqtt.port``).

    The loader asks for each key of every table present, set or not, so on a file that
    has every table this is the set of keys the loader knows.
    """
    asked: set[str] = set()
    _load(path, environ, asked)
    return frozenset(asked)


def _load(path: Path, environ: Mapping[str, str] | None, asked: set[str]) -> Config:
    env = os.environ if environ is None else environ
    path = path.resolve()
    base = path.parent
    root = _Table(path, "", _read_toml(path), asked)
    panicd = root.table("panicd")
    site = panicd.get("site", str, "Kota Madiun")
    # Below the unit's TimeoutStartSec=90, so a dead receiver cannot cause a restart loop.
    ready_timeout_s = panicd.number("ready_timeout_s", 60, 1, 3600)
    instance = panicd.get("instance", str, socket.gethostname())
    if not _INSTANCE.fullmatch(instance):
        raise panicd.error("instance", "must be 1-64 letters, digits or . _ : - "
                           "(unique among the instances on one store)")
    store = _store(root.table("store"), panicd, base, env)
    panicd.check_unknown()

    geo = root.table("geo")
    kelurahan_file = base / geo.get("kelurahan_file", str, "geo/kelurahan.geojson")
    if not kelurahan_file.exists():
        raise geo.error("kelurahan_file", f"{kelurahan_file} does not exist")
    nearest = geo.number("nearest_within_m", 150, 0, 5000)
    geo.check_unknown()

    ingest_t = root.table("ingest")
    ingest = IngestConfig(
        batch_max=ingest_t.integer("batch_max", 256, 1, 10_000),
        batch_window_ms=ingest_t.number("batch_window_ms", 0.0, 0, 1000),
        queue_max=ingest_t.integer("queue_max", 10_000, 1, 1_000_000),
        cancel_grace_s=ingest_t.number("cancel_grace_s", 120, 0, 86400),
        burst_urgent_presses=ingest_t.integer("burst_urgent_presses", 3, 2, 1000),
        drain_timeout_s=ingest_t.number("drain_timeout_s", 10, 0.1, 300),
    )
    ingest_t.check_unknown()

    devices_t = root.table("devices")
    devices_file = base / devices_t.get("registry", str, "devices.toml")
    if not devices_file.exists():
        # Name the key that points at it: the operator edits panicd.toml, not the registry.
        raise devices_t.error("registry", f"{devices_file} does not exist")
    devices_t.check_unknown()
    keys_path, keys = load_device_keys(env)
    devices, gateways = load_registry(devices_file, keys, keys_path)

    sources = tuple(_mqtt(row, env, base) for row in root.tables("mqtt"))
    names = [s.name for s in sources]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise ConfigError(path, f"mqtt[{index}].name", f"duplicate source name {name}")
    serial = tuple(_serial(row) for row in root.tables("serial"))
    for index, serial_source in enumerate(serial):
        if serial_source.name in names:
            where = f"serial[{index}].name"
            raise ConfigError(path, where, f"duplicate source name {serial_source.name}")
        names.append(serial_source.name)
    dispatch = _dispatch(root.table("dispatch"), base)
    app = _app(root.table("app"), dispatch is not None)
    health = _health(root.table("health"))
    root.check_unknown()
    return Config(
        path=path,
        site=site,
        instance=instance,
        ready_timeout_s=ready_timeout_s,
        store=store,
        kelurahan_file=kelurahan_file,
        nearest_within_m=nearest,
        devices_file=devices_file,
        devices=devices,
        gateways=gateways,
        ingest=ingest,
        mqtt=sources,
        serial=serial,
        dispatch=dispatch,
        app=app,
        health=health,
        external_index={
            (fmt, ref): device.id
            for device in devices.values()
            for fmt, ref in device.external_ids.items()
        },
    )


def unheard_devices(config: Config) -> list[str]:
    """Devices no frame of theirs can pass: no key (every signed frame is refused,
    dead letter ``no_key``) and no third-party id (no network-trusted frame names them).
    The one rule for panicd's start-up warning and ``check-config``'s."""
    return sorted(d.id for d in config.devices.values() if d.key is None and not d.external_ids)
