"""Configuration loading: the demo config, one-line file+key errors, secrets, device lookup."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.config import BrokerAddress, Config, load_config
from gateway.errors import WHOLE_FILE, ConfigError
from gateway.model import Frame, GeoFix, PressKind, Trust

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo"
GEO = ROOT / "config" / "geo" / "kelurahan.geojson"
KEY_A = "11" * 32
KEY_B = "22" * 32

BASE_MAIN = f"""
[geo]
kelurahan_file = "{GEO}"

[devices]
registry = "devices.toml"

[[mqtt]]
name = "local"
client_id = "panicd-test"
"""

BASE_DEVICES = """
[[gateway]]
id = "gw-1"
location = { lat = -7.6298, lon = 111.5239 }

[[device]]
id = "btn-1"
hardware = "esp32-wifi"
location = { lat = -7.62182, lon = 111.53096 }
kelurahan = "35.77.01.1001"

[[device]]
id = "zb-1"
hardware = "zigbee-button"
location = { lat = -7.62804, lon = 111.53908 }
external_ids = { zigbee2mqtt = "0x00158d0001", shelly = "shellybutton1-AABB" }
"""


def _write(
    tmp_path: Path,
    *,
    main: str = BASE_MAIN,
    devices: str = BASE_DEVICES,
    keys: str | None = None,
) -> Path:
    (tmp_path / "devices.toml").write_text(devices, encoding="utf-8")
    if keys is not None:
        (tmp_path / "keys.toml").write_text(keys, encoding="utf-8")
    path = tmp_path / "panicd.toml"
    path.write_text(main, encoding="utf-8")
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"PANICD_DEVICE_KEYS_FILE": str(tmp_path / "keys.toml")}
    env.update(extra)
    return env


def _error(path: Path, environ: Mapping[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)
    message = str(caught.value)
    assert "\n" not in message, message
    return caught.value


def _assert_names(error: ConfigError, file: Path, key: str) -> None:
    assert error.file == str(file.resolve())
    assert error.key == key
    assert str(error).startswith(f"{file.resolve()}: {key}: ")


def _assert_whole_file(error: ConfigError, file: Path, problem: str) -> None:
    """A problem with the file itself reads "file: problem", with no key placeholder."""
    assert (error.file, error.key) == (str(file.resolve()), WHOLE_FILE)
    assert str(error).startswith(f"{file.resolve()}: {problem}")


# --- the demo config ------------------------------------------------------------------


def _demo() -> Config:
    return load_config(
        DEMO / "panicd.toml", {"PANICD_DEVICE_KEYS_FILE": str(DEMO / "device-keys.toml")}
    )


def test_demo_config_loads_every_device_with_its_key() -> None:
    config = _demo()
    assert config.site == "Kota Madiun (demo)"
    assert len(config.devices) == 10
    assert all(
        device.key is not None and len(device.key) == 32 for device in config.devices.values()
    )
    assert config.database.resolve() == ROOT / "var" / "demo" / "panicd.sqlite3"
    assert config.kelurahan_file.resolve() == GEO
    assert config.nearest_within_m == 150.0
    assert config.ingest.cancel_grace_s == 120.0
    assert config.ingest.burst_urgent_presses == 3


def test_demo_config_reads_fixed_and_mobile_devices() -> None:
    config = _demo()
    fixed = config.devices["MDN-OOO-0001"]
    assert fixed.location == GeoFix(lat=-7.62182, lon=111.53096)
    assert not fixed.mobile
    assert fixed.landmark == "Pos kamling RW 02"
    mobile = config.devices["MDN-MOB-0001"]
    assert mobile.mobile
    assert mobile.location is None
    assert config.devices["MDN-KLN-0001"].heartbeat_interval_s == 21600
    assert config.gateways["gw-balaikota"].location == GeoFix(lat=-7.6298, lon=111.5239)


def test_demo_config_has_one_native_signed_mqtt_source() -> None:
    (source,) = _demo().mqtt
    assert (source.name, source.host, source.port, source.client_id) == (
        "local",
        "127.0.0.1",
        18830,
        "panicd-demo",
    )
    assert source.format == "native"
    assert source.trust is Trust.SIGNED
    assert source.topics == ("panicd/v1/dev/+/up", "panicd/v1/gw/+/up")
    assert source.password is None


def test_demo_without_keys_file_loads_devices_without_keys() -> None:
    config = load_config(DEMO / "panicd.toml", {})
    assert all(device.key is None for device in config.devices.values())


# --- one line with file and key per error ---------------------------------------------


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    error = _error(tmp_path / "absent.toml", {})
    _assert_whole_file(error, tmp_path / "absent.toml", "file not found")


def test_missing_registry_file_names_the_key_that_points_to_it(tmp_path: Path) -> None:
    path = _write(tmp_path, main=BASE_MAIN.replace("devices.toml", "nope.toml"))
    error = _error(path, {})
    _assert_names(error, path, "devices.registry")
    assert error.problem == f"{tmp_path.resolve() / 'nope.toml'} does not exist"


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, main=BASE_MAIN + "\n[[mqtt]\nname = 'x'\n")
    error = _error(path, {})
    _assert_whole_file(error, path, "not valid TOML")


@pytest.mark.parametrize(
    ("mqtt_extra", "key", "problem"),
    [
        ("port = 18830.5", "mqtt[0].port", "expected an integer, got 18830.5"),
        ("port = 18830.0", "mqtt[0].port", "expected an integer, got 18830.0"),
        ("port = 'x'", "mqtt[0].port", "expected an integer, got str"),
        ("keepalive_s = 30.5", "mqtt[0].keepalive_s", "expected an integer, got 30.5"),
    ],
)
def test_a_float_where_an_integer_belongs_is_refused(
    tmp_path: Path, mqtt_extra: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, main=BASE_MAIN + mqtt_extra + "\n")
    error = _error(path, {})
    _assert_names(error, path, key)
    assert error.problem == problem


def test_an_integer_in_range_is_kept_as_an_int(tmp_path: Path) -> None:
    (source,) = load_config(_write(tmp_path, main=BASE_MAIN + "port = 18830\n"), {}).mqtt
    assert source.port == 18830
    assert type(source.port) is int


@pytest.mark.parametrize(
    ("addition", "key", "problem"),
    [
        ("topcis = []", "mqtt[0].topcis", "unknown key (did you mean 'topics'?)"),
        ("[ingest]\nbatch_maxx = 5", "ingest.batch_maxx",
         "unknown key (did you mean 'batch_max'?)"),
        ("[healht]\n", "healht", "unknown key (did you mean 'health'?)"),
    ],
)
def test_an_unknown_key_suggests_the_nearest_known_key(
    tmp_path: Path, addition: str, key: str, problem: str
) -> None:
    # Tables after [[mqtt]] would belong to it; [ingest] and [healht] are put first.
    main = BASE_MAIN + addition + "\n" if addition.startswith("topcis") else addition + BASE_MAIN
    path = _write(tmp_path, main=main)
    error = _error(path, {})
    _assert_names(error, path, key)
    assert error.problem == problem


def test_an_unknown_key_far_from_any_lists_the_known_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, main="[panicd]\nzzzz = 1\n" + BASE_MAIN)
    error = _error(path, {})
    _assert_names(error, path, "panicd.zzzz")
    assert error.problem == (
        "unknown key (expected one of: database, instance, ready_timeout_s, site)"
    )


@pytest.mark.parametrize(
    ("addition", "key", "problem"),
    [
        ("[ingest]\nbatch_maxx = 5\n", "ingest.batch_maxx", "unknown key"),
        ("[ingest]\nbatch_max = 'many'\n", "ingest.batch_max", "got str"),
        ("[ingest]\nqueue_max = true\n", "ingest.queue_max", "got a boolean"),
        ("[ingest]\nburst_urgent_presses = 1\n", "ingest.burst_urgent_presses", "between 2"),
        ("[ingest]\ncancel_grace_s = nan\n", "ingest.cancel_grace_s", "between"),
        ("[geo2]\nx = 1\n", "geo2", "unknown key"),
        ("[panicd]\nsite = 5\n", "panicd.site", "expected a string"),
        ("ingest = 5\n", "ingest", "expected a table"),
    ],
)
def test_bad_value_in_main_file_names_its_key(
    tmp_path: Path, addition: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, main=addition + BASE_MAIN)
    error = _error(path, {})
    _assert_names(error, path, key)
    assert problem in error.problem


def test_missing_kelurahan_file_names_geo_key(tmp_path: Path) -> None:
    path = _write(tmp_path, main=BASE_MAIN.replace(str(GEO), "absent.geojson"))
    error = _error(path, {})
    _assert_names(error, path, "geo.kelurahan_file")


@pytest.mark.parametrize(
    ("mqtt_extra", "key", "problem"),
    [
        ("port = 70000", "mqtt[0].port", "between 1 and 65535"),
        ("port = true", "mqtt[0].port", "boolean"),
        ("topics = []", "mqtt[0].topics", "non-empty"),
        ("trust = 'network'", "mqtt[0].trust", "always verified"),
        ("trust = 'maybe'", "mqtt[0].trust", "'signed' or 'network'"),
        ("format = 'bogus'", "mqtt[0].format", "unknown format 'bogus'"),
        ("format = 'zigbee2mqtt'\nformat_options = { nonsense = 1 }", "mqtt[0].format_options", ""),
        ("format_options = { base_topic = 'x' }", "mqtt[0].format_options", "native"),
        ("format = 'chirpstack'\n"
         "format_options = { mapping = [ { field = 'sos', panik = [true] } ] }",
         "mqtt[0].format_options", "unknown key(s) panik"),
        ("ca_file = 'absent.pem'", "mqtt[0].ca_file", "does not exist"),
        ("clientid = 'x'", "mqtt[0].clientid", "unknown key"),
        ("reconnect_min_s = 10\nreconnect_max_s = 5", "mqtt[0].reconnect_max_s", "between"),
    ],
)
def test_bad_mqtt_source_names_its_key(
    tmp_path: Path, mqtt_extra: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, main=BASE_MAIN + mqtt_extra + "\n")
    error = _error(path, {})
    _assert_names(error, path, key)
    assert problem in error.problem


def test_mqtt_source_without_client_id_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, main=BASE_MAIN.replace('client_id = "panicd-test"\n', ""))
    _assert_names(_error(path, {}), path, "mqtt[0].client_id")


def test_mqtt_client_id_defaults_to_the_username_the_broker_binds_it_to(tmp_path: Path) -> None:
    main = BASE_MAIN.replace('client_id = "panicd-test"\n', 'username = "panicd"\n')
    (source,) = load_config(_write(tmp_path, main=main), {}).mqtt
    assert (source.username, source.client_id) == ("panicd", "panicd")


def test_a_source_without_brokers_has_its_host_and_port_as_its_only_broker(
    tmp_path: Path,
) -> None:
    main = BASE_MAIN + 'host = "mqtt.local"\nport = 18830\n'
    (source,) = load_config(_write(tmp_path, main=main), {}).mqtt
    assert source.brokers == (BrokerAddress("mqtt.local", 18830),)
    assert source.fallback_brokers == ()


def test_brokers_are_read_in_failover_order_the_first_preferred(tmp_path: Path) -> None:
    main = BASE_MAIN + 'brokers = ["mqtt1.local:1883", "10.0.0.2:18830", "[::1]:1884"]\n'
    (source,) = load_config(_write(tmp_path, main=main), {}).mqtt
    assert source.brokers == (
        BrokerAddress("mqtt1.local", 1883),
        BrokerAddress("10.0.0.2", 18830),
        BrokerAddress("::1", 1884),
    )
    assert (source.host, source.port) == ("mqtt1.local", 1883)
    assert [str(broker) for broker in source.brokers] == [
        "mqtt1.local:1883", "10.0.0.2:18830", "[::1]:1884"
    ]


@pytest.mark.parametrize("single", ['host = "mqtt.local"', "port = 1883"])
def test_brokers_and_host_or_port_together_are_refused(tmp_path: Path, single: str) -> None:
    path = _write(tmp_path, main=BASE_MAIN + f'{single}\nbrokers = ["a.local:1883"]\n')
    error = _error(path, {})
    _assert_names(error, path, "mqtt[0].brokers")
    assert error.problem == "set either brokers or host/port, not both"
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("value", "key", "problem"),
    [
        ("[]", "mqtt[0].brokers", "at least one broker"),
        ('"a.local:1883"', "mqtt[0].brokers", "expected an array"),
        ('["a.local"]', "mqtt[0].brokers[0]", "is not host:port"),
        ('["a.local:1883", "b.local:"]', "mqtt[0].brokers[1]", "is not host:port"),
        ('["a.local:http"]', "mqtt[0].brokers[0]", "is not host:port"),
        ('["a.local:70000"]', "mqtt[0].brokers[0]", "between 1 and 65535"),
        ('["a.local:0"]', "mqtt[0].brokers[0]", "between 1 and 65535"),
        ('["::1:1883"]', "mqtt[0].brokers[0]", "IPv6 address goes in brackets"),
        ('["[::g]:1883"]', "mqtt[0].brokers[0]", "is not an IPv6 address"),
        ('[":1883"]', "mqtt[0].brokers[0]", "is not a host name"),
        ('["a b:1883"]', "mqtt[0].brokers[0]", "is not a host name"),
        ("[1883]", "mqtt[0].brokers[0]", "expected a string"),
        ('["a.local:1883", "a.local:1883"]', "mqtt[0].brokers[1]", "a.local:1883 is listed twice"),
    ],
)
def test_a_bad_broker_address_names_the_file_and_key(
    tmp_path: Path, value: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, main=BASE_MAIN + f"brokers = {value}\n")
    error = _error(path, {})
    _assert_names(error, path, key)
    assert problem in error.problem


def test_password_in_toml_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = _write(tmp_path, main=BASE_MAIN + 'password = "hunter2-secret"\n')
    error = _error(path, {})
    _assert_names(error, path, "mqtt[0].password")
    assert "hunter2-secret" not in str(error)
    assert "PANICD_MQTT_LOCAL_PASSWORD" in str(error)


def test_duplicate_source_name_is_refused(tmp_path: Path) -> None:
    second = '\n[[mqtt]]\nname = "local"\nclient_id = "other"\n'
    path = _write(tmp_path, main=BASE_MAIN + second)
    error = _error(path, {})
    _assert_names(error, path, "mqtt[1].name")
    assert "duplicate source name local" in error.problem


@pytest.mark.parametrize(
    ("devices", "key", "problem"),
    [
        (
            BASE_DEVICES + '[[device]]\nid = "btn-1"\nhardware = "x"\nmobile = true\n',
            "device[2].id",
            "duplicate device id btn-1",
        ),
        ('[[device]]\nid = "btn-2"\nhardware = "x"\n', "device[0].location", "unless mobile"),
        (
            '[[device]]\nid = "btn-2"\nhardware = "x"\nmobile = true\nkelurahan = "3577011001"\n',
            "device[0].kelurahan",
            "kode",
        ),
        ('[[device]]\nid = "bad id"\nhardware = "x"\nmobile = true\n', "device[0].id", "letters"),
        ('[[device]]\nid = "btn-2"\nmobile = true\n', "device[0].hardware", "is required"),
        (
            '[[device]]\nid = "btn-2"\nhardware = "x"\nlocation = { lat = 91, lon = 0 }\n',
            "device[0].location.lat",
            "between -90 and 90",
        ),
        (
            '[[device]]\nid = "btn-2"\nhardware = "x"\nlocation = { lat = 1, lon = 1, alt = 3 }\n',
            "device[0].location.alt",
            "unknown key",
        ),
        (
            '[[device]]\nid = "btn-2"\nhardware = "x"\nmobile = true\nheartbeat_interval_s = 10\n',
            "device[0].heartbeat_interval_s",
            "between 60",
        ),
        (
            BASE_DEVICES
            + '[[device]]\nid = "zb-2"\nhardware = "x"\nmobile = true\n'
            + 'external_ids = { zigbee2mqtt = "0x00158d0001" }\n',
            "device[2].external_ids.zigbee2mqtt",
            "already zb-1",
        ),
        ('[[gateway]]\nid = "gw-1"\n', "gateway[0].location", "is required"),
        ("device = 3\n", "device", "expected an array"),
        ("device = [3]\n", "device[0]", "expected a table"),
    ],
)
def test_bad_registry_row_names_the_registry_file_and_row(
    tmp_path: Path, devices: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, devices=devices)
    error = _error(path, {})
    _assert_names(error, tmp_path / "devices.toml", key)
    assert problem in error.problem


def test_key_for_unregistered_device_names_the_keys_file(tmp_path: Path) -> None:
    path = _write(tmp_path, keys=f'btn-1 = "{KEY_A}"\nghost-9 = "{KEY_B}"\n')
    error = _error(path, _env(tmp_path))
    _assert_names(error, tmp_path / "keys.toml", "ghost-9")
    assert "unregistered" in error.problem


@pytest.mark.parametrize(
    "bad_value",
    ["zz" * 32, "ab" * 15, "ab" * 65, "abc" * 11, "s3cret-passphrase-not-hex-000000"],
)
def test_bad_hex_key_is_refused_without_echoing_the_value(tmp_path: Path, bad_value: str) -> None:
    path = _write(tmp_path, keys=f'btn-1 = "{bad_value}"\n')
    error = _error(path, _env(tmp_path))
    _assert_names(error, tmp_path / "keys.toml", "btn-1")
    assert bad_value not in str(error)
    assert bad_value not in repr(error)


def test_non_string_key_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, keys="btn-1 = 1234\n")
    _assert_names(_error(path, _env(tmp_path)), tmp_path / "keys.toml", "btn-1")


def test_keys_are_decoded_from_hex_in_either_case(tmp_path: Path) -> None:
    path = _write(tmp_path, keys=f'btn-1 = "{"AB" * 16}"\nzb-1 = "{KEY_B}"\n')
    config = load_config(path, _env(tmp_path))
    assert config.devices["btn-1"].key == b"\xab" * 16
    assert config.devices["zb-1"].key == bytes.fromhex(KEY_B)


# --- secrets: credentials win over the environment ------------------------------------


def test_device_keys_credential_wins_over_the_environment_file(tmp_path: Path) -> None:
    path = _write(tmp_path, keys=f'btn-1 = "{KEY_A}"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "device-keys").write_text(f'btn-1 = "{KEY_B}"\n', encoding="utf-8")
    config = load_config(path, _env(tmp_path, CREDENTIALS_DIRECTORY=str(creds)))
    assert config.devices["btn-1"].key == bytes.fromhex(KEY_B)


def test_keys_file_from_environment_is_used_when_credentials_lack_device_keys(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, keys=f'btn-1 = "{KEY_A}"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    config = load_config(path, _env(tmp_path, CREDENTIALS_DIRECTORY=str(creds)))
    assert config.devices["btn-1"].key == bytes.fromhex(KEY_A)


def test_bad_key_in_credential_names_the_credential_file(tmp_path: Path) -> None:
    path = _write(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "device-keys").write_text('btn-1 = "not-a-key"\n', encoding="utf-8")
    error = _error(path, {"CREDENTIALS_DIRECTORY": str(creds)})
    _assert_names(error, creds / "device-keys", "btn-1")
    assert "not-a-key" not in str(error)


def test_mqtt_password_credential_wins_over_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-local-password").write_text("from-credential\n", encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "PANICD_MQTT_LOCAL_PASSWORD": "from-env"}
    (source,) = load_config(path, env).mqtt
    assert source.password == "from-credential"
    assert "from-credential" not in repr(source)


def test_mqtt_password_comes_from_the_environment_without_credential(tmp_path: Path) -> None:
    path = _write(tmp_path, main=BASE_MAIN.replace('"local"', '"city-broker"'))
    env = {"PANICD_MQTT_CITY_BROKER_PASSWORD": "from-env"}
    (source,) = load_config(path, env).mqtt
    assert source.password == "from-env"


def test_empty_password_variable_means_no_password(tmp_path: Path) -> None:
    (source,) = load_config(_write(tmp_path), {"PANICD_MQTT_LOCAL_PASSWORD": ""}).mqtt
    assert source.password is None


# --- device_for -----------------------------------------------------------------------


def _frame(fmt: str, ref: str, *, tag: bytes | None = None) -> Frame:
    return Frame(format=fmt, device_ref=ref, kind=PressKind.PANIC, counter=1, tag=tag)


def test_native_and_lora_frames_map_by_registry_id(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), {})
    device = config.device_for(_frame("native", "btn-1"))
    assert device is not None
    assert device.id == "btn-1"
    lora = config.device_for(_frame("lora-frame", "zb-1"))
    assert lora is not None
    assert lora.id == "zb-1"
    assert config.device_for(_frame("native", "ghost")) is None


def test_third_party_frame_maps_by_external_id_only(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), {})
    device = config.device_for(_frame("zigbee2mqtt", "0x00158d0001"))
    assert device is not None
    assert device.id == "zb-1"
    shelly = config.device_for(_frame("shelly", "shellybutton1-AABB"))
    assert shelly is not None
    assert shelly.id == "zb-1"
    # The external id belongs to one format: another network's name does not match.
    assert config.device_for(_frame("tasmota", "0x00158d0001")) is None
    assert config.external_index[("zigbee2mqtt", "0x00158d0001")] == "zb-1"


def test_third_party_frame_naming_a_registry_id_without_tag_is_not_mapped(
    tmp_path: Path,
) -> None:
    config = load_config(_write(tmp_path), {})
    assert config.device_for(_frame("zigbee2mqtt", "btn-1")) is None
    assert config.device_for(_frame("shelly", "zb-1")) is None


def test_third_party_frame_carrying_our_tag_maps_by_registry_id(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path), {})
    device = config.device_for(_frame("chirpstack", "btn-1", tag=b"\x00" * 8))
    assert device is not None
    assert device.id == "btn-1"


# --- [app] ------------------------------------------------------------------------------

APP_MAIN = BASE_MAIN + f"""
[dispatch]
responders = "{DEMO / "responders.toml"}"
policies = "{DEMO / "policies.toml"}"
public_base_url = "https://panicd.example"

[app]
"""


def test_app_trusted_proxies_are_cidr_networks(tmp_path: Path) -> None:
    main = APP_MAIN + 'trusted_proxies = ["127.0.0.1/32", "10.20.0.0/16", "::1/128"]\n'
    app = load_config(_write(tmp_path, main=main), {}).app
    assert app is not None
    assert [str(net) for net in app.trusted_proxies] == ["127.0.0.1/32", "10.20.0.0/16",
                                                          "::1/128"]


def test_app_trusts_no_proxy_unless_configured(tmp_path: Path) -> None:
    app = load_config(_write(tmp_path, main=APP_MAIN + "burst = 10\n"), {}).app
    assert app is not None
    assert app.trusted_proxies == ()


@pytest.mark.parametrize(
    ("value", "key", "problem"),
    [
        ('["10.0.0.1/8"]', "app.trusted_proxies[0]", "host bits set"),
        ('["127.0.0.1/32", "proxy.local"]', "app.trusted_proxies[1]", "not a CIDR network"),
        ("[32]", "app.trusted_proxies[0]", "expected a CIDR string"),
        ('"127.0.0.1/32"', "app.trusted_proxies", "expected an array"),
    ],
)
def test_a_bad_trusted_proxy_names_the_file_and_key(
    tmp_path: Path, value: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, main=APP_MAIN + f"trusted_proxies = {value}\n")
    error = _error(path, {})
    _assert_names(error, path, key)
    assert problem in error.problem
